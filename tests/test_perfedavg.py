"""Per-FedAvg (PFLlib serverperavg.py / clientperavg.py / fedoptimizer.py PerAvgOptimizer): first-order MAML steps on
batches of 2 x batch_size, train run twice per round, FedAvg's server, and a client's model is the global model after
one SGD step on a batch of its train split; hand-computed cases, bit-for-bit agreement with PFLlib's client loop,
exact resume and templates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny import as_fedavg, half_square, linear, pool, template_and_fedavg, training_context
from pfl.algorithms import REGISTRY
from pfl.algorithms.perfedavg import PerFedAvg, PerFedAvgUpdate
from pfl.data.loader import ClientData
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import model_state


def _fit(beta: float | None):
    """w = 3 on two identical samples x = 1, y = 0 (loss w^2 / 2 per half, gradient w), batch 1, lr 0.5, 1 epoch."""
    update = PerFedAvgUpdate(SGDUpdate(batch_size=1, lr=0.5, local_epochs=1, loss_fn=half_square), beta)
    ins = FitIns({"weight": torch.tensor([[3.0]])})
    return update.fit(linear(3.0), pool(torch.ones(2, 1), torch.zeros(2, 1)), ins, torch.arange(2), seed=0)


def test_meta_steps_by_hand():
    """One batch of 2 per epoch, 2 epochs (train runs twice per round, serverperavg.py:34-36):
    epoch 1: w' = 3 - 0.5 * 3 = 1.5, gradient at w' 1.5, w <- 3 - 0.5 * 1.5 = 2.25;
    epoch 2: w' = 2.25 - 0.5 * 2.25 = 1.125, w <- 2.25 - 0.5 * 1.125 = 1.6875 (beta = lr, clientperavg.py:14).
    The loss is step 1's at w: (3^2 / 2 + 2.25^2 / 2) / 2 = (4.5 + 2.53125) / 2 = 3.515625."""
    state, loss = _fit(beta=None)
    assert state["weight"].item() == 1.6875
    assert loss.item() == 3.515625
    # beta = 0.1: w <- 3 - 0.1 * 1.5 = 2.85; w' = 1.425, w <- 2.85 - 0.1 * 1.425 = 2.7075
    state, _ = _fit(beta=0.1)
    assert state["weight"].item() == pytest.approx(2.7075, abs=1e-6)


def pfllib_peravg(model: nn.Module, batches, batch_size: int, lr: float) -> None:
    """PFLlib's clientPerAvg.train loop (clientperavg.py:34-72) with PerAvgOptimizer (fedoptimizer.py:10-19), written
    out: beta = lr (clientperavg.py:14)."""
    loss_fn = nn.CrossEntropyLoss()

    def step(rate):
        for p in model.parameters():
            if p.grad is not None:
                p.data.add_(other=p.grad.data, alpha=-rate)

    for X, Y in batches:
        temp_model = [p.detach().clone() for p in model.parameters()]
        loss = loss_fn(model(X[:batch_size]), Y[:batch_size])
        model.zero_grad()
        loss.backward()
        step(lr)
        model.zero_grad()
        loss = loss_fn(model(X[batch_size:]), Y[batch_size:])
        loss.backward()
        for old_param, new_param in zip(model.parameters(), temp_model):
            old_param.data = new_param.data.clone()
        step(lr)


def test_client_round_is_pfllibs_bit_for_bit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(23, 5), torch.randint(3, (23,))
    ins = FitIns({k: v.clone() for k, v in model_state(net).items()})
    ours, _ = PerFedAvgUpdate(SGDUpdate(batch_size=3, lr=0.05, local_epochs=1), None).fit(
        net, pool(x, y), ins, torch.arange(23), seed=5)

    gen = torch.Generator().manual_seed(5)  # two train() calls of 1 epoch: 3 batches of 2 x 3 each (drop_last)
    orders = [torch.randperm(23, generator=gen) for _ in range(2)]
    batches = [(x[o[b * 6:(b + 1) * 6]], y[o[b * 6:(b + 1) * 6]]) for o in orders for b in range(3)]
    net.load_state_dict(ins.state)
    pfllib_peravg(net, batches, batch_size=3, lr=0.05)
    for k, v in model_state(net).items():
        assert torch.equal(ours[k], v), k
        assert not torch.equal(v, ins.state[k]), k


