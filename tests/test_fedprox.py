"""FedProx (PFLlib serverprox.py / clientprox.py / fedoptimizer.py PerturbedGradientDescent): each local SGD step adds
mu * (w - w_global) to the gradient; the server is FedAvg's. Hand-computed steps, bit-for-bit agreement with PFLlib's
update rule, the aggregation, resume and the templates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny import LinearLoss, as_fedavg, pool, template_and_fedavg, with_sgd
from pfl.algorithms import REGISTRY
from pfl.algorithms.fedprox import FedProx, ProximalSGD
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import model_state
from test_fedper import BUFFERS, context, filled, tiny_split_model


def test_one_proximal_step_by_hand():
    """w0 = 1 (the global model), x = 2 (gradient 2 in every step), lr = 0.25, mu = 0.5, batch 1, two steps:
    step 1: w1 = 1 - 0.25 * (2 + 0.5 * (1 - 1)) = 0.5 (w equals the global model: no pull yet);
    step 2: w2 = 0.5 - 0.25 * (2 + 0.5 * (0.5 - 1)) = 0.5 - 0.25 * 1.75 = 0.0625 (FedAvg's SGD: 0.5 - 0.5 = 0)."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ins = FitIns(model_state(model))
    data = pool(torch.full((2, 1), 2.0), torch.zeros(2))
    base = SGDUpdate(batch_size=1, lr=0.25, local_epochs=1, loss_fn=LinearLoss())

    state, loss = ProximalSGD(base, mu=0.5).fit(model, data, ins, torch.arange(2), seed=0)
    assert state["weight"].item() == 0.0625
    assert loss.item() == (2.0 + 1.0) / 2  # the task loss alone (w * x at w = 1, then 0.5), no proximal term

    model.load_state_dict(ins.state)
    plain, _ = base.fit(model, data, ins, torch.arange(2), seed=0)
    assert plain["weight"].item() == 0.0  # without the pull: 1 - 0.5 - 0.5


def pfllib_perturbed_sgd(model: nn.Module, global_params: list[torch.Tensor], batches, loss_fn, lr: float,
                         mu: float) -> None:
    """PFLlib's client loop (clientprox.py:37-50) with its optimizer step (fedoptimizer.py:70-75), written out:
    per batch, d = grad + mu * (p - g), p += -lr * d."""
    for x, y in batches:
        loss = loss_fn(model(x), y)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p, g in zip(model.parameters(), global_params):
                d_p = p.grad.data + mu * (p.data - g.data)
                p.data.add_(d_p, alpha=-lr)


def test_local_update_is_pfllibs_bit_for_bit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(23, 5), torch.randint(3, (23,))
    ins = FitIns({k: v.clone() for k, v in model_state(net).items()})
    with torch.no_grad():
        for p in net.parameters():  # leave the global model, so the pull acts from the first step
            p.add_(0.1 * torch.randn_like(p))
    start = {k: v.clone() for k, v in model_state(net).items()}
    base = SGDUpdate(batch_size=4, lr=0.05, local_epochs=2)
    ours, _ = ProximalSGD(base, mu=0.3).fit(net, pool(x, y), ins, torch.arange(23), seed=5)

    # the same batches, in the order SGDUpdate.fit draws them (drop_last: 5 batches of 4 per epoch)
    gen = torch.Generator().manual_seed(5)
    orders = [torch.randperm(23, generator=gen) for _ in range(2)]
    batches = [(x[o[b * 4:(b + 1) * 4]], y[o[b * 4:(b + 1) * 4]]) for o in orders for b in range(5)]
    net.load_state_dict(start)
    global_params = [ins.state[n] for n, _ in net.named_parameters()]
    pfllib_perturbed_sgd(net, global_params, batches, nn.CrossEntropyLoss(), lr=0.05, mu=0.3)
    theirs = model_state(net)
    assert list(ours) == list(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
        assert not torch.equal(ours[k], start[k]), k


def test_mu_zero_is_fedavgs_local_update():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(4, 3))
    x, y = torch.randn(12, 4), torch.randint(3, (12,))
    ins = FitIns(model_state(net))
    base = SGDUpdate(batch_size=3, lr=0.1, local_epochs=1)
    prox, prox_loss = ProximalSGD(base, mu=0.0).fit(net, pool(x, y), ins, torch.arange(12), seed=2)
    net.load_state_dict(ins.state)
    plain, plain_loss = base.fit(net, pool(x, y), ins, torch.arange(12), seed=2)
    assert all(torch.equal(prox[k], plain[k]) for k in plain) and torch.equal(prox_loss, plain_loss)


def fedprox(num_clients: int, model: nn.Module, mu: float = 0.1) -> FedProx:
    return FedProx(with_sgd(context(num_clients, model)), mu=mu)


def test_fedprox_averages_like_fedavg_and_every_client_gets_the_global_model():
    model = tiny_split_model()
    init = model_state(model)
    algo = fedprox(3, model)
    assert isinstance(algo.local_update, ProximalSGD) and algo.local_update.mu == 0.1

    ins = algo.configure_fit(2, rnd=1)  # the whole global model goes down, and anchors the pull
    assert ins.sent is None and all(torch.equal(ins.state[k], init[k]) for k in init)

    # clients 0 (1 sample) and 1 (3 samples) upload; client 2 is not sampled
    s0, s1 = filled(init, 1.0, 7), filled(init, 5.0, 9)
    algo.aggregate_fit(1, [FitRes(0, s0, 1, torch.tensor(0.0)), FitRes(1, s1, 3, torch.tensor(0.0))])

    # every float entry, parameters and running statistics: (1 * 1.0 + 3 * 5.0) / 4 = 4.0; the integer counter keeps
    # the global model's (FedAvg's buffer policy)
    for cid in range(3):
        p = algo.personalized_state(cid)
        assert list(p) == list(init)
        for k, v in init.items():
            want = torch.full_like(v, 4.0) if v.is_floating_point() else v
            assert torch.equal(p[k], want), (cid, k)
    assert torch.equal(algo.personalized_state(0)[BUFFERS[2]], init[BUFFERS[2]])
    assert torch.equal(algo.configure_fit(0, rnd=2).state["head.weight"], torch.full_like(init["head.weight"], 4.0))


def test_fedprox_state_round_trips():
    model = tiny_split_model()
    algo = fedprox(3, model)
    algo.aggregate_fit(1, [FitRes(2, filled(model_state(model), 3.0, 1), 2, torch.tensor(0.0))])
    tensors, meta = algo.state_dict()
    fresh = fedprox(3, model)
    fresh.load_state_dict(tensors, meta)
    a, b = algo.personalized_state(1), fresh.personalized_state(1)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_fedprox_knob():
    model = tiny_split_model()
    assert fedprox(2, model, mu=0.0).hp.mu == 0.0 and FedProx.Params().mu == 0.0  # PFLlib's main.py:449 default
    with pytest.raises(ValueError):
        fedprox(2, model, mu=-0.1)
    space = FedProx.search_space["mu"]
    assert (space.kind, space.low, space.high, space.log) == ("float", 1e-3, 1.0, True)


@pytest.mark.parametrize("name", ["fedprox_cifar10_pr0.2.yaml", "fedprox_cifar10_cpu.yaml"])
def test_fedprox_templates_are_the_fedavg_setting(name):
    cfg, fedavg = template_and_fedavg(name)
    assert cfg.algo == "fedprox" and REGISTRY[cfg.algo] is FedProx and cfg.hparams == {"mu": 0.01}
    assert as_fedavg(cfg) == fedavg
