"""Vectorized local training equals sequential training (same seeds) on a real CIFAR-10 slice."""

from __future__ import annotations

import pytest
import torch

from pfl.federated.base import FederatedContext
from pfl.federated.inference import batched_logits
from pfl.federated.local import FitIns, ModelRunner, SGDUpdate
from pfl.federated.state import State, flatten, float_keys, model_state
from pfl.federated.vectorized import _orders, can_vectorize, train_vectorized, vectorizable
from pfl.config import load_config
from pfl.data.loader import DeviceData
from pfl.models import ModelSpec, build_model
from pfl.train import prepare, run_federated

SPEC = ModelSpec("cnn", 10)


def _runner(cifar10, local_epochs=2, eval_batch_size=2000) -> tuple[ModelRunner, SGDUpdate]:
    torch.manual_seed(0)
    model = build_model(SPEC)
    runner = ModelRunner({SPEC: model}, DeviceData(cifar10, torch.device("cpu")), eval_batch_size=eval_batch_size)
    return runner, SGDUpdate(batch_size=10, lr=0.05, local_epochs=local_epochs)


def _fit(runner: ModelRunner, update: SGDUpdate, start: State, indices: torch.Tensor, seed: int):
    """Sequential local training of one client from ``start`` (the engine's path)."""
    model = runner.load(SPEC, start)
    return update.fit(model, runner.data, FitIns(start), indices, seed)


def _shifted(state: State, fn) -> State:
    """``fn`` applied to every float entry (other entries as they are)."""
    return {k: fn(v) if v.is_floating_point() else v for k, v in state.items()}


def test_local_sgd_is_torch_sgd_bit_for_bit(cifar10):
    runner, update = _runner(cifar10, local_epochs=1)
    start = model_state(runner.models[SPEC])
    indices = torch.arange(0, 45)
    params, loss = _fit(runner, update, start, indices, seed=5)
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn", 10)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    order = indices[torch.randperm(45, generator=torch.Generator().manual_seed(5))]
    losses = []
    for b in range(4):
        x, y = runner.data.batch(order[b * 10:(b + 1) * 10])
        step_loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        step_loss.backward()
        optimizer.step()
        losses.append(step_loss.item())
    reference = model_state(model)
    assert sorted(params) == sorted(reference)
    assert not any(torch.equal(params[k], start[k]) for k in params)  # every entry trained
    for k in reference:
        assert torch.equal(params[k], reference[k]), k
    assert loss.item() == pytest.approx(sum(losses) / 4, rel=1e-6)


def test_orders_are_the_sequential_batches_padded_and_masked():
    idx = [torch.arange(100, 125), torch.arange(300, 342)]
    batches, active = _orders(idx, [3, 4], epochs=2, batch_size=10)
    assert batches.shape == (2, 8, 10) and active.sum(1).tolist() == [4, 8]  # 2*(25//10), 2*(42//10)
    gen = torch.Generator().manual_seed(3)
    first = [idx[0][torch.randperm(25, generator=gen)][:20] for _ in range(2)]
    assert torch.equal(batches[0, :4].reshape(-1), torch.cat(first))


def test_vectorized_training_equals_sequential(cifar10):
    runner, update = _runner(cifar10)
    start = model_state(runner.models[SPEC])
    keys = float_keys(start)
    starts = [start, _shifted(start, lambda v: v + 0.01), _shifted(start, lambda v: v - 0.01)]
    indices = [torch.arange(0, 37), torch.arange(500, 555), torch.arange(1000, 1080)]  # 3, 5, 8 steps/epoch
    seeds = [1, 2, 3]
    assert vectorizable(runner.models[SPEC], update, runner.data, indices)
    together = train_vectorized(runner.models[SPEC], runner.data, update, starts, indices, seeds)
    for (params, loss), s, i, seed in zip(together, starts, indices, seeds):
        ref_params, ref_loss = _fit(runner, update, s, i, seed)
        assert sorted(params) == sorted(ref_params)
        # float tolerance: batched (grouped) and per-client convolutions sum in different orders, and
        # 16 SGD steps at lr 0.05 amplify that rounding
        drift = (torch.linalg.vector_norm(flatten(params, keys) - flatten(ref_params, keys))
                 / torch.linalg.vector_norm(flatten(ref_params, keys)))
        assert drift < 1e-4, drift
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)


