"""FedProto (PFLlib serverproto.py / clientproto.py): only per-class mean features travel; clients add
lamda * MSE(features, global prototype of the label) to cross-entropy; the server averages each class's prototypes
without weights over the round's holders; clients keep their own models and are scored by the nearest global
prototype (a linear rule in place of their final Linear). Hand-computed cases, a mixed VGG-11 / VGG-16 run on CIFAR-10,
templates."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pfl.algorithms import REGISTRY
from pfl.algorithms.fedproto import ABSENT, FedProto, ProtoUpdate, prototype_classifier
from pfl.config import load_config
from pfl.data.loader import ClientData
from pfl.federated.base import FederatedContext
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import model_state
from pfl.models import ModelSpec
from pfl.models.split import SplitModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_SPEC = ModelSpec("tiny", num_classes=3)


class _Data(SimpleNamespace):
    def batch(self, idx, gen=None):
        return self.x[idx], self.y[idx]


def _zero(out, y):
    return 0.0 * out.sum()


def _doubling() -> SplitModel:
    """base z = (x, 2x) (Linear(1, 2) without bias), head Linear(2, 3)."""
    model = SplitModel(nn.Linear(1, 2, bias=False), nn.Linear(2, 3))
    with torch.no_grad():
        model.base.weight.copy_(torch.tensor([[1.0], [2.0]]))
    return model


def _algo(num_clients: int = 3, **hp) -> FedProto:
    torch.manual_seed(0)
    model = SplitModel(nn.Sequential(nn.Linear(1, 2), nn.BatchNorm1d(2)), nn.Linear(2, 3))
    idx = torch.arange(4)
    clients = [ClientData(fit=idx[:3], val=None, test=idx[3:]) for _ in range(num_clients)]
    ctx = FederatedContext(clients=clients, specs=[_SPEC] * num_clients, runner=SimpleNamespace(models={_SPEC: model}),
                           update=None, init_states={_SPEC: model_state(model)}, num_join_clients=2, seed=0)
    return FedProto(ctx, **hp)


def _result(cid: int, state: dict, protos: list[list[float]], present: list[bool], n: int = 1) -> FitRes:
    return FitRes(cid, {**state, "proto/protos": torch.tensor(protos), "proto/present": torch.tensor(present)}, n,
                  torch.tensor(0.0))


def test_regularizer_replaces_rows_with_the_labels_global_prototype():
    """x = (1, 2), labels (0, 1): z = ((1, 2), (2, 4)). Class 0's prototype (0, 0); class 1 has none, so its row is
    z itself (adds 0 but counts): MSE = (1 + 4 + 0 + 0) / 4 = 1.25; lamda 2: 2.5 (clientproto.py:46-52)."""
    model = _doubling()
    data = _Data(x=torch.tensor([[1.0], [2.0]]), y=torch.tensor([0, 1]), device=torch.device("cpu"))
    update = ProtoUpdate(SGDUpdate(batch_size=2, lr=0.0, local_epochs=1, loss_fn=_zero), lamda=2.0, num_classes=3)
    protos = {"protos": torch.tensor([[0.0, 0.0], [9.0, 9.0], [9.0, 9.0]]),
              "present": torch.tensor([True, False, False])}
    _, loss = update.fit(model, data, FitIns(model_state(model), extras=protos), torch.arange(2), seed=0)
    assert loss.item() == pytest.approx(2.5)
    # before any global prototypes (round 1): the task loss alone
    _, loss = update.fit(model, data, FitIns(model_state(model)), torch.arange(2), seed=0)
    assert loss.item() == 0.0


def test_client_uploads_per_class_mean_features_of_its_training():
    """x = (1, 2, 3), labels (0, 0, 1), z = (x, 2x), two epochs of batches of 1 at lr 0: class 0's mean (1.5, 3),
    class 1's (3, 6), class 2 absent (agg_func over every minibatch of every epoch, clientproto.py:54-56,67)."""
    model = _doubling()
    data = _Data(x=torch.tensor([[1.0], [2.0], [3.0]]), y=torch.tensor([0, 0, 1]), device=torch.device("cpu"))
    update = ProtoUpdate(SGDUpdate(batch_size=1, lr=0.0, local_epochs=2), lamda=1.0, num_classes=3)
    state, _ = update.fit(model, data, FitIns(model_state(model)), torch.arange(3), seed=0)
    assert torch.equal(state["proto/present"], torch.tensor([True, True, False]))
    assert torch.allclose(state["proto/protos"][:2], torch.tensor([[1.5, 3.0], [3.0, 6.0]]))
    assert set(state) == {"base.weight", "head.weight", "head.bias", "proto/protos", "proto/present"}


