"""FlexiFed: common prefixes of real architectures, each scheme's aggregation on a hand-computed case,
and a tracked mixed-architecture run whose saved client models reproduce their logged accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from pfl import tracking
from pfl.tracking import FLRunError
from pfl.algorithms.flexifed import SCHEMES, aggregate, common_prefix, signature
from pfl.config import ConfigError, load_config, load_head_config
from pfl.data.loader import DeviceData
from pfl.heads.run import run_heads
from pfl.metrics import accuracy
from pfl.models import ModelSpec, build_model
from pfl.train import build_algorithm, evaluate_client_model, prepare, run_training

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _sig(name: str):
    return signature(build_model(ModelSpec(name, 10, width=0.125)).state_dict())


# Leading state entries shared position by position (name and shape). A VGG conv layer is 7 entries
# (conv weight, bias, BN weight, bias, running mean, running var, num_batches_tracked); a CIFAR-ResNet
# stem 6 (conv weight + BN) and a basic block 12 (two convs + BNs). VGG-11 and -13 differ at their second
# layer ('M' vs conv); VGG-13 and -16/19 share 6 convs; VGG-16 and -19 share 7. ResNet-6n+2 has n blocks
# per stage: the shallower one's first stage is the common prefix (stem + n blocks).
PREFIXES = {("vgg11", "vgg13"): 7, ("vgg11", "vgg16"): 7, ("vgg11", "vgg19"): 7, ("vgg13", "vgg16"): 42,
            ("vgg13", "vgg19"): 42, ("vgg16", "vgg19"): 49,
            ("resnet20", "resnet32"): 6 + 3 * 12, ("resnet20", "resnet44"): 6 + 3 * 12,
            ("resnet20", "resnet56"): 6 + 3 * 12, ("resnet32", "resnet44"): 6 + 5 * 12,
            ("resnet32", "resnet56"): 6 + 5 * 12, ("resnet44", "resnet56"): 6 + 7 * 12}


@pytest.mark.parametrize(("a", "b"), list(PREFIXES))
def test_common_prefix_of_every_pair_of_depths(a, b):
    assert common_prefix(_sig(a), _sig(b)) == common_prefix(_sig(b), _sig(a)) == PREFIXES[a, b]
    assert common_prefix(_sig(a), _sig(a)) == len(_sig(a))  # identical architectures share everything


def _t(v):
    return torch.tensor([float(v)])


# Three architectures: X (clients 0, 1), Y (client 2: shares l0, t, l1 with X) and Z (client 3: l0, t only).
# t is an integer counter (num_batches_tracked), never averaged. Weights 1, 3, 2, 2 (8 in all).
STATES = {0: {"l0": _t(0), "t": torch.tensor(1), "l1": _t(10), "l2": _t(100)},
          1: {"l0": _t(4), "t": torch.tensor(2), "l1": _t(14), "l2": _t(104)},
          2: {"l0": _t(8), "t": torch.tensor(3), "l1": _t(20), "m2": _t(200)},
          3: {"l0": _t(12), "t": torch.tensor(4), "n1": _t(30)}}
WEIGHTS = {0: 1, 1: 3, 2: 2, 3: 2}
L0_ALL = (0 * 1 + 4 * 3 + 8 * 2 + 12 * 2) / 8  # 6.5: the prefix common to all (l0; t is not averaged)
X_L1, X_L2, X_L0 = (10 + 14 * 3) / 4, (100 + 104 * 3) / 4, (0 + 4 * 3) / 4  # FedAvg within X
XY_L1 = (10 * 1 + 14 * 3 + 20 * 2) / 6  # Max-Common: X and Y share the prefix through l1
EXPECTED = {  # scheme -> client -> float entries after aggregation
    "standalone": {c: {k: float(v) for k, v in s.items() if k != "t"} for c, s in STATES.items()},
    "clustered_fl": {0: {"l0": X_L0, "l1": X_L1, "l2": X_L2}, 1: {"l0": X_L0, "l1": X_L1, "l2": X_L2},
                     2: {"l0": 8, "l1": 20, "m2": 200}, 3: {"l0": 12, "n1": 30}},
    "basic_common": {0: {"l0": L0_ALL, "l1": 10, "l2": 100}, 1: {"l0": L0_ALL, "l1": 14, "l2": 104},
                     2: {"l0": L0_ALL, "l1": 20, "m2": 200}, 3: {"l0": L0_ALL, "n1": 30}},
    "clustered_common": {0: {"l0": L0_ALL, "l1": X_L1, "l2": X_L2}, 1: {"l0": L0_ALL, "l1": X_L1, "l2": X_L2},
                         2: {"l0": L0_ALL, "l1": 20, "m2": 200}, 3: {"l0": L0_ALL, "n1": 30}},
    "max_common": {0: {"l0": L0_ALL, "l1": XY_L1, "l2": X_L2}, 1: {"l0": L0_ALL, "l1": XY_L1, "l2": X_L2},
                   2: {"l0": L0_ALL, "l1": XY_L1, "m2": 200}, 3: {"l0": L0_ALL, "n1": 30}},
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_each_scheme_aggregates_as_hand_computed(scheme):
    out = aggregate(scheme, STATES, WEIGHTS)
    for c, expected in EXPECTED[scheme].items():
        assert list(out[c]) == list(STATES[c])  # every entry kept, in order
        assert {k: pytest.approx(float(v)) for k, v in out[c].items() if k != "t"} == expected, (scheme, c)
        assert out[c]["t"] == STATES[c]["t"]  # the counter stays the client's own


def test_unknown_scheme_and_mixed_architectures_elsewhere_are_config_errors(cifar10_dir, tmp_path):
    with pytest.raises(ConfigError, match="scheme"):
        load_config(None, ["algo=flexifed", "scheme=max"])
    cfg = load_config(None, ["algo=fedavg", "model=vgg11,vgg13", "model_width=0.125", f"data_dir={cifar10_dir}",
                             f"cache_dir={tmp_path}", "num_clients=4", "partition=iid", "device=cpu"])
    with pytest.raises(ConfigError, match="needs one architecture"):
        build_algorithm(prepare(cfg), 0)


def test_templates_hold_the_paper_setting():
    for family, models in (("vgg", "vgg11,vgg13,vgg16,vgg19"), ("resnet", "resnet20,resnet32,resnet44,resnet56")):
        cfg = load_config(CONFIGS / f"flexifed_cifar10_{family}.yaml")
        assert (cfg.algo, cfg.model, cfg.num_clients, cfg.partition, cfg.join_ratio) == \
            ("flexifed", models, 8, "iid", 1.0)
        assert cfg.hparams["sample_fraction"] == 0.1 and cfg.hparams["scheme"] == "max_common"
        cpu = load_config(CONFIGS / f"flexifed_cifar10_{family}_cpu.yaml")
        assert (cpu.model, cpu.num_clients, cpu.model_width) == (models, 8, 0.25)


@pytest.fixture(scope="module")
def mixed_run(cifar10_dir, tmp_path_factory):
    """A tracked FlexiFed run of 4 clients (VGG-11, VGG-16, VGG-11, VGG-16 at width 1/8): (config, FL run id, dir)."""
    tmp_path = tmp_path_factory.mktemp("flexifed")
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(None, ["algo=flexifed", "model=vgg11,vgg16", "model_width=0.125", f"data_dir={cifar10_dir}",
                             f"cache_dir={tmp_path / 'cache'}", "num_clients=4", "partition=iid", "join_ratio=1",
                             "global_rounds=1", "batch_size=32", "sample_fraction=0.2", "device=cpu",
                             "experiment=ff", "scheme=max_common"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        (fl_id,) = run_training(cfg, progress=False)["fl_run_ids"]
    return cfg, fl_id, tmp_path


def test_mixed_run_saves_each_clients_architecture_and_reloads_its_accuracy(mixed_run, tmp_path):
    cfg, fl_id, store = mixed_run
    tracking.configure_tracking(f"sqlite:///{store / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(fl_id)
    assert run.data.params["scheme"] == "max_common" and run.data.params["model"] == "vgg11,vgg16"
    assert {"test/acc_vgg11", "test/acc_vgg16", "test/acc"} <= set(run.data.metrics)
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=fl_id, artifact_path="client_metrics.json",
                                                                 dst_path=str(tmp_path / "m"))).read_text())
    prepared = prepare(cfg)
    data = DeviceData(prepared.dataset, torch.device("cpu"))
    for cid in range(4):
        model = tracking.load_client_model(fl_id, cid)
        assert [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)].__len__() == (8 if cid % 2 == 0 else 13)
        x, y = data.batch(prepared.partition.clients[cid].test)
        with torch.no_grad():
            acc = accuracy(torch.softmax(model(x), 1), y)
        entry = logged["clients"][cid]
        assert entry["architecture"] == ("vgg11" if cid % 2 == 0 else "vgg16")
        assert acc == pytest.approx(entry["acc"], abs=1e-9)
        again = evaluate_client_model(fl_id, str(cid))  # one call; a client id given as text works too
        assert {k: again[k] for k in ("acc", "nll", "ece", "brier", "num_test")} == \
            {k: entry[k] for k in ("acc", "nll", "ece", "brier", "num_test")}
    with pytest.raises(FLRunError, match="no run 'nope'"):
        tracking.load_client_model("nope", 0)
    with pytest.raises(FLRunError, match="client_id 'x'"):
        tracking.load_client_model(fl_id, "x")


def test_heads_train_on_every_client_of_a_mixed_run_with_its_own_head(mixed_run):
    cfg, fl_id, store = mixed_run
    tracking.configure_tracking(f"sqlite:///{store / 'mlflow.db'}")
    hc = load_head_config(["global_epoch=1", "sampling_num=2", "ood_dataset=none", "device=cpu"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(store)
        head_id = run_heads(fl_id, hc, progress=False)
    run = mlflow.MlflowClient().get_run(head_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == fl_id
    heads = sorted(a.path for a in mlflow.MlflowClient().list_artifacts(head_id, "heads"))
    assert len(heads) == 4 and {"test/acc", "wo/acc", "test/f_ece", "wo/f_ece"} <= set(run.data.metrics)


@pytest.mark.parametrize("overrides, message", [
    (["model=vgg11,resnet20"], "model=vgg11,resnet20 mixes architecture families (vgg: vgg11; resnet: resnet20)"),
    (["model=vgg11,vgg13", "optimizer=adamw"], "optimizer=adamw: flexifed trains with FlexiFed-IMP's SGD with "
                                               "momentum"),
], ids=["mixed-families", "adamw"])
def test_what_flexifed_cannot_mean_is_refused_in_one_line_before_any_run(overrides, message, cifar10_dir, tmp_path,
                                                                         monkeypatch, capsys):
    """Exit 2 with one line naming the families (or the optimizer), before any data is read or store opened."""
    from pfl.cli import main

    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--no-progress", "algo=flexifed", f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}",
                 "num_clients=4", "partition=iid", "global_rounds=1", "device=cpu", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not store.exists() and not (tmp_path / "mlruns").exists()


def test_one_architecture_warns_that_it_is_clustered_fedavg_and_weight_decay_is_flexifeds(cifar10_dir, tmp_path):
    """model=vgg11 alone trains, with a warning; `weight_decay` (bare, as a run field would be) sets FlexiFed's
    hyperparameter, which its fresh SGD with momentum uses, while the run's lr schedule applies."""
    cfg = load_config(None, ["algo=flexifed", "model=vgg11", "model_width=0.125", f"data_dir={cifar10_dir}",
                             f"cache_dir={tmp_path}", "num_clients=2", "partition=iid", "device=cpu",
                             "weight_decay=0.001", "lr_schedule=linear"])
    assert cfg.hparams["weight_decay"] == 0.001 and cfg.weight_decay is None
    with pytest.warns(UserWarning, match=r"flexifed with one architecture \(vgg11\) is clustered FedAvg"):
        algo = build_algorithm(prepare(cfg), 0)
    update = algo.local_update
    opt = update.optimizer([torch.zeros(1, requires_grad=True)])
    assert isinstance(opt, torch.optim.SGD)
    assert (opt.defaults["momentum"], opt.defaults["weight_decay"]) == (0.9, 0.001)
    assert update.lr_schedule == "linear" and update.step_lr(1, 4) == pytest.approx(cfg.lr * 3 / 4)
