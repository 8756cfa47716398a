"""Several `pfl train` processes started at the same moment on one fresh SQLite store all finish.

Creating MLflow's schema is a series of alembic migrations; two processes running them at once
crashed (``table latest_metrics already exists``). :func:`pfl.tracking.configure_tracking`
now opens a SQLite store under a file lock (:mod:`pfl.locking`); Optuna's storage likewise.

The processes meet at a file barrier (:func:`_together`) after their imports, so they reach the store together
whatever the machine's load; no assertion depends on how long anything takes.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import optuna
import pytest

from pfl.locking import sqlite_path, store_lock

WORKERS = 4
HANG_GUARD_S = 600  # a process still running after this long has hung


def _together(barrier: Path, imports: str, action: str) -> list[str]:
    """The command line of a Python process that runs ``imports``, then waits until :data:`WORKERS` processes have
    arrived at ``barrier`` (a folder: one file each), then runs ``action`` (its arguments: ``sys.argv[1:]``)."""
    code = (f"import os, sys, time\n{imports}\n"
            f"os.close(os.open(os.path.join({str(barrier)!r}, str(os.getpid())), os.O_CREAT | os.O_WRONLY))\n"
            f"while len(os.listdir({str(barrier)!r})) < {WORKERS}:\n    time.sleep(0.01)\n{action}\n")
    barrier.mkdir(exist_ok=True)
    return [sys.executable, "-c", code]


def _outputs(workers: list[subprocess.Popen]) -> list[str]:
    """Each worker's output once it has ended (killed, and the test failed, past :data:`HANG_GUARD_S`)."""
    outputs = []
    for w in workers:
        try:
            outputs.append(w.communicate(timeout=HANG_GUARD_S)[0])
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            pytest.fail(f"a worker still ran after {HANG_GUARD_S} s: a hang")
    return outputs


def test_four_trains_on_one_fresh_sqlite_store_all_finish(cifar10_dir, tmp_path):
    """Four processes in one folder, sharing the store and the partition cache, as a user launching them would:
    one round of two clients each, started at the same moment."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert not db.exists()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID",
                                                             "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    env["OMP_NUM_THREADS"] = "1"
    train = [*_together(tmp_path / "barrier", "import mlflow, torch\nfrom pfl.cli import main",
                        "sys.exit(main(sys.argv[1:]))"),
             "train", "--no-progress", "--tracking-uri", uri, f"data_dir={cifar10_dir}",
             f"cache_dir={tmp_path / 'cache'}", "algo=fedavg", "num_clients=2", "partition=iid", "join_ratio=1",
             "global_rounds=1", "experiment=concurrent", "device=cpu", "num_threads=1", "eval_batch_size=500"]
    workers = [subprocess.Popen(train, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for _ in range(WORKERS)]
    outputs = _outputs(workers)
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


def test_four_optuna_storages_created_at_once(tmp_path):
    """Workers opening one fresh Optuna SQLite file together (`pfl tune`'s open_study) all get the study."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    open_study = _together(tmp_path / "barrier", "from tuning.study import StudySettings, open_study",
                           "open_study(StudySettings(storage=sys.argv[1]), 's', 0)")
    workers = [subprocess.Popen([*open_study, url], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT) for _ in range(WORKERS)]
    outputs = _outputs(workers)
    assert [w.returncode for w in workers] == [0] * WORKERS, "\n----\n".join(outputs)
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["s"]


def test_store_lock_is_exclusive_and_only_for_sqlite_files(tmp_path):
    assert sqlite_path("sqlite:///mlflow.db").name == "mlflow.db"
    assert sqlite_path(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"
    assert sqlite_path("sqlite://") is None and sqlite_path("sqlite:///:memory:") is None
    assert sqlite_path("postgresql://u@h/db") is None and sqlite_path("http://127.0.0.1:5000") is None
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    # another process holds the lock until told to let go; it writes `released` just before it does
    holder = ("import sys\nfrom pathlib import Path\nfrom pfl.locking import store_lock\n"
              "with store_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.readline()\n"
              "    Path(sys.argv[2]).touch()\n")
    released = tmp_path / "released"
    other = subprocess.Popen([sys.executable, "-c", holder, uri, str(released)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert other.stdout.readline().strip() == "held"
    fd = os.open(tmp_path / "a.db.lock", os.O_RDWR)
    try:  # held: the lock file <database file>.lock cannot be taken
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    seen = []

    def take():  # waits for the other process to let go
        with store_lock(uri):
            seen.append(released.exists())

    taker = threading.Thread(target=take)
    taker.start()
    other.communicate("go\n", timeout=HANG_GUARD_S)
    taker.join(timeout=HANG_GUARD_S)
    assert seen == [True] and other.returncode == 0
    with store_lock("sqlite:///no/such/folder/x.db"):  # no lock file possible: proceeds, the store reports it
        pass


def test_configure_tracking_creates_a_sqlite_store_in_a_new_folder_under_its_lock(tmp_path):
    from pfl import tracking

    db = tmp_path / "new" / "sub" / "mlflow.db"
    uri = tracking.configure_tracking(f"sqlite:///{db}")
    assert db.is_file() and (db.parent / "mlflow.db.lock").is_file()  # created (schema and all) right away
    assert [e.name for e in mlflow.MlflowClient(uri).search_experiments()] == ["Default"]
