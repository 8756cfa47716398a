"""The downlink knobs (pfl.federated.downlink) on a tiny model, by hand: which layers go down, how a blend merges, what
FedAvg averages and each client keeps, and what the engine counts as travelled; algo=local's clients train alone."""

from __future__ import annotations

import pytest
import torch

from pfl.algorithms.fedavg import FedAvg
from pfl.algorithms.local import Local
from pfl.federated.base import FederatedContext
from pfl.federated.downlink import Downlink
from pfl.federated.local import FitRes
from pfl.models import ModelSpec

SPEC = ModelSpec("tiny", 1)
# three layers in state-dict order: "base" (weight, bias), "head.0" (weight), "head.1" (weight, bias)
INIT = {"base.weight": torch.tensor([1.0, 1.0]), "base.bias": torch.tensor([0.0]),
        "head.0.weight": torch.tensor([2.0]), "head.1.weight": torch.tensor([4.0]), "head.1.bias": torch.tensor([8.0])}


def _state(v: float) -> dict[str, torch.Tensor]:
    """Every entry of INIT's shape filled with ``v``."""
    return {k: torch.full_like(t, v) for k, t in INIT.items()}


def _fedavg(downlink: Downlink, cls=FedAvg):
    ctx = FederatedContext(clients=[None, None, None], specs=[SPEC] * 3, runner=None, update=None,
                           init_states={SPEC: INIT}, num_join_clients=2, seed=0, downlink=downlink)
    return cls(ctx)


def test_parse_names_each_knob_and_refuses_the_rest():
    assert Downlink.parse("full") == Downlink(None, 1.0) and Downlink.parse("full").full
    assert Downlink.parse("none") == Downlink(0, 1.0) and Downlink.parse("head_layers:2", 0.5) == Downlink(2, 0.5)
    assert [Downlink.parse(d, b).label for d, b in [("full", 1), ("head_layers:2", 1), ("full", 0.5),
                                                    ("head_layers:2", 0.5), ("none", 1)]] == \
        ["", "-head2", "-blend0.5", "-head2-blend0.5", "-nodl"]
    for bad in ("head_layers:0", "head_layers", "top:2", "all"):
        with pytest.raises(ValueError, match="downlink="):
            Downlink.parse(bad)
    with pytest.raises(ValueError, match="downlink_blend=0"):
        Downlink.parse("full", 0.0)


def test_the_last_k_layers_are_the_last_modules_owning_entries():
    assert Downlink(2).shared(INIT) == ["head.0.weight", "head.1.weight", "head.1.bias"]
    assert Downlink(1).shared(INIT) == ["head.1.weight", "head.1.bias"]
    assert Downlink(0).shared(INIT) == [] and Downlink(None).shared(INIT) == list(INIT)
    assert Downlink(5).shared(INIT) == list(INIT)  # more layers than the model has: all of them


def test_blend_merges_beta_global_and_one_minus_beta_own_on_the_shared_layers():
    own, glob = _state(2.0), _state(10.0)
    merged = Downlink(1, 0.25).merge(own, glob)
    # head.1: 0.25 * 10 + 0.75 * 2 = 2.5 + 1.5 = 4; the rest stays the client's own 2
    assert merged["head.1.weight"].item() == 4.0 and merged["head.1.bias"].item() == 4.0
    assert merged["head.0.weight"].item() == 2.0 and torch.equal(merged["base.weight"], torch.tensor([2.0, 2.0]))
    ints = Downlink(None, 0.5).merge({"n": torch.tensor(3)}, {"n": torch.tensor(7)})
    assert ints["n"].item() == 7  # an integer buffer takes the global value


def test_full_downlink_is_fedavg():
    algo = _fedavg(Downlink())
    algo.aggregate_fit(1, [FitRes(0, _state(1.0), 1, torch.tensor(0.0)), FitRes(1, _state(4.0), 3, torch.tensor(0.0))])
    # (1 * 1 + 3 * 4) / 4 = 13 / 4 = 3.25 everywhere; every client's model is the global one, sent whole
    assert all(v.eq(3.25).all() for v in algo.global_state.values())
    assert algo.personalized_state(2) is algo.global_state
    ins = algo.configure_fit(2, 2)
    assert ins.state is algo.global_state and ins.sent is None and len(algo.own) == 0


def test_head_layers_average_and_send_only_the_top_layers():
    algo = _fedavg(Downlink(2))
    algo.aggregate_fit(1, [FitRes(0, _state(1.0), 1, torch.tensor(0.0)), FitRes(1, _state(4.0), 3, torch.tensor(0.0))])
    glob = algo.global_state
    assert glob["head.0.weight"].item() == 3.25 and glob["head.1.bias"].item() == 3.25  # averaged
    assert torch.equal(glob["base.weight"], INIT["base.weight"])  # never uploaded, never averaged
    # client 0 keeps its own base (1.0) under the averaged top layers (3.25); client 2 never trained: INIT's base
    mine = algo.personalized_state(0)
    assert mine["base.weight"].eq(1.0).all() and mine["head.0.weight"].item() == 3.25
    assert torch.equal(algo.personalized_state(2)["base.bias"], INIT["base.bias"])
    ins = algo.configure_fit(0, 2)
    assert sorted(ins.sent) == ["head.0.weight", "head.1.bias", "head.1.weight"]  # what travelled
    assert ins.state["base.weight"].eq(1.0).all() and ins.state["head.1.weight"].item() == 3.25
    assert sorted(algo.upload(FitRes(0, _state(1.0), 1, torch.tensor(0.0)))) == sorted(ins.sent)


def test_blend_of_the_whole_model():
    algo = _fedavg(Downlink(None, 0.5))
    algo.aggregate_fit(1, [FitRes(0, _state(2.0), 1, torch.tensor(0.0)), FitRes(1, _state(6.0), 1, torch.tensor(0.0))])
    # global = (2 + 6) / 2 = 4; client 0's new model = 0.5 * 4 + 0.5 * 2 = 3, client 1's = 0.5 * 4 + 0.5 * 6 = 5
    assert algo.configure_fit(0, 2).state["head.1.bias"].item() == 3.0
    assert algo.personalized_state(1)["base.weight"].eq(5.0).all()
    assert len(algo.configure_fit(0, 2).sent) == len(INIT)  # the whole global model travelled


def test_no_downlink_keeps_every_client_on_its_own_model():
    algo = _fedavg(Downlink(0))
    algo.aggregate_fit(1, [FitRes(0, _state(2.0), 1, torch.tensor(0.0)), FitRes(1, _state(6.0), 1, torch.tensor(0.0))])
    assert algo.personalized_state(0)["head.1.weight"].item() == 2.0 and algo.configure_fit(1, 2).sent == {}
    assert algo.global_state["head.1.weight"].item() == 4.0  # uploaded and averaged all the same (FedGen's heads)


def test_local_clients_train_alone_and_nothing_travels():
    algo = _fedavg(Downlink(), cls=Local)
    algo.aggregate_fit(1, [FitRes(0, _state(2.0), 1, torch.tensor(0.0))])
    assert algo.configure_fit(0, 2).state["base.bias"].item() == 2.0 and algo.configure_fit(0, 2).sent == {}
    assert torch.equal(algo.personalized_state(1)["head.0.weight"], INIT["head.0.weight"])
    assert algo.upload(FitRes(0, _state(2.0), 1, torch.tensor(0.0))) == {}
