"""MOON (PFLlib servermoon.py / clientmoon.py): FedAvg whose clients add mu times the model-contrastive loss between the
base's output, the received global model's (positive) and the client's previous local model's (negative); the previous
model is the client's own state; every client is scored with the global model. Hand-computed cases, templates."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pfl.algorithms import REGISTRY
from pfl.algorithms.moon import MOON, MOONUpdate, contrastive_loss
from pfl.config import load_config
from pfl.data.loader import ClientData
from pfl.federated.base import FederatedContext
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import model_state
from pfl.models import ModelSpec
from pfl.models.split import SplitModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_SPEC = ModelSpec("tiny", num_classes=1)


def _model() -> SplitModel:
    """base: Linear(1, 1) + BatchNorm1d(1) (parameters, float running statistics, an integer counter); head: Linear."""
    torch.manual_seed(0)
    return SplitModel(nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)), nn.Linear(1, 1))


def _algo(num_clients: int = 3, **hp) -> MOON:
    model = _model()
    idx = torch.arange(4)
    clients = [ClientData(fit=idx[:3], val=None, test=idx[3:]) for _ in range(num_clients)]
    ctx = FederatedContext(clients=clients, specs=[_SPEC] * num_clients, runner=SimpleNamespace(models={_SPEC: model}),
                           update=None, init_states={_SPEC: model_state(model)}, num_join_clients=2, seed=0)
    return MOON(ctx, **hp)


def _filled(like: dict, v: float, count: int) -> dict:
    return {k: torch.full_like(t, v) if t.is_floating_point() else torch.full_like(t, count) for k, t in like.items()}


class _Data(SimpleNamespace):
    def batch(self, idx, gen=None):
        return self.x[idx], self.y[idx]


def _zero(out, y):
    return 0.0 * out.sum()


def test_contrastive_loss_by_hand():
    """tau 1, z = (1, 0), positive (1, 0) (cos 1), negative (0, 1) (cos 0): -log(e / (e + 1)) = log(1 + 1/e);
    a second sample with z = (0, 2), positive (1, 1) (cos 1/sqrt 2), negative (0, 5) (cos 1), tau 0.5:
    -log(e^{sqrt 2} / (e^{sqrt 2} + e^2)) = log(1 + e^{2 - sqrt 2})."""
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    zg = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    zo = torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    assert contrastive_loss(z[:1], zg[:1], zo[:1], 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert contrastive_loss(z[1:], zg[1:], zo[1:], 0.5).item() == pytest.approx(math.log(1 + math.exp(2 - 2 ** 0.5)),
                                                                                rel=1e-6)


def test_objective_is_task_loss_plus_mu_times_mean_contrastive_loss():
    """base Linear(1, 2) without bias: current W = (1, 0), global (1, 1), previous (0, 1); x = 1 gives z = (1, 0),
    z_g = (1, 1) (cos 1/sqrt 2), z_o = (0, 1) (cos 0). tau 0.5, mu 2, task loss 0:
    2 * -log(e^{sqrt 2} / (e^{sqrt 2} + 1)) = 2 log(1 + e^{-sqrt 2}); the received states are not written."""
    model = SplitModel(nn.Linear(1, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model.base.weight.copy_(torch.tensor([[1.0], [0.0]]))
    head = model.head.weight.detach().clone()
    ins = FitIns({"base.weight": torch.tensor([[1.0], [1.0]]), "head.weight": head},
                 extras={"old": {"base.weight": torch.tensor([[0.0], [1.0]]), "head.weight": head}})
    data = _Data(x=torch.tensor([[1.0]]), y=torch.tensor([[0.0]]), device=torch.device("cpu"))
    update = MOONUpdate(SGDUpdate(batch_size=1, lr=0.0, local_epochs=1, loss_fn=_zero), mu=2.0, tau=0.5)
    _, loss = update.fit(model, data, ins, torch.tensor([0]), seed=0)
    assert loss.item() == pytest.approx(2 * math.log(1 + math.exp(-(2 ** 0.5))), rel=1e-6)
    assert torch.equal(ins.state["base.weight"], torch.tensor([[1.0], [1.0]]))
    assert torch.equal(ins.extras["old"]["base.weight"], torch.tensor([[0.0], [1.0]]))
    # mu = 0: the task loss alone (FedAvg's update)
    _, loss = MOONUpdate(update, mu=0.0, tau=0.5).fit(model, data, ins, torch.tensor([0]), seed=0)
    assert loss.item() == 0.0


def test_first_round_term_is_log_two_and_moves_nothing():
    """Before a client's first round its previous model is the initial (= global) model: the term is the constant
    log 2 (cos equal for both), so the update equals plain SGD's."""
    torch.manual_seed(1)
    model = SplitModel(nn.Linear(3, 4), nn.Linear(4, 2))
    init = model_state(model)
    data = _Data(x=torch.randn(6, 3), y=torch.tensor([0, 1, 0, 1, 1, 0]), device=torch.device("cpu"))
    run = SGDUpdate(batch_size=2, lr=0.1, local_epochs=1)
    moon_state, moon_loss = MOONUpdate(run, mu=1.0, tau=1.0).fit(model, data, FitIns(init, extras={"old": init}),
                                                                  torch.arange(6), seed=3)
    model.load_state_dict(init)
    plain_state, plain_loss = run.fit(model, data, FitIns(init), torch.arange(6), seed=3)
    assert moon_loss.item() == pytest.approx(plain_loss.item() + math.log(2), rel=1e-6)
    assert all(torch.allclose(moon_state[k], plain_state[k], atol=1e-7) for k in init)


