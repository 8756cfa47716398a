"""End to end: FedFomo on a real CIFAR-10 slice against a real SQLite MLflow store in a temp dir."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pfl import tracking
from pfl.federated.engine import Callback
from pfl.config import load_config
from pfl.metrics import accuracy
from pfl.models import ModelSpec, build_model
from pfl.train import prepare, run_federated, run_training

NUM_CLIENTS = 10


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh SQLite tracking store (and artifact folder) inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")


def _cfg(cifar10_dir, tmp_path, **overrides):
    values = {"data_dir": cifar10_dir, "cache_dir": tmp_path / "cache", "num_clients": NUM_CLIENTS,
              "global_rounds": 2, "join_ratio": 0.4, "experiment": "it", "eval_batch_size": 500, **overrides}
    return load_config(None,
                       [f"{k}={v}" for k, v in values.items()])


def _runs(experiment="it"):
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_fedfomo_run_tree_metrics_and_client_models(cifar10_dir, tmp_path, store):
    cfg = _cfg(cifar10_dir, tmp_path)
    ids = run_training(cfg, progress=False)
    client = mlflow.MlflowClient()

    launch = client.get_run(ids["launch_run_id"])
    (fl_id,) = ids["fl_run_ids"]
    fl = client.get_run(fl_id)
    assert launch.info.status == fl.info.status == "FINISHED"
    assert launch.data.tags["pfl.kind"] == "launch"
    assert fl.data.tags["mlflow.parentRunId"] == launch.info.run_id
    assert {r.info.run_id for r in _runs()} == {launch.info.run_id, fl_id}

    params = fl.data.params
    assert params["algo"] == "fedfomo" and params["dataset"] == "cifar10"
    assert params["num_clients"] == str(NUM_CLIENTS) and params["join_ratio"] == "0.4"
    assert params["num_join_clients"] == "4" and len(params["dataset_fingerprint"]) == 16

    for key in ("test/acc", "test/nll", "test/f_ece", "train/loss"):
        steps = [m.step for m in client.get_metric_history(fl_id, key)]
        assert steps == [1, 2], key
    acc_hist = client.get_metric_history(fl_id, "test/acc")
    assert all(0.0 <= m.value <= 1.0 for m in acc_hist)
    # PFLlib's "Best accuracy": the best round's test accuracy, its round and that round's other metrics
    best = max(acc_hist, key=lambda m: (m.value, -m.step))
    assert fl.data.metrics["best/test_acc"] == best.value and fl.data.metrics["best/round"] == best.step
    nll = {m.step: m.value for m in client.get_metric_history(fl_id, "test/nll")}
    assert fl.data.metrics["best/test_nll"] == nll[best.step] and "best/test_f_ece" in fl.data.metrics

    artifacts = {Path(a.path).name for a in client.list_artifacts(fl_id, "clients")}
    assert artifacts == {f"client_{c:03d}" for c in range(NUM_CLIENTS)}  # MLflow models (tests/test_mlflow_models.py)
    counts = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=fl_id, artifact_path="partition/label_counts.json")).read_text())
    assert len(counts["clients"]) == NUM_CLIENTS
    affinity = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=fl_id, artifact_path="server/affinity.json")).read_text())
    assert len(affinity) == NUM_CLIENTS

    # load_client_model reproduces the logged accuracy of one client on its own test split
    per_client = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=fl_id, artifact_path="client_metrics.json")).read_text())["clients"]
    cid = 3
    model = tracking.load_client_model(fl_id, cid)
    prepared = prepare(cfg)
    test_idx = prepared.partition.clients[cid].test
    x = prepared.dataset.inputs[test_idx].float() / 127.5 - 1.0
    with torch.inference_mode():
        probs = torch.softmax(model(x), dim=1)
    assert accuracy(probs, prepared.dataset.targets[test_idx]) == pytest.approx(per_client[cid]["acc"], abs=1e-9)
    assert fl.data.metrics["test/acc"] == pytest.approx(
        sum(c["acc"] * c["num_test"] for c in per_client) / sum(c["num_test"] for c in per_client))

    with pytest.raises(FileNotFoundError, match="saved clients"):
        tracking.load_client_model(fl_id, NUM_CLIENTS + 5)


class _Explode(Callback):
    def on_round_end(self, rnd, metrics):
        if rnd == 2:
            raise RuntimeError("boom in round 2")


def test_failed_run_is_marked_failed_and_keeps_earlier_runs(cifar10_dir, tmp_path, store):
    ok = run_training(_cfg(cifar10_dir, tmp_path, algo="fedavg", global_rounds=1), progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        run_training(_cfg(cifar10_dir, tmp_path), extra_callbacks=[_Explode()], progress=False)
    client = mlflow.MlflowClient()
    by_status = {}
    for run in _runs():
        by_status.setdefault(run.info.status, set()).add(run.info.run_id)
    assert by_status["FINISHED"] == {ok["launch_run_id"], *ok["fl_run_ids"]}
    assert len(by_status["FAILED"]) == 2
    failed_fl = [r for r in _runs() if r.info.status == "FAILED" and r.data.tags.get("pfl.kind") == "fl"][0]
    # artifacts and metrics logged before the failure stay
    assert [a.path for a in client.list_artifacts(failed_fl.info.run_id, "partition")] == \
        ["partition/label_counts.json"]
    assert [m.step for m in client.get_metric_history(failed_fl.info.run_id, "train/loss")] == [1, 2]
    # the earlier run's client models are intact
    assert len(client.list_artifacts(ok["fl_run_ids"][0], "clients")) == NUM_CLIENTS


def test_same_config_and_seed_give_same_metrics(cifar10_dir, tmp_path):
    cfg = _cfg(cifar10_dir, tmp_path, global_rounds=2, num_partitions=3 * NUM_CLIENTS)  # clients of 120 images
    prepared = prepare(cfg)
    _, first = run_federated(prepared, cfg.seed, [])
    _, second = run_federated(prepared, cfg.seed, [])
    _, other = run_federated(prepared, cfg.seed + 1, [])
    def scores(evaluation):
        return {k: v for k, v in evaluation.metrics.items() if k != "time/eval"}

    assert scores(first) == scores(second)
    assert first.per_client == second.per_client
    assert scores(first) != scores(other)


def test_client_model_file_is_plain_safetensors(cifar10_dir, tmp_path, store):
    ids = run_training(_cfg(cifar10_dir, tmp_path, algo="fedavg", global_rounds=1), progress=False)
    path = mlflow.artifacts.download_artifacts(run_id=ids["fl_run_ids"][0],
                                               artifact_path="clients/client_000/artifacts/model.safetensors")
    state = load_file(path)
    assert state["head.2.weight"].shape == (10, 512)
    assert state["base.0.weight"].shape == (32, 3, 5, 5)
    # the file carries its client's architecture (JSON in the safetensors metadata), so no model.json
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta[tracking.CLIENT_METADATA])["client_id"] == 0
    half = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # the CNN's inputs are normalized as PFLlib's
    assert ModelSpec.from_dict(json.loads(meta[tracking.CLIENT_METADATA])["model_spec"]) == ModelSpec(
        "cnn", 10, normalization=half)
    root = {a.path for a in mlflow.MlflowClient().list_artifacts(ids["fl_run_ids"][0])}
    assert tracking.MODEL_SPEC_FILE not in root


def _same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return sorted(own) == sorted(state) and all(torch.equal(own[k], v) for k, v in state.items())


def test_client_models_of_mixed_architectures_load_by_client_id(tmp_path, store):
    specs = [ModelSpec("cnn", 10), ModelSpec("resnet20", 10, width=0.25), ModelSpec("cnn", 10)]
    torch.manual_seed(0)
    states = [{k: v.clone() for k, v in build_model(s).state_dict().items()} for s in specs]
    mlflow.set_experiment("client-files")  # in this test's store (the active experiment may be another store's)
    with mlflow.start_run() as run:
        tracking.log_client_models(specs, lambda cid: states[cid])
    for cid, (spec, state) in enumerate(zip(specs, states)):
        model = tracking.load_client_model(run.info.run_id, cid)
        assert type(model) is type(build_model(spec)) and not model.training
        assert _same_weights(model, state), cid


def test_runs_saved_before_per_client_specs_load_through_model_json(tmp_path, store):
    # the flat core's layout: client files without a spec in their metadata, one model.json for the run
    spec = ModelSpec("cnn", 10)
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build_model(spec).state_dict().items()}
    old = tmp_path / "old"
    (old / "clients").mkdir(parents=True)
    save_file(state, old / "clients" / "client_000.safetensors", metadata={"client_id": "0"})
    (old / "model.json").write_text(json.dumps(spec.to_dict()))
    mlflow.set_experiment("client-files")  # in this test's store (the active experiment may be another store's)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(old / "clients"), "clients")
        mlflow.log_artifact(str(old / "model.json"))
    assert _same_weights(tracking.load_client_model(run.info.run_id, 0), state)
