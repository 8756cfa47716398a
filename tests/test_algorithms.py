"""FedAvg averaging, FedFomo weights and model selection, the client store, named state and exact resumption."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pfl.federated.base import FederatedContext
from pfl.algorithms.fedfomo import FedFomo, fomo_weights, normalize_weights
from pfl.federated.local import FitRes
from pfl.federated.state import (State, flatten, float_keys, load_state, model_state, param_keys, unflatten,
                                  state_digest, weighted_average)
from pfl.federated.store import ClientStore
from pfl.data.loader import ClientData
from pfl.models import ModelSpec


def _equal_states(a: State, b: State) -> bool:
    """Same entry names (in any order: a state read back from safetensors lists them sorted), and every entry
    bit-identical (dtype included)."""
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- FedAvg


def test_weighted_average_hand_vectors():
    # ([1, 2] * 1 + [3, 4] * 3) / (1 + 3) = ([1, 2] + [9, 12]) / 4 = [10, 14] / 4 = [2.5, 3.5]
    out = weighted_average([{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}], [1, 3])
    assert list(out) == ["w"]
    assert out["w"].shape == (2,)
    assert out["w"].dtype == torch.float32
    assert torch.allclose(out["w"], torch.tensor([2.5, 3.5]))


def test_weighted_average_named_entries_keep_their_shapes_and_skip_integer_buffers():
    # the same hand case spread over two entries: "a" (2, 1) holds [1; 2] / [3; 4], "b" () holds 5 / 9;
    # (1 * 5 + 3 * 9) / 4 = 32 / 4 = 8. An integer entry (a BatchNorm counter) is not averaged.
    s1 = {"a": torch.tensor([[1.0], [2.0]]), "b": torch.tensor(5.0), "n": torch.tensor(7)}
    s2 = {"a": torch.tensor([[3.0], [4.0]]), "b": torch.tensor(9.0), "n": torch.tensor(1)}
    out = weighted_average([s1, s2], [1, 3])
    assert list(out) == ["a", "b"]
    assert out["a"].shape == (2, 1) and out["b"].shape == ()
    assert torch.allclose(out["a"], torch.tensor([[2.5], [3.5]])) and out["b"].item() == pytest.approx(8.0)
    # an explicit key list averages only those entries
    assert list(weighted_average([s1, s2], [1, 3], keys=["b"])) == ["b"]


def test_weighted_average_equal_weights_is_mean_and_zero_weight_ignored():
    vs = [{"w": torch.tensor([0.0, 6.0])}, {"w": torch.tensor([2.0, 0.0])}, {"w": torch.tensor([100.0, 100.0])}]
    # weights 5, 5, 0: (5*[0,6] + 5*[2,0]) / 10 = [1, 3]; the third vector has no influence
    assert torch.allclose(weighted_average(vs, [5, 5, 0])["w"], torch.tensor([1.0, 3.0]))


def test_weighted_average_errors():
    with pytest.raises(ValueError, match="zero states"):
        weighted_average([], [])
    with pytest.raises(ValueError, match="positive"):
        weighted_average([{"w": torch.ones(2)}, {"w": torch.ones(2)}], [0, 0])


# ---------------------------------------------------------------- FedFomo weights


def test_fomo_weights_hand_computed():
    # loss_old = 2.0; received models with losses 1.0, 2.5, 1.5 at distances 1.0, 0.5, 2.0:
    #   w_0 = (2.0 - 1.0) / (1.0 + 1e-5) =  1.0 / 1.00001 =  0.99999
    #   w_1 = (2.0 - 2.5) / (0.5 + 1e-5) = -0.5 / 0.50001 = -0.99998
    #   w_2 = (2.0 - 1.5) / (2.0 + 1e-5) =  0.5 / 2.00001 =  0.2499988
    raw = fomo_weights(2.0, torch.tensor([1.0, 2.5, 1.5]), torch.tensor([1.0, 0.5, 2.0]))
    assert raw.dtype == torch.float64
    expected = torch.tensor([1.0 / 1.00001, -0.5 / 0.50001, 0.5 / 2.00001], dtype=torch.float64)
    assert torch.allclose(raw, expected, rtol=1e-6, atol=1e-9)
    # clip at 0 -> [0.99999, 0, 0.2499988]; sum 1.2499888; normalized ~= [0.8, 0, 0.2]
    w = normalize_weights(raw)
    assert w is not None
    assert torch.allclose(w, torch.tensor([0.8, 0.0, 0.2], dtype=torch.float64), atol=1e-5)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[1].item() == 0.0


def test_fomo_weights_zero_distance_uses_guard():
    # identical model (distance 0) that is better by 1e-3: (1e-3) / (0 + 1e-5) = 100, finite
    raw = fomo_weights(1.0, torch.tensor([0.999]), torch.tensor([0.0]))
    assert torch.isfinite(raw).all()
    assert raw.item() == pytest.approx(100.0, rel=1e-4)


def test_normalize_weights_all_nonpositive_returns_none():
    assert normalize_weights(torch.tensor([-1.0, 0.0, -0.5], dtype=torch.float64)) is None
    assert normalize_weights(torch.zeros(3, dtype=torch.float64)) is None


def test_normalize_weights_single_positive_gets_all_mass():
    w = normalize_weights(torch.tensor([-3.0, 0.5, -1.0], dtype=torch.float64))
    assert w is not None
    assert w.tolist() == [0.0, 1.0, 0.0]


# ---------------------------------------------------------------- ClientStore


def test_client_store_default_is_shared():
    default = {"w": torch.arange(4, dtype=torch.float32), "n": torch.tensor(3)}
    store = ClientStore(default)
    assert len(store) == 0
    # unwritten clients all return the very same default state (no per-client copies)
    assert store[0] is store.default(0)
    assert store[7] is store[3]
    assert _equal_states(store[5], default)
    # a default per client id (each client's architecture may differ)
    per_client = ClientStore(lambda cid: {"w": torch.full((cid + 1,), float(cid))})
    assert torch.equal(per_client[2]["w"], torch.full((3,), 2.0))


def test_client_store_copies_on_set():
    store = ClientStore({"w": torch.zeros(3)})
    source = {"w": torch.tensor([1.0, 2.0, 3.0])}
    store[2] = source
    source["w"].add_(10.0)  # mutating the source after set must not change the stored value
    assert torch.equal(store[2]["w"], torch.tensor([1.0, 2.0, 3.0]))
    assert len(store) == 1
    assert torch.equal(store[0]["w"], torch.zeros(3))  # other clients still see the default


def test_client_store_rejects_wrong_shape():
    store = ClientStore({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match="client 1"):
        store[1] = {"w": torch.zeros(4)}
    with pytest.raises(ValueError, match="client 1"):  # entries of another architecture
        store[1] = {"v": torch.zeros(3)}
    with pytest.raises(ValueError, match="client 1"):  # an entry missing
        store[1] = {}
    assert len(store) == 0


def test_disk_backed_store_round_trips_exactly_past_its_budget(tmp_path):
    states = {c: {"w": torch.randn(1000, generator=torch.Generator().manual_seed(c)) * 10 ** (c - 3),
                  "n": torch.tensor(c)} for c in range(6)}
    per_state = 1000 * 4 + 8  # float32 (1000,) + one int64
    default = {"w": torch.zeros(1000), "n": torch.tensor(0)}
    store = ClientStore(default, budget_bytes=2 * per_state, spill_dir=tmp_path)  # room for 2 states
    for c, v in states.items():
        store[c] = v
    assert store.bytes_in_memory == 2 * per_state  # clients 0 and 1 in memory, 2..5 on disk
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"client_{c}.safetensors" for c in range(2, 6)]
    assert len(store) == 6 and store.written() == list(range(6))
    for c, v in states.items():
        assert _equal_states(store[c], v)  # bit-exact, dtypes included
        assert store[c]["n"].dtype == torch.int64
    assert [c for c, _ in store.items()] == list(range(6))
    assert all(_equal_states(s, states[c]) for c, s in store.items())
    store[4] = {"w": states[4]["w"] + 1, "n": states[4]["n"]}  # overwriting a spilled client rewrites its file
    assert torch.equal(store[4]["w"], states[4]["w"] + 1) and store.bytes_in_memory == 2 * per_state
    assert _equal_states(store[9], default)
    store.clear()  # every client falls back to the default; spilled files are removed
    assert len(store) == 0 and store.written() == [] and list(tmp_path.iterdir()) == []
    assert _equal_states(store[4], default)


def test_fedfomo_with_a_tiny_budget_matches_unlimited(cifar10_dir, tmp_path):
    from pfl.config import load_config
    from pfl.train import prepare, run_federated

    models = {}
    for budget in (0, 1):  # 1 MB holds no CNN state (3.5 MB) -> none: everything spills to disk
        cfg = load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", "num_clients=5",
                                 "global_rounds=2", "join_ratio=0.6", "device=cpu", f"client_state_budget_mb={budget}"])
        algorithm, _ = run_federated(prepare(cfg), 0, [])
        models[budget] = [algorithm.personalized_state(c) for c in range(5)]
        if budget:  # every written state went to disk
            assert algorithm.models.bytes_in_memory == 0 and len(algorithm.models) >= 3
    for a, b in zip(models[0], models[1]):
        assert _equal_states(a, b)


# ---------------------------------------------------------------- named state


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    # float state: Linear weight 2*3 + bias 2, BatchNorm weight 2 + bias 2 + running_mean 2 + running_var 2
    # = 16 floats; BatchNorm's num_batches_tracked is an integer buffer and is excluded.
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_state_round_trip():
    model = _tiny_model()
    state = model_state(model)
    keys = float_keys(state)
    assert keys == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"]
    assert list(state) == [*keys, "1.num_batches_tracked"]  # the full state_dict, in order
    assert param_keys(model) == keys[:4]  # trainable parameters only
    flat = flatten(state, keys)
    assert flat.shape == (16,) and flat.dtype == torch.float32
    new = torch.arange(16, dtype=torch.float32)
    load_state(model, unflatten(new, state, keys))
    assert torch.equal(flatten(model_state(model), keys), new)
    # state_dict order: linear.weight (0..5), linear.bias (6,7), bn.weight (8,9), bn.bias (10,11),
    # bn.running_mean (12,13), bn.running_var (14,15)
    assert torch.equal(model[0].weight, torch.arange(6, dtype=torch.float32).view(2, 3))
    assert torch.equal(model[1].running_var, torch.tensor([14.0, 15.0]))
    assert model[1].num_batches_tracked.item() == 0  # entries missing from a (partial) state keep their values
    # model_state is detached from the model: changing the model does not change an earlier state
    snapshot = model_state(model)
    load_state(model, unflatten(torch.zeros(16), state, keys))
    assert torch.equal(flatten(snapshot, keys), new)
    assert all(not v.requires_grad for v in snapshot.values())


def test_unflatten_wrong_length_raises():
    model = _tiny_model()
    state = model_state(model)
    keys = float_keys(state)
    with pytest.raises(ValueError, match="15 entries"):
        unflatten(torch.zeros(15), state, keys)
    with pytest.raises(ValueError, match="17 entries"):
        unflatten(torch.zeros(17), state, keys)


def test_load_state_wrong_shape_or_name_raises_and_leaves_the_model_unchanged():
    model = _tiny_model()
    before = model_state(model)
    keys = float_keys(before)
    bad = {**unflatten(torch.arange(16, dtype=torch.float32), before, keys), "1.running_var": torch.zeros(3)}
    with pytest.raises(ValueError, match="running_var"):
        load_state(model, bad)
    assert _equal_states(model_state(model), before)
    with pytest.raises(KeyError, match="2.weight"):  # an entry of another architecture
        load_state(model, {"0.weight": torch.zeros(2, 3), "2.weight": torch.zeros(1)})
    assert _equal_states(model_state(model), before)


# ---------------------------------------------------------------- FedFomo selection


_SPEC = ModelSpec("tiny", num_classes=1)


def _fomo(num_clients: int, num_join: int, M: int = 5, epsilon: float = 0.0, seed: int = 0,
          epsilon_decay: float = 0.05, model: nn.Module | None = None) -> FedFomo:
    idx = torch.arange(4)
    clients = [ClientData(fit=idx[:2], val=idx[2:3], test=idx[3:]) for _ in range(num_clients)]
    model = model or nn.Linear(2, 1)  # 3 float parameters, no buffers
    # select() never trains or scores; the context needs only clients, the model, init state and counts
    ctx = FederatedContext(clients=clients, specs=[_SPEC] * num_clients, runner=SimpleNamespace(models={_SPEC: model}),
                           update=None, init_states={_SPEC: model_state(model)}, num_join_clients=num_join, seed=seed)
    return FedFomo(ctx, M=M, epsilon=epsilon, epsilon_decay=epsilon_decay)


def test_fedfomo_initial_state():
    algo = _fomo(num_clients=4, num_join=2, M=5)
    assert algo.M == 2  # M' = min(M, clients sampled per round)
    assert torch.equal(algo.P, torch.eye(4, dtype=torch.float64))
    # before anything was uploaded, a client starts from (and anchors on) its current model
    ins = algo.configure_fit(1, rnd=1)
    assert ins.indices is None  # trains on the client's whole train split
    assert _equal_states(ins.state, algo.ctx.init_state(1))
    assert _equal_states(algo.anchors[1], algo.ctx.init_state(1))


def test_fedfomo_select_top_m_ties_by_lower_id():
    algo = _fomo(num_clients=5, num_join=5)
    algo.P[2] = torch.tensor([0.5, 0.9, 0.1, 0.9, 0.5], dtype=torch.float64)
    # descending by value: 0.9 (ids 1, 3 -> lower id first), 0.5 (ids 0, 4), 0.1 (id 2)
    assert algo.select(2, 3, rnd=1).tolist() == [1, 3, 0]
    assert algo.select(2, 5, rnd=1).tolist() == [1, 3, 0, 4, 2]
    # an untouched row is the identity row: the client itself first, then the others by id
    assert algo.select(4, 3, rnd=1).tolist() == [4, 0, 1]


def test_fedfomo_e_greedy_exploits_by_affinity_once_epsilon_has_decayed():
    # NVlabs e_greedy: [self] + M' others. epsilon - (round - 1) * decay = 0.3 - 7 * 0.05 < 0 at round 8,
    # so every slot exploits: the others of row 2 by affinity are 1 (0.9), 4 (0.7), 0 (0.5), 3 (0.1);
    # the client itself (affinity 5.0, the highest) is kept once, first, and never drawn again.
    algo = _fomo(num_clients=5, num_join=5, M=3, epsilon=0.3, epsilon_decay=0.05)
    algo.P[2] = torch.tensor([0.5, 0.9, 5.0, 0.1, 0.7], dtype=torch.float64)
    assert algo.select(2, 3, rnd=8).tolist() == [2, 1, 4, 0]
    # M' capped by the n - 1 other clients
    assert algo.select(2, 9, rnd=8).tolist() == [2, 1, 4, 0, 3]


def test_fedfomo_e_greedy_explores_per_slot_with_linear_decay():
    # round 1: threshold 1.0 - 0 * 0.1 = 1.0 > every uniform draw: all slots take the shuffled others
    a = _fomo(num_clients=10, num_join=10, epsilon=1.0, epsilon_decay=0.1, seed=3)
    b = _fomo(num_clients=10, num_join=10, epsilon=1.0, epsilon_decay=0.1, seed=3)
    for algo in (a, b):  # affinity falls with the id (no ties): exploiting takes the lowest other ids
        algo.P[:] = -torch.arange(10, dtype=torch.float64)
    picks = [a.select(c, 4, rnd=1).tolist() for c in range(10)]
    assert picks == [b.select(c, 4, rnd=1).tolist() for c in range(10)]  # seeded
    for c, ids in enumerate(picks):
        assert ids[0] == c and c not in ids[1:] and len(set(ids)) == 5 and all(0 <= i < 10 for i in ids)
    # exploring must differ from exploiting somewhere
    assert any(ids[1:] != [i for i in range(10) if i != c][:4] for c, ids in enumerate(picks))
    # round 11: threshold 1.0 - 10 * 0.1 = 0 (linear, not 1.0 * 0.1 ** 10 > 0): never explores
    for c in range(10):
        assert a.select(c, 4, rnd=11).tolist() == [c] + [i for i in range(10) if i != c][:4]


def test_validation_loss_is_pfllibs_mean_of_batch_means():
    # 5 validation samples with per-sample losses l = CE(logits, labels); PFLlib's recalculate_loss
    # with batch 2 averages the batch means of [l0, l1], [l2, l3], [l4] (or drops [l4] with drop_last)
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, -2.0]])
    labels = torch.tensor([0, 0, 1, 0, 1])
    runner = SimpleNamespace(data=SimpleNamespace(targets=labels),
                             logits=lambda spec, state, idx: logits[idx] * state["v"][0])
    clients = [ClientData(fit=torch.arange(5), val=torch.arange(5), test=torch.arange(5))]
    one = {"v": torch.ones(1)}
    ctx = FederatedContext(clients, [_SPEC], runner, None, {_SPEC: one}, num_join_clients=1, seed=0)
    l = nn.functional.cross_entropy(logits, labels, reduction="none").double()
    out = ctx.losses(_SPEC, [one], torch.arange(5), batch_size=2)
    assert out.tolist() == pytest.approx([((l[0] + l[1]) / 2 + (l[2] + l[3]) / 2 + l[4]).item() / 3])
    out = ctx.losses(_SPEC, [one], torch.arange(5), batch_size=2, drop_last=True)
    assert out.tolist() == pytest.approx([((l[0] + l[1]) / 2 + (l[2] + l[3]) / 2).item() / 2])
    assert ctx.losses(_SPEC, [one], torch.arange(5)).tolist() == pytest.approx([l.mean().item()])


def test_fedfomo_distances_and_blend_use_parameters_only():
    # Linear(3, 2) + BatchNorm1d(2): flat = 6 weight, 2 bias, 2 bn weight, 2 bn bias (params: 0..11),
    # then running_mean (12, 13) and running_var (14, 15) (buffers)
    # (the states below are these 16 floats unflattened, plus the integer num_batches_tracked)
    algo = _fomo(num_clients=3, num_join=3, model=nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    like = algo.ctx.init_state(0)
    keys = float_keys(like)
    assert algo.params == keys[:4]  # distances and blend cover the four parameter entries

    def state(flat: torch.Tensor, counter: int = 0) -> State:
        return {**unflatten(flat, like, keys), "1.num_batches_tracked": torch.tensor(counter)}

    anchor = state(torch.zeros(16))
    a = torch.zeros(16)
    a[0], a[13] = 3.0, 100.0   # parameter moved by 3, a buffer by 100
    b = torch.zeros(16)
    b[1], b[2], b[14] = 3.0, 4.0, -7.0
    # ||a - anchor|| over parameters = 3 (not sqrt(9 + 10000)); ||b - anchor|| = sqrt(9 + 16) = 5
    assert algo.distances(anchor, [state(a), state(b)]).tolist() == [3.0, 5.0]
    own = state(torch.arange(16, dtype=torch.float32), counter=7)
    mixed = algo.blend(own, torch.tensor([0.25, 0.75], dtype=torch.float64), [state(a, 1), state(b, 2)])
    # parameters: 0.25 * a + 0.75 * b = [0.75, 2.25, 3, 0, ...]; buffers: the client's own [12, 13, 14, 15]
    expected = torch.zeros(16)
    expected[:3] = torch.tensor([0.75, 2.25, 3.0])
    expected[12:] = torch.tensor([12.0, 13.0, 14.0, 15.0])
    assert list(mixed) == list(like)
    assert torch.equal(flatten(mixed, keys), expected)
    assert mixed["1.num_batches_tracked"].item() == 7  # the integer buffer is the client's own too


def test_fedfomo_aggregate_adds_raw_weights_to_affinity_row():
    algo = _fomo(num_clients=3, num_join=3)
    ids = torch.tensor([2, 0])
    raw = torch.tensor([0.25, -0.5], dtype=torch.float64)
    algo._pending[1] = (ids, raw)
    uploaded = {"weight": torch.tensor([[1.0, 2.0]]), "bias": torch.tensor([3.0])}
    algo.aggregate_fit(1, [FitRes(client_id=1, state=uploaded, num_samples=2, loss=torch.tensor(0.0))])
    # row 1 of the identity plus the raw (unclipped) weights at columns 2 and 0: [-0.5, 1, 0.25]
    assert algo.P[1].tolist() == [-0.5, 1.0, 0.25]
    assert algo.P[0].tolist() == [1.0, 0.0, 0.0]
    assert _equal_states(algo.personalized_state(1), uploaded)
    assert _equal_states(algo.personalized_state(0), algo.ctx.init_state(0))  # not uploaded: unchanged
    assert algo.num_uploaded == 1
    assert 1 not in algo._pending


# ---------------------------------------------------------------- client stores (exact resumption of every algorithm:
# tests/test_resume.py)


def test_store_keeps_the_architectures_entry_order_in_memory_and_spilled(tmp_path):
    default = {"b.weight": torch.zeros(2), "a.bias": torch.zeros(1), "c.count": torch.tensor(0)}
    store = ClientStore(default, budget_bytes=20, spill_dir=tmp_path)  # room for one state in memory
    shuffled = {"c.count": torch.tensor(3), "a.bias": torch.ones(1), "b.weight": torch.ones(2)}
    store[0] = shuffled
    store[1] = shuffled  # spilled: safetensors stores entries sorted by name
    assert (tmp_path / "client_1.safetensors").is_file()
    for cid in (0, 1):
        assert list(store[cid]) == list(default) and torch.equal(store[cid]["c.count"], torch.tensor(3))
    assert state_digest(store[0]) == state_digest(dict(reversed(list(store[1].items()))))