def test_client_round_matches_a_pfllib_style_loop():
    """Two epochs of batches of 4 on a BatchNorm model: the trained state equals a loop written as clientmoon.py:30-50
    (three models; the global and previous ones deep copies in train mode; torch.optim.SGD), with the same batch order
    (SGDUpdate's seeded permutation per epoch)."""
    import copy

    torch.manual_seed(2)
    model = SplitModel(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2))
    glob, old = copy.deepcopy(model), copy.deepcopy(model)
    for m in (glob, old):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))
    x, y = torch.randn(8, 3), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    data = _Data(x=x, y=y, device=torch.device("cpu"))
    ins = FitIns(model_state(glob), extras={"old": model_state(old)})
    model.load_state_dict(ins.state)
    update = MOONUpdate(SGDUpdate(batch_size=4, lr=0.1, local_epochs=2), mu=0.7, tau=0.5)
    ours, _ = update.fit(model, data, ins, torch.arange(8), seed=11)

    ref = copy.deepcopy(glob).train()  # set_parameters: the client's model starts from the global one
    glob.train(), old.train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):
        order = torch.randperm(8, generator=gen)
        for b in range(2):
            xb, yb = x[order[4 * b:4 * b + 4]], y[order[4 * b:4 * b + 4]]
            rep = ref.base(xb)
            loss = nn.functional.cross_entropy(ref.head(rep), yb)
            rep_old, rep_global = old.base(xb).detach(), glob.base(xb).detach()
            loss = loss + 0.7 * contrastive_loss(rep, rep_global, rep_old, 0.5).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    theirs = model_state(ref)
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)


def test_server_averages_and_keeps_each_clients_previous_model():
    algo = _algo(mu=1.0)
    init = algo.ctx.init_state(0)
    ins = algo.configure_fit(1, 1)
    assert ins.sent is None and all(torch.equal(ins.state[k], init[k]) for k in init)  # the global model travels
    assert all(torch.equal(ins.extras["old"][k], init[k]) for k in init)  # previous model: the initial one
    # clients 0 (1 sample) and 2 (3 samples) trained to 1.0 / 5.0 everywhere (counters 7 / 9)
    s0, s2 = _filled(init, 1.0, 7), _filled(init, 5.0, 9)
    algo.aggregate_fit(1, [FitRes(0, s0, 1, torch.tensor(0.0)), FitRes(2, s2, 3, torch.tensor(0.0))])
    # floats (parameters and running statistics): (1 * 1.0 + 3 * 5.0) / 4 = 4.0; the counter keeps the global's own
    for k, t in init.items():
        expected = torch.full_like(t, 4.0) if t.is_floating_point() else t
        assert torch.equal(algo.global_state[k], expected), k
    for cid in range(3):  # every client is scored with the global model
        assert all(torch.equal(algo.personalized_state(cid)[k], algo.global_state[k]) for k in init)
    for cid, old in ((0, s0), (2, s2), (1, init)):  # previous local models: what each trained, whole
        ins = algo.configure_fit(cid, 2)
        assert all(torch.equal(ins.extras["old"][k], old[k]) for k in init), cid
        assert torch.equal(ins.state["head.weight"], torch.full((1, 1), 4.0))


def test_moon_state_round_trips():
    algo = _algo(mu=1.0)
    init = algo.ctx.init_state(0)
    algo.aggregate_fit(1, [FitRes(2, _filled(init, 3.0, 1), 2, torch.tensor(0.0))])
    tensors, meta = algo.state_dict()
    fresh = _algo(mu=1.0)
    fresh.load_state_dict(tensors, meta)
    assert all(torch.equal(fresh.global_state[k], algo.global_state[k]) for k in init)
    for cid in range(3):
        a, b = algo.configure_fit(cid, 2).extras["old"], fresh.configure_fit(cid, 2).extras["old"]
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_knobs_default_to_pfllibs():
    hp = MOON.Params()
    assert (hp.mu, hp.tau) == (0.0, 1.0)  # main.py:449 -mu 0.0, main.py:469 -tau 1.0
    with pytest.raises(ValueError):
        MOON.Params(tau=0.0)
    assert set(MOON.search_space) == {"mu", "tau"}


@pytest.mark.parametrize("name", ["moon_cifar10_pr0.2.yaml", "moon_cifar10_cpu.yaml"])
def test_moon_templates_are_the_fedavg_setting(name):
    cfg, fedavg = load_config(CONFIGS / name), load_config(CONFIGS / "fedavg_cifar10_pr0.2.yaml")
    assert cfg.algo == "moon" and REGISTRY[cfg.algo] is MOON and cfg.hparams == {"mu": 1.0, "tau": 1.0}
    rounds = 3 if name.endswith("_cpu.yaml") else 100
    same = fedavg.model_copy(update={"global_rounds": rounds})
    assert cfg.model_copy(update={"algo": "fedavg", "hparams": {}}) == same
