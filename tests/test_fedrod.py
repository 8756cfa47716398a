"""FedRoD (PFLlib semantics): the generic model trains with the balanced softmax and is averaged; the personal head
trains on the detached representation against the pre-step generic logits; the personalized model's final Linear
is the sum of both heads; exact resumption."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from _tiny import TWO_CLASSES, as_fedavg, deep_head_model, pool, template_and_fedavg, uniform
from conftest import check_exact_resumption
from pfl.algorithms import REGISTRY
from pfl.algorithms.fedrod import FedRoD, RoDUpdate, label_counts
from pfl.data.loader import ClientData
from pfl.federated.base import FederatedContext
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import PERSONAL, model_state
from pfl.models.split import SplitModel


def _algo() -> FedRoD:
    model = deep_head_model()
    targets = torch.tensor([0, 0, 1, 0, 1, 1])
    runner = SimpleNamespace(models={TWO_CLASSES: model}, data=SimpleNamespace(targets=targets))
    clients = [ClientData(fit=torch.tensor(f), val=None, test=torch.tensor([5])) for f in ([0, 1, 2], [3, 4], [0])]
    ctx = FederatedContext(clients=clients, specs=[TWO_CLASSES] * 3, runner=runner, update=None,
                           init_states={TWO_CLASSES: model_state(model)}, num_join_clients=2, seed=0)
    return FedRoD(ctx)


def _state(like: dict, v: float) -> dict:
    """Every float entry of the model filled with v, the counter with int(v); the personal head with 10 v."""
    head = {PERSONAL + k: torch.full_like(like[k], 10 * v) for k in ("head.2.weight", "head.2.bias")}
    return {**uniform(like, v), **head}


def test_registered_classification_only():
    assert REGISTRY["fedrod"] is FedRoD and FedRoD.tasks == ("classification",)


def test_label_counts_of_the_train_split():
    algo = _algo()
    assert algo.label_counts(0).tolist() == [2.0, 1.0] and algo.label_counts(1).tolist() == [1.0, 1.0]
    assert algo.label_counts(2).tolist() == [1.0, 0.0]  # an absent class counts 0 (its log prior is -inf)
    assert label_counts(torch.tensor([2, 2, 0]), torch.tensor([0, 1, 2]), 4).tolist() == [1.0, 0.0, 2.0, 0.0]


def test_aggregate_averages_the_generic_model_and_keeps_heads_and_buffers():
    algo = _algo()
    like = algo.ctx.init_state(0)
    assert algo.shared_keys == [k for k in like if "running" not in k and "num_batches" not in k]  # every parameter
    algo.aggregate_fit(1, [FitRes(0, _state(like, 1.0), 1, torch.tensor(0.0)),
                           FitRes(2, _state(like, 4.0), 3, torch.tensor(0.0))])
    avg = (1.0 * 1 + 4.0 * 3) / 4  # 3.25, sample-weighted
    for k in algo.shared_keys:
        assert torch.equal(algo.global_state[k], torch.full_like(like[k], avg)), k
    for cid, v in ((0, 1.0), (2, 4.0)):
        p = algo.personalized_state(cid)
        assert list(p) == list(like)  # a plain state of the architecture
        for k in ("head.2.weight", "head.2.bias"):  # generic head (average) + personal head (10 v)
            assert torch.equal(p[k], torch.full_like(like[k], avg + 10 * v)), (cid, k)
        for k in ("base.0.weight", "head.0.bias"):
            assert torch.equal(p[k], torch.full_like(like[k], avg)), (cid, k)
        assert torch.equal(p["base.1.running_mean"], torch.full((1,), v))  # buffers: the client's own
        assert p["base.1.num_batches_tracked"].item() == int(v)
        ins = algo.configure_fit(cid, 2)  # the generic model, the personal head beside it
        assert torch.equal(ins.state["head.2.bias"], torch.full((2,), avg))
        assert torch.equal(ins.extras["personal_head"]["head.2.bias"], torch.full((2,), 10 * v))
        assert set(ins.sent) == set(algo.shared_keys)
    p1 = algo.personalized_state(1)  # never sampled: initial buffers and personal head (the initial fc)
    assert torch.equal(p1["head.2.weight"], avg + like["head.2.weight"])
    assert torch.equal(p1["base.1.running_var"], like["base.1.running_var"])
    assert set(algo.upload(FitRes(0, _state(like, 1.0), 1, torch.tensor(0.0)))) == set(algo.shared_keys)


def test_local_step_by_hand():
    """rep = 1 (body w = 1), zero heads, x = 1, label 0, counts (3, 1), lr 1, one step."""
    model = SplitModel(nn.Linear(1, 1, bias=False), nn.Linear(1, 2))
    with torch.no_grad():
        model.base.weight.fill_(1.0)
        model.head.weight.zero_()
        model.head.bias.zero_()
    data = pool(torch.tensor([[1.0]]), torch.tensor([0]))
    update = RoDUpdate(SGDUpdate(batch_size=1, lr=1.0, local_epochs=1), "head")
    zeros = {"head.weight": torch.zeros(2, 1), "head.bias": torch.zeros(2)}
    ins = FitIns(model_state(model), extras={"personal_head": zeros, "label_counts": torch.tensor([3.0, 1.0])})
    state, loss = update.fit(model, data, ins, torch.tensor([0]), seed=0)
    # balanced softmax: logits 0 + log(3, 1) -> p = (3/4, 1/4), dL/dz = (-1/4, 1/4): generic head -= that; the body's
    # gradient goes through the zero head weight: 0
    assert state["head.weight"].flatten().tolist() == pytest.approx([0.25, -0.25], abs=1e-7)
    assert state["head.bias"].tolist() == pytest.approx([0.25, -0.25], abs=1e-7)
    assert state["base.weight"].item() == 1.0
    # personal head: out_g of the same (pre-step) forward, 0, + out_p 0 -> p = (1/2, 1/2), dL/dz = (-1/2, 1/2)
    assert state[PERSONAL + "head.weight"].flatten().tolist() == [0.5, -0.5]
    assert state[PERSONAL + "head.bias"].tolist() == [0.5, -0.5]
    assert loss.item() == pytest.approx(-math.log(0.75) + math.log(2.0), abs=1e-6)  # the two losses' sum


def test_local_update_equals_pfllibs_two_optimizer_loop():
    """2 epochs of 3 batches on a random model: clientrod.py:41-59 written out with two torch SGD optimizers."""
    torch.manual_seed(0)
    x, y = torch.randn(7, 4), torch.tensor([0, 1, 2, 0, 0, 1, 0])
    counts = torch.bincount(y, minlength=3).float()
    model = SplitModel(nn.Sequential(nn.Linear(4, 5), nn.ReLU()), nn.Sequential(nn.Linear(5, 5), nn.ReLU(),
                                                                                 nn.Linear(5, 3)))
    personal = nn.Linear(5, 3)
    with torch.no_grad():
        personal.load_state_dict(model.head[2].state_dict())
    start = model_state(model)
    ref, ref_head = SplitModel(nn.Sequential(nn.Linear(4, 5), nn.ReLU()),
                               nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3))), nn.Linear(5, 3)
    ref.load_state_dict(start)
    ref_head.load_state_dict(personal.state_dict())
    opt, opt_head = torch.optim.SGD(ref.parameters(), lr=0.1), torch.optim.SGD(ref_head.parameters(), lr=0.1)
    gen, idx = torch.Generator().manual_seed(5), torch.arange(7)
    for _ in range(2):
        order = idx[torch.randperm(7, generator=gen)]
        for b in range(3):
            xb, yb = x[order[2 * b:2 * b + 2]], y[order[2 * b:2 * b + 2]]
            rep = ref.head[1](ref.head[0](ref.base(xb)))
            out_g = ref.head[2](rep)
            loss = nn.functional.cross_entropy(out_g + counts.log(), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_p = nn.functional.cross_entropy(out_g.detach() + ref_head(rep.detach()), yb)
            opt_head.zero_grad()
            loss_p.backward()
            opt_head.step()
    update = RoDUpdate(SGDUpdate(batch_size=2, lr=0.1, local_epochs=2), "head.2")
    head = {"head.2." + k: v for k, v in model_state(personal).items()}
    ins = FitIns(start, extras={"personal_head": head, "label_counts": counts})
    state, _ = update.fit(model, pool(x, y), ins, idx, seed=5)
    for k, v in model_state(ref).items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6)
    for k, v in model_state(ref_head).items():
        torch.testing.assert_close(state[PERSONAL + "head.2." + k], v, rtol=0, atol=1e-6)


def test_fedrod_resumes_exactly(cifar10_dir, tmp_path):
    original, _ = check_exact_resumption(cifar10_dir, tmp_path, "fedrod")
    init = original.ctx.init_state(0)
    trained = [c for c in range(5) if not torch.equal(original.heads[c]["head.2.weight"], init["head.2.weight"])]
    assert trained  # personal heads moved away from the initial fc


@pytest.mark.parametrize("name", ["fedrod_cifar10_pr0.2.yaml", "fedrod_cifar10_cpu.yaml"])
def test_fedrod_templates_are_the_fedavg_setting(name):
    cfg, fedavg = template_and_fedavg(name)
    assert cfg.algo == "fedrod" and REGISTRY[cfg.algo] is FedRoD and cfg.hparams == {}
    assert as_fedavg(cfg) == fedavg