def _algo(**hp) -> PerFedAvg:
    """Three clients of a bias-free Linear(1, 1); each trains on samples with x = 1 and is tested on one with x = 2."""
    data = pool(torch.tensor([[1.0], [1.0], [1.0], [2.0]]), torch.zeros(4, 1))
    idx = torch.arange(4)
    clients = [ClientData(fit=idx[:3], val=None, test=idx[3:]) for _ in range(3)]
    update = SGDUpdate(batch_size=1, lr=0.5, local_epochs=1, loss_fn=half_square)
    return PerFedAvg(training_context(linear(0.0), data, clients, update), **hp)


def test_server_averages_and_a_client_model_is_one_train_step_from_the_global_model():
    algo = _algo()
    assert isinstance(algo.local_update, PerFedAvgUpdate)
    assert (algo.local_update.batch_size, algo.local_update.local_epochs) == (2, 2)  # 2 x batch, train() twice
    assert algo.configure_fit(1, rnd=1).state["weight"].item() == 0.0
    results = [FitRes(0, {"weight": torch.tensor([[1.0]])}, 1, torch.tensor(0.0)),
               FitRes(2, {"weight": torch.tensor([[5.0]])}, 3, torch.tensor(0.0))]
    algo.aggregate_fit(1, results)
    # global: (1 * 1 + 3 * 5) / 4 = 4; every client's model: one step on a train sample (x = 1, gradient 4):
    # 4 - 0.5 * 4 = 2 (a step on its test sample, x = 2, would give 4 - 0.5 * 16 = -4)
    assert algo.global_state["weight"].item() == 4.0 and algo.round == 1
    for cid in range(3):
        assert algo.personalized_state(cid)["weight"].item() == 2.0
    assert algo.global_state["weight"].item() == 4.0  # the evaluation step leaves the global model alone
    assert algo.configure_fit(0, rnd=2).state["weight"].item() == 4.0


def test_evaluation_step_is_deterministic_and_state_round_trips():
    algo = _algo()
    data = algo.ctx.runner.data
    data.x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])  # distinct train samples: the drawn one matters
    algo.aggregate_fit(3, [FitRes(0, {"weight": torch.tensor([[1.0]])}, 1, torch.tensor(0.0))])
    first = [algo.personalized_state(c)["weight"].item() for c in range(3)]
    assert first == [algo.personalized_state(c)["weight"].item() for c in range(3)]
    assert all(v in (1 - 0.5 * 1, 1 - 0.5 * 4, 1 - 0.5 * 9) for v in first)  # one of the 3 train samples
    tensors, meta = algo.state_dict()
    fresh = _algo()
    fresh.ctx.runner.data.x = data.x
    fresh.load_state_dict(tensors, meta)
    assert fresh.round == 3 and [fresh.personalized_state(c)["weight"].item() for c in range(3)] == first


def test_knobs_default_to_pfllibs():
    assert PerFedAvg.Params().beta is None  # beta = the learning rate (clientperavg.py:13-14)
    with pytest.raises(ValueError):
        PerFedAvg.Params(beta=0.0)
    assert set(PerFedAvg.search_space) == {"beta"}


@pytest.mark.parametrize("name", ["perfedavg_cifar10_pr0.2.yaml", "perfedavg_cifar10_cpu.yaml"])
def test_perfedavg_templates_are_the_fedavg_setting(name):
    cfg, fedavg = template_and_fedavg(name)
    assert cfg.algo == "perfedavg" and REGISTRY[cfg.algo] is PerFedAvg and cfg.hparams == {"beta": None}
    assert as_fedavg(cfg) == fedavg
