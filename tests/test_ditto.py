"""Ditto (PFLlib serverditto.py / clientditto.py / fedoptimizer.py PerturbedGradientDescent): the personal model steps
with the pull mu (w - g) toward the received global model, the global copy trains as FedAvg's and is averaged, the
personal model stays the client's own and is what it is scored with; hand-computed cases, exact resume, templates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _tiny import Pool, as_fedavg, half_square, pool, template_and_fedavg
from pfl.algorithms import REGISTRY
from pfl.algorithms.ditto import Ditto, DittoUpdate
from pfl.algorithms.fedprox import ProximalSGD
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import model_state, split_personal, with_personal
from test_fedper import context, filled, tiny_split_model


def _algo(num_clients: int = 3, model: nn.Module | None = None, **hp) -> Ditto:
    return Ditto(context(num_clients, model if model is not None else tiny_split_model()), **hp)


def _data() -> Pool:
    return pool(torch.tensor([[1.0]]), torch.tensor([[0.0]]))


def test_one_personal_step_is_pfllibs_perturbed_gradient_descent():
    """f(x) = w x, one sample x = 1, y = 0, loss w^2 / 2 (gradient w), lr 0.5, mu 0.2, w = 3 pulled toward g = 1:
    w <- w - lr (grad + mu (w - g)) = 3 - 0.5 (3 + 0.2 * 2) = 3 - 1.7 = 1.3 (fedoptimizer.py:74-75)."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    anchor = FitIns({"weight": torch.tensor([[1.0]])})  # the received global model the pull targets

    def pulled(epochs: int, mu: float):
        run = SGDUpdate(batch_size=1, lr=0.5, local_epochs=epochs, loss_fn=half_square)
        return ProximalSGD(run, mu).fit(model, _data(), anchor, torch.tensor([0]), 0)

    state, loss = pulled(1, 0.2)
    assert state["weight"].item() == pytest.approx(1.3, abs=1e-6)
    assert loss.item() == 4.5  # the task loss at w = 3; the pull is in the step, not in the loss
    # mu = 0: plain SGD, 3 - 0.5 * 3 = 1.5; two epochs with mu: 1.3 - 0.5 (1.3 + 0.2 * 0.3) = 0.62
    with torch.no_grad():
        model.weight.fill_(3.0)
    plain, _ = pulled(1, 0.0)
    assert plain["weight"].item() == 1.5
    with torch.no_grad():
        model.weight.fill_(3.0)
    two, _ = pulled(2, 0.2)
    assert two["weight"].item() == pytest.approx(0.62, abs=1e-6)


def test_client_round_pulls_toward_the_received_global_model_and_trains_the_copy_as_fedavg():
    """Received g = 1, personal w = 3, lr 0.5, mu 0.2, one epoch each: the personal model moves to 1.3 (pulled toward
    the received 1, not toward the trained copy), the global copy by plain SGD 1 - 0.5 * 1 = 0.5."""
    model = nn.Linear(1, 1, bias=False)
    run = SGDUpdate(batch_size=1, lr=0.5, local_epochs=1, loss_fn=half_square)
    update = DittoUpdate(run, plocal_epochs=1, mu=0.2)
    ins = FitIns({"weight": torch.tensor([[1.0]])}, extras={"personal": {"weight": torch.tensor([[3.0]])}})
    model.load_state_dict(ins.state)
    state, loss = update.fit(model, _data(), ins, torch.tensor([0]), seed=0)
    assert state["weight"].item() == 0.5
    assert state["personal/weight"].item() == pytest.approx(1.3, abs=1e-6)
    assert loss.item() == pytest.approx((4.5 + 0.5) / 2)  # mean task loss over both trainings' minibatches
    # the global copy is exactly FedAvg's client update from the same seed
    model.load_state_dict(ins.state)
    fedavg, _ = run.fit(model, _data(), ins, torch.tensor([0]), seed=0)
    assert torch.equal(fedavg["weight"], state["weight"])
    # plocal_epochs = 0: the personal model is returned unchanged
    model.load_state_dict(ins.state)
    state, loss = DittoUpdate(run, 0, 0.2).fit(model, _data(), ins, torch.tensor([0]), seed=0)
    assert state["personal/weight"].item() == 3.0 and state["weight"].item() == 0.5 and loss.item() == 0.5


