"""FedALA's adaptive local aggregation: blend, weight learning, stopping rule, per-client state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pfl.algorithms.fedala as fedala_module
from pfl.federated.base import FederatedContext
from pfl.federated.engine import Engine, Schedule
from pfl.algorithms.fedala import FedALA, blend, learn_weights
from pfl.federated.local import FitRes, ModelRunner, SGDUpdate
from pfl.federated.state import State, flatten, float_keys, model_state, unflatten
from pfl.data.loader import ClientData, DeviceData
from pfl.models.split import ModelSpec, SplitModel

# ---------------------------------------------------------------- pure functions


def test_blend_hand_computed():
    local, glob = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([3.0, 2.0, 0.0])
    # 1 + (3 - 1) * 0.5 = 2;  2 + (2 - 2) * 0.3 = 2;  -4 + (0 + 4) * 1 = 0
    assert blend(local, glob, torch.tensor([0.5, 0.3, 1.0])).tolist() == [2.0, 2.0, 0.0]
    # W = 0 keeps the local model, W = 1 takes the global one
    assert torch.equal(blend(local, glob, torch.zeros(3)), local)
    assert torch.equal(blend(local, glob, torch.ones(3)), glob)


def test_learn_weights_gradient_step_and_clipping():
    # local 0, global 1 -> blended top = W; loss = sum(c * W) -> dL/dW = c * (1 - 0) = c
    c = torch.tensor([-5.0, 5.0, 0.25, 0.0])
    w, passes = learn_weights(lambda top, b: (c * top).sum(), 1, torch.zeros(4), torch.ones(4),
                              torch.ones(4), eta=1.0, until_converged=False, threshold=0.1, num_pre_loss=10)
    # 1 + 5 -> clipped to 1;  1 - 5 -> clipped to 0;  1 - 0.25 = 0.75;  untouched 1
    assert w.tolist() == [1.0, 0.0, 0.75, 1.0]
    assert passes == 1
    assert not w.requires_grad


def test_learn_weights_gradient_is_scaled_by_global_minus_local():
    # loss = sum(top); dL/dtop = 1; dL/dW = theta_g - theta_l = [0.2, -0.4]; eta = 0.5
    w, _ = learn_weights(lambda top, b: top.sum(), 2, torch.tensor([1.0, 1.0]), torch.tensor([1.2, 0.6]),
                         torch.tensor([0.5, 0.5]), eta=0.5, until_converged=False, threshold=0.1, num_pre_loss=10)
    # two batches: 0.5 - 2 * 0.5 * 0.2 = 0.3;  0.5 + 2 * 0.5 * 0.4 = 0.9
    assert torch.allclose(w, torch.tensor([0.3, 0.9]))


def _scripted(values: list[float]):
    calls = iter(values)
    return lambda top, b: (top * 0).sum() + next(calls)


def test_first_round_stops_when_loss_std_falls_below_threshold():
    # pass losses 0, 1, 0, 1, 0.3, 0.3, 0.3: std of the last 3 is < 0.1 first after pass 7
    values = [0.0, 1.0, 0.0, 1.0, 0.3, 0.3, 0.3, 9.0, 9.0]
    assert np.std([1.0, 0.3, 0.3]) >= 0.1 and np.std([0.3, 0.3, 0.3]) < 0.1
    _, passes = learn_weights(_scripted(values), 1, torch.zeros(2), torch.ones(2), torch.ones(2), 1.0,
                              until_converged=True, threshold=0.1, num_pre_loss=3)
    assert passes == 7


def test_first_round_needs_more_than_num_pre_loss_passes():
    # constant losses have std 0 at once, but PFLlib waits for len(losses) > num_pre_loss
    _, passes = learn_weights(_scripted([0.5] * 20), 1, torch.zeros(2), torch.ones(2), torch.ones(2), 1.0,
                              until_converged=True, threshold=0.1, num_pre_loss=3)
    assert passes == 4


def test_later_rounds_run_one_pass_and_the_loop_is_bounded():
    _, passes = learn_weights(_scripted([0.0, 1.0] * 10), 1, torch.zeros(2), torch.ones(2), torch.ones(2), 1.0,
                              until_converged=False, threshold=0.1, num_pre_loss=3)
    assert passes == 1
    _, passes = learn_weights(_scripted([0.0, 1.0] * 10), 1, torch.zeros(2), torch.ones(2), torch.ones(2), 1.0,
                              until_converged=True, threshold=0.1, num_pre_loss=3, max_epochs=6)
    assert passes == 6


# ---------------------------------------------------------------- FedALA on a tiny model and real images


class _Tiny(SplitModel):
    """base: 2x2 average pool of each channel (12 features); head: Linear(12, 4) + ReLU + Linear(4, 10)."""

    def __init__(self):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()),
                         nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 10)))


_SPEC = ModelSpec("tiny", num_classes=10)


def _fedala(cifar10, num_clients: int = 3, layer_idx: int = 2, eta: float = 1.0, num_join: int = 1, **kw) -> FedALA:
    torch.manual_seed(0)
    model = _Tiny()
    clients = [ClientData(fit=torch.arange(c * 100, c * 100 + 60), val=None,
                          test=torch.arange(c * 100 + 60, c * 100 + 80)) for c in range(num_clients)]
    runner = ModelRunner({_SPEC: model}, DeviceData(cifar10, torch.device("cpu")))
    update = SGDUpdate(batch_size=10, lr=0.05, local_epochs=1)
    ctx = FederatedContext(clients, [_SPEC] * num_clients, runner, update, {_SPEC: model_state(model)},
                           num_join_clients=num_join, seed=0)
    return FedALA(ctx, eta=eta, layer_idx=layer_idx, **kw)


def _equal(a: State, b: State) -> bool:
    """Same entry names and every entry bit-identical."""
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def _top(alg: FedALA, state: State) -> torch.Tensor:
    """The state's top ``layer_idx`` parameter tensors as one vector (T,), in ALA's order."""
    return flatten(state, alg.top)


def test_top_layers_are_the_last_layer_idx_parameter_tensors(cifar10):
    alg = _fedala(cifar10, layer_idx=2)
    assert alg.top == ["head.2.weight", "head.2.bias"]
    assert list(alg.weights[0]) == ["ala_weights"]
    assert alg.weights[0]["ala_weights"].shape == (4 * 10 + 10,)
    with pytest.raises(ValueError, match="layer_idx=7"):
        _fedala(cifar10, layer_idx=7)


def test_round_one_skips_ala_while_models_equal_the_global_model(cifar10):
    alg = _fedala(cifar10)
    alg.initialize_clients(1)
    assert len(alg.models) == 0 and alg.started == set()
    assert _equal(alg.configure_fit(2, 1).state, alg.ctx.init_state(2))


def _diverge(alg: FedALA, client: int, seed: int = 1) -> tuple[State, State]:
    """Give ``client`` a local model and the server a global model, both random and different."""
    g = torch.Generator().manual_seed(seed)
    init = alg.ctx.init_state(client)
    keys = float_keys(init)
    flat = flatten(init, keys)
    local = {**init, **unflatten(flat + 0.1 * torch.randn(flat.shape, generator=g), init, keys)}
    alg.models[client] = local
    glob = {**init, **unflatten(flat - 0.1 * torch.randn(flat.shape, generator=g), init, keys)}
    alg.global_state = glob
    return local, glob


def test_lower_layers_take_global_and_top_layers_are_blended(cifar10):
    alg = _fedala(cifar10, layer_idx=2)
    local, glob = _diverge(alg, 1)
    alg.initialize_clients(2)
    new = alg.models[1]
    assert sorted(new) == sorted(local)
    for lower in ("head.0.weight", "head.0.bias"):
        assert torch.equal(new[lower], glob[lower])
    w = alg.weights[1]["ala_weights"]
    assert ((w >= 0) & (w <= 1)).all()
    assert not torch.equal(w, torch.ones_like(w))  # learned
    lt, gt = _top(alg, local), _top(alg, glob)
    assert torch.allclose(_top(alg, new), lt + (gt - lt) * w, atol=1e-7)
    assert alg.start_passes[1] >= 11  # first ALA: more than num_pre_loss passes


def test_layer_idx_one_blends_only_the_last_bias(cifar10):
    alg = _fedala(cifar10, layer_idx=1)
    local, glob = _diverge(alg, 0)
    alg.initialize_clients(2)
    assert alg.top == ["head.2.bias"]
    assert torch.equal(alg.models[0]["head.2.weight"], glob["head.2.weight"])
    assert not torch.equal(alg.models[0]["head.2.bias"], glob["head.2.bias"])  # blended with W learned from 1


def test_weights_persist_between_rounds(cifar10, monkeypatch):
    alg = _fedala(cifar10)
    _diverge(alg, 2)
    alg.initialize_clients(2)
    w1 = alg.weights[2]["ala_weights"].clone()
    # a new round from a different global model; with eta = 0 the weights must stay exactly w1
    local2 = alg.models[2]
    _, glob2 = _diverge(alg, 2, seed=2)
    alg.models[2] = local2
    flags: list[bool] = []
    real = fedala_module.learn_weights
    monkeypatch.setattr(fedala_module, "learn_weights", lambda *a, **k: flags.append(a[6]) or real(*a, **k))
    alg.eta = 0.0
    alg.initialize_clients(3)
    # every client ran its first ALA in round 2 (the global model moved away from all of them): one pass now
    assert flags == [False, False, False]
    assert torch.equal(alg.weights[2]["ala_weights"], w1)
    assert torch.allclose(_top(alg, alg.models[2]), blend(_top(alg, local2), _top(alg, glob2), w1), atol=1e-7)


def test_every_client_runs_ala_each_round_and_slices_are_seeded(cifar10):
    alg = _fedala(cifar10, num_clients=3, num_join=2)
    idx = alg.sample_slice(1, rnd=4)
    fit = alg.ctx.clients[1].fit
    assert len(idx) == int(0.8 * len(fit))
    start = int((fit == idx[0]).nonzero())
    assert torch.equal(idx, fit[start:start + len(idx)])  # contiguous slice of the local data
    assert torch.equal(idx, alg.sample_slice(1, rnd=4))
    engine = Engine(alg, Schedule(global_rounds=2, num_join_clients=2))
    engine.run_round(1)
    # right after round 1's aggregation every client, selected or not, ran its (first) ALA toward the
    # new global model, the average of the round's two uploads, which differs from every local model
    assert alg.started == {0, 1, 2}
    (unselected,) = set(range(3)) - set(engine.sample_clients(1))
    assert torch.equal(alg.models[unselected]["head.0.weight"], alg.global_state["head.0.weight"])


def test_evaluation_scores_and_saves_the_ala_initialized_models_as_pfllib(cifar10, monkeypatch):
    # PFLlib: send_models (ALA) -> evaluate -> train -> aggregate. After a round, a participant's
    # personalized model is ALA(its upload -> the new global model), not its raw upload.
    alg = _fedala(cifar10, num_clients=3, num_join=2)
    uploads, seen = {}, {}
    real_aggregate, real_ala = alg.aggregate_fit, alg.local_aggregation
    def aggregate_fit(rnd, ups):
        uploads.update({u.client_id: u.state for u in ups})
        return real_aggregate(rnd, ups)

    monkeypatch.setattr(alg, "aggregate_fit", aggregate_fit)
    monkeypatch.setattr(alg, "local_aggregation",
                        lambda cid, rnd: seen.update({(cid, rnd): alg.models[cid]}) or real_ala(cid, rnd))
    engine = Engine(alg, Schedule(global_rounds=2, num_join_clients=2))
    engine.run_round(1)
    evaluation = engine.evaluate(1)
    lower = "head.0.weight"
    for cid, upload in uploads.items():
        assert _equal(seen[(cid, 2)], upload)  # ALA of round 2 started from the raw upload ...
        scored = alg.personalized_state(cid)  # ... and that ALA-initialized model is what is scored
        assert not _equal(scored, upload)
        assert torch.equal(scored[lower], alg.global_state[lower])
        probs = torch.softmax(alg.ctx.runner.logits(_SPEC, scored, alg.ctx.clients[cid].test), 1)
        acc = (probs.argmax(1) == cifar10.targets[alg.ctx.clients[cid].test]).double().mean().item()
        assert evaluation.per_client[cid]["acc"] == pytest.approx(acc)
    assert _equal(alg.configure_fit(0, 2).state, alg.personalized_state(0))  # round 2 starts from it


def test_aggregate_is_fedavg_and_uploads_become_local_models(cifar10, monkeypatch):
    alg = _fedala(cifar10)
    p = alg.ctx.init_state(0)

    def plus(c: float) -> State:
        return {k: v + c for k, v in p.items()}

    local_at_ala = {}
    monkeypatch.setattr(alg, "local_aggregation",
                        lambda cid, rnd: local_at_ala.update({cid: (rnd, alg.models[cid])}))
    ups = [FitRes(0, plus(1), 30, torch.tensor(0.0)), FitRes(2, plus(4), 10, torch.tensor(0.0))]
    alg.aggregate_fit(1, ups)
    expected = plus((30 * 1 + 10 * 4) / 40)
    assert sorted(alg.global_state) == sorted(p)
    for k in p:
        assert torch.allclose(alg.global_state[k], expected[k]), k
    # every client's ALA (for round 2) starts from its local model: the upload, or the old model
    assert local_at_ala[2][0] == 2 and _equal(local_at_ala[2][1], plus(4))
    assert _equal(local_at_ala[0][1], plus(1)) and _equal(local_at_ala[1][1], p)
