"""Vectorized local training: the round's clients trained together as one batched computation.

Each client's parameters are one slice of stacked tensors (C, ...); a step runs
``vmap(grad(loss))`` of ``torch.func.functional_call`` over the clients, so C models
train in lockstep on C minibatches. Every client keeps its own batch order (the same
seeded permutations as :meth:`SGDUpdate.fit`) and its own number of steps: a
client that has run out of batches is masked (its update is multiplied by 0) while
the others go on. Plain SGD has no optimizer state, so the per-client state is the
parameters alone. For the same seeds the result equals sequential training up to
float rounding (tested).

Models with buffers (BatchNorm statistics) are not vectorized: their in-place updates
do not batch; :func:`can_vectorize` says whether a model qualifies.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from pfl.federated.local import SGDUpdate
from pfl.federated.state import State, stack_states
from pfl.data.loader import DeviceData


def can_vectorize(model: nn.Module) -> bool:
    """True when the model's state is parameters only (no BatchNorm-like buffers) and it has no recurrent layer (an
    LSTM's fused kernel does not batch under ``vmap``) and no active dropout (random under ``vmap`` only in its
    ``randomness="different"`` mode, whose draws differ from sequential training's)."""
    return len(list(model.buffers())) == 0 and not any(
        isinstance(m, nn.RNNBase) or (isinstance(m, nn.Dropout) and m.p > 0) for m in model.modules())


def vectorizable(model: nn.Module, update: object, data: DeviceData, indices: list[torch.Tensor]) -> bool:
    """Whether :func:`train_vectorized` accepts these clients: the default local update (plain fp32
    :class:`SGDUpdate`, not a subclass with its own loss), un-augmented batches, a buffer-free model whose
    parameters all train, and every client holding at least one full batch (so all clients share the batch size)."""
    return (type(update) is SGDUpdate and update.plain and not data.transform.augments and can_vectorize(model)
            and all(p.requires_grad for p in model.parameters()) and min(len(i) for i in indices) >= update.batch_size)


def _orders(indices: list[torch.Tensor], seeds: list[int], epochs: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-client batch indices padded to a common length, and the mask of real steps.

    Returns:
        ``(batches, active)``: (C, T, B) pool indices and (C, T) bool, T = the largest client's
        ``epochs * (n // B)`` steps; client c's steps are its ``SGDUpdate.fit`` batches, in order.
    """
    per_client = []
    for idx, seed in zip(indices, seeds):
        gen = torch.Generator().manual_seed(seed)
        n = len(idx)
        steps = n // batch_size
        epochs_batches = [idx[torch.randperm(n, generator=gen).to(idx.device)][: steps * batch_size]
                          for _ in range(epochs)]
        per_client.append(torch.cat(epochs_batches).view(-1, batch_size))
    longest = max(len(b) for b in per_client)
    active = torch.zeros(len(per_client), longest, dtype=torch.bool)
    padded = []
    for c, b in enumerate(per_client):
        active[c, :len(b)] = True
        pad = b[:1].expand(longest - len(b), -1)  # any real indices; masked out
        padded.append(torch.cat([b, pad]))
    return torch.stack(padded), active


def train_vectorized(model: nn.Module, data: DeviceData, update: SGDUpdate, starts: list[State],
                     indices: list[torch.Tensor], seeds: list[int]) -> list[tuple[State, torch.Tensor]]:
    """Local SGD of C clients of one architecture at once, equivalent to ``update.fit`` per client.

    Args:
        model: the architecture's device instance (architecture only; its values are not used).
        data: the device-resident pool.
        update: batch size, lr and epochs.
        starts: named start states per client.
        indices: training indices (n_c,) per client, on the training device.
        seeds: batch-order seed per client.

    Returns:
        ``(state, mean_loss)`` per client, like :meth:`SGDUpdate.fit`.

    Raises:
        ValueError: not :func:`vectorizable` (the engine trains such rounds sequentially instead).
    """
    if not vectorizable(model, update, data, indices):
        raise ValueError("vectorized training needs plain SGD without augmentation, a model without buffers (e.g. no "
                         "BatchNorm) and clients with at least one full batch (fewer samples than one batch: train "
                         "sequentially)")
    device = data.device
    params = stack_states(starts, starts[0], device)  # fresh (C, ...) tensors, updated in place below
    batches, active = _orders(indices, seeds, update.local_epochs, update.batch_size)
    active = active.to(device)
    loss_fn = update.loss_fn
    model.train()

    def client_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (x,)), y)

    step_fn = vmap(grad_and_value(client_loss))
    c, t_max, b = batches.shape
    loss_sum = torch.zeros(c, device=device)
    lr = update.lr
    for t in range(t_max):
        x, y = data.batch(batches[:, t].reshape(-1))
        x, y = x.view(c, b, *x.shape[1:]), y.view(c, b, *y.shape[1:])
        mask = active[:, t].to(x.dtype)
        grads, losses = step_fn(params, x, y)
        with torch.no_grad():
            loss_sum += losses * mask
            for name, g in grads.items():
                params[name].sub_(g * (lr * mask).view(-1, *[1] * (g.dim() - 1)))
    steps = active.sum(dim=1).to(loss_sum.dtype)
    host = {k: v.cpu() for k, v in params.items()}
    return [({k: v[i].clone() for k, v in host.items()}, loss_sum[i] / steps[i]) for i in range(c)]
