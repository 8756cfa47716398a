"""Optuna search on a real CIFAR-10 slice: spaces, validation-only objective, metric names, studies in SQLite
storage (their Optuna attributes, MLflow runs and end-of-command summary)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml

from pfl import tracking
from pfl.config import ConfigError, load_config
from pfl.data.loader import DeviceData
from tuning.objective import validation_score
from tuning.spaces import load_space, search_space, suggest
from tuning.study import StudyResult, StudySettings, dataset_fallback_note, run_study, summary_lines

ROOT = Path(__file__).resolve().parents[1]


def _cfg(cifar10_dir, tmp_path, **overrides):
    values = {"data_dir": cifar10_dir, "cache_dir": tmp_path / "cache", "num_clients": 4, "num_partitions": 12,
              "global_rounds": 2, "join_ratio": 0.5, "classes_per_client": 5, "experiment": "tune-it",
              "device": "cpu", "algo": "fedfomo", **overrides}  # 4 clients of 300 images
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


# ---------------------------------------------------------------- spaces


def test_spaces_sample_inside_bounds():
    space = search_space("fedfomo", tune_lr=True)
    assert set(space) == {"M", "epsilon", "val_ratio", "lr"}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(60):
        values = suggest(study.ask(), space, num_clients=7)
        assert 1 <= values["M"] <= 6 and isinstance(values["M"], int)
        assert 0.0 <= values["epsilon"] <= 0.5 and 0.1 <= values["val_ratio"] <= 0.4
        assert 1e-3 <= values["lr"] <= 1e-1
    ala = search_space("fedala")
    assert set(ala) == {"eta", "rand_percent", "layer_idx"} and ala["eta"].log


def test_yaml_space_overrides_and_errors(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("M: {type: int, low: 2, high: 3}\nlr: {type: float, low: 0.01, high: 0.02, log: true}\n")
    space = search_space("fedfomo", overrides=load_space(path))
    assert space["M"].bounds(20) == (2, 3) and space["lr"].log and "epsilon" in space
    # names are run fields or hyperparameters: of any algorithm, or of the one given
    assert set(load_space(path, algo="fedfomo")) == {"M", "lr"}
    with pytest.raises(ConfigError, match="'M' is not a run config field or a hyperparameter of fedala"):
        load_space(path, algo="fedala")
    path.write_text("bogus: {type: int, low: 1, high: 2}\n")
    with pytest.raises(ConfigError, match="'bogus' is not a run config field"):
        load_space(path)
    path.write_text("M: {type: int, low: 5, high: 2}\n")
    with pytest.raises(ConfigError, match="low <= high"):
        load_space(path)
    with pytest.raises(ConfigError, match="no default search space"):
        search_space("fedavg")


# ---------------------------------------------------------------- objective


def test_objective_reads_validation_splits_never_test(cifar10_dir, tmp_path, monkeypatch):
    touched: list = []
    real_batch = DeviceData.batch  # every image read (training, scoring, evaluation) goes through it
    monkeypatch.setattr(DeviceData, "batch",
                        lambda self, idx, *rest: touched.append(idx.clone()) or real_batch(self, idx, *rest))
    for algo in ("fedfomo", "fedavg"):
        cfg = _cfg(cifar10_dir, tmp_path, algo=algo)
        score = validation_score(cfg, "val/acc", [])
        assert 0.0 <= score <= 1.0
    from pfl.train import prepare

    test_idx = set(int(i) for c in prepare(cfg).partition.clients for i in c.test)
    assert touched and all(not (set(idx.tolist()) & test_idx) for idx in touched)
    with pytest.raises(ConfigError, match="'test/acc' is not a validation metric"):
        validation_score(cfg, "test/acc", [])


def test_every_trial_scores_on_one_fixed_tuning_split_whatever_its_val_ratio(cifar10_dir, tmp_path):
    from pfl.train import build_algorithm, prepare

    clients = {}
    for val_ratio in (0.1, 0.4):  # FedFomo's own validation split is searched; the tuning split is not
        cfg = _cfg(cifar10_dir, tmp_path, val_ratio=val_ratio, tuning_val_ratio=0.25)
        prepared = prepare(cfg)
        clients[val_ratio] = build_algorithm(prepared, cfg.seed, holdout=True).ctx.clients
    for a, b, split in zip(clients[0.1], clients[0.4], prepared.partition.clients):
        assert torch.equal(a.holdout, b.holdout)  # the same samples for every trial
        n = len(split.train)
        assert torch.equal(a.holdout, split.train[n - int(0.25 * n):])  # the last 25% of the train split
        for c, val_ratio in ((a, 0.1), (b, 0.4)):  # FedFomo's split is carved from the remaining 75%
            rest = n - len(c.holdout)
            assert len(c.val) == int(val_ratio * rest) and torch.equal(c.val, split.train[rest - len(c.val):rest])
            assert torch.equal(torch.cat([c.fit, c.val, c.holdout]), split.train)


def test_the_tuning_split_is_not_searchable(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("tuning_val_ratio: {type: float, low: 0.1, high: 0.3}\n")
    with pytest.raises(ConfigError, match="tuning_val_ratio is fixed"):
        load_space(path)


# ---------------------------------------------------------------- studies


@pytest.fixture
def stores(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = mlflow.get_tracking_uri()
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield f"sqlite:///{tmp_path / 'optuna.db'}"
    mlflow.set_tracking_uri(old)


def _trial_runs():
    return mlflow.search_runs(experiment_names=["tune-it"], filter_string="tags.`pfl.kind` = 'trial'",
                              output_format="list")


def test_study_tracks_trials_resumes_and_best_config_reproduces(cifar10_dir, tmp_path, stores):
    cfg = _cfg(cifar10_dir, tmp_path)
    optuna.create_study(storage=stores, study_name="s", direction="maximize")  # as created before metric names
    settings = StudySettings(n_trials=2, storage=stores, study_name="s", out_dir=tmp_path)  # with a progress bar
    result = run_study(cfg, search_space("fedfomo"), settings)
    study = optuna.load_study(study_name="s", storage=stores)
    assert len(study.trials) == 2
    assert result.states["complete"] + result.states["pruned"] == 2
    runs = _trial_runs()
    assert len(runs) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {result.study_run_id}
    by_number = {int(r.data.tags["optuna.trial"]): r for r in runs}
    for t in study.trials:
        assert by_number[t.number].data.tags["optuna.state"] == t.state.name.lower()
        assert by_number[t.number].data.params["M"] == str(t.params["M"])
        assert t.user_attrs["mlflow_run_id"] == by_number[t.number].info.run_id  # the dashboard links trial and run
    # the dashboard names the objective (a study from before metric names gets its name); the study knows its
    # MLflow runs and base config
    assert study.metric_names == ["val/acc"]
    assert study.user_attrs["mlflow_study_run_ids"] == [result.study_run_id]
    assert study.user_attrs["base_config"] == cfg.flat_params()
    assert result.best_trial == study.best_trial.number
    assert result.best_run_id == by_number[result.best_trial].info.run_id
    study_run = mlflow.MlflowClient().get_run(result.study_run_id)
    study_metrics = study_run.data.metrics
    assert f"best trial {result.best_trial}:" in study_run.data.tags["mlflow.note.content"]
    assert study_metrics["val/acc"] == result.best_value and study_metrics["study/best_trial"] == result.best_trial
    assert study_metrics["study/n_complete"] == result.states["complete"] and result.final_run_ids == []

    best = load_config(result.best_config)
    assert yaml.safe_load(result.best_config.read_text())["M"] == result.best_params["M"]
    assert validation_score(best, "val/acc", []) == result.best_value  # exact: same seed, same splits

    again = run_study(cfg, search_space("fedfomo"), StudySettings(n_trials=1, storage=stores, study_name="s",
                                                                  out_dir=tmp_path, final_repeats=2, progress=False,
                                                                  register=True))
    study = optuna.load_study(study_name="s", storage=stores)
    assert len(study.trials) == 3  # resumed, not restarted
    assert study.user_attrs["mlflow_study_run_ids"] == [result.study_run_id, again.study_run_id]
    finals = mlflow.search_runs(experiment_names=["tune-it"], output_format="list",
                                filter_string=f"tags.`mlflow.parentRunId` = '{again.study_run_id}' and "
                                              "tags.`pfl.kind` = 'fl'")
    assert set(again.final_run_ids) == {r.info.run_id for r in finals}
    accs = [r.data.metrics["test/acc"] for r in finals]
    study_metrics = mlflow.MlflowClient().get_run(again.study_run_id).data.metrics
    assert len(accs) == 2 and {r.data.params["seed"] for r in finals} == {"0", "1"}
    assert study_metrics["final/test_acc"] == pytest.approx(sum(accs) / 2)
    assert study_metrics["final/test_acc_seed_std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
    assert {"final/test_nll", "final/test_f_ece", "final/best_test_acc"} <= set(study_metrics)
    assert study_metrics["final/seeds"] == 2
    # --register: every client of both seeds, one registered model per client, champion = the first seed's
    expected = [(f"s-client_{c:03d}", v) for c in range(4) for v in (1, 2)]
    assert sorted((n, int(v)) for n, v in again.registered) == expected
    champion = mlflow.MlflowClient().get_model_version_by_alias("s-client_002", "champion")
    seed0 = next(r.info.run_id for r in finals if r.data.params["seed"] == "0")
    assert str(champion.version) == "1" and champion.run_id == seed0 == again.final_run_ids[0]

    lines = summary_lines(again)
    text = "\n".join(lines)
    assert f"val/acc = {again.best_value:.4f}" in text and str(again.best_params) in text
    assert f"pfl train --config {again.best_config}" in text and f"optuna-dashboard {stores}" in text
    assert f"mlflow ui --backend-store-uri {tracking.tracking_uri()}" in text
    assert sum("acc (%)" in line for line in lines) == 1  # the final repeats' table: a header and a row per seed
    assert "models:/s-client_000@champion" in text
    assert all(any(r.info.run_name in line for line in lines) for r in finals)


def test_metric_names_old_spellings_and_errors():
    assert StudySettings().metric == "val/acc"
    old = {"val_acc": "val/acc", "val_nll": "val/nll", "val_ece": "val/f_ece", "val_brier": "val/brier"}
    assert {name: StudySettings(metric=name).metric for name in old} == old
    assert StudySettings(metric="val/global_ece").metric == "val/global_ece"
    for bad in ("test/acc", "val_f_ece", "acc"):
        with pytest.raises(ConfigError) as err:
            StudySettings(metric=bad)
        message = str(err.value)
        assert "\n" not in message and f"{bad!r} is not a validation metric" in message
        assert "val/acc (maximized)" in message and "val/nll, val/f_ece, val/ece_mean, val/global_ece, val/brier" \
            in message


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # set_metric_names
def test_a_resumed_study_keeps_its_metric(tmp_path):
    cfg = _cfg(tmp_path / "data", tmp_path)  # refused before any data is read or any run is logged
    stores = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(storage=stores, study_name="named", direction="maximize").set_metric_names(["val/acc"])
    with pytest.raises(ConfigError, match="study named optimizes val/acc, not val/f_ece"):
        run_study(cfg, search_space("fedfomo"), StudySettings(metric="val_ece", storage=stores, study_name="named"))
    optuna.create_study(storage=stores, study_name="older", direction="maximize")  # from before metric names
    with pytest.raises(ConfigError, match="study older optimizes a metric to maximize, not val/nll"):
        run_study(cfg, search_space("fedfomo"), StudySettings(metric="val/nll", storage=stores, study_name="older"))


def test_summary_lines_of_a_study_on_a_tracking_server():
    result = StudyResult("study-run", "s", "postgresql://db/optuna", "val/nll", 3, 1.23456, {"M": 2}, None,
                         {"complete": 4, "pruned": 1, "fail": 0}, Path("out/best_s.yaml"), "http://mlflow:5000", [])
    assert summary_lines(result) == [
        "study s in postgresql://db/optuna: 4 complete, 1 pruned, 0 fail (study run study-run)",
        "best trial 3: val/nll = 1.2346", "best params: {'M': 2}", "best config: out/best_s.yaml", "next:",
        "  pfl train --config out/best_s.yaml", "  optuna-dashboard postgresql://db/optuna",
        "  open http://mlflow:5000"]


def test_dataset_without_config_notes_the_default_partition(tmp_path):
    cfg = load_config(None, ["dataset=cifar100"])
    assert dataset_fallback_note(None, "cifar100", cfg) == (
        "note: --dataset cifar100 without --config uses the default partition: pathological, 10 classes per "
        "client; pass --config or e.g. partition=dirichlet alpha=0.1")
    assert "2 classes per client" in dataset_fallback_note("", "cifar10", load_config(None, ["dataset=cifar10"]))
    path = tmp_path / "run.yaml"
    path.write_text("dataset: cifar100\n")
    assert dataset_fallback_note(path, "cifar100", load_config(path, ["dataset=cifar100"])) is None
    for chosen in ("partition=dirichlet", "classes_per_client=5", "partition=pathological"):
        assert dataset_fallback_note(None, "cifar100", load_config(None, ["dataset=cifar100", chosen])) is None
    assert dataset_fallback_note(None, None, load_config(None, [])) is None


def test_two_workers_share_one_sqlite_study(cifar10_dir, tmp_path, stores):
    args = [sys.executable, "-m", "pfl.cli", "tune", "--algo", "fedfomo", "--n-trials", "2", "--storage", stores,
            "--study", "shared", "--out", str(tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            f"data_dir={cifar10_dir}", f"cache_dir={tmp_path / 'cache'}", "num_clients=4", "global_rounds=2",
            "join_ratio=0.5", "classes_per_client=5", "experiment=tune-it", "device=cpu", "num_threads=1"]
    # both stores exist before the workers start (two processes must not create the schemas at once)
    mlflow.set_experiment("tune-it")
    optuna.storages.RDBStorage(stores)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = optuna.load_study(study_name="shared", storage=stores)
    assert len(study.trials) == 4 and all(t.state.is_finished() for t in study.trials)
    assert len({t.number for t in study.trials}) == 4
    assert len(_trial_runs()) == 4
    # a new study's direction follows the metric (the CLI's old spelling val_acc is val/acc); both workers'
    # study runs are recorded although they started together
    assert study.metric_names == ["val/acc"] and study.direction == optuna.study.StudyDirection.MAXIMIZE
    study_runs = mlflow.search_runs(experiment_names=["tune-it"], filter_string="tags.`pfl.kind` = 'study'",
                                    output_format="list")
    assert sorted(study.user_attrs["mlflow_study_run_ids"]) == sorted(r.info.run_id for r in study_runs)
    assert len(study_runs) == 2


def test_pruning_callback_reports_every_round_and_never_prunes_the_last():
    from pfl.federated.engine import Evaluation
    from tuning.objective import PruningCallback

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()  # every value is below 2.0: the pruner always says prune
    callback = PruningCallback(trial, "val/acc", last_round=3)
    with pytest.raises(optuna.TrialPruned):
        callback.on_evaluate(Evaluation(2, {"val/acc": 0.5}))
    callback.on_evaluate(Evaluation(3, {"val/acc": 0.6}))  # reported, not pruned
    assert study.trials[0].intermediate_values == {2: 0.5, 3: 0.6}
