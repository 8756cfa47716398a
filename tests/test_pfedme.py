"""pFedMe (PFLlib serverpFedMe.py / clientpFedMe.py / fedoptimizer.py pFedMeOptimizer): per minibatch K steps of theta
on the Moreau envelope, then w moves toward theta; the server mixes the average of the w's into the previous global
model with beta; theta is each client's personalized model. Hand-computed cases, bit-for-bit agreement with PFLlib's
loop, resume and templates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny import LinearLoss, as_fedavg, pool, template_and_fedavg, with_sgd
from pfl.algorithms import REGISTRY
from pfl.algorithms.pfedme import MU, PFedMe, PFedMeUpdate
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import PERSONAL, model_state
from test_fedper import BUFFERS, context, filled, tiny_split_model


def test_inner_steps_and_local_step_by_hand():
    """w = theta = 1, input 2 (gradient 2), plr 0.1, lamda 1, mu 0.001, K 2, lr 0.5, one batch:
    theta1 = 1 - 0.1 (2 + 0 + 0.001) = 0.7999;
    theta2 = 0.7999 - 0.1 (2 + (0.7999 - 1) + 0.001 * 0.7999) = 0.7999 - 0.18006999 = 0.61983001;
    w = 1 - 1 * 0.5 (1 - 0.61983001) = 0.809915005."""
    assert MU == 0.001
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ins = FitIns(model_state(model))
    base = SGDUpdate(batch_size=1, lr=0.5, local_epochs=1, loss_fn=LinearLoss())
    update = PFedMeUpdate(base, lamda=1.0, K=2, personal_learning_rate=0.1)
    state, loss = update.fit(model, pool(torch.full((1, 1), 2.0), torch.zeros(1)), ins, torch.arange(1), seed=0)
    assert sorted(state) == ["personal/weight", "weight"]
    assert state["personal/weight"].item() == pytest.approx(0.61983001, rel=1e-6)
    assert state["weight"].item() == pytest.approx(0.809915005, rel=1e-6)
    assert loss.item() == 2.0  # the batch's first inner step: w * 2 at theta = 1


def pfllib_pfedme(model: nn.Module, batches, loss_fn, lamda: float, K: int, plr: float, lr: float):
    """PFLlib's client round written out (clientpFedMe.py:39-61 with pFedMeOptimizer.step, fedoptimizer.py:38-47,
    mu = 0.001): returns (w, theta) as parameter lists."""
    local = [p.detach().clone() for p in model.parameters()]
    for x, y in batches:
        for _ in range(K):
            loss = loss_fn(model(x), y)
            model.zero_grad()
            loss.backward()
            for p, lw in zip(model.parameters(), local):
                p.data = p.data - plr * (p.grad.data + lamda * (p.data - lw.data) + 0.001 * p.data)
        for new_param, lw in zip(model.parameters(), local):
            lw.data = lw.data - lamda * lr * (lw.data - new_param.data)
    return local, [p.detach().clone() for p in model.parameters()]


def test_local_round_is_pfllibs_bit_for_bit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, y = torch.randn(23, 5), torch.randint(3, (23,))
    ins = FitIns({k: v.clone() for k, v in model_state(net).items()})
    update = PFedMeUpdate(SGDUpdate(batch_size=4, lr=0.05, local_epochs=2), lamda=15.0, K=3,
                          personal_learning_rate=0.01)
    ours, _ = update.fit(net, pool(x, y), ins, torch.arange(23), seed=5)

    gen = torch.Generator().manual_seed(5)  # SGDUpdate.fit's batches (drop_last: 5 batches of 4 per epoch)
    orders = [torch.randperm(23, generator=gen) for _ in range(2)]
    batches = [(x[o[b * 4:(b + 1) * 4]], y[o[b * 4:(b + 1) * 4]]) for o in orders for b in range(5)]
    net.load_state_dict(ins.state)
    w, theta = pfllib_pfedme(net, batches, nn.CrossEntropyLoss(), lamda=15.0, K=3, plr=0.01, lr=0.05)
    for (n, _), wn, tn in zip(net.named_parameters(), w, theta):
        assert torch.equal(ours[n], wn) and torch.equal(ours[PERSONAL + n], tn), n
        assert not torch.equal(ours[n], ours[PERSONAL + n]) and not torch.equal(ours[n], ins.state[n]), n


def pfedme(num_clients: int, model: nn.Module, **hp) -> PFedMe:
    return PFedMe(with_sgd(context(num_clients, model)), **hp)


def result(cid: int, init, w: float, theta: float, count: int, n: int) -> FitRes:
    return FitRes(cid, {**filled(init, w, count), **{PERSONAL + k: v for k, v in filled(init, theta, count).items()}},
                  n, torch.tensor(0.0))


def test_beta_mix_and_personal_models_by_hand():
    model = tiny_split_model()
    init = model_state(model)
    algo = pfedme(3, model, beta=0.5)
    assert isinstance(algo.local_update, PFedMeUpdate)
    ins = algo.configure_fit(2, rnd=1)
    assert ins.extras == {} and all(torch.equal(ins.state[k], init[k]) for k in init)

    algo.global_state = filled(init, 1.0, 5)  # the previous global model: 1, the counter 5
    # clients 0 (1 sample: w = 2, theta = 10) and 1 (3 samples: w = 4, theta = 20); client 2 is not sampled
    r0, r1 = result(0, init, 2.0, 10.0, 7, 1), result(1, init, 4.0, 20.0, 9, 3)
    assert list(algo.upload(r0)) == list(init)  # only w travels up
    algo.aggregate_fit(1, [r0, r1])

    # every float entry: average (1 * 2 + 3 * 4) / 4 = 3.5, mixed (1 - 0.5) * 1 + 0.5 * 3.5 = 2.25; the counter keeps 5
    g = algo.global_state
    assert list(g) == list(init)
    for k, v in init.items():
        want = torch.full_like(v, 2.25) if v.is_floating_point() else torch.full_like(v, 5)
        assert torch.equal(g[k], want), k
    # personalized models: each sampled client's theta (its buffers too); the unsampled client's initial model
    for cid, theta in [(0, filled(init, 10.0, 7)), (1, filled(init, 20.0, 9)), (2, init)]:
        p = algo.personalized_state(cid)
        assert list(p) == list(init) and all(torch.equal(p[k], theta[k]) for k in init), cid
    assert torch.equal(algo.configure_fit(0, rnd=2).state[BUFFERS[0]], g[BUFFERS[0]])


@pytest.mark.parametrize("beta, want", [(0.0, 1.0), (1.0, 3.5)])
def test_beta_zero_keeps_the_global_model_and_one_is_fedavg(beta, want):
    model = tiny_split_model()
    init = model_state(model)
    algo = pfedme(2, model, beta=beta)
    algo.global_state = filled(init, 1.0, 5)
    algo.aggregate_fit(1, [result(0, init, 2.0, 0.0, 7, 1), result(1, init, 4.0, 0.0, 9, 3)])
    assert torch.equal(algo.global_state["head.weight"], torch.full_like(init["head.weight"], want))


def test_state_round_trips():
    model = tiny_split_model()
    init = model_state(model)
    algo = pfedme(3, model, beta=1.0)
    algo.aggregate_fit(1, [result(2, init, 3.0, 6.0, 1, 2)])
    tensors, meta = algo.state_dict()
    fresh = pfedme(3, model, beta=1.0)
    fresh.load_state_dict(tensors, meta)
    for cid in range(3):
        a, b = algo.personalized_state(cid), fresh.personalized_state(cid)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(algo.global_state[k], fresh.global_state[k]) for k in init)


def test_knobs_and_refused_optimizers():
    hp = PFedMe.Params()  # PFLlib's main.py:446-453 defaults
    assert (hp.lamda, hp.K, hp.personal_learning_rate, hp.beta) == (1.0, 5, 0.01, 0.0)
    with pytest.raises(ValueError):
        pfedme(2, tiny_split_model(), K=0)
    with pytest.raises(ValueError, match="optimizer=sgd"):
        PFedMeUpdate(SGDUpdate(batch_size=2, lr=0.01, local_epochs=1, optimizer="adamw"), 1.0, 5, 0.01)
    with pytest.raises(ValueError, match="weight_decay"):
        PFedMeUpdate(SGDUpdate(batch_size=2, lr=0.01, local_epochs=1, weight_decay=1e-4), 1.0, 5, 0.01)


@pytest.mark.parametrize("name", ["pfedme_cifar10_pr0.2.yaml", "pfedme_cifar10_cpu.yaml"])
def test_templates_are_the_fedavg_setting(name):
    cfg, fedavg = template_and_fedavg(name)
    assert cfg.algo == "pfedme" and REGISTRY[cfg.algo] is PFedMe
    assert cfg.hparams == {"lamda": 1.0, "K": 5, "personal_learning_rate": 0.01, "beta": 1.0}
    assert as_fedavg(cfg) == fedavg


def test_a_new_client_starts_from_the_global_model():
    model = tiny_split_model()
    init = model_state(model)
    algo = pfedme(3, model, beta=1.0)
    algo.aggregate_fit(1, [result(0, init, 2.0, 9.0, 7, 1)])
    assert algo.new_client_state(2) is algo.global_state  # not its (initial) personalized model
    assert torch.equal(algo.new_client_state(2)["head.weight"], torch.full_like(init["head.weight"], 2.0))
