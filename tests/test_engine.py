"""The round engine's evaluation: unchanged client models keep their scores, changed ones are re-run."""

from __future__ import annotations

import pytest
import torch

from pfl.federated.engine import Engine, Schedule
from pfl.config import ConfigError, load_config
from pfl.data.loader import inference_batch_size
from pfl.train import build_algorithm, prepare


def _fedfomo(cifar10_dir, tmp_path, mode: str = "sequential"):
    cfg = load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path / 'cache'}", "algo=fedfomo",
                             "num_clients=6", "join_ratio=0.5", "classes_per_client=5", "device=cpu",
                             f"client_parallelism={mode}"])
    return build_algorithm(prepare(cfg), seed=0)


def test_evaluation_reruns_only_changed_models_and_equals_a_fresh_evaluation(cifar10_dir, tmp_path):
    algorithm = _fedfomo(cifar10_dir, tmp_path)
    engine = Engine(algorithm, Schedule(global_rounds=3, num_join_clients=3))
    first = engine.evaluate(0)
    assert first.metrics["eval/reused"] == 0
    assert [e["architecture"] for e in first.per_client] == ["cnn"] * 6
    again = engine.evaluate(0)
    assert again.metrics["eval/reused"] == 6 and again.per_client == first.per_client
    engine.run_round(1)  # FedFomo changes the models of the round's 3 clients only
    after = engine.evaluate(1)
    assert after.metrics["eval/reused"] == 3
    fresh = Engine(algorithm, engine.schedule).evaluate(1)
    assert fresh.metrics["eval/reused"] == 0
    assert after.per_client == fresh.per_client
    assert {k: v for k, v in after.metrics.items() if not k.startswith(("eval/", "time/"))} == \
        {k: v for k, v in fresh.metrics.items() if not k.startswith(("eval/", "time/"))}
    changed = set(engine.sample_clients(1))
    assert [c for c in range(6) if after.per_client[c] != first.per_client[c]] == sorted(changed)


def test_batched_evaluation_matches_sequential(cifar10_dir, tmp_path):
    per_client = {}
    for mode in ("sequential", "vectorized"):
        algorithm = _fedfomo(cifar10_dir, tmp_path, mode)
        engine = Engine(algorithm, Schedule(global_rounds=1, num_join_clients=3))
        engine.run_round(1)
        per_client[mode] = engine.evaluate(1).per_client
    for seq, vec in zip(per_client["sequential"], per_client["vectorized"]):
        assert seq["num_test"] == vec["num_test"] and abs(seq["acc"] - vec["acc"]) <= 1 / seq["num_test"]
        assert abs(seq["nll"] - vec["nll"]) < 1e-3


def test_inference_batch_follows_the_device_unless_configured(cifar10_dir, tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert inference_batch_size(None, cpu, (3, 32, 32)) == 195
    assert inference_batch_size(None, cpu, (3, 64, 64)) == 48
    assert inference_batch_size(None, cuda, (3, 32, 32)) == 2000
    assert inference_batch_size(7, cpu, (3, 32, 32)) == 7
    algorithm = _fedfomo(cifar10_dir, tmp_path)  # eval_batch_size unset: resolved by prepare() for the CPU
    assert algorithm.ctx.runner.eval_batch_size == 195
    with pytest.raises(ConfigError, match="eval_batch_size"):
        load_config(None, ["eval_batch_size=0"])


def test_round_metrics_of_the_algorithm_join_the_engines(cifar10_dir, tmp_path, monkeypatch):
    algorithm = _fedfomo(cifar10_dir, tmp_path)
    monkeypatch.setattr(algorithm, "round_metrics", lambda: {"server/probe": 1.5})
    metrics = Engine(algorithm, Schedule(global_rounds=1, num_join_clients=3)).run_round(1)
    assert metrics["server/probe"] == 1.5 and "train/loss" in metrics and "time/round" in metrics
