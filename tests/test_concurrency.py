"""Several `pfl train` processes started at the same moment on one fresh SQLite store all finish.

Creating MLflow's schema is a series of alembic migrations; two processes running them at once
crashed (``table latest_metrics already exists``). :func:`pfl.tracking.configure_tracking`
now opens a SQLite store under a file lock (:mod:`pfl.locking`); Optuna's storage likewise.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna

from pfl.locking import sqlite_path, store_lock

WORKERS = 4
REPO = Path(__file__).resolve().parents[1]  # where `tuning` imports from


def _train_args(cifar10_dir, cache_dir, uri: str) -> list[str]:
    return [sys.executable, "-m", "pfl.cli", "train", "--no-progress", "--tracking-uri", uri,
            f"data_dir={cifar10_dir}", f"cache_dir={cache_dir}", "algo=fedavg", "num_clients=4",
            "classes_per_client=5", "join_ratio=0.5", "global_rounds=1", "experiment=concurrent", "device=cpu",
            "num_threads=1", "eval_batch_size=500"]


def test_four_trains_on_one_fresh_sqlite_store_all_finish(cifar10_dir, tmp_path):
    """Four processes in one folder, sharing the store and the partition cache, as a user launching them would."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert not db.exists()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID",
                                                             "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    workers = [subprocess.Popen(_train_args(cifar10_dir, tmp_path / "cache", uri), cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(WORKERS)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    elapsed = time.perf_counter() - start
    assert [w.returncode for w in workers] == [0] * WORKERS, "\n----\n".join(outputs)
    assert not any("Traceback" in out for out in outputs), "\n----\n".join(outputs)

    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("concurrent").experiment_id])
    launch = [r for r in runs if r.data.tags.get("pfl.kind") == "launch"]
    fl = [r for r in runs if r.data.tags.get("pfl.kind") == "fl"]
    assert len(launch) == WORKERS and len(fl) == WORKERS and len(runs) == 2 * WORKERS
    assert {r.info.status for r in runs} == {"FINISHED"}
    # each FL run under its own launch run, each launch run printed by one process
    assert {r.data.tags["mlflow.parentRunId"] for r in fl} == {r.info.run_id for r in launch}
    printed = {line.split()[2] for out in outputs for line in out.splitlines() if line.startswith("FL run: ")}
    assert printed == {r.info.run_id for r in fl}
    assert all("test/acc" in r.data.metrics for r in fl)
    print(f"{WORKERS} concurrent `pfl train`: {elapsed:.1f} s")


def test_four_optuna_storages_created_at_once(tmp_path):
    """Workers opening one fresh Optuna SQLite file together (`pfl tune`'s open_study) all get the study."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    code = ("import sys, time\n"
            "from tuning.study import StudySettings, open_study\n"
            "t = float(sys.argv[2])\n"
            "while time.time() < t: time.sleep(0.001)\n"  # all four touch the file at the same moment
            "open_study(StudySettings(storage=sys.argv[1]), 's', 0)\n")
    at = str(time.time() + 10)  # after the imports
    workers = [subprocess.Popen([sys.executable, "-c", code, url, at], cwd=REPO, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for _ in range(WORKERS)]
    outputs = [w.communicate(timeout=120)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * WORKERS, "\n----\n".join(outputs)
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["s"]


def test_store_lock_is_exclusive_and_only_for_sqlite_files(tmp_path):
    assert sqlite_path("sqlite:///mlflow.db").name == "mlflow.db"
    assert sqlite_path(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"
    assert sqlite_path("sqlite://") is None and sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql://u@h/db") is None and sqlite_path("http://127.0.0.1:5000") is None
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    holder = ("import sys, time\nfrom pfl.locking import store_lock\n"
              "with store_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(2)\n")
    other = subprocess.Popen([sys.executable, "-c", holder, uri], stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "held"
    start = time.perf_counter()
    with store_lock(uri):  # waits for the other process to let go
        waited = time.perf_counter() - start
    other.wait(timeout=30)
    assert waited > 0.3
    with store_lock("sqlite:///no/such/folder/x.db"):  # no lock file possible: proceeds, the store reports it
        pass


def test_configure_tracking_creates_a_sqlite_store_in_a_new_folder_under_its_lock(tmp_path):
    from pfl import tracking

    db = tmp_path / "new" / "sub" / "mlflow.db"
    uri = tracking.configure_tracking(f"sqlite:///{db}")
    assert db.is_file() and (db.parent / "mlflow.db.lock").is_file()  # created (schema and all) right away
    assert [e.name for e in mlflow.MlflowClient(uri).search_experiments()] == ["Default"]
