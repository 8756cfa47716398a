"""Inference of several client models at once: FedFomo's scoring and the all-client evaluation.

Sequentially, each model is copied into its architecture's single device instance in
turn (:meth:`ModelRunner.logits`). Batched (``client_parallelism=vectorized``), the
models' parameters are stacked (C, ...) and ``vmap(functional_call)`` runs C
forward passes as one computation, as :mod:`pfl.federated.vectorized` does for
training. Work is packed as (model, chunk of its samples) items, so models with
more samples take more items instead of padding every other model to the largest:
only each model's last chunk is padded. Models with buffers (BatchNorm) are run
sequentially, like their training.
"""

from __future__ import annotations

import math

import torch
from torch.func import functional_call, vmap

from pfl.federated.local import ModelRunner
from pfl.federated.state import State, stack_states
from pfl.models.split import ModelSpec


def _chunks(indices: list[torch.Tensor], size: int) -> tuple[list[int], torch.Tensor]:
    """Every model's samples cut into chunks of ``size`` (the last one padded by repeating its first index).

    Returns:
        ``(counts, chunks)``: the number of chunks of each model and all chunks' pool indices (R, size),
        model by model.
    """
    counts = [math.ceil(len(idx) / size) for idx in indices]
    chunks = [torch.cat([idx, idx[:1].expand(n * size - len(idx))]).view(n, size) for idx, n in zip(indices, counts)]
    return counts, torch.cat(chunks)


@torch.no_grad()
def batched_logits(runner: ModelRunner, spec: ModelSpec, vectors: list[State],
                   indices: list[torch.Tensor]) -> list[torch.Tensor]:
    """Logits of C models of one architecture, model c on its own indices, in batched forward passes.

    Equal to ``[runner.logits(spec, v, i) for v, i in zip(vectors, indices)]`` up to float rounding (tested).

    Args:
        runner: supplies the model (architecture only), the data and ``eval_batch_size``.
        spec: the models' architecture.
        vectors: named states per model, on any device.
        indices: pool indices (n_c,) per model (n_c >= 1), on the training device.

    Returns:
        Logits (n_c, K) per model on the training device.
    """
    model, data = runner.models[spec], runner.data
    params = stack_states(vectors, vectors[0], data.device)
    size = max(1, runner.eval_batch_size // len(vectors))
    counts, chunks = _chunks(indices, size)
    owner = torch.repeat_interleave(torch.arange(len(vectors)), torch.tensor(counts))  # model of each chunk (R,)
    forward = vmap(lambda p, x: functional_call(model, p, (x,)))
    model.eval()
    outputs = []
    for lo in range(0, len(chunks), len(vectors)):  # C chunks per call: about eval_batch_size samples
        rows = chunks[lo:lo + len(vectors)]
        x, _ = data.batch(rows.reshape(-1))
        group = owner[lo:lo + len(vectors)].to(data.device)
        outputs.append(forward({k: v[group] for k, v in params.items()}, x.view(len(rows), size, *x.shape[1:])))
    logits = torch.cat(outputs)  # (R, size, K)
    per_model = logits.split(counts)
    return [z.reshape(-1, z.shape[-1])[:len(idx)] for z, idx in zip(per_model, indices)]
