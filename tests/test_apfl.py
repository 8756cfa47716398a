"""APFL (PFLlib serverapfl.py / clientapfl.py): per batch the global copy w steps, then the local model v on the same
batch, then the mixing weight alpha; v ends the round as the mixture (1 - alpha) w + alpha v; the server averages w;
hand-computed cases, bit-for-bit agreement with PFLlib's client loop, the aggregation, exact resume and templates."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from _tiny import as_fedavg, half_square, linear, pool, template_and_fedavg
from pfl.algorithms import REGISTRY
from pfl.algorithms.apfl import ALPHA, APFL, APFLUpdate
from pfl.config import load_config
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import model_state
from test_fedper import BUFFERS, context, filled, tiny_split_model


def _round(lr: float, w0: float, v0: float, alpha0: float):
    """One client round on one sample x = 1, y = 0 (loss m^2 / 2 of a model m, gradient m), batch 1, one epoch."""
    update = APFLUpdate(SGDUpdate(batch_size=1, lr=lr, local_epochs=1, loss_fn=half_square))
    alpha = torch.tensor(alpha0, dtype=torch.float64)
    ins = FitIns({"weight": torch.tensor([[w0]])},
                 extras={"personal": {"weight": torch.tensor([[v0]])}, "alpha": alpha})
    return update.fit(linear(w0), pool(torch.tensor([[1.0]]), torch.tensor([[0.0]])), ins, torch.tensor([0]), seed=0)


def test_one_step_by_hand():
    """w = 1, v = 3, alpha = 0.5, lr = 0.1:
    w <- 1 - 0.1 * 1 = 0.9; v <- 3 - 0.1 * 3 = 2.7 (v's own loss, the same batch);
    alpha's gradient: (v - w) (alpha grad_v + (1 - alpha) grad_w) + 0.02 alpha = 1.8 * (1.5 + 0.5) + 0.01 = 3.61,
    alpha <- 0.5 - 0.1 * 3.61 = 0.139; v <- (1 - 0.139) * 0.9 + 0.139 * 2.7 = 0.7749 + 0.3753 = 1.1502."""
    state, loss = _round(lr=0.1, w0=1.0, v0=3.0, alpha0=0.5)
    assert state["weight"].item() == pytest.approx(0.9, abs=1e-6)  # the uploaded copy w, plain SGD
    assert state[ALPHA].dtype == torch.float64 and state[ALPHA].item() == pytest.approx(0.139, abs=1e-6)
    assert state["personal/weight"].item() == pytest.approx(1.1502, abs=1e-6)
    assert loss.item() == 0.5  # w's task loss at w = 1


def test_alpha_is_clipped_to_the_unit_interval():
    """lr = 0.5: w <- 0.5, v <- 1.5, alpha's gradient 1.0 * (1.5 + 0.5) + 0.01 = 2.01, alpha <- 0.5 - 1.005 < 0 -> 0,
    so v ends as w's 0.5; and alpha = 1 with v = w stays at 1 - lr * 0.02 (only its own decay moves it)."""
    state, _ = _round(lr=0.5, w0=1.0, v0=3.0, alpha0=0.5)
    assert state[ALPHA].item() == 0.0 and state["personal/weight"].item() == 0.5
    state, _ = _round(lr=0.5, w0=1.0, v0=1.0, alpha0=1.0)  # v - w = 0 after both steps
    assert state[ALPHA].item() == pytest.approx(1 - 0.5 * 0.02, abs=1e-7)
    assert state["personal/weight"].item() == 0.5


def pfllib_apfl(model: nn.Module, model_per: nn.Module, batches, lr: float, alpha: float) -> float:
    """PFLlib's clientAPFL.train (clientapfl.py:35-59) and alpha_update (clientapfl.py:69-78), written out with
    torch.optim.SGD as PFLlib's optimizers; returns the final alpha."""
    loss_fn = nn.CrossEntropyLoss()
    opt, opt_per = torch.optim.SGD(model.parameters(), lr=lr), torch.optim.SGD(model_per.parameters(), lr=lr)
    for x, y in batches:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_per = loss_fn(model_per(x), y)
        opt_per.zero_grad()
        loss_per.backward()
        opt_per.step()
        grad_alpha = 0
        for l_params, p_params in zip(model.parameters(), model_per.parameters()):
            dif = p_params.data - l_params.data
            grad = alpha * p_params.grad.data + (1 - alpha) * l_params.grad.data
            grad_alpha += dif.view(-1).dot(grad.view(-1))  # PFLlib's .T is a no-op on 1-d (deprecated)
        grad_alpha += 0.02 * alpha
        alpha = alpha - lr * grad_alpha
        alpha = np.clip(alpha.item(), 0.0, 1.0)
    for lp, p in zip(model_per.parameters(), model.parameters()):
        lp.data = (1 - alpha) * p + alpha * lp
    return alpha


def test_client_round_is_pfllibs_bit_for_bit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    per = copy.deepcopy(net)
    with torch.no_grad():
        for p in per.parameters():  # a local model apart from the global one
            p.add_(0.3 * torch.randn_like(p))
    x, y = torch.randn(23, 5), torch.randint(3, (23,))
    alpha0 = torch.tensor(0.7, dtype=torch.float64)
    ins = FitIns(model_state(net), extras={"personal": model_state(per), "alpha": alpha0})
    ours, _ = APFLUpdate(SGDUpdate(batch_size=4, lr=0.05, local_epochs=2)).fit(net, pool(x, y), ins, torch.arange(23),
                                                                               seed=5)

    gen = torch.Generator().manual_seed(5)  # SGDUpdate.fit's batches: drop_last, 5 batches of 4 per epoch
    orders = [torch.randperm(23, generator=gen) for _ in range(2)]
    batches = [(x[o[b * 4:(b + 1) * 4]], y[o[b * 4:(b + 1) * 4]]) for o in orders for b in range(5)]
    net.load_state_dict(ins.state)
    per.load_state_dict(ins.extras["personal"])
    alpha = pfllib_apfl(net, per, batches, lr=0.05, alpha=0.7)
    assert 0.0 < alpha < 1.0 and alpha != 0.7
    assert ours[ALPHA].item() == alpha
    for k, v in model_state(net).items():
        assert torch.equal(ours[k], v), k
    for k, v in model_state(per).items():
        assert torch.equal(ours["personal/" + k], v), k


def test_server_averages_w_and_keeps_v_and_alpha_per_client():
    model = tiny_split_model()
    init = model_state(model)
    algo = APFL(context(3, model), alpha_init=0.25)
    assert algo.alphas.tolist() == [0.25] * 3

    ins = algo.configure_fit(1, rnd=1)  # w is the global model; v (initial) and alpha ride along, never counted
    assert all(torch.equal(ins.state[k], init[k]) for k in init)
    assert all(torch.equal(ins.extras["personal"][k], init[k]) for k in init) and ins.extras["alpha"].item() == 0.25

    def result(cid, w, v, count, alpha, n):
        state = {**filled(init, w, count), **{"personal/" + k: t for k, t in filled(init, v, count + 1).items()},
                 ALPHA: torch.tensor(alpha, dtype=torch.float64)}
        return FitRes(cid, state, n, torch.tensor(0.0))

    results = [result(0, 1.0, 10.0, 7, 0.4, 1), result(1, 5.0, 20.0, 9, 0.6, 3)]
    assert sorted(algo.upload(results[0])) == sorted(init)  # comm/bytes_up: w only
    algo.aggregate_fit(1, results)

    # w's float entries: (1 * 1.0 + 3 * 5.0) / 4 = 4.0 (parameters and running statistics); the counter stays global
    for k, v in algo.global_state.items():
        expected = init[k] if k == "base.1.num_batches_tracked" else torch.full_like(init[k], 4.0)
        assert torch.equal(v, expected), k
    # each client's v is its own (10.0 / counter 8, 20.0 / counter 10), client 2 keeps the initial model
    for cid, own in ((0, filled(init, 10.0, 8)), (1, filled(init, 20.0, 10)), (2, init)):
        p = algo.personalized_state(cid)
        assert sorted(p) == sorted(init) and all(torch.equal(p[k], own[k]) for k in init), cid
    assert algo.alphas.tolist() == [0.4, 0.6, 0.25]
    assert set(BUFFERS) <= set(algo.personalized_state(0))


def test_state_round_trips():
    model = tiny_split_model()
    init = model_state(model)
    algo = APFL(context(3, model))
    state = {**filled(init, 2.0, 3), **{"personal/" + k: t for k, t in filled(init, 3.0, 3).items()},
             ALPHA: torch.tensor(0.3, dtype=torch.float64)}
    algo.aggregate_fit(1, [FitRes(2, state, 2, torch.tensor(0.0))])
    tensors, meta = algo.state_dict()
    fresh = APFL(context(3, model))
    fresh.load_state_dict(tensors, meta)
    assert torch.equal(fresh.alphas, algo.alphas) and fresh.alphas.tolist() == [1.0, 1.0, 0.3]
    for k in init:
        assert torch.equal(fresh.global_state[k], algo.global_state[k])
        assert torch.equal(fresh.personalized_state(2)[k], algo.personalized_state(2)[k])


def test_knobs_default_to_pfllibs():
    assert APFL.Params().alpha_init == 1.0  # main.py:465, -al
    with pytest.raises(ValueError):
        APFL.Params(alpha_init=1.5)
    assert set(APFL.search_space) == {"alpha_init"}
    # `alpha` stays the run's Dirichlet concentration
    cfg = load_config(None, ["algo=apfl", "partition=dirichlet", "alpha=0.3", "alpha_init=0.5"])
    assert cfg.alpha == 0.3 and cfg.hparams == {"alpha_init": 0.5}


@pytest.mark.parametrize("name", ["apfl_cifar10_pr0.2.yaml", "apfl_cifar10_cpu.yaml"])
def test_apfl_templates_are_the_fedavg_setting(name):
    cfg, fedavg = template_and_fedavg(name)
    assert cfg.algo == "apfl" and REGISTRY[cfg.algo] is APFL and cfg.hparams == {"alpha_init": 1.0}
    assert as_fedavg(cfg) == fedavg
