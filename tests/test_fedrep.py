"""FedRep (PFLlib semantics): the final Linear stays personal, the rest is averaged; the local update trains the head
first with the representation frozen, then the representation with the head frozen; exact resumption."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import check_exact_resumption
from pfl.algorithms.fedrep import FedRep, RepresentationSGD
from pfl.federated.partial import personal_layer
from pfl.data.loader import ClientData
from pfl.federated.base import FederatedContext
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import model_state
from pfl.models import ModelSpec, build_model
from pfl.models.split import SplitModel

_SPEC = ModelSpec("tiny", num_classes=2)


def _model() -> SplitModel:
    # base: Linear(1, 1) + BatchNorm1d(1); head: Linear(1, 1), ReLU, Linear(1, 2) (the personal layer is head.2)
    return SplitModel(nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)),
                      nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)))


def _algo(num_clients: int = 3) -> FedRep:
    model = _model()
    idx = torch.arange(4)
    clients = [ClientData(fit=idx[:2], val=idx[2:2], test=idx[2:]) for _ in range(num_clients)]
    ctx = FederatedContext(clients=clients, specs=[_SPEC] * num_clients, runner=SimpleNamespace(models={_SPEC: model}),
                           update=None, init_states={_SPEC: model_state(model)}, num_join_clients=2, seed=0)
    return FedRep(ctx)


def _state(like: dict, v: float) -> dict:
    """Every float entry filled with v (+ 0.5 for the personal layer's), the counter with int(v)."""
    return {k: (torch.full_like(t, v + (0.5 if k.startswith("head.2.") else 0.0)) if t.is_floating_point()
                else torch.full_like(t, int(v))) for k, t in like.items()}


def test_personal_layer_is_pfllibs_model_fc():
    assert personal_layer(build_model(ModelSpec("cnn", 10))) == "head.2"
    assert personal_layer(build_model(ModelSpec("resnet20", 10, width=0.125))) == "head"
    assert personal_layer(build_model(ModelSpec("vgg11", 10, width=0.125))) == "head.4"


def test_aggregate_averages_the_representation_and_keeps_heads_and_buffers():
    algo = _algo()
    like = algo.ctx.init_state(0)
    assert algo.shared_keys == ["base.0.weight", "base.0.bias", "base.1.weight", "base.1.bias",
                           "head.0.weight", "head.0.bias"]  # parameters only, outside head.2
    s0, s1 = _state(like, 1.0), _state(like, 4.0)
    algo.aggregate_fit(1, [FitRes(0, s0, 1, torch.tensor(0.0)), FitRes(2, s1, 3, torch.tensor(0.0))])
    shared_avg = (1.0 * 1 + 4.0 * 3) / 4  # 3.25, sample-weighted
    for cid, own in ((0, 1.0), (2, 4.0)):
        p = algo.personalized_state(cid)
        assert list(p) == list(like)  # every entry, in state-dict order
        for k in algo.shared_keys:
            assert torch.equal(p[k], torch.full_like(like[k], shared_avg)), (cid, k)
        for k in ("head.2.weight", "head.2.bias"):  # the personal Linear
            assert torch.equal(p[k], torch.full_like(like[k], own + 0.5)), (cid, k)
        for k in ("base.1.running_mean", "base.1.running_var"):  # buffers: the client's own
            assert torch.equal(p[k], torch.full_like(like[k], own)), (cid, k)
        assert p["base.1.num_batches_tracked"].item() == int(own)
    p1 = algo.personalized_state(1)  # never sampled: initial head and buffers, the new representation
    for k in like:
        expected = torch.full_like(like[k], shared_avg) if k in algo.shared_keys else like[k]
        assert torch.equal(p1[k], expected), k
    assert algo.upload(FitRes(0, s0, 1, torch.tensor(0.0))).keys() == set(algo.shared_keys)
    ins = algo.configure_fit(2, 2)
    assert torch.equal(ins.state["head.2.bias"], torch.full((2,), 4.5)) and set(ins.sent) == set(algo.shared_keys)


class _Data(SimpleNamespace):
    def batch(self, idx, gen=None):
        return self.x[idx], self.y[idx]


def test_local_update_trains_the_head_then_the_representation():
    """One sample, batch 1, lr 1, plocal_epochs=1, local_epochs=1 on f(x) = w2 * (w1 * x) (no biases trained,
    squared loss): phase 1 moves w2 alone, phase 2 moves w1 alone, with the gradient at the updated w2."""
    torch.manual_seed(0)
    model = SplitModel(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model.base.weight.fill_(2.0)
        model.head.weight.fill_(3.0)
    data = _Data(x=torch.tensor([[1.0]]), y=torch.tensor([[0.0]]), device=torch.device("cpu"))
    run = SGDUpdate(batch_size=1, lr=1.0, local_epochs=1, loss_fn=lambda out, y: 0.5 * ((out - y) ** 2).sum())
    update = RepresentationSGD(run, plocal_epochs=1, personal="head")
    state, loss = update.fit(model, data, FitIns({}), torch.tensor([0]), seed=0)
    # phase 1 (head): out = 3 * 2 = 6, dL/dw2 = out * w1 = 12 -> w2 = 3 - 12 = -9, loss 18
    # phase 2 (base): out = -9 * 2 = -18, dL/dw1 = out * w2 = 162 -> w1 = 2 - 162 = -160, loss 162
    assert state["head.weight"].item() == -9.0 and state["base.weight"].item() == -160.0
    assert loss.item() == pytest.approx((18 + 162) / 2)
    assert all(p.requires_grad for p in model.parameters())  # restored after training
    # plocal_epochs=0: the head never moves, the representation trains at the original head
    with torch.no_grad():
        model.base.weight.fill_(2.0)
        model.head.weight.fill_(3.0)
    state, _ = RepresentationSGD(run, 0, "head").fit(model, data, FitIns({}), torch.tensor([0]), seed=0)
    assert state["head.weight"].item() == 3.0 and state["base.weight"].item() == 2.0 - 18.0


def test_fedrep_resumes_exactly(cifar10_dir, tmp_path):
    check_exact_resumption(cifar10_dir, tmp_path, "fedrep", "plocal_epochs=2")
