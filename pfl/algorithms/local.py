"""Local work on one client: SGD training, loss and prediction on a model given as a flat vector.

One :class:`LocalTrainer` owns the single model instance on the training device;
each client's parameters are copied into it for the duration of its work, so the
device holds one client's model at a time whatever the number of clients.
"""

from __future__ import annotations

import torch
from torch import nn

from pfl.data.loader import DeviceImages
from pfl.models.flat import get_flat, set_flat


class LocalTrainer:
    """Local SGD (PFLlib's client update: plain SGD, cross-entropy, ``local_epochs`` epochs).

    Args:
        model: the network, already on ``data.device``.
        data: the device-resident pool.
        batch_size: minibatch size; the last incomplete batch of an epoch is dropped
            (PFLlib's ``drop_last=True``) unless the client has fewer samples than one batch.
        lr: SGD learning rate.
        local_epochs: passes over the client's training indices per round.
        eval_batch_size: batch size of inference.
    """

    def __init__(self, model: nn.Module, data: DeviceImages, batch_size: int, lr: float,
                 local_epochs: int, eval_batch_size: int = 2000):
        self.model = model.to(memory_format=torch.channels_last)  # matches DeviceImages' batches
        self.data = data
        self.batch_size = batch_size
        self.local_epochs = local_epochs
        self.eval_batch_size = eval_batch_size
        self.lr = lr
        self.params = list(model.parameters())
        self.loss_fn = nn.CrossEntropyLoss()

    def train(self, start: torch.Tensor, indices: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Train from flat parameters ``start`` (P,) on ``indices`` (n,).

        Batch order comes from a generator seeded with ``seed``, so results do not
        depend on which other clients trained before.

        Returns:
            ``(params, mean_loss)``: trained flat parameters (P,) on the host and the mean
            minibatch loss as a 0-d tensor (no host sync inside the loop).
        """
        set_flat(self.model, start)
        self.model.train()
        gen = torch.Generator().manual_seed(seed)
        n = len(indices)
        bs = min(self.batch_size, n)
        steps = n // bs
        loss_sum = torch.zeros((), device=self.data.device)
        for _ in range(self.local_epochs):
            order = indices[torch.randperm(n, generator=gen).to(indices.device)]
            for b in range(steps):
                x, y = self.data.batch(order[b * bs:(b + 1) * bs])
                loss = self.loss_fn(self.model(x), y)
                for p in self.params:
                    p.grad = None
                loss.backward()
                self._sgd_step()
                loss_sum += loss.detach()
        return get_flat(self.model).cpu(), loss_sum / (steps * self.local_epochs)

    @torch.no_grad()
    def _sgd_step(self) -> None:
        """theta <- theta - lr * grad: torch.optim.SGD's update (no momentum, no weight decay), bit for bit,
        as one fused multi-tensor op without the optimizer's per-step bookkeeping (5% of a CNN step on CPU)."""
        params = [p for p in self.params if p.grad is not None]  # as SGD, skip parameters without a gradient
        torch._foreach_add_(params, [p.grad for p in params], alpha=-self.lr)

    @torch.inference_mode()
    def logits(self, params: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Logits (n, K) on the training device of the model with flat ``params`` on ``indices`` (n,)."""
        set_flat(self.model, params)
        self.model.eval()
        chunks = [self.model(self.data.batch(indices[i:i + self.eval_batch_size])[0])
                  for i in range(0, len(indices), self.eval_batch_size)]
        return torch.cat(chunks)
