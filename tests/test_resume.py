"""Crash-safe runs: checkpoints, exact resume (in process for every algorithm; after SIGKILL through the CLI) of the
FL run and of its command's launch run, SIGTERM, stale-run recovery and refusing what cannot be resumed."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch

from pfl import tracking
from pfl.algorithms import REGISTRY
from pfl.federated.checkpoint import Checkpointer, load_checkpoint
from pfl.federated.engine import Engine, RunInterrupted, Schedule
from pfl.cli import main
from pfl.config import load_config
from pfl.train import build_algorithm, prepare, resume_training, run_training

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("time/", "checkpoint/mb", "memory/")  # wall-clock figures differ from run to run

ALGOS = {"fedavg": [], "fedfomo": ["M=2"], "fedala": [],
         "mocosfl": ["model=resnet18_sfl", "model_width=0.0625", "batch_size=4", "steps_per_round=2", "queue_size=16",
                     "linear_epochs=1"],
         "flexifed": ["model=vgg11,vgg13", "model_width=0.125", "partition=iid", "sample_fraction=0.3"],
         "fedgen": ["server_epochs=3", "gen_hidden=[32]"],
         "fedlora": ["model=vit_cifar", "image_size=8", "batch_size=32", "personal_head=true"],
         "local": [], "fedper": [], "lgfedavg": [], "fedrep": ["plocal_epochs=2"],
         "fedprox": ["mu=0.01"],
         "ditto": ["mu=0.1", "plocal_epochs=2"],
         "apfl": ["alpha_init=0.5"], "perfedavg": [],
         "pfedme": ["lamda=15", "K=2", "beta=1.0"],
         "scaffold": ["server_learning_rate=1.0"],
         "fedpac": ["lamda=0.5"],
         "moon": ["mu=1.0", "tau=0.5"],
         "fedproto": ["model=vgg11,vgg13", "model_width=0.125", "lamda=1.0"],
         "fedbn": ["model=vgg11", "model_width=0.125"],
         "fedbabu": ["fine_tuning_epochs=2"], "fedrod": []}


def _overrides(data_dir, tmp_path, algo="fedfomo", rounds=6):
    return [f"algo={algo}", f"data_dir={data_dir}", f"cache_dir={tmp_path / 'cache'}", "num_clients=5",
            "join_ratio=0.5", f"global_rounds={rounds}", "num_threads=1", "device=cpu", "eval_batch_size=500",
            "experiment=resume", *ALGOS[algo]]


def test_every_registered_algorithm_has_a_resume_case():
    assert set(ALGOS) == set(REGISTRY), "add the new algorithm's small config to ALGOS"


@pytest.mark.parametrize("algo", list(ALGOS))
def test_engine_resumes_from_a_checkpoint_file_bit_for_bit(algo, cifar10_dir, tmp_path):
    cfg = load_config(None, _overrides(cifar10_dir, tmp_path, algo, rounds=4))
    prepared = prepare(cfg)
    schedule = Schedule(4, cfg.num_join_clients, eval_gap=1)
    whole = build_algorithm(prepared, 0)
    final = Engine(whole, schedule).run()

    first = build_algorithm(prepared, 0)
    ckpt = Checkpointer(tmp_path / "ckpt.safetensors")
    Engine(first, Schedule(2, cfg.num_join_clients, eval_gap=1), checkpointer=ckpt).run()  # stop after round 2
    resumed = build_algorithm(prepared, 0)
    engine = Engine(resumed, schedule)
    assert engine.restore(*load_checkpoint(ckpt.path)) == 3
    again = engine.run(3)
    assert again.metrics | {"time/eval": 0} == final.metrics | {"time/eval": 0}
    for cid in range(cfg.num_clients):
        a, b = whole.personalized_state(cid), resumed.personalized_state(cid)
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a), cid
    (t1, m1), (t2, m2) = whole.state_dict(), resumed.state_dict()  # the whole algorithm state, bit for bit
    assert m1 == m2 and list(t1) == list(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)


def _store_env(tmp_path):
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "PYTHONPATH": str(ROOT), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def _fl_run(tmp_path):
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["resume"], filter_string="tags.`pfl.kind` = 'fl'",
                                output_format="list")
    return run


# `pfl train` (its arguments: sys.argv[2:]) that, at the end of round sys.argv[1] (0: never), prints "paused" and
# waits for a stop signal: the test's signal then finds the run between rounds, however fast the machine is
_PAUSING_TRAIN = """
import sys, time
import pfl.train
from pfl.federated.engine import Callback
from pfl.cli import main

