"""SCAFFOLD (PFLlib serverscaffold.py / clientscaffold.py / fedoptimizer.py SCAFFOLDOptimizer): every local step adds
c - c_i to the gradient; c_i follows option II; the server moves x by eta_g times the mean model change and c by the
control changes over N. Hand-computed cases, bit-for-bit agreement with PFLlib's update rule, resume and templates."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pfl.algorithms import REGISTRY
from pfl.algorithms.scaffold import CONTROL, DELTA, Scaffold, ScaffoldSGD
from pfl.config import load_config
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import model_state
from test_fedper import BASE_PARAMS, BUFFERS, HEAD_PARAMS, context, filled, tiny_split_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PARAMS = BASE_PARAMS + HEAD_PARAMS


class LinearLoss(nn.Module):
    """The sum of the outputs: with a bias-free Linear(1, 1) on inputs x, the gradient of w is sum(x), whatever w."""

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out.sum()


def pool(x: torch.Tensor, y: torch.Tensor) -> SimpleNamespace:
    """A device pool whose batch of indices idx is (x[idx], y[idx]) (no transform)."""
    return SimpleNamespace(device=torch.device("cpu"), batch=lambda idx, gen=None: (x[idx], y[idx]))


def test_corrected_steps_and_control_update_by_hand():
    """x = y0 = 1, inputs 2 (gradient 2 every step), lr 0.25, c = 0.5, c_i = 0.25, batch 1, two steps (K = 2):
    step 1: y1 = 1 - 0.25 * (2 + 0.5 - 0.25) = 1 - 0.5625 = 0.4375; step 2: y2 = 0.4375 - 0.5625 = -0.125;
    c_i <- 0.25 - 0.5 + (1 - (-0.125)) / (2 * 0.25) = -0.25 + 2.25 = 2.0; delta_c = -0.5 + 2.25 = 1.75."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ins = FitIns(model_state(model), extras={"c": {"weight": torch.full((1, 1), 0.5)},
                                             "c_i": {"weight": torch.full((1, 1), 0.25)}})
    update = ScaffoldSGD(SGDUpdate(batch_size=1, lr=0.25, local_epochs=1, loss_fn=LinearLoss()))
    state, loss = update.fit(model, pool(torch.full((2, 1), 2.0), torch.zeros(2)), ins, torch.arange(2), seed=0)
    assert state["weight"].item() == -0.125
    assert state[CONTROL + "weight"].item() == 2.0 and state[DELTA + "weight"].item() == 1.75
    assert sorted(state) == sorted(["weight", CONTROL + "weight", DELTA + "weight"])
    assert loss.item() == (2.0 + 0.875) / 2  # the task loss alone: w * 2 at w = 1, then 0.4375


def pfllib_scaffold(model: nn.Module, batches, loss_fn, lr: float, server_c, client_c, epochs: int, num_batches: int):
    """PFLlib's client round written out: clientscaffold.py:35-52 with SCAFFOLDOptimizer.step (fedoptimizer.py:27-30),
    then update_yc (:69-73) and delta_yc (:75-84), x the received model."""
    x = [p.detach().clone() for p in model.parameters()]
    for xb, yb in batches:
        loss = loss_fn(model(xb), yb)
        model.zero_grad()
        loss.backward()
        for p, sc, cc in zip(model.parameters(), server_c, client_c):
            p.data.add_(other=(p.grad.data + sc - cc), alpha=-lr)
    new_c = [ci - c + 1 / num_batches / epochs / lr * (xp - yi)
             for ci, c, xp, yi in zip(client_c, server_c, x, model.parameters())]
    delta_c = [- c + 1 / num_batches / epochs / lr * (xp - yi) for c, xp, yi in zip(server_c, x, model.parameters())]
    return [t.detach() for t in new_c], [t.detach() for t in delta_c]


def test_local_round_is_pfllibs_bit_for_bit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(23, 5), torch.randint(3, (23,))
    names = [n for n, _ in net.named_parameters()]
    c = {n: 0.1 * torch.randn_like(p) for n, p in net.named_parameters()}
    c_i = {n: 0.1 * torch.randn_like(p) for n, p in net.named_parameters()}
    ins = FitIns({k: v.clone() for k, v in model_state(net).items()}, extras={"c": c, "c_i": c_i})
    update = ScaffoldSGD(SGDUpdate(batch_size=4, lr=0.05, local_epochs=2))
    ours, _ = update.fit(net, pool(x, y), ins, torch.arange(23), seed=5)

    gen = torch.Generator().manual_seed(5)  # SGDUpdate.fit's batches (drop_last: 5 batches of 4 per epoch)
    orders = [torch.randperm(23, generator=gen) for _ in range(2)]
    batches = [(x[o[b * 4:(b + 1) * 4]], y[o[b * 4:(b + 1) * 4]]) for o in orders for b in range(5)]
    net.load_state_dict(ins.state)
    new_c, delta_c = pfllib_scaffold(net, batches, nn.CrossEntropyLoss(), 0.05, [c[n] for n in names],
                                     [c_i[n] for n in names], epochs=2, num_batches=5)
    for n, p, nc, dc in zip(names, net.parameters(), new_c, delta_c):
        assert torch.equal(ours[n], p.detach()), n
        assert torch.equal(ours[CONTROL + n], nc) and torch.equal(ours[DELTA + n], dc), n
        assert not torch.equal(ours[n], ins.state[n]), n


