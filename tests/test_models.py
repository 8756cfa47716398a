"""Model factory: the CNN sized to its input, ResNet-18 split into base + head."""

from __future__ import annotations

import pytest
import torch

from pfl._torchvision import import_torchvision
from pfl.models import CNN, ModelSpec, ResNet18, build_model

# positions in ResNet18.base -> torchvision's ResNet-18 module names
_RESNET_BASE = {0: "conv1", 1: "bn1", 4: "layer1", 5: "layer2", 6: "layer3", 7: "layer4"}


@pytest.mark.parametrize(("image_size", "features"), [(32, 64 * 5 * 5), (64, 64 * 13 * 13)])
def test_cnn_fc_input_follows_image_size(image_size, features):
    model = build_model(ModelSpec("cnn", num_classes=7, image_size=image_size))
    assert model.head[0].in_features == features  # 1600 for CIFAR, 10816 for Tiny-ImageNet
    x = torch.zeros(2, 3, image_size, image_size)
    assert model.base(x).shape == (2, features)
    assert model(x).shape == (2, 7)


def _unsplit_name(key: str) -> str:
    if key.startswith("head."):
        return "fc." + key.removeprefix("head.")
    _, index, rest = key.split(".", 2)
    return f"{_RESNET_BASE[int(index)]}.{rest}"


def _unsplit_copy(split: ResNet18, num_classes: int) -> torch.nn.Module:
    reference = import_torchvision().models.resnet18(num_classes=num_classes)
    # strict loading: every key of the unsplit model must be matched by exactly the split one's
    reference.load_state_dict({_unsplit_name(k): v for k, v in split.state_dict().items()})
    return reference


def test_cnn_pooling_before_relu_equals_pfllibs_order_exactly():
    torch.manual_seed(0)
    ours = CNN(10)
    convs = [ours.base[0], ours.base[3]]
    pfllib = torch.nn.Sequential(convs[0], torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                 convs[1], torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(), ours.head)
    x = torch.randn(6, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    grads = []
    for net in (ours, pfllib):
        net.zero_grad()
        out = net(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        grads.append([out.detach(), *[p.grad.clone() for p in ours.parameters()]])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert grads[0][1].abs().sum() > 0  # the first conv's weight gradient is not trivially zero


@pytest.mark.parametrize("image_size", [32, 64])
def test_resnet18_split_gives_the_unsplit_logits(image_size):
    torch.manual_seed(0)
    split = build_model(ModelSpec("resnet18", num_classes=200, image_size=image_size))
    assert isinstance(split.head, torch.nn.Linear) and split.head.in_features == 512
    reference = _unsplit_copy(split, 200)
    split.eval(), reference.eval()
    x = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        assert split.base(x).shape == (3, 512)
        assert torch.allclose(split(x), reference(x), atol=1e-5)


def test_resnet18_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="in_channels=1"):
        build_model(ModelSpec("resnet18", num_classes=10, in_channels=1))


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model(ModelSpec("vgg", num_classes=10))


def test_a_specs_normalization_round_trips_and_old_flexifed_specs_read_back_pfllibs():
    """New specs carry the inputs' normalization; a VGG / CIFAR ResNet spec saved before the field existed was
    trained with PFLlib's 0.5 / 0.5 (FlexiFed's CIFAR-10 statistics came later), and reads back with it."""
    from pfl.models import ModelSpec, input_normalization

    new = ModelSpec("vgg11", 10, normalization=input_normalization("vgg11"))
    assert ModelSpec.from_dict(new.to_dict()) == new
    assert new.normalization == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.201))
    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert ModelSpec.from_dict({"name": "resnet20", "num_classes": 10}).normalization == half
    assert ModelSpec.from_dict({"name": "cnn", "num_classes": 10}).normalization is None  # input_normalization's
