"""FedPer (PFLlib serverper.py / clientper.py): the base parameters are averaged, the head and every buffer stay each
client's own; hand-computed on a tiny split model; its templates."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pfl.algorithms import REGISTRY
from pfl.algorithms.fedper import FedPer
from pfl.algorithms.lgfedavg import LGFedAvg
from pfl.algorithms.local import Local
from pfl.config import load_config
from pfl.data.loader import ClientData
from pfl.federated.base import FederatedContext
from pfl.federated.local import FitRes
from pfl.federated.state import State, model_state
from pfl.models import ModelSpec
from pfl.models.split import SplitModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_SPEC = ModelSpec("tiny", num_classes=1)


def tiny_split_model() -> SplitModel:
    """base: Linear(1, 1) + BatchNorm1d(1) (parameters, float running statistics, an integer counter); head: Linear."""
    torch.manual_seed(0)
    return SplitModel(nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)), nn.Linear(1, 1))


def context(num_clients: int, model: nn.Module) -> FederatedContext:
    """A context for aggregation only: clients, the model and its initial state (nothing trains or scores)."""
    idx = torch.arange(4)
    clients = [ClientData(fit=idx[:3], val=None, test=idx[3:]) for _ in range(num_clients)]
    return FederatedContext(clients=clients, specs=[_SPEC] * num_clients, runner=SimpleNamespace(models={_SPEC: model}),
                            update=None, init_states={_SPEC: model_state(model)}, num_join_clients=2, seed=0)


def filled(like: State, value: float, count: int) -> State:
    """``like``'s entries, every float entry set to ``value`` and the integer counter to ``count``."""
    return {k: torch.full_like(v, value) if v.is_floating_point() else torch.full_like(v, count)
            for k, v in like.items()}


BASE_PARAMS = ["base.0.weight", "base.0.bias", "base.1.weight", "base.1.bias"]
HEAD_PARAMS = ["head.weight", "head.bias"]
BUFFERS = ["base.1.running_mean", "base.1.running_var", "base.1.num_batches_tracked"]


def test_fedper_averages_the_base_parameters_and_keeps_heads_and_buffers_per_client():
    model = tiny_split_model()
    init = model_state(model)
    assert sorted(init) == sorted(BASE_PARAMS + HEAD_PARAMS + BUFFERS)
    algo = FedPer(context(3, model))
    assert algo.shared_keys == BASE_PARAMS  # PFLlib's serverper.py:85 uploads model.base, parameters() only

    # round 1: every client starts from the initial model, and the initial base is what travels down
    ins = algo.configure_fit(0, rnd=1)
    assert all(torch.equal(ins.state[k], init[k]) for k in init) and list(ins.sent) == BASE_PARAMS

    # clients 0 (1 sample) and 1 (3 samples) upload; client 2 is not sampled
    s0, s1 = filled(init, 1.0, 7), filled(init, 5.0, 9)
    results = [FitRes(0, s0, 1, torch.tensor(0.0)), FitRes(1, s1, 3, torch.tensor(0.0))]
    assert list(algo.upload(results[0])) == BASE_PARAMS  # comm/bytes_up: the base only
    algo.aggregate_fit(1, results)

    # base parameters: (1 * 1.0 + 3 * 5.0) / (1 + 3) = 16 / 4 = 4.0, the same for every client
    for cid in range(3):
        p = algo.personalized_state(cid)
        assert sorted(p) == sorted(init)
        for k in BASE_PARAMS:
            assert torch.equal(p[k], torch.full_like(init[k], 4.0)), (cid, k)
    # heads and buffers (running statistics, counter) are each client's own: 1.0 / 7 and 5.0 / 9; client 2's initial
    for cid, own in ((0, s0), (1, s1), (2, init)):
        p = algo.personalized_state(cid)
        for k in HEAD_PARAMS + BUFFERS:
            assert torch.equal(p[k], own[k]), (cid, k)
    # the next round starts from the personalized model (own head, global base); the global base travels down
    ins = algo.configure_fit(1, rnd=2)
    assert torch.equal(ins.state["head.weight"], s1["head.weight"])
    assert torch.equal(ins.state["base.0.weight"], torch.full_like(init["base.0.weight"], 4.0))
    assert list(ins.sent) == BASE_PARAMS


@pytest.mark.parametrize("cls", [FedPer, LGFedAvg, Local])
def test_state_round_trips(cls):
    model = tiny_split_model()
    algo = cls(context(3, model))
    init = model_state(model)
    algo.aggregate_fit(1, [FitRes(2, filled(init, 3.0, 1), 2, torch.tensor(0.0))])
    tensors, meta = algo.state_dict()
    fresh = cls(context(3, model))
    fresh.load_state_dict(tensors, meta)
    for cid in range(3):
        a, b = algo.personalized_state(cid), fresh.personalized_state(cid)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_fedper_needs_a_head_to_keep():
    with pytest.raises(ValueError, match="no head that is or ends with a Linear"):
        FedPer(context(2, nn.Linear(1, 1)))


@pytest.mark.parametrize("cls", [FedPer, LGFedAvg, Local])
@pytest.mark.parametrize("twin", ["pr0.2", "cpu"])
def test_templates_are_the_fedavg_setting(cls, twin):
    name = f"{cls.name}_cifar10_{twin}.yaml"
    cfg, fedavg = load_config(CONFIGS / name), load_config(CONFIGS / "fedavg_cifar10_pr0.2.yaml")
    assert cfg.algo == cls.name and REGISTRY[cfg.algo] is cls and cfg.hparams == {}
    rounds = 3 if name.endswith("_cpu.yaml") else 100
    assert cfg.model_copy(update={"algo": "fedavg"}) == fedavg.model_copy(update={"global_rounds": rounds})


def test_the_personal_part_is_pfllibs_model_fc_on_every_family():
    """PFLlib's BaseHeadSplit makes model.fc the head: on pfl's CNN, whose head holds fc1 and fc, FedPer averages fc1
    with the base and keeps fc; LG-FedAvg averages fc alone."""
    from pfl.federated.state import param_keys
    from pfl.models import build_model

    for name, fc in (("cnn", "head.2"), ("vgg11", "head.4"), ("resnet20", "head")):
        model = build_model(ModelSpec(name, 10, width=0.125))
        keys = param_keys(model)
        personal = [k for k in keys if k.startswith(fc + ".")]
        assert personal == [f"{fc}.weight", f"{fc}.bias"], name
        assert FedPer.shares(model) == [k for k in keys if k not in personal], name
        assert LGFedAvg.shares(model) == personal, name
    assert "head.0.weight" in FedPer.shares(build_model(ModelSpec("cnn", 10)))  # fc1 is shared
