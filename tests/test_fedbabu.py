"""FedBABU (PFLlib semantics): the body is averaged while every head stays frozen at its initial value; after the last
round every client fine-tunes its whole model, from the model it holds before the last aggregate reaches it; exact
resumption (fine-tuning included)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny import as_fedavg, half_square, pool, template_and_fedavg, training_context
from conftest import check_exact_resumption
from pfl.algorithms import REGISTRY
from pfl.algorithms.fedbabu import FedBABU
from pfl.data.loader import ClientData
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.models.split import SplitModel


def _algo(global_rounds: int = 2, **hparams) -> tuple[FedBABU, SplitModel]:
    """Three clients of f(x) = w2 * (w1 * x) (body w1 = 1, head w2 = 2), one sample x = 1, y = 0 each; squared loss,
    batch 1, lr 0.5."""
    model = SplitModel(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        model.base.weight.fill_(1.0)
        model.head.weight.fill_(2.0)
    idx = torch.tensor([0])
    clients = [ClientData(fit=idx, val=None, test=idx) for _ in range(3)]
    update = SGDUpdate(batch_size=1, lr=0.5, local_epochs=1, loss_fn=half_square)
    ctx = training_context(model, pool(torch.tensor([[1.0]]), torch.tensor([[0.0]])), clients, update,
                           global_rounds=global_rounds)
    return FedBABU(ctx, **hparams), model


def _res(cid: int, body: float, n: int) -> FitRes:
    return FitRes(cid, {"base.weight": torch.tensor([[body]]), "head.weight": torch.tensor([[2.0]])}, n,
                  torch.tensor(0.0))


def test_registered_with_pfllibs_default():
    assert REGISTRY["fedbabu"] is FedBABU
    assert FedBABU.Params().fine_tuning_epochs == 10  # PFLlib main.py:471, -fte


def test_local_update_trains_the_body_with_the_head_frozen():
    algo, model = _algo()
    assert algo.shared_keys == ["base.weight"] and algo.personal == "head"
    state, loss = algo.local_update.fit(model, algo.ctx.runner.data, FitIns({}), torch.tensor([0]), seed=0)
    # out = 2 * 1 = 2, loss 2; dL/dw1 = out * w2 = 4 -> w1 = 1 - 0.5 * 4 = -1; the head never moves
    assert state["base.weight"].item() == -1.0 and state["head.weight"].item() == 2.0
    assert loss.item() == 2.0
    assert all(p.requires_grad for p in model.parameters())


def test_bodies_averaged_then_every_client_fine_tuned_after_the_last_round():
    algo, _ = _algo(global_rounds=2, fine_tuning_epochs=1)
    algo.aggregate_fit(1, [_res(0, 3.0, 1), _res(1, 5.0, 3)])
    assert not algo.fine_tuned  # round 1 of 2: no fine-tuning yet
    assert algo.global_state["base.weight"].item() == (3.0 * 1 + 5.0 * 3) / 4  # 4.5, sample-weighted
    assert set(algo.upload(_res(0, 3.0, 1))) == {"base.weight"}  # the head never travels
    for cid in range(3):
        p = algo.personalized_state(cid)
        assert p["base.weight"].item() == 4.5 and p["head.weight"].item() == 2.0  # the frozen initial head
    algo.aggregate_fit(2, [_res(0, 0.5, 1)])  # the last round: client 0 alone
    assert algo.fine_tuned and algo.global_state["base.weight"].item() == 0.5
    # fine-tuning starts (serverbabu.py:60-61): client 0 from its own trained body 0.5, clients 1 and 2 from the body
    # they received at the start of round 2 (4.5), never from the new average; body and head both train, lr 0.5:
    # client 0: out = 0.5 * 2 = 1, dw1 = out * w2 = 2 -> -0.5; dw2 = out * w1 = 0.5 -> 1.75
    # clients 1, 2: out = 4.5 * 2 = 9, dw1 = 18 -> 4.5 - 9 = -4.5; dw2 = 40.5 -> 2 - 20.25 = -18.25
    expected = {0: (-0.5, 1.75), 1: (-4.5, -18.25), 2: (-4.5, -18.25)}
    for cid, (body, head) in expected.items():
        p = algo.personalized_state(cid)
        assert (p["base.weight"].item(), p["head.weight"].item()) == (body, head), cid


def test_zero_fine_tuning_epochs_keeps_the_federated_models():
    algo, _ = _algo(global_rounds=1, fine_tuning_epochs=0)
    algo.aggregate_fit(1, [_res(0, 3.0, 1)])
    assert not algo.fine_tuned
    assert algo.personalized_state(2)["base.weight"].item() == 3.0


def test_fedbabu_resumes_exactly_through_the_fine_tuning(cifar10_dir, tmp_path):
    original, resumed = check_exact_resumption(cifar10_dir, tmp_path, "fedbabu", "fine_tuning_epochs=1")
    assert original.fine_tuned and resumed.fine_tuned  # round 3 of 3 fine-tuned every client
    init = original.ctx.init_state(0)
    for cid in range(5):
        assert not torch.equal(original.personalized_state(cid)["head.2.weight"], init["head.2.weight"])
        assert torch.equal(original.own[cid]["head.2.weight"], init["head.2.weight"])  # frozen through federation


@pytest.mark.parametrize("name", ["fedbabu_cifar10_pr0.2.yaml", "fedbabu_cifar10_cpu.yaml"])
def test_fedbabu_templates_are_the_fedavg_setting(name):
    cfg, fedavg = template_and_fedavg(name)
    assert cfg.algo == "fedbabu" and REGISTRY[cfg.algo] is FedBABU
    assert cfg.hparams == {"fine_tuning_epochs": 1 if name.endswith("_cpu.yaml") else 10}
    assert as_fedavg(cfg) == fedavg