def scaffold(num_clients: int, model: nn.Module, **hp) -> Scaffold:
    ctx = context(num_clients, model)
    ctx.update = SGDUpdate(batch_size=2, lr=0.01, local_epochs=1)
    return Scaffold(ctx, **hp)


def result(cid: int, init, value: float, count: int, n: int, control: float, delta: float) -> FitRes:
    state = {**filled(init, value, count), **{CONTROL + k: torch.full_like(init[k], control) for k in PARAMS},
             **{DELTA + k: torch.full_like(init[k], delta) for k in PARAMS}}
    return FitRes(cid, state, n, torch.tensor(0.0))


def test_server_update_and_control_variates_by_hand():
    model = tiny_split_model()
    init = model_state(model)
    algo = scaffold(4, model, server_learning_rate=0.5)  # N = 4 clients
    assert isinstance(algo.local_update, ScaffoldSGD)
    assert list(algo.global_c) == PARAMS and all(not v.any() for v in algo.global_c.values())  # c = 0, params only
    ins = algo.configure_fit(3, rnd=1)
    assert list(ins.extras["c_i"]) == PARAMS and all(not v.any() for v in ins.extras["c_i"].values())

    algo.global_state = filled(init, 1.0, 5)  # x = 1, the counter 5
    # clients 0 (1 sample: y = 2, c_i = 0.5, delta_c = 0.25) and 1 (3 samples: y = 4, c_i = 1.5, delta_c = 0.75)
    r0, r1 = result(0, init, 2.0, 7, 1, 0.5, 0.25), result(1, init, 4.0, 9, 3, 1.5, 0.75)
    assert set(algo.upload(r0)) == set(init) | {DELTA + k for k in PARAMS}  # c_i stays on the client
    algo.aggregate_fit(1, [r0, r1])

    # parameters: x + eta_g * sum (y - x) / m = 1 + 0.5 * (1 / 2 + 3 / 2) = 2.0 (unweighted by samples, m = 2);
    # running statistics: FedAvg's (1 * 2 + 3 * 4) / 4 = 3.5; the counter keeps the global model's 5
    g = algo.global_state
    assert list(g) == list(init)
    for k in PARAMS:
        assert torch.equal(g[k], torch.full_like(init[k], 2.0)), k
    assert torch.equal(g[BUFFERS[0]], torch.full_like(init[BUFFERS[0]], 3.5))
    assert torch.equal(g[BUFFERS[1]], torch.full_like(init[BUFFERS[1]], 3.5))
    assert torch.equal(g[BUFFERS[2]], torch.full_like(init[BUFFERS[2]], 5))
    # c <- 0 + (0.25 + 0.75) / N = 0.25; each sampled client's c_i is its new one, the others' stay zero
    for k in PARAMS:
        assert torch.equal(algo.global_c[k], torch.full_like(init[k], 0.25)), k
        assert torch.equal(algo.client_c[0][k], torch.full_like(init[k], 0.5))
        assert torch.equal(algo.client_c[1][k], torch.full_like(init[k], 1.5))
        assert not algo.client_c[2][k].any()
    ins = algo.configure_fit(1, rnd=2)
    assert torch.equal(ins.state["head.weight"], g["head.weight"])
    assert torch.equal(ins.extras["c"]["head.bias"], torch.full_like(init["head.bias"], 0.25))
    assert torch.equal(ins.extras["c_i"]["head.bias"], torch.full_like(init["head.bias"], 1.5))
    for cid in range(4):  # no personalization: everyone is scored with the global model
        assert algo.personalized_state(cid) is algo.global_state


def test_state_round_trips_with_the_control_variates():
    model = tiny_split_model()
    init = model_state(model)
    algo = scaffold(3, model)
    algo.aggregate_fit(1, [result(2, init, 3.0, 1, 2, 0.7, 0.3)])
    tensors, meta = algo.state_dict()
    fresh = scaffold(3, model)
    fresh.load_state_dict(tensors, meta)
    for a, b in [(algo.global_state, fresh.global_state), (algo.global_c, fresh.global_c),
                 (algo.client_c[2], fresh.client_c[2]), (algo.client_c[0], fresh.client_c[0])]:
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(fresh.client_c[2]["head.weight"], torch.full_like(init["head.weight"], 0.7))


def test_knob():
    assert Scaffold.Params().server_learning_rate == 1.0  # PFLlib's main.py:482 default
    with pytest.raises(ValueError):
        scaffold(2, tiny_split_model(), server_learning_rate=0.0)


@pytest.mark.parametrize("name", ["scaffold_cifar10_pr0.2.yaml", "scaffold_cifar10_cpu.yaml"])
def test_templates_are_the_fedavg_setting(name):
    cfg, fedavg = load_config(CONFIGS / name), load_config(CONFIGS / "fedavg_cifar10_pr0.2.yaml")
    assert cfg.algo == "scaffold" and REGISTRY[cfg.algo] is Scaffold and cfg.hparams == {"server_learning_rate": 1.0}
    rounds = 3 if name.endswith("_cpu.yaml") else 100
    assert (cfg.model_copy(update={"algo": "fedavg", "hparams": {}})
            == fedavg.model_copy(update={"global_rounds": rounds}))