class Pause(Callback):
    def __init__(self, stop):
        self.stop = stop

    def on_round_end(self, rnd, metrics):
        if rnd == int(sys.argv[1]):
            print("paused", flush=True)
            while self.stop() is None:  # SIGTERM is recorded (the round loop then stops); SIGKILL ends it here
                time.sleep(0.05)

def run_training(cfg, *args, stop, extra_callbacks=None, **kwargs):
    return real(cfg, *args, stop=stop, extra_callbacks=[*(extra_callbacks or []), Pause(stop)], **kwargs)

real, pfl.train.run_training = pfl.train.run_training, run_training
sys.exit(main(["train", "--no-progress", *sys.argv[2:]]))
"""


def _paused(proc) -> None:
    """Wait until ``proc`` (:func:`_train` with ``pause_at``) has paused between rounds."""
    for line in proc.stdout:
        if line.strip() == "paused":
            return
    raise AssertionError(f"pfl train ended before it paused: {proc.communicate()}")


def _history(run_id):
    client = mlflow.MlflowClient()
    return {k: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, k), key=lambda m: m.step)]
            for k in client.get_run(run_id).data.metrics if not k.startswith(TIMING)}


def _client_files(run_id, dst):
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="clients", dst_path=str(dst)))
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def _train(args, env, pause_at=0):
    """``pfl train --no-progress <args>`` as a subprocess, paused at the end of round ``pause_at`` (:func:`_paused`)."""
    return subprocess.Popen([sys.executable, "-c", _PAUSING_TRAIN, str(pause_at), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_equals_an_uninterrupted_run(cifar10_dir, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = _train(_overrides(cifar10_dir, killed), _store_env(killed), pause_at=3)
    _paused(proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run = _fl_run(killed)
    assert run.info.status == "RUNNING"  # what kill -9 leaves behind

    assert main(["runs", "--stale", "--tracking-uri", f"sqlite:///{killed / 'mlflow.db'}"]) == 0  # listed as gone
    assert main(["train", "--resume", run.info.run_id, "--no-progress"]) == 0
    done = mlflow.MlflowClient().get_run(run.info.run_id)
    assert done.info.status == "FINISHED"
    resumed_launch = _launch_record(done.data.tags["mlflow.parentRunId"])
    resumed_history, resumed_files = _history(run.info.run_id), _client_files(run.info.run_id, tmp_path / "a")

    ref = _train(_overrides(cifar10_dir, whole), _store_env(whole))
    assert ref.wait() == 0, ref.communicate()
    ref_run = _fl_run(whole)
    assert resumed_history == _history(ref_run.info.run_id)  # step by step, no step twice
    assert all(len({s for s, _ in h}) == len(h) for h in resumed_history.values())
    assert resumed_files == _client_files(ref_run.info.run_id, tmp_path / "b")  # byte-identical safetensors
    # the launch run too: FINISHED with the seed summary and description (the run tree of an uninterrupted command)
    assert resumed_launch == _launch_record(ref_run.data.tags["mlflow.parentRunId"])
    assert resumed_launch["status"] == "FINISHED" and "test/acc" in resumed_launch["metrics"]


def _launch_record(run_id):
    """What a launch run shows: status, name, params (but each command's own cache_dir), metrics (steps and values),
    description and tag names."""
    run = mlflow.MlflowClient().get_run(run_id)
    params = {k: v for k, v in run.data.params.items() if k != "cache_dir"}
    return {"status": run.info.status, "name": run.info.run_name, "params": params,
            "metrics": _history(run_id), "description": run.data.tags.get("mlflow.note.content"),
            "tags": sorted(run.data.tags)}


def _stop_after_round_1():
    calls = itertools.count(1)
    return lambda: signal.SIGTERM if next(calls) == 1 else None


def _run_tree(experiment):
    """A store's runs by name: each one's status, parent's name, metrics (no wall-clock ones), and a launch run's
    params and description."""
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    names = {r.info.run_id: r.info.run_name for r in runs}
    return {r.info.run_name: (r.info.status, names.get(r.data.tags.get("mlflow.parentRunId")), _history(r.info.run_id),
                              *((r.data.params, r.data.tags.get("mlflow.note.content"))
                                if r.data.tags["pfl.kind"] == "launch" else ()))
            for r in runs}


def test_a_resumed_command_leaves_the_run_tree_of_an_uninterrupted_one(cifar10_dir, tmp_path, monkeypatch):
    """Stopped in its first repeat, then resumed: the resume also runs the second repeat and logs the launch
    run's seed summary and description, as the uninterrupted command does."""
    args = [*_overrides(cifar10_dir, tmp_path, "fedavg", rounds=2), "repeats=2"]
    trees = {}
    for name in ("whole", "resumed"):
        (tmp_path / name).mkdir()
        monkeypatch.chdir(tmp_path / name)  # the store's artifacts
        tracking.configure_tracking(f"sqlite:///{tmp_path / name / 'mlflow.db'}")
        if name == "whole":
            run_training(load_config(None, args), progress=False)
        else:
            with pytest.raises(RunInterrupted):
                run_training(load_config(None, args), progress=False, stop=_stop_after_round_1())
            (killed,) = mlflow.search_runs(experiment_names=["resume"], output_format="list",
                                           filter_string="tags.`pfl.kind` = 'fl'")
            ids = resume_training(killed.info.run_id, progress=False)
            assert ids["fl_run_ids"][0] == killed.info.run_id and len(ids["fl_run_ids"]) == 2
        trees[name] = _run_tree("resume")
    assert len(trees["whole"]) == 3  # the launch run and two FL runs
    assert trees["resumed"] == trees["whole"]


def test_sigterm_checkpoints_marks_killed_and_exits_143(cifar10_dir, tmp_path):
    proc = _train(_overrides(cifar10_dir, tmp_path, rounds=30), _store_env(tmp_path), pause_at=1)
    _paused(proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    run = _fl_run(tmp_path)
    assert run.info.status == "KILLED"
    assert mlflow.MlflowClient().get_run(run.data.tags["mlflow.parentRunId"]).info.status == "KILLED"
    assert f"pfl train --resume {run.info.run_id}" in err and "Traceback" not in err
    _, meta = load_checkpoint(tracking.download_checkpoint(run.info.run_id, tmp_path / "dl"))
    assert 1 <= meta["round"] < 30 and meta["round"] == max(s for s, _ in _history(run.info.run_id)["train/loss"])


def test_resume_refuses_finished_runs_and_runs_without_checkpoint(cifar10_dir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "--no-progress", "--tracking-uri", uri, *_overrides(cifar10_dir, tmp_path, rounds=1)]) == 0
    run = _fl_run(tmp_path)
    assert main(["train", "--resume", run.info.run_id, "--tracking-uri", uri]) == 2
    assert f"FL run {run.info.run_id} is FINISHED" in capsys.readouterr().err

    mlflow.set_experiment("resume")
    with mlflow.start_run(tags={"pfl.kind": "launch"}), \
            mlflow.start_run(nested=True, tags={"pfl.kind": "fl", "pfl.host": "elsewhere", "pfl.pid": "1"}) as fl:
        mlflow.log_dict(dict(load_config(None, _overrides(cifar10_dir, tmp_path)).flat_params()), "config.json")
        mlflow.log_params({"seed": 0})
    mlflow.MlflowClient().set_terminated(fl.info.run_id, "FAILED")
    assert main(["train", "--resume", fl.info.run_id, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert f"FL run {fl.info.run_id} has no checkpoint" in err and err.count("\n") == 1


def test_stale_runs_are_listed_and_marked_failed(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.configure_tracking(uri)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mlflow.set_experiment("stale")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("stale").experiment_id
    dead = client.create_run(exp, tags={"pfl.kind": "fl", **tracking.process_tags(), "pfl.pid": gone.stdout.strip()})
    alive = client.create_run(exp, tags={"pfl.kind": "fl", **tracking.process_tags()})  # this very process
    assert main(["runs", "--stale", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert dead.info.run_id in out and alive.info.run_id not in out
    assert main(["runs", "--stale", "--mark-failed", "--tracking-uri", uri]) == 0
    assert client.get_run(dead.info.run_id).info.status == "FAILED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
