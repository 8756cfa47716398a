"""FedBN (PFLlib semantics): every BatchNorm layer's parameters and every buffer stay with the client, every other
parameter is averaged; exact resumption on a VGG."""

from __future__ import annotations

import torch
from torch import nn

from _tiny import aggregation_context, uniform
from pfl.algorithms.fedbn import FedBN, shared_keys
from pfl.federated.local import FitRes
from pfl.federated.state import param_keys
from pfl.models import ModelSpec, build_model
from pfl.models.split import SplitModel

BATCHNORM_APART = {"base.1.weight": 100.0, "base.1.bias": 100.0}  # uniform() offsets of the BatchNorm's affine entries


def _algo(num_clients: int = 3) -> FedBN:
    # base: Linear(1, 1) + BatchNorm1d(1); head: Linear(1, 2)
    return FedBN(aggregation_context(SplitModel(nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)), nn.Linear(1, 2)),
                                     num_clients))


def test_aggregate_averages_all_but_batchnorm():
    algo = _algo()
    like = algo.ctx.init_state(0)
    assert algo.shared_keys == ["base.0.weight", "base.0.bias", "head.weight", "head.bias"]
    # float entries v (+ 100 for BatchNorm's weight and bias), the counter int(v)
    s0, s2 = uniform(like, 2.0, BATCHNORM_APART), uniform(like, 6.0, BATCHNORM_APART)
    algo.aggregate_fit(1, [FitRes(0, s0, 3, torch.tensor(0.0)), FitRes(2, s2, 1, torch.tensor(0.0))])
    avg = (2.0 * 3 + 6.0 * 1) / 4  # 3.0, sample-weighted
    for cid, own in ((0, 2.0), (2, 6.0)):
        p = algo.personalized_state(cid)
        assert list(p) == list(like)
        for k in algo.shared_keys:
            assert torch.equal(p[k], torch.full_like(like[k], avg)), (cid, k)
        assert p["base.1.weight"].item() == p["base.1.bias"].item() == own + 100  # BatchNorm affine: own
        assert p["base.1.running_mean"].item() == p["base.1.running_var"].item() == own  # buffers: own
        assert p["base.1.num_batches_tracked"].item() == int(own)
    p1 = algo.personalized_state(1)  # never sampled: the initial BatchNorm, the averaged rest
    for k in like:
        assert torch.equal(p1[k], torch.full_like(like[k], avg) if k in algo.shared_keys else like[k]), k
    assert algo.upload(FitRes(0, s0, 3, torch.tensor(0.0))).keys() == set(algo.shared_keys)
    ins = algo.configure_fit(0, 2)
    assert ins.state["base.1.bias"].item() == 102.0 and set(ins.sent) == set(algo.shared_keys)


def test_every_batchnorm_of_vgg_and_resnet_stays_personal():
    for name in ("vgg11", "resnet20"):
        model = build_model(ModelSpec(name, 10, width=0.125))
        bn = {f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, nn.BatchNorm2d)
              for p in ("weight", "bias")}
        assert bn and set(shared_keys(model)) == set(param_keys(model)) - bn, name
    cnn = build_model(ModelSpec("cnn", 10))  # no BatchNorm: every parameter is shared (FedAvg)
    assert shared_keys(cnn) == param_keys(cnn)
