"""Ray for sweeps and tuning (pfl.distributed) on a local Ray instance of two CPUs and a real CIFAR-10 slice:
a Ray sweep's runs equal a local sweep's, a failing cell fails its launch run and cancels the others (even when Ray
drops a cancel), Optuna workers share one study, and the Ray options' errors."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from types import SimpleNamespace

import mlflow
import optuna
import pytest

from pfl import tracking
from pfl.cli import main
from pfl.config import ConfigError, load_config
from pfl.data.datasets import DatasetNotFoundError
from pfl.distributed import (RayOptions, TaskError, _check_reachable, _finished, _remote, absolute_store, map_cells,
                             ray_session, split_trials, sqlite_warning, task_resources)

ray = pytest.importorskip("ray", reason="ray is not installed (pip install -c constraints.txt ray)")

CELL = ["algo=fedavg", "num_clients=4", "num_partitions=12", "global_rounds=1", "partition=dirichlet", "device=cpu",
        "num_threads=1"]  # 4 clients of about 300 images
HEAD = ["--head", "global_epoch=1", "--head", "sampling_num=2", "--head", "ood_dataset=none"]


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    """A local Ray instance with two CPUs for the module; pfl's commands use it as it is (pfl.distributed)."""
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store in the test's folder, which is the working directory. Its URI is absolute:
    MLflow keeps one engine per URI string, so a relative one would reach an earlier test's folder."""
    monkeypatch.chdir(tmp_path)
    old = mlflow.get_tracking_uri()
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(old)


def _tree(experiment: str) -> list[tuple]:
    """Every run of ``experiment`` as (name, pfl.kind, parent's name, status, param keys)."""
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    names = {r.info.run_id: r.info.run_name for r in runs}
    return sorted((r.info.run_name, r.data.tags["pfl.kind"], names.get(r.data.tags.get("mlflow.parentRunId")),
                   r.info.status, tuple(sorted(r.data.params))) for r in runs)


def _launch(experiment: str) -> mlflow.entities.Run:
    (run,) = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.`pfl.kind` = 'launch'",
                                output_format="list")
    return run


def test_a_ray_sweep_logs_the_runs_of_a_local_sweep(cifar10_dir, tmp_path, store):
    def sweep(backend: str) -> int:
        return main(["sweep", "--no-progress", "--backend", backend, "--alphas", "0.3", "1.0", "--join-ratios", "0.5",
                     "--methods", "aph", *HEAD, "--tracking-uri", store, f"data_dir={cifar10_dir}",
                     "cache_dir=cache", f"experiment={backend}", *CELL])

    assert sweep("local") == 0
    assert sweep("ray") == 0
    local, distributed = _tree("local"), _tree("ray")
    assert distributed == local
    fl = mlflow.search_runs(experiment_names=["ray"], filter_string="tags.`pfl.kind` = 'fl'", output_format="list")
    assert {r.data.params["cache_dir"] for r in fl} == {str(tmp_path / "cache")}  # relative: made absolute
    assert [kind for _, kind, *_ in local].count("fl") == 2 and [k for _, k, *_ in local].count("heads") == 2
    assert {status for *_, status, _ in local} == {"FINISHED"}
    lo, rd = _launch("local"), _launch("ray")
    assert {**rd.data.params, "experiment": "local"} == lo.data.params
    assert rd.data.metrics.keys() == lo.data.metrics.keys()
    assert rd.data.metrics["dir0.3-jr0.5/test_acc"] == pytest.approx(lo.data.metrics["dir0.3-jr0.5/test_acc"])
    assert rd.data.tags["mlflow.note.content"] == lo.data.tags["mlflow.note.content"]


def test_a_failing_cell_fails_the_launch_run_with_its_own_error(tmp_path, store):
    cfg = load_config(None, [f"data_dir={tmp_path / 'nothing'}", "experiment=failing", *CELL])
    with pytest.raises(DatasetNotFoundError):  # the worker's error, not Ray's wrapper
        with tracking.launch_run("failing", "sweep-failing", {}) as launch_id:
            list(map_cells([cfg], [], launch_id, {"num_cpus": 1}, progress=False))
    assert mlflow.MlflowClient().get_run(launch_id).info.status == "FAILED"


