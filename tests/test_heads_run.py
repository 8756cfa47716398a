"""Head runs on an FL run made by the real pipeline (real CIFAR-10 slice, SQLite MLflow store in a temp dir)."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pfl import tracking
from pfl.federated.engine import Callback
from pfl.config import ConfigError, load_config, load_head_config
from pfl.data.datasets import CIFAR100_FOLDER
from pfl.heads.run import run_heads
from pfl.metrics import weighted_mean
from pfl.train import run_training

NUM_CLIENTS = 5
OOD_COLUMNS = [f"{p}ood_{m}_{s}" for p in ("wo_", "") for m in ("auroc", "aupr") for s in ("msp", "entropy")]
OOD_METRICS = {c: c.replace("wo_ood_", "wo/ood_") if c.startswith("wo_") else c.replace("ood_", "ood/", 1)
               for c in OOD_COLUMNS}  # client_metrics.csv column -> run metric


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _train(data_dir, tmp_path, callbacks=None) -> dict:
    values = {"data_dir": data_dir, "cache_dir": tmp_path / "cache", "num_clients": NUM_CLIENTS,
              "classes_per_client": 4, "global_rounds": 1, "join_ratio": 0.4, "experiment": "heads-it",
              "algo": "fedfomo", "device": "cpu"}
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    return run_training(cfg, extra_callbacks=callbacks, progress=False)


def _head_runs():
    return mlflow.search_runs(experiment_names=["heads-it"], filter_string="tags.`pfl.kind` = 'heads'",
                              output_format="list")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory) -> tuple[Path, str]:
    """One FL run for the module's tests (trained once): its store's database file and its run id."""
    folder = tmp_path_factory.mktemp("heads_fl_run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # the store's artifacts
        tracking.configure_tracking(f"sqlite:///{folder / 'mlflow.db'}")
        (fl_id,) = _train(data_dir, folder)["fl_run_ids"]
    return folder / "mlflow.db", fl_id


@pytest.fixture
def fl_run(trained, tmp_path) -> str:
    """The module's FL run in a copy of its store for this test alone (the head runs a test logs are only in its
    copy; their artifacts go under the run's experiment, each run in its own folder)."""
    db, fl_id = trained
    shutil.copyfile(db, tmp_path / "mlflow.db")
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    return fl_id


@pytest.mark.parametrize("method", ["aph", "loraph"])
def test_head_run_is_nested_and_logs_heads_table_and_metrics(fl_run, method):
    hc = load_head_config(["global_epoch=1", "sampling_num=3", "rank=4"], method=method)
    run_id = run_heads(fl_run, hc, progress=False)
    client = mlflow.MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == fl_run and run.data.tags["pfl.kind"] == "heads"
    assert run.info.experiment_id == client.get_run(fl_run).info.experiment_id
    params = run.data.params
    assert params["method"] == method and params["sampling_num"] == "3" and params["fl_run_id"] == fl_run
    assert params["algo"] == "fedfomo" and params["perturb_scope"] == "head"

    heads = sorted(a.path for a in client.list_artifacts(run_id, "heads"))
    assert heads == [f"heads/client_{c:03d}" for c in range(NUM_CLIENTS)]  # MLflow models (tests/test_mlflow_models.py)
    state = load_file(mlflow.artifacts.download_artifacts(run_id=run_id,
                                                          artifact_path=f"{heads[0]}/artifacts/members.safetensors"))
    assert state["learning_rates"].shape == (3,)
    assert all(t.shape[0] == 3 for k, t in state.items() if k.endswith((".bias", ".a_t", ".b_t", ".weight_t")))

    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/client_metrics.csv")))
    assert list(table["client"]) == list(range(NUM_CLIENTS))
    m = run.data.metrics
    for column, group in (("wo_", "wo/"), ("", "test/")):
        assert m[group + "acc"] == pytest.approx(weighted_mean(table[column + "acc"], table["num_test"]))
        assert m[group + "f_ece"] == pytest.approx(weighted_mean(table[column + "ece"], table["num_test"]))
        assert m[group + "ece_mean"] == pytest.approx(table[column + "ece"].mean())
        for key in ("nll", "brier", "global_ece"):
            assert 0 <= m[group + key] < 10
    expected_trainable = 1600 * 512 + 512 + 512 * 10 + 10 if method == "aph" else \
        (512 * 4 + 512) + (10 * 4 + 10)  # LoRAPH trains B_j and the bias; A_j is a frozen projection
    assert m["model/trainable_params_per_member"] == expected_trainable
    fl_name = client.get_run(fl_run).info.run_name
    assert run.info.run_name == f"{method}-{fl_name}" and "mlflow.note.content" in run.data.tags

    assert params["ood_dataset"] == "cifar100"  # auto for a CIFAR-10 model
    for column, key in OOD_METRICS.items():
        assert 0 < m[key] < 1, key
        assert 0 < table[column].min() and table[column].max() < 1
        assert m[key] == pytest.approx(weighted_mean(table[column], table["num_test"]))


def test_unmodified_model_metrics_equal_the_fl_run_client_metrics(fl_run):
    run_id = run_heads(fl_run, load_head_config(["global_epoch=1", "sampling_num=2", "ood_dataset=none"]),
                       progress=False)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.params["ood_dataset"] == "none" and not set(OOD_METRICS.values()) & set(run.data.metrics)
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/client_metrics.csv")))
    assert not any("ood" in c for c in table.columns)
    fl_clients = mlflow.artifacts.load_dict(f"runs:/{fl_run}/client_metrics.json")["clients"]
    for row, fl in zip(table.itertuples(), fl_clients):
        assert row.num_test == fl["num_test"]
        assert row.wo_acc == pytest.approx(fl["acc"], abs=1e-6)
        assert row.wo_nll == pytest.approx(fl["nll"], rel=1e-4)


