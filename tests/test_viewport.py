"""Viewport prediction on the real David MMSys'18 traces, end to end: a template's CPU twin trains and logs the
regression metrics and every viewer's model as an MLflow model that predicts positions; what does not apply is
refused in one line before any run; a stopped VP run resumes bit for bit; the templates hold the researchers' arms."""

from __future__ import annotations

import itertools
import re
import signal
from pathlib import Path

import mlflow
import numpy as np
import torch
import pytest

from pfl import tracking
from pfl.cli import main
from pfl.config import load_config
from pfl.federated.engine import RunInterrupted
from pfl.train import evaluate_client_model, resume_training, run_training
from pfl.vocabulary import headline_score
from test_resume import _client_files, _history

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["global_rounds=2", "num_clients=3", "num_threads=1", "device=cpu"]  # a few seconds on a CPU


def _store(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.configure_tracking(uri)
    return uri


def test_a_template_trains_and_logs_regression_metrics_and_position_models(david_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ["train", "--no-progress", "--config", str(CONFIGS / "vp_david_fedavg_lstm_cpu.yaml"), f"data_dir={david_dir}",
            f"cache_dir={tmp_path / 'cache'}", *SMALL]
    assert main(args) == 0
    (run,) = mlflow.search_runs(experiment_names=["pfl"], output_format="list", filter_string="tags.`pfl.kind` = 'fl'")
    metrics = run.data.metrics
    assert {"test/mse", "test/orthodromic_deg", "test/orthodromic_deg_h1", "test/orthodromic_deg_h5",
            "best/test_orthodromic_deg", "best/round"} <= set(metrics)
    assert "test/acc" not in metrics and 0 < metrics["test/orthodromic_deg"] < 180
    assert run.data.params["history"] == "10" and "random_crop" not in run.data.params
    assert run.info.run_name == "fedavg-david-natural_video4-jr1-s0"
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/clients/client_002")
    histories = np.random.default_rng(0).normal(size=(4, 10, 3)).astype(np.float32)
    histories /= np.linalg.norm(histories, axis=-1, keepdims=True)
    positions = model.predict(histories)
    assert positions.shape == (4, 15)  # 5 horizon steps x (x, y, z)
    assert np.allclose(np.linalg.norm(positions.reshape(4, 5, 3), axis=-1), 1, atol=1e-5)  # unit vectors
    assert model.predict(np.zeros((0, 10, 3), np.float32)).shape == (0, 15)
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"expected \(N, 10, 3\)"):
        model.predict(histories[:, :9])
    # the saved model scores on its own test split as the run did, and registers
    rows = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/client_metrics.json")["clients"]
    again = evaluate_client_model(run.info.run_id, 1)
    assert again["orthodromic_deg"] == pytest.approx(rows[1]["orthodromic_deg"], rel=1e-6)
    assert again["mse"] == pytest.approx(rows[1]["mse"], rel=1e-6) and again["num_test"] == rows[1]["num_test"]
    assert main(["register", "--run-id", run.info.run_id, "--client", "1", "--name", "vp-viewer1",
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 0
    # head methods need a classifier: refused before any head run exists
    code = main(["heads", "--run-id", run.info.run_id, "--method", "aph", "--tracking-uri",
                 f"sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 2
    assert len(mlflow.search_runs(experiment_names=["pfl"], output_format="list")) == 2  # launch + FL run only


@pytest.mark.parametrize("override, message", [
    ("partition=dirichlet", "partition=dirichlet needs class labels; david is viewport prediction"),
    ("history=96", "history=96 \\+ horizon=5 needs 101 positions but the traces of David MMSys'18 hold 100"),
    ("model=cnn", "model=cnn takes images"),
    ("algo=fedfomo", "algo=fedfomo trains classification only"),
    ("random_crop=4", "random_crop=4 is an image knob"),
    ("downlink=head_layers:0", "downlink='head_layers:0': use full, none, or head_layers:K"),
])
def test_what_does_not_apply_is_refused_in_one_line_before_any_run(override, message, david_dir, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code = main(["train", "--no-progress", "--config", str(CONFIGS / "vp_david_fedavg_lstm_cpu.yaml"),
                 f"data_dir={david_dir}", f"cache_dir={tmp_path / 'cache'}", override])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / "mlflow.db").exists()


def test_natural_on_a_dataset_without_groups_is_refused():
    with pytest.raises(Exception, match="partition=natural makes one client per natural group.*cifar10 has none"):
        load_config(None, ["partition=natural"])


def test_a_stopped_vp_run_resumes_bit_for_bit(david_dir, tmp_path, monkeypatch):
    args = [f"data_dir={david_dir}", f"cache_dir={tmp_path / 'cache'}", "experiment=vp", *SMALL, "global_rounds=3",
            "downlink=head_layers:2", "downlink_blend=0.5"]
    cfg = load_config(CONFIGS / "vp_david_partial_blend_transformer_cpu.yaml", args)
    record = {}
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)
        _store(tmp_path / name)
        if name == "whole":
            ids = run_training(cfg, progress=False)
        else:
            calls = itertools.count(1)
            with pytest.raises(RunInterrupted):
                run_training(cfg, progress=False, stop=lambda: signal.SIGTERM if next(calls) == 1 else None)
            (killed,) = mlflow.search_runs(experiment_names=["vp"], output_format="list",
                                           filter_string="tags.`pfl.kind` = 'fl'")
            assert killed.info.status == "KILLED"
            ids = resume_training(killed.info.run_id, progress=False)
        fl = ids["fl_run_ids"][0]
        record[name] = (_history(fl), _client_files(fl, tmp_path / name / "files"))
    assert record["resumed"][0] == record["whole"][0]  # every metric at every round
    assert record["resumed"][1] == record["whole"][1] and len(record["whole"][1]) == 3  # byte-identical models


def test_the_best_round_is_the_lowest_error():
    assert headline_score({"test/orthodromic_deg": 12.0, "test/mse": 0.1}) > headline_score(
        {"test/orthodromic_deg": 13.0, "test/mse": 0.05})  # orthodromic error is the headline, lower is better
    assert headline_score({"test/acc": 0.8}) > headline_score({"test/acc": 0.7})


# the researchers' arms: (algo, downlink, blend)
ARMS = {"local": ("local", "full", 1.0), "fedavg": ("fedavg", "full", 1.0), "partial": ("fedavg", "head_layers:2", 1.0),
        "blend": ("fedavg", "full", 0.5), "partial_blend": ("fedavg", "head_layers:2", 0.5)}


@pytest.mark.parametrize("arm", ARMS)
@pytest.mark.parametrize("model", ["lstm", "transformer"])
def test_templates_hold_the_researchers_arms_and_schedule(arm, model):
    gpu, cpu = (load_config(CONFIGS / f"vp_david_{arm}_{model}{twin}.yaml") for twin in ("", "_cpu"))
    for cfg in (gpu, cpu):
        assert (cfg.algo, cfg.downlink, cfg.downlink_blend) == ARMS[arm]
        assert (cfg.dataset, cfg.model, cfg.partition, cfg.split_by, cfg.num_test_keys) == \
            ("david", f"vp_{model}", "natural", "video", 4)
        assert (cfg.num_clients, cfg.join_ratio, cfg.batch_size, cfg.lr) == (10, 1.0, 64, 0.01)
        assert (cfg.history, cfg.horizon, cfg.predict) == (10, 5, "sequence")  # "David-m10-h1"
    assert (gpu.global_rounds, gpu.local_epochs, gpu.model_width) == (300, 10, 1.0)
    assert (cpu.global_rounds, cpu.local_epochs) == (20, 1) and cpu.model_width < 1


def test_a_search_on_viewport_prediction_tunes_its_error():
    from pfl.config import ConfigError
    from tuning.objective import DIRECTIONS, task_metric

    vp = load_config(None, ["algo=fedavg", "dataset=david", "model=vp_lstm", "partition=natural"])
    assert task_metric(vp, None) == "val/orthodromic_deg" and DIRECTIONS["val/orthodromic_deg"] == "minimize"
    assert task_metric(vp, "val/mse") == "val/mse" and task_metric(load_config(None, []), None) == "val/acc"
    with pytest.raises(ConfigError, match="metric: val/acc is not reported for david .*use val/orthodromic_deg"):
        task_metric(vp, "val/acc")


@pytest.mark.parametrize("bad, reason", [
    ([[[0.0, 0.0, 1.0]] * 10, [[0.0, 0.0, 1.0]] * 9], "nested lists of unequal lengths"),
    (np.zeros((2, 9, 3), np.float32), r"shape \(2, 9, 3\), expected \(N, 10, 3\)"),
    (np.zeros((2, 10, 3), bool), "dtype bool"),
    (np.full((2, 10, 3), np.nan, np.float32), "NaN or infinite"),
])
def test_a_served_predictor_refuses_histories_it_cannot_take(bad, reason):
    from pfl.pyfunc import InputError, as_sequences

    with pytest.raises(InputError, match=reason):
        as_sequences(bad, (10, 3))
    assert as_sequences(np.ones((2, 10, 3), np.int64), (10, 3)).dtype == torch.float32  # integers become floats
