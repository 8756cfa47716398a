"""Client-side work: the device models of a run (:class:`ModelRunner`) and the local update (:class:`SGDUpdate`).

The runner owns one model instance per architecture on the training device; a client's
named state is copied into its architecture's instance for the duration of its work, so
the device holds one model per architecture whatever the number of clients.

A *local update* owns the loss, the optimizer and the steps of a client's training.
:class:`SGDUpdate` (PFLlib's client update: plain SGD on cross-entropy) is the default; an
algorithm supplies its own by subclassing it (override :meth:`SGDUpdate.loss` to add a
regularizer such as FedProx's proximal term or FedGen's generated-feature loss, which read
what the server sent from the :class:`FitIns`), or by writing a :class:`LocalUpdate` from scratch.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pfl.algorithms.state import State, load_state, model_state
from pfl.data.loader import DeviceImages
from pfl.models.split import ModelSpec


@dataclass
class FitIns:
    """What the server sends a sampled client (Flower's ``FitIns``).

    Attributes:
        state: the named state local training starts from.
        indices: pool indices (n,) to train on this round (``None``: the client's whole train split),
            e.g. FlexiFed's random ``sample_fraction`` of the shard.
        extras: anything else the algorithm's local update reads (a generator, masks, label counts).
    """

    state: State
    indices: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FitRes:
    """What a sampled client returns after local training (Flower's ``FitRes``).

    Attributes:
        client_id: the client.
        state: the trained named state on the host.
        num_samples: samples local training used (FedAvg's aggregation weight).
        loss: mean minibatch training loss (nats), a 0-d tensor on the training device
            (read once per round, so local training never waits on the device).
        extras: what else the client reports (label counts, metrics).
    """

    client_id: int
    state: State
    num_samples: int
    loss: torch.Tensor
    extras: Mapping[str, Any] = field(default_factory=dict)


class ModelRunner:
    """The run's device models, one per architecture, and inference on the device-resident pool.

    Args:
        models: architecture -> its single model instance, already on ``data.device``.
        data: the device-resident pool.
        eval_batch_size: batch size of inference.
    """

    def __init__(self, models: Mapping[ModelSpec, nn.Module], data: DeviceImages, eval_batch_size: int = 2000,
                 autocast: torch.dtype | None = None):
        self.models = {spec: m.to(memory_format=torch.channels_last) for spec, m in models.items()}  # as batches
        self.data = data
        self.eval_batch_size = eval_batch_size
        self.autocast = autocast

    def load(self, spec: ModelSpec, state: State) -> nn.Module:
        """The device instance of ``spec`` holding ``state``."""
        return load_state(self.models[spec], state)

    @torch.inference_mode()
    def logits(self, spec: ModelSpec, state: State, indices: torch.Tensor) -> torch.Tensor:
        """Logits (n, K) on the training device of the model ``state`` (architecture ``spec``) on ``indices`` (n,)."""
        model = self.load(spec, state).eval()
        with autocast(self.data.device, self.autocast):
            chunks = [model(self.data.batch(indices[i:i + self.eval_batch_size])[0]).float()
                      for i in range(0, len(indices), self.eval_batch_size)]
        return torch.cat(chunks)


class LocalUpdate:
    """The contract of a client's local training; see :class:`SGDUpdate` for the default."""

    def fit(self, model: nn.Module, data: DeviceImages, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        """Train ``model`` (already holding ``ins.state``) on pool ``indices`` (n,); batch order from ``seed``.

        Returns:
            ``(state, mean_loss)``: the trained named state on the host and the mean minibatch loss (0-d tensor).
        """
        raise NotImplementedError


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``dtype``; ``None``: no context at all (fp32, and no per-step cost)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class SGDUpdate(LocalUpdate):
    """Local SGD (PFLlib's client update: plain SGD, cross-entropy, ``local_epochs`` epochs).

    Only parameters that require gradients train (a LoRA model's adapters and head). Training batches
    are augmented when the run's image transform says so (:mod:`pfl.data.transforms`), drawn from
    the same seeded generator as the batch order.

    Args:
        batch_size: minibatch size; the last incomplete batch of an epoch is dropped
            (PFLlib's ``drop_last=True``) unless the client has fewer samples than one batch.
        lr: learning rate.
        local_epochs: passes over the client's training indices per round.
        optimizer: ``"sgd"`` (plain SGD) or ``"adamw"`` (``torch.optim.AdamW`` with torch's defaults: betas
            (0.9, 0.999), weight decay 0.01); a fresh one per client and round, so no moments carry over rounds.
        autocast: autocast dtype of the forward pass and loss (``torch.bfloat16``), or ``None`` (fp32).
    """

    def __init__(self, batch_size: int, lr: float, local_epochs: int, optimizer: str = "sgd",
                 autocast: torch.dtype | None = None):
        self.batch_size = batch_size
        self.lr = lr
        self.local_epochs = local_epochs
        self.optimizer_name = optimizer
        self.autocast = autocast
        self.loss_fn = nn.CrossEntropyLoss()

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments, for a subclass built on the run's update (``Sub(**update.settings())``)."""
        return {"batch_size": self.batch_size, "lr": self.lr, "local_epochs": self.local_epochs,
                "optimizer": self.optimizer_name, "autocast": self.autocast}

    @property
    def plain(self) -> bool:
        """Plain fp32 SGD (what vectorized training computes)."""
        return self.optimizer_name == "sgd" and self.autocast is None

    def optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer | None:
        """The optimizer of one client's round, created afresh each round (``None``: plain SGD as one fused
        step, :meth:`_sgd_step`). Subclasses return e.g. ``torch.optim.SGD`` with momentum."""
        return torch.optim.AdamW(params, lr=self.lr) if self.optimizer_name == "adamw" else None

    def result_state(self, model: nn.Module) -> State:
        """What the client uploads after training: its full state (subclasses send less, e.g. FedLoRA's adapters)."""
        return model_state(model)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ins: FitIns) -> torch.Tensor:
        """The minibatch objective: cross-entropy of ``model(x)`` (B, K) against labels ``y`` (B,).
        Subclasses add their regularizers here."""
        return self.loss_fn(model(x), y)

    def fit(self, model: nn.Module, data: DeviceImages, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        """``local_epochs`` epochs of SGD on ``indices`` (n,), batch order from a generator seeded with ``seed``
        (so results do not depend on which clients trained before); no host sync inside the loop."""
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = self.optimizer(params)
        gen = torch.Generator().manual_seed(seed)
        n = len(indices)
        bs = min(self.batch_size, n)
        steps = n // bs
        loss_sum = torch.zeros((), device=data.device)
        for _ in range(self.local_epochs):
            order = indices[torch.randperm(n, generator=gen).to(indices.device)]
            for b in range(steps):
                x, y = data.batch(order[b * bs:(b + 1) * bs], gen)
                with autocast(data.device, self.autocast):
                    loss = self.loss(model, x, y, ins)
                for p in params:
                    p.grad = None
                loss.backward()
                opt.step() if opt is not None else self._sgd_step(params)
                loss_sum += loss.detach()
        return self.result_state(model), loss_sum / (steps * self.local_epochs)

    @torch.no_grad()
    def _sgd_step(self, params: list[torch.Tensor]) -> None:
        """theta <- theta - lr * grad: torch.optim.SGD's update (no momentum, no weight decay), bit for bit,
        as one fused multi-tensor op without the optimizer's per-step bookkeeping (5% of a CNN step on CPU)."""
        params = [p for p in params if p.grad is not None]  # as SGD, skip parameters without a gradient
        torch._foreach_add_(params, [p.grad for p in params], alpha=-self.lr)
