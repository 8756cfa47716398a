"""MocoSFL's ResNet-18: weight standardization, the cut layers' shapes, no BatchNorm, the MLP's initialization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pfl.models.resnet_sfl import MocoSFLResNet18, WSConv2d, client_entries, split


def test_weight_standardization_against_the_formula():
    torch.manual_seed(0)
    conv = WSConv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 8, 8)
    w = conv.weight.detach()
    flat = w.reshape(4, -1)
    standardized = ((flat - flat.mean(1, keepdim=True)) / (flat.std(1, keepdim=True) + 1e-5)).view_as(w)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, standardized, padding=1))


@pytest.mark.parametrize("cut", [1, 2])
def test_cut_layers_send_64x32x32_and_compose_to_the_whole_network(cut):
    torch.manual_seed(0)
    model = MocoSFLResNet18()
    client, server = split(model, cut)
    x = torch.randn(2, 3, 32, 32)
    smashed = client(x)
    assert smashed.shape == (2, 64, 32, 32)
    torch.testing.assert_close(server(smashed), model(x))
    assert model(x).shape == (2, 1024) and model.base(x).shape == (2, 512)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    names = list(model.state_dict())
    held = client_entries(names, cut)
    assert set(held) == {f"base.{k}" for k in client.state_dict()} and len(held) < len(names)
    assert all(torch.all(m.bias == 0) for m in model.head if isinstance(m, nn.Linear))


def test_other_cut_layers_are_one_line_errors():
    with pytest.raises(ValueError, match="cut_layer=3"):
        split(MocoSFLResNet18(), 3)