def test_server_averages_the_global_copies_and_keeps_personal_models():
    algo = _algo()
    init = algo.ctx.init_state(0)
    ins = algo.configure_fit(0, 1)
    assert all(torch.equal(ins.state[k], init[k]) for k in init) and ins.sent is None  # only the global travels
    assert all(torch.equal(ins.extras["personal"][k], init[k]) for k in init)  # personal: the initial model
    # clients 0 (1 sample) and 2 (3 samples): global copies 1.0 / 5.0, personal models 10.0 / 50.0
    g0, g2 = filled(init, 1.0, 7), filled(init, 5.0, 9)
    p0, p2 = filled(init, 10.0, 4), filled(init, 50.0, 6)
    results = [FitRes(0, {**g0, **{"personal/" + k: v for k, v in p0.items()}}, 1, torch.tensor(0.0)),
               FitRes(2, {**g2, **{"personal/" + k: v for k, v in p2.items()}}, 3, torch.tensor(0.0))]
    assert list(algo.upload(results[0])) == list(init)  # the global copy only travels up
    algo.aggregate_fit(1, results)
    # floats (parameters and running statistics): (1 * 1.0 + 3 * 5.0) / 4 = 4.0; the counter keeps the global's own
    for k, t in init.items():
        expected = torch.full_like(t, 4.0) if t.is_floating_point() else t
        assert torch.equal(algo.global_state[k], expected), k
    for cid, own in ((0, p0), (2, p2), (1, init)):  # personalized = the personal model, buffers included
        p = algo.personalized_state(cid)
        assert list(p) == list(init) and all(torch.equal(p[k], own[k]) for k in init), cid
    ins = algo.configure_fit(2, 2)
    assert torch.equal(ins.state["head.weight"], torch.full((1, 1), 4.0))
    assert torch.equal(ins.extras["personal"]["head.weight"], torch.full((1, 1), 50.0))


def test_ditto_state_round_trips():
    model = tiny_split_model()
    algo = _algo(model=model, mu=0.5)
    init = model_state(model)
    g, p = filled(init, 3.0, 1), filled(init, 8.0, 2)
    algo.aggregate_fit(1, [FitRes(2, {**g, **{"personal/" + k: v for k, v in p.items()}}, 2, torch.tensor(0.0))])
    tensors, meta = algo.state_dict()
    fresh = _algo(model=model, mu=0.5)
    fresh.load_state_dict(tensors, meta)
    assert all(torch.equal(fresh.global_state[k], algo.global_state[k]) for k in init)
    for cid in range(3):
        a, b = algo.personalized_state(cid), fresh.personalized_state(cid)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_knobs_default_to_pfllibs():
    hp = Ditto.Params()
    assert (hp.mu, hp.plocal_epochs) == (0.0, 1)  # main.py:449 -mu 0.0, main.py:467 -pls 1
    with pytest.raises(ValueError):
        Ditto.Params(mu=-1.0)
    assert set(Ditto.search_space) == {"mu", "plocal_epochs"}


@pytest.mark.parametrize("name", ["ditto_cifar10_pr0.2.yaml", "ditto_cifar10_cpu.yaml"])
def test_ditto_templates_are_the_fedavg_setting(name):
    cfg, fedavg = template_and_fedavg(name)
    assert cfg.algo == "ditto" and REGISTRY[cfg.algo] is Ditto and cfg.hparams == {"mu": 0.1, "plocal_epochs": 1}
    assert as_fedavg(cfg) == fedavg


def test_personal_entries_ride_under_their_prefix_and_split_back():
    """Ditto's, pFedMe's, APFL's and FedRoD's results carry the personal model under ``"personal/"``."""
    trained, personal = {"w": torch.tensor(1.0), "b": torch.tensor(2.0)}, {"w": torch.tensor(3.0)}
    packed = with_personal(trained, personal)
    assert list(packed) == ["w", "b", "personal/w"] and packed["personal/w"] is personal["w"]
    uploaded, back = split_personal({**packed, "apfl/alpha": torch.tensor(0.5)})
    assert list(uploaded) == ["w", "b", "apfl/alpha"] and list(back) == ["w"] and back["w"] is personal["w"]