def test_models_with_buffers_or_tiny_clients_are_refused(cifar10):
    bn = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    assert not can_vectorize(bn) and can_vectorize(torch.nn.Linear(3, 3))
    runner, update = _runner(cifar10, local_epochs=1)
    start = model_state(runner.models[SPEC])
    model = runner.models[SPEC]
    assert not vectorizable(model, update, runner.data, [torch.arange(5), torch.arange(50)])
    with pytest.raises(ValueError, match="fewer samples than one batch"):
        train_vectorized(model, runner.data, update, [start, start], [torch.arange(5), torch.arange(50)], [0, 1])
    # a local update with its own loss (a subclass) is not vectorized either

    class Proximal(SGDUpdate):
        def loss(self, model, x, y, ins):
            return super().loss(model, x, y, ins)

    assert not vectorizable(model, Proximal(10, 0.05, 1), runner.data, [torch.arange(50), torch.arange(50)])


@pytest.mark.parametrize("algo", ["fedavg", "fedfomo"])
def test_engine_vectorized_rounds_match_sequential(cifar10_dir, tmp_path, algo):
    results = {}
    for mode in ("sequential", "vectorized"):
        cfg = load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path / 'cache'}", f"algo={algo}",
                                 "num_clients=6", "num_partitions=18", "join_ratio=0.5", "global_rounds=2",
                                 "classes_per_client=5", "device=cpu", f"client_parallelism={mode}"])
        algorithm, final = run_federated(prepare(cfg), 0, [])
        results[mode] = ([algorithm.personalized_state(c) for c in range(6)], final.metrics)
    for seq, vec in zip(results["sequential"][0], results["vectorized"][0]):
        assert sorted(seq) == sorted(vec)
        for k in seq:
            assert torch.allclose(seq[k], vec[k], atol=1e-4), (k, (seq[k] - vec[k]).abs().max())
    assert results["vectorized"][1]["test/acc"] == pytest.approx(results["sequential"][1]["test/acc"], abs=2e-3)


def test_batched_inference_equals_one_model_at_a_time(cifar10):
    runner, _ = _runner(cifar10, eval_batch_size=64)  # 3 models: chunks of 21, so padding and several calls
    start = model_state(runner.models[SPEC])
    vectors = [start, _shifted(start, lambda v: v + 0.02 * torch.randn_like(v)),
               _shifted(start, lambda v: v - 0.02 * torch.randn_like(v))]
    indices = [torch.arange(7, 8), torch.arange(100, 137), torch.arange(400, 650)]  # 1, 37 and 250 samples
    batched = batched_logits(runner, SPEC, vectors, indices)
    for z, v, i in zip(batched, vectors, indices):
        ref = runner.logits(SPEC, v, i)
        assert z.shape == ref.shape
        assert torch.allclose(z, ref, atol=1e-4), (z - ref).abs().max()


def test_context_losses_are_the_same_batched_or_sequential(cifar10):
    runner, update = _runner(cifar10)
    start = model_state(runner.models[SPEC])
    vectors = [_shifted(start, lambda v: v + 0.05 * torch.randn_like(v)) for _ in range(4)]
    val = torch.arange(200, 331)
    losses = {}
    for mode in ("sequential", "vectorized"):
        ctx = FederatedContext([], [], runner, update, {SPEC: start}, num_join_clients=4, seed=0,
                               client_parallelism=mode)
        assert ctx.batched(SPEC) == (mode == "vectorized")
        losses[mode] = ctx.losses(SPEC, vectors, val)
    labels = cifar10.targets[val].long()
    expected = torch.stack([torch.nn.functional.cross_entropy(runner.logits(SPEC, v, val), labels)
                            for v in vectors])
    assert losses["sequential"].shape == (4,) and len(set(losses["sequential"].tolist())) == 4
    assert torch.allclose(losses["sequential"], expected.double())
    assert torch.allclose(losses["vectorized"], losses["sequential"], atol=1e-5)