def _tasks(resources: dict) -> tuple:
    """Two pfl Ray tasks (:func:`pfl.distributed._remote`), defined here so that Ray ships them by value (the
    workers cannot import this test module): ``fail(after=None)`` raises a two-line ValueError once file ``after``
    exists (the other task runs); ``run_until_cancelled(started=None, resent=None)`` writes ``started`` and sleeps in
    short steps until cancelled (the interrupt lands between Python bytecodes, not inside a long sleep), then, as a
    task ending its runs KILLED does, keeps working until file ``resent`` exists (written once the driver has sent
    its cancel again) and writes ``ended`` beside it."""

    def fail(after=None):
        while after is not None and not after.exists():
            time.sleep(0.05)
        raise ValueError("bad value\nmore detail")

    def run_until_cancelled(started=None, resent=None):
        if started is not None:
            started.touch()
        try:
            while True:
                time.sleep(0.05)
        except KeyboardInterrupt:
            while resent is not None and not resent.exists():
                time.sleep(0.05)
            if resent is not None:
                (resent.parent / "ended").touch()
            raise

    return _remote(fail, resources), _remote(run_until_cancelled, resources)


def test_a_failing_task_cancels_the_others_and_reads_as_one_line():
    fail, run_until_cancelled = _tasks({"num_cpus": 1})
    refs = [run_until_cancelled.remote(), fail.remote()]
    with pytest.raises(TaskError) as err:
        list(_finished(refs, ["waiting task", "failing task"]))
    assert str(err.value) == "failing task failed: ValueError: bad value"
    assert isinstance(err.value.cause, ValueError)
    with pytest.raises(ray.exceptions.TaskCancelledError):  # ended (cancelled) before _finished returned
        ray.get(refs[0], timeout=0)


def test_a_cancel_that_ray_drops_is_sent_again_and_never_interrupts_twice(tmp_path, monkeypatch):
    """Ray drops a cancel that reaches the worker before the task does (pfl.distributed._cancel); here the driver's
    first cancel is dropped on purpose. The cancel sent again ends the task, and the later ones do not cut short
    what it does after the interrupt (two more cancels are sent before it can end)."""
    sent = []

    def lossy_cancel(ref, real=ray.cancel, **kwargs):
        sent.append(ref)
        if len(sent) > 1:
            real(ref, **kwargs)
        if len(sent) == 4:
            (tmp_path / "resent").touch()

    monkeypatch.setattr(ray, "cancel", lossy_cancel)
    fail, run_until_cancelled = _tasks({"num_cpus": 1})
    running = run_until_cancelled.remote(tmp_path / "started", tmp_path / "resent")
    failing = fail.remote(tmp_path / "started")
    with pytest.raises(TaskError, match="failing task failed"):
        list(_finished([running, failing], ["running task", "failing task"]))
    with pytest.raises(ray.exceptions.TaskCancelledError):
        ray.get(running, timeout=0)
    assert (tmp_path / "ended").exists() and len(sent) >= 4