def test_server_averages_prototypes_unweighted_per_class_and_keeps_models():
    algo = _algo(lamda=1.0)
    init = algo.ctx.init_state(0)
    ins = algo.configure_fit(0, 1)
    assert ins.extras == {} and ins.sent == {}  # round 1: no prototypes yet, nothing travels down
    assert all(torch.equal(ins.state[k], init[k]) for k in init)
    own0 = {k: torch.full_like(v, 1.0) if v.is_floating_point() else v for k, v in init.items()}
    own2 = {k: torch.full_like(v, 2.0) if v.is_floating_point() else v for k, v in init.items()}
    # client 0 holds classes 0, 1; client 2 classes 1, 2 (its absent row 0 holds junk); weights 1 and 3 are ignored
    r0 = _result(0, own0, [[1.0, 1.0], [2.0, 2.0], [0.0, 0.0]], [True, True, False], n=1)
    r2 = _result(2, own2, [[99.0, 99.0], [4.0, 6.0], [5.0, 5.0]], [False, True, True], n=3)
    assert set(algo.upload(r2)) == {"protos", "labels"} and algo.upload(r2)["protos"].shape == (2, 2)
    algo.aggregate_fit(1, [r0, r2])
    g = algo.global_protos
    assert torch.equal(g["present"], torch.tensor([True, True, True]))
    assert torch.equal(g["protos"], torch.tensor([[1.0, 1.0], [3.0, 4.0], [5.0, 5.0]]))  # (2+4)/2, (2+6)/2
    weight, bias = prototype_classifier(g["protos"], g["present"])
    for cid, own in ((0, own0), (2, own2), (1, init)):  # each keeps its own model; nothing of a model is averaged
        assert all(torch.equal(algo.own[cid][k], own[k]) for k in init), cid
        p = algo.personalized_state(cid)  # scored with the prototype classifier as its final Linear
        assert list(p) == list(init) and torch.equal(p["head.weight"], weight) and torch.equal(p["head.bias"], bias)
        assert all(torch.equal(p[k], own[k]) for k in init if not k.startswith("head.")), cid
    ins = algo.configure_fit(1, 2)
    assert torch.equal(ins.extras["protos"], g["protos"]) and torch.equal(ins.sent["present"], g["present"])
    # round 2, only client 0: the global prototypes are replaced; class 2 has none any more
    algo.aggregate_fit(2, [_result(0, own0, [[7.0, 7.0], [8.0, 8.0], [0.0, 0.0]], [True, True, False])])
    assert torch.equal(algo.global_protos["present"], torch.tensor([True, True, False]))
    assert torch.equal(algo.global_protos["protos"][:2], torch.tensor([[7.0, 7.0], [8.0, 8.0]]))
    # state round trip
    tensors, meta = algo.state_dict()
    fresh = _algo(lamda=1.0)
    fresh.load_state_dict(tensors, meta)
    assert all(torch.equal(fresh.global_protos[k], algo.global_protos[k]) for k in ("protos", "present"))
    assert all(torch.equal(fresh.own[0][k], own0[k]) for k in init)
    assert all(torch.equal(fresh.personalized_state(0)[k], algo.personalized_state(0)[k]) for k in init)


def test_mismatched_feature_dimensions_are_refused():
    algo = _algo()
    state = algo.ctx.init_state(0)
    with pytest.raises(ValueError, match="feature dimension"):
        algo.aggregate_fit(1, [_result(0, state, [[1.0, 1.0]] * 3, [True] * 3),
                               _result(1, state, [[1.0, 1.0, 1.0]] * 3, [True] * 3)])


def test_the_prototype_classifier_picks_the_nearest_prototype_by_hand():
    """Prototypes (1, 1), (3, 4), class 2 absent: (0, 0) -> 0; (3, 3.9) -> 1; (10, 10) -> 1, as the absent class is
    never chosen even where its row would be nearest (clientproto.py:120-126). D = 2: weight 2P/2 = P, bias -|p|^2/2
    = (-1, -12.5); logits = -MSE + |z|^2 / 2: for z = (0, 0), -MSE = (-1, -12.5)."""
    feats = torch.tensor([[0.0, 0.0], [3.0, 3.9], [10.0, 10.0]])
    protos = torch.tensor([[1.0, 1.0], [3.0, 4.0], [10.0, 10.0]])
    weight, bias = prototype_classifier(protos, torch.tensor([True, True, False]))
    assert torch.equal(weight, torch.tensor([[1.0, 1.0], [3.0, 4.0], [0.0, 0.0]]))
    assert torch.equal(bias, torch.tensor([-1.0, -12.5, ABSENT]))
    logits = feats @ weight.T + bias
    assert logits.argmax(1).tolist() == [0, 1, 1]
    mse = ((feats[:, None, :] - protos[None]) ** 2).mean(2)
    assert torch.allclose(logits[:, :2], (-mse + (feats ** 2).sum(1, keepdim=True) / 2)[:, :2])
    weight, bias = prototype_classifier(protos, torch.tensor([True, True, True]))
    assert (feats @ weight.T + bias).argmax(1).tolist() == [0, 1, 2]


