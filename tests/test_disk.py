"""Disk use of runs: a FINISHED run keeps no checkpoint, neither logged (``checkpoint/``) nor local
(``<cache_dir>/checkpoints/<run id>/``), unless ``keep_checkpoint=true``; a stopped or failed run keeps its
checkpoint and resumes from it; a checkpoint rewrites only the groups of tensors that changed."""

from __future__ import annotations

import itertools
import os
import signal

import mlflow
import pytest
import torch
from safetensors.torch import save_file

from pfl import tracking
from pfl.federated.checkpoint import STATES_DIR, Checkpointer, load_checkpoint, save_checkpoint
from pfl.federated.engine import Callback, RunInterrupted
from pfl.config import load_config
from pfl.train import checkpoint_path, resume_training, run_training

NUM_CLIENTS = 5


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store, its artifacts inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _cfg(cifar10_dir, tmp_path, *overrides):
    return load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path / 'cache'}", "algo=fedfomo", "M=2",
                              f"num_clients={NUM_CLIENTS}", "join_ratio=0.4", "global_rounds=2", "num_threads=1",
                              "device=cpu", "eval_batch_size=500", "experiment=disk", *overrides])


def _logged(run_id):
    """Paths of the run's logged checkpoint files."""
    client = mlflow.MlflowClient()
    return sorted(a.path for d in client.list_artifacts(run_id, "checkpoint")
                  for a in ([d] if not d.is_dir else client.list_artifacts(run_id, d.path)))


def _fl_run():
    (run,) = mlflow.search_runs(experiment_names=["disk"], filter_string="tags.`pfl.kind` = 'fl'",
                                output_format="list")
    return run


def test_a_finished_run_keeps_no_checkpoint(cifar10_dir, tmp_path, store):
    cfg = _cfg(cifar10_dir, tmp_path)
    (run_id,) = run_training(cfg, progress=False)["fl_run_ids"]
    assert _logged(run_id) == []
    assert not checkpoint_path(cfg, run_id).parent.exists()
    run = mlflow.MlflowClient().get_run(run_id)  # what it keeps: client models and metrics
    assert run.info.status == "FINISHED" and "test/acc" in run.data.metrics and "checkpoint/mb" in run.data.metrics
    assert len(mlflow.MlflowClient().list_artifacts(run_id, "clients")) == NUM_CLIENTS


def test_keep_checkpoint_keeps_the_last_rounds_checkpoint_local_and_logged(cifar10_dir, tmp_path, store):
    cfg = _cfg(cifar10_dir, tmp_path, "keep_checkpoint=true")
    (run_id,) = run_training(cfg, progress=False)["fl_run_ids"]
    local = load_checkpoint(checkpoint_path(cfg, run_id))
    logged = load_checkpoint(tracking.download_checkpoint(run_id, tmp_path / "dl"))
    assert local[1]["round"] == logged[1]["round"] == 2
    assert local[0].keys() == logged[0].keys() and all(torch.equal(local[0][k], logged[0][k]) for k in local[0])
    assert "checkpoint/checkpoint.safetensors" in _logged(run_id)


class _FailInRound2(Callback):
    def on_round_end(self, rnd, metrics):
        if rnd == 2:
            raise RuntimeError("boom in round 2")


def _stop_after_round_1():
    calls = itertools.count(1)
    return lambda: signal.SIGTERM if next(calls) == 1 else None


@pytest.mark.parametrize("ending", ["KILLED", "FAILED"])
def test_a_stopped_or_failed_run_keeps_its_checkpoint_resumes_and_then_keeps_none(ending, cifar10_dir, tmp_path,
                                                                                   store):
    cfg = _cfg(cifar10_dir, tmp_path, "global_rounds=3")
    if ending == "KILLED":
        with pytest.raises(RunInterrupted):
            run_training(cfg, progress=False, stop=_stop_after_round_1())
    else:
        with pytest.raises(RuntimeError, match="boom"):
            run_training(cfg, extra_callbacks=[_FailInRound2()], progress=False)
    run = _fl_run()
    assert run.info.status == ending
    assert "checkpoint/checkpoint.safetensors" in _logged(run.info.run_id)
    assert load_checkpoint(checkpoint_path(cfg, run.info.run_id))[1]["round"] == 1

    resume_training(run.info.run_id, progress=False)
    done = mlflow.MlflowClient().get_run(run.info.run_id)
    assert done.info.status == "FINISHED"
    assert [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert _logged(run.info.run_id) == [] and not checkpoint_path(cfg, run.info.run_id).parent.exists()


def test_a_checkpoint_writes_only_the_groups_that_changed(tmp_path):
    path = tmp_path / "ckpt" / "checkpoint.safetensors"
    same, changed = {"a/0/w": torch.arange(6.0).view(2, 3)}, {"a/1/w": torch.zeros(4)}
    save_checkpoint(path, {**same, **changed, "rng/x": torch.ones(2)}, {"round": 1})
    before = {p.name: os.stat(p).st_ino for p in (path.parent / STATES_DIR).iterdir()}
    assert len(before) == 3  # one file per group: a/0, a/1 and rng

    size = save_checkpoint(path, {**same, "a/1/w": torch.ones(4), "rng/x": torch.ones(2)}, {"round": 2})
    after = {p.name: os.stat(p).st_ino for p in (path.parent / STATES_DIR).iterdir()}
    assert len(after) == 3 and len(set(before.items()) & set(after.items())) == 2  # a/0 and rng: the same files
    assert size == path.stat().st_size + sum(p.stat().st_size for p in (path.parent / STATES_DIR).iterdir())
    tensors, meta = load_checkpoint(path)
    assert meta == {"round": 2} and sorted(tensors) == ["a/0/w", "a/1/w", "rng/x"]
    assert torch.equal(tensors["a/0/w"], same["a/0/w"]) and torch.equal(tensors["a/1/w"], torch.ones(4))


def test_equal_states_are_stored_once(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    state = torch.randn(3, 3)
    save_checkpoint(path, {"models/0/w": state, "anchors/0/w": state.clone()}, {})
    assert len(list((tmp_path / STATES_DIR).iterdir())) == 1
    tensors, _ = load_checkpoint(path)
    assert torch.equal(tensors["models/0/w"], state) and torch.equal(tensors["anchors/0/w"], state)


def test_a_checkpoint_of_one_file_written_before_states_still_loads(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_file({"algorithm/P": torch.eye(2)}, path, metadata={"pfl_checkpoint": '{"round": 4}'})
    tensors, meta = load_checkpoint(path)
    assert meta == {"round": 4} and torch.equal(tensors["algorithm/P"], torch.eye(2))


def test_a_checkpoint_missing_a_state_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"a/0/w": torch.zeros(2)}, {"round": 1})
    for p in (tmp_path / STATES_DIR).iterdir():
        p.unlink()
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(path)


def test_the_last_round_writes_a_checkpoint_only_when_it_is_kept():
    assert [r for r in range(1, 11) if Checkpointer(None, every=5, at_end=False).due(r, 10)] == [5]
    assert [r for r in range(1, 11) if Checkpointer(None, every=4, at_end=True).due(r, 10)] == [4, 8, 10]