def test_ray_tune_workers_share_one_study_and_the_driver_writes_the_best_config(cifar10_dir, tmp_path, store,
                                                                                capsys):
    args = ["tune", "--backend", "ray", "--workers", "2", "--n-trials", "2", "--algo", "fedavg", "--tune-lr",
            "--pruner", "none", "--no-progress", "--study", "shared", "--storage", "sqlite:///optuna.db",
            "--final-repeats", "1", "--out", "out", "--tracking-uri", store,
            f"data_dir={cifar10_dir}", "cache_dir=cache", "classes_per_client=5", "experiment=tune-ray",
            *[c for c in CELL if not c.startswith(("algo", "partition"))]]
    assert main(args) == 0  # a relative Optuna storage: made absolute for the workers
    study = optuna.load_study(study_name="shared", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 2 and all(t.state.is_finished() for t in study.trials)
    runs = mlflow.search_runs(experiment_names=["tune-ray"], output_format="list")
    studies = [r for r in runs if r.data.tags["pfl.kind"] == "study"]
    assert len(studies) == 3 and sorted(study.user_attrs["mlflow_study_run_ids"]) == \
        sorted(r.info.run_id for r in studies)
    driver = study.user_attrs["mlflow_study_run_ids"][-1]  # recorded after the workers'
    workers = {r.info.run_id for r in studies} - {driver}
    trials = [r for r in runs if r.data.tags["pfl.kind"] == "trial"]
    assert sorted(r.data.tags["mlflow.parentRunId"] for r in trials) == sorted(workers)  # one trial each
    (final,) = [r for r in runs if r.data.tags["pfl.kind"] == "fl"]  # the final repeat ran once, in the driver
    assert final.data.tags["mlflow.parentRunId"] == driver
    assert (tmp_path / "out" / "best_shared.yaml").is_file()
    out = capsys.readouterr().out
    assert out.count("best trial") == 1 and "2 complete" in out


def test_ray_options_errors_are_one_line_and_name_the_option(store, capsys):
    for args, expected in ((["--address", "auto"], "--address: only with --backend ray"),
                           (["--workers", "2"], "--workers: only with --backend ray"),
                           (["--backend", "ray", "--workers", "0"], "--workers: 0 is below 1; pass --workers 1"),
                           (["--backend", "ray", "--workers", "3", "--n-trials", "2"],
                            "--workers: 3 workers for 2 trials (--n-trials)")):
        assert main(["tune", "--algo", "fedavg", "--tune-lr", "--tracking-uri", store, *args]) == 2
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, err
    assert main(["sweep", "--alphas", "0.1", "--join-ratios", "0.5", "--cpus-per-task", "2"]) == 2
    assert "--cpus-per-task: only with --backend ray" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--cpus-per-task: 3 CPUs per task, but the Ray cluster has 2"):
        with ray_session(RayOptions(cpus_per_task=3), "cpu"):
            pass
    # an address where nothing listens is refused at once (ray.init would retry it for minutes)
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        with pytest.raises(ConfigError, match=f"--address {address}: nothing answers there"):
            _check_reachable(address)
    _check_reachable("auto")  # left to ray.init


def test_pfl_and_its_commands_import_ray_only_when_a_command_uses_it():
    code = "import sys, pfl, pfl.cli, pfl.sweep, pfl.distributed; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_task_takes_one_gpu_on_a_cluster_with_gpus_else_its_cpus():
    gpus = SimpleNamespace(cluster_resources=lambda: {"CPU": 64.0, "GPU": 8.0})
    assert task_resources(gpus, "auto", 4) == {"num_gpus": 1}
    assert task_resources(gpus, "cpu", 4) == {"num_cpus": 4}  # a CPU run takes no GPU
    assert task_resources(SimpleNamespace(cluster_resources=lambda: {"CPU": 16.0}), "auto", 2) == {"num_cpus": 2}


def test_trials_split_over_workers_and_sqlite_stores_made_absolute(tmp_path, monkeypatch):
    assert split_trials(5, 2) == [3, 2] and split_trials(2, 2) == [1, 1] and split_trials(7, 3) == [3, 2, 2]
    monkeypatch.chdir(tmp_path)
    assert absolute_store("sqlite:///optuna.db") == f"sqlite:///{tmp_path / 'optuna.db'}"
    for unchanged in (f"sqlite:///{tmp_path / 'a.db'}", "http://mlflow:5000", "postgresql://u@db/optuna"):
        assert absolute_store(unchanged) == unchanged
    warning = sqlite_warning(RayOptions("auto"), "sqlite:///mlflow.db", "postgresql://u@db/optuna")
    assert "cannot reach the SQLite tracking store sqlite:///mlflow.db" in warning and "--tracking-uri" in warning
    assert sqlite_warning(RayOptions(), "sqlite:///mlflow.db") is None  # a local instance: same machine
