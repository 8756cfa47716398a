"""On CPU the same config and seed give the same run: every metric's history and every client model's bytes.

Two :func:`pfl.train.run_training` runs, each in a fresh tracking store with a fresh partition
cache. The second runs in a fresh interpreter with another ``PYTHONHASHSEED``, so nothing left
in one process (caches, generator states, set order of strings) can make the two agree by accident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load

from pfl import tracking
from pfl.config import load_config
from pfl.train import run_training

# wall-clock measurements, the only metrics allowed to differ between two identical runs
# wall-clock seconds, and the checkpoint's size, whose JSON holds the latest evaluation's time/eval as text
_TIMING_PREFIX = ("time/", "checkpoint/mb", "memory/")


def _overrides(cifar10_dir: Path, folder: Path, algo: str, parallelism: str) -> list[str]:
    return [f"data_dir={cifar10_dir}", f"cache_dir={folder / 'cache'}", f"algo={algo}", "num_clients=4",
            "num_partitions=12", "classes_per_client=5", "join_ratio=0.5", "global_rounds=2", "seed=3",
            "experiment=det", "device=cpu", "num_threads=1", "eval_batch_size=500", f"client_parallelism={parallelism}"]


_CHILD = """
import json, sys
from pfl import tracking
from pfl.config import load_config
from pfl.train import run_training
tracking.configure_tracking(sys.argv[1])
ids = run_training(load_config(None, sys.argv[2:]), progress=False)
print("IDS=" + json.dumps(ids))
"""


def _train_in_process(folder: Path, overrides: list[str], monkeypatch) -> dict:
    monkeypatch.chdir(folder)  # the store's artifacts (./mlruns) stay in its folder
    tracking.configure_tracking(f"sqlite:///{folder / 'mlflow.db'}")
    return run_training(load_config(None, overrides), progress=False)


def _train_in_subprocess(folder: Path, overrides: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _CHILD, f"sqlite:///{folder / 'mlflow.db'}", *overrides], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("IDS="))
    return json.loads(line[4:])


def _fl_run_record(uri: str, run_id: str, out: Path) -> tuple[dict, dict[str, bytes]]:
    """Every non-timing metric's full history of FL run ``run_id``, and the bytes of its compared artifacts."""
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
               for key in sorted(run.data.metrics) if not key.startswith(_TIMING_PREFIX)}
    root = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(out), tracking_uri=uri))
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    return history, files


@pytest.mark.parametrize(("algo", "parallelism"), [("fedfomo", "sequential"), ("fedala", "sequential"),
                                                   ("fedfomo", "vectorized")])
def test_same_config_and_seed_give_identical_metrics_and_client_models(cifar10_dir, tmp_path, monkeypatch, algo,
                                                                       parallelism):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    ids_a = _train_in_process(first, _overrides(cifar10_dir, first, algo, parallelism), monkeypatch)
    ids_b = _train_in_subprocess(second, _overrides(cifar10_dir, second, algo, parallelism))
    (run_a,), (run_b,) = ids_a["fl_run_ids"], ids_b["fl_run_ids"]
    assert run_a != run_b  # two stores, two runs

    history_a, files_a = _fl_run_record(f"sqlite:///{first / 'mlflow.db'}", run_a, tmp_path / "art_a")
    history_b, files_b = _fl_run_record(f"sqlite:///{second / 'mlflow.db'}", run_b, tmp_path / "art_b")
    assert {"test/acc", "test/nll", "test/f_ece", "train/loss", "best/test_acc"} <= history_a.keys()
    assert all(len(history_a[k]) == 2 for k in ("test/acc", "train/loss"))  # one value per round
    assert history_a == history_b  # exact floats, step by step

    clients = sorted(k for k in files_a if k.startswith(f"{tracking.CLIENT_DIR}/") and k.endswith(".safetensors"))
    assert clients == [f"{tracking.CLIENT_DIR}/client_{c:03d}/artifacts/{tracking.MODEL_WEIGHTS}" for c in range(4)]
    assert sorted(files_b) == sorted(files_a)
    for name in clients:
        assert files_a[name] == files_b[name], f"{name} differs between two identical runs"
    # every other artifact is byte-identical too, except config.json (it records each run's own cache_dir), the
    # client models' MLmodel files (their uuid and creation time) and the checkpoint, whose metadata holds the last
    # evaluation's wall-clock eval_time: its tensors must agree
    for name in files_a:
        if name.startswith("checkpoint/") and name.endswith(".safetensors"):
            tensors_a, tensors_b = load(files_a[name]), load(files_b[name])
            assert tensors_a.keys() == tensors_b.keys(), name
            assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a), name
        elif name != "config.json" and not name.startswith("checkpoint/") and not name.endswith("/MLmodel"):
            assert files_a[name] == files_b[name], f"{name} differs between two identical runs"