def test_bad_run_ids_and_a_missing_ood_folder_fail_before_any_head_run(fl_run, cifar10_dir):
    client = mlflow.MlflowClient()
    launch_id = client.get_run(fl_run).data.tags["mlflow.parentRunId"]
    hc = load_head_config(["sampling_num=2"])
    with pytest.raises(ConfigError, match="no run 'deadbeef'"):
        run_heads("deadbeef", hc, progress=False)
    with pytest.raises(ConfigError, match="not an FL run"):
        run_heads(launch_id, hc, progress=False)
    no_ood = load_head_config([f"data_dir={cifar10_dir}", "sampling_num=2"])  # same CIFAR-10 files, no CIFAR-100
    with pytest.raises(ConfigError, match="ood_dataset=none") as err:
        run_heads(fl_run, no_ood, progress=False)
    assert str(cifar10_dir / CIFAR100_FOLDER) in str(err.value) and "\n" not in str(err.value)
    assert _head_runs() == []


class _Explode(Callback):
    def on_round_end(self, rnd, metrics):
        raise RuntimeError("boom")


def test_fl_run_without_client_models_is_refused(data_dir, tmp_path, store):
    with pytest.raises(RuntimeError, match="boom"):
        _train(data_dir, tmp_path, callbacks=[_Explode()])
    (failed,) = mlflow.search_runs(experiment_names=["heads-it"], filter_string="tags.`pfl.kind` = 'fl'",
                                   output_format="list")
    with pytest.raises(ConfigError, match=f"holds 0 of its {NUM_CLIENTS} client models"):
        run_heads(failed.info.run_id, load_head_config(), progress=False)
    assert _head_runs() == []


def test_failure_during_work_marks_the_head_run_failed(fl_run, monkeypatch):
    import pfl.heads.run as run_module

    def broken(*args, **kwargs):
        raise RuntimeError("head training broke")

    monkeypatch.setattr(run_module, "rearrange_client", broken)
    with pytest.raises(RuntimeError, match="head training broke"):
        run_heads(fl_run, load_head_config(["sampling_num=2"]), progress=False)
    (run,) = _head_runs()
    assert run.info.status == "FAILED"
    assert mlflow.MlflowClient().get_run(fl_run).info.status == "FINISHED"


def test_cli_heads_prints_both_methods_side_by_side(fl_run, capsys):
    from pfl.cli import main

    assert main(["heads", "--run-id", fl_run, "--method", "loraph", "--no-progress", "sampling_num=2",
                 "global_epoch=1", "ood_dataset=none"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0].split()[:3] == ["run", "acc", "(%)"] and "F-ECE" in lines[0]
    (run,) = _head_runs()
    wo = lines[1].split()
    assert wo[0] == "w/o" and float(wo[1]) == pytest.approx(100 * run.data.metrics["wo/acc"], abs=1e-2)
    assert lines[2].split()[0] == "LoRAPH"


def test_cli_heads_exit_2_on_bad_run_id(fl_run, capsys):
    from pfl.cli import main

    assert main(["heads", "--run-id", "nope", "--method", "loraph", "--no-progress"]) == 2
    assert "no run 'nope'" in capsys.readouterr().err
    assert main(["heads", "--run-id", fl_run, "lower_lr=0.5", "upper_lr=0.1"]) == 2
    assert "lower_lr" in capsys.readouterr().err
    assert _head_runs() == []


@pytest.fixture(scope="module")
def scopes(cifar10):
    """One client's rearrangement in both scopes, on a random CNN and a real CIFAR-10 slice."""
    from pfl.data.loader import DeviceData
    from pfl.heads.rearrange import rearrange_client
    from pfl.models import ModelSpec, build_model

    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", 10)).eval()
    data = DeviceData(cifar10, torch.device("cpu"))
    train, test = torch.arange(0, 120), torch.arange(120, 160)
    results = {scope: rearrange_client(model, data, train, test,
                                       load_head_config([f"perturb_scope={scope}", "sampling_num=2",
                                                         "global_epoch=1"]), client_id=0)
               for scope in ("head", "model")}
    return model, data, test, results


def test_model_scope_gives_each_member_its_own_noisy_base(scopes):
    _, _, _, results = scopes
    for r in results.values():
        assert r.probs.shape == (40, 10) and torch.allclose(r.probs.sum(1), torch.ones(40), atol=1e-5)
    assert torch.equal(results["head"].probs_wo, results["model"].probs_wo)  # same unmodified model
    assert not torch.allclose(results["head"].probs, results["model"].probs)  # trained on different bases


def test_both_scopes_predict_through_the_clean_base(scopes):
    from pfl.heads.members import ensemble_probs

    model, data, test, results = scopes
    with torch.no_grad():
        clean = model.base(data.batch(test)[0])  # (n, D), shared by every member
        assert torch.allclose(results["model"].probs_wo, torch.softmax(model(data.batch(test)[0]), 1), atol=1e-6)
    for r in results.values():
        assert torch.allclose(r.probs, ensemble_probs(r.members, clean), atol=1e-6)