def test_before_any_prototype_a_client_is_its_own_model():
    algo = _algo()
    own = algo.personalized_state(0)
    assert algo.global_protos == {} and all(torch.equal(own[k], algo.ctx.init_state(0)[k]) for k in own)


def test_knobs_default_to_pfllibs():
    assert FedProto.Params().lamda == 1.0  # main.py:447 -lam 1.0
    with pytest.raises(ValueError):
        FedProto.Params(lamda=-1.0)
    assert set(FedProto.search_space) == {"lamda"}


@pytest.mark.parametrize("name", ["fedproto_cifar10_pr0.2.yaml", "fedproto_cifar10_cpu.yaml",
                                  "fedproto_cifar10_vgg_mixed.yaml", "fedproto_cifar10_vgg_mixed_cpu.yaml"])
def test_fedproto_templates_are_the_fedavg_setting(name):
    cfg, fedavg = load_config(CONFIGS / name), load_config(CONFIGS / "fedavg_cifar10_pr0.2.yaml")
    assert cfg.algo == "fedproto" and REGISTRY[cfg.algo] is FedProto and cfg.hparams == {"lamda": 1.0}
    update = {"global_rounds": 3 if name.endswith("_cpu.yaml") else 100}
    if "vgg_mixed" in name:
        update |= {"model": ["vgg11", "vgg16"] if isinstance(cfg.model, list) else "vgg11,vgg16",
                   "model_width": 0.25 if name.endswith("_cpu.yaml") else 1.0}
    assert cfg.model_copy(update={"algo": "fedavg", "hparams": {}}) == fedavg.model_copy(update=update)


def test_mixed_vgg11_vgg16_run_trains(cifar10_dir, tmp_path):
    """The mixed template's federation, shrunk: 5 clients (VGG-11, VGG-16, VGG-11, VGG-16, VGG-11), all sampled,
    2 rounds: every client's own model trained, prototypes of the common features (the input of VGG's last Linear),
    per-architecture accuracies logged."""
    from pfl.federated.engine import Engine, Schedule
    from pfl.train import build_algorithm, prepare

    cfg = load_config(CONFIGS / "fedproto_cifar10_vgg_mixed_cpu.yaml",
                      [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", "num_clients=5", "join_ratio=1.0",
                       "global_rounds=2", "model_width=0.0625", "batch_size=32", "device=cpu", "num_threads=1",
                       "eval_batch_size=500"])
    algo = build_algorithm(prepare(cfg), 0)
    assert [s.name for s in algo.ctx.specs] == ["vgg11", "vgg16"] * 2 + ["vgg11"]
    final = Engine(algo, Schedule(2, cfg.num_join_clients, eval_gap=1)).run()
    g = algo.global_protos
    width = {m.head[-1].in_features for m in algo.ctx.runner.models.values()}  # the input of VGG's last Linear
    assert len(width) == 1 and g["protos"].shape == (10, *width) and g["present"].any()
    for cid in range(5):
        own, init = algo.own[cid], algo.ctx.init_state(cid)
        assert any(not torch.equal(own[k], init[k]) for k in init), cid
    m = final.metrics
    assert 0.0 < m["test/acc"] <= 1.0 and {"test/acc_vgg11", "test/acc_vgg16"} <= set(m)
    # new-client adaptation: FedProto's objective from the client's model; the algorithm's state is untouched
    before, protos = algo.personalized_state(1), {k: v.clone() for k, v in g.items()}
    adapted = algo.adapt(1, 1, seed=5)
    assert list(adapted) == list(before) and any(not torch.equal(adapted[k], before[k]) for k in before)
    assert all(torch.equal(algo.personalized_state(1)[k], before[k]) for k in before)
    assert all(torch.equal(algo.global_protos[k], protos[k]) for k in protos)
