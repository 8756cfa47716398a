"""FedRep (PFLlib semantics): the final Linear stays personal, the rest is averaged; the local update trains the head
first with the representation frozen, then the representation with the head frozen; exact resumption."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny import PERSONAL_LAYER_APART, aggregation_context, deep_head_model, half_square, pool, uniform
from pfl.algorithms.fedrep import FedRep, RepresentationSGD
from pfl.federated.partial import personal_layer
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.models import ModelSpec, build_model
from pfl.models.split import SplitModel


def _algo(num_clients: int = 3) -> FedRep:
    return FedRep(aggregation_context(deep_head_model(), num_clients))


def test_personal_layer_is_pfllibs_model_fc():
    assert personal_layer(build_model(ModelSpec("cnn", 10))) == "head.2"
    assert personal_layer(build_model(ModelSpec("resnet20", 10, width=0.125))) == "head"
    assert personal_layer(build_model(ModelSpec("vgg11", 10, width=0.125))) == "head.4"


def test_aggregate_averages_the_representation_and_keeps_heads_and_buffers():
    algo = _algo()
    like = algo.ctx.init_state(0)
    assert algo.shared_keys == ["base.0.weight", "base.0.bias", "base.1.weight", "base.1.bias",
                           "head.0.weight", "head.0.bias"]  # parameters only, outside head.2
    # every float entry v (+ 0.5 for the personal layer's), the counter int(v)
    s0, s1 = uniform(like, 1.0, PERSONAL_LAYER_APART), uniform(like, 4.0, PERSONAL_LAYER_APART)
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


def test_local_update_trains_the_head_then_the_representation():
    """One sample, batch 1, lr 1, plocal_epochs=1, local_epochs=1 on f(x) = w2 * (w1 * x) (no biases trained,
    squared loss): phase 1 moves w2 alone, phase 2 moves w1 alone, with the gradient at the updated w2."""
    torch.manual_seed(0)
    model = SplitModel(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model.base.weight.fill_(2.0)
        model.head.weight.fill_(3.0)
    data = pool(torch.tensor([[1.0]]), torch.tensor([[0.0]]))
    run = SGDUpdate(batch_size=1, lr=1.0, local_epochs=1, loss_fn=half_square)
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
