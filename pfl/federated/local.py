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

from collections.abc import Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pfl.federated.state import State, load_state, model_state
from pfl.data.loader import DeviceData
from pfl.models.split import ModelSpec


@dataclass
class FitIns:
    """What the server sends a sampled client (Flower's ``FitIns``).

    Attributes:
        state: the named state local training starts from.
        indices: pool indices (n,) to train on this round (``None``: the client's whole train split),
            e.g. FlexiFed's random ``sample_fraction`` of the shard.
        extras: anything else the algorithm's local update reads (a generator, masks, label counts).
        sent: what actually travelled when it is less than ``state``: the downlink that the client merged into its
            own model to get ``state`` (:class:`pfl.federated.downlink.Downlink`; ``comm/bytes_down`` counts it);
            ``None``: ``state`` travelled whole.
    """

    state: State
    indices: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    sent: State | None = None


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

    def __init__(self, models: Mapping[ModelSpec, nn.Module], data: DeviceData, eval_batch_size: int = 2000,
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
        """Logits (n, K) on the training device of the model ``state`` (architecture ``spec``) on ``indices`` (n,);
        a regression model's outputs (n, D)."""
        model = self.load(spec, state).eval()
        with autocast(self.data.device, self.autocast):
            chunks = [model(self.data.batch(indices[i:i + self.eval_batch_size])[0]).float()
                      for i in range(0, len(indices), self.eval_batch_size)]
        return torch.cat(chunks)


class LocalUpdate:
    """The contract of a client's local training; see :class:`SGDUpdate` for the default."""

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        """Train ``model`` (already holding ``ins.state``) on pool ``indices`` (n,); batch order from ``seed``.

        Returns:
            ``(state, mean_loss)``: the trained named state on the host and the mean minibatch loss (0-d tensor).
        """
        raise NotImplementedError


@contextmanager
def training_only(model: nn.Module, names: Collection[str]) -> Iterator[nn.Module]:
    """Within the block only the parameters named in ``names`` (that required gradients) train: every other
    parameter's ``requires_grad`` is off, and each flag is restored on exit (FedRep's phases, a new client's
    fine-tuning of its personal part)."""
    params = dict(model.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(before[n] and n in names)
        yield model
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device`` in ``dtype``; ``None``: no context at all (fp32, and no per-step cost)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class SGDUpdate(LocalUpdate):
    """Local SGD (PFLlib's client update: plain SGD, cross-entropy, ``local_epochs`` epochs), or AdamW, on the run's
    task loss (cross-entropy for classification, MSE for a regression; :mod:`pfl.tasks`).

    Only parameters that require gradients train (a LoRA model's adapters and head). Training batches
    are augmented when the run's image transform says so (:mod:`pfl.data.transforms`), drawn from
    the same seeded generator as the batch order. The optimizer, its moments and the learning-rate
    schedule start afresh for every client and round, as a fresh HF ``Trainer`` per client and round does
    in FedIT (``fed_utils/client.py``, ``build_local_trainer``).

    Args:
        batch_size: minibatch size; the last incomplete batch of an epoch is dropped
            (PFLlib's ``drop_last=True``) unless the client has fewer samples than one batch.
        lr: (peak) learning rate.
        local_epochs: passes over the client's training indices per round.
        optimizer: ``"sgd"`` (``torch.optim.SGD``: no momentum; weight decay as an L2 term added to the gradient)
            or ``"adamw"`` (``torch.optim.AdamW``: betas (0.9, 0.999), eps 1e-8, decoupled weight decay).
        autocast: autocast dtype of the forward pass and loss (``torch.bfloat16``), or ``None`` (fp32).
        weight_decay: the optimizer's weight decay, on every trained parameter (the HF ``Trainer`` exempts biases
            and LayerNorm weights; FedIT's is 0); ``None``: its default (sgd: 0, PFLlib; adamw: torch's 0.01).
        lr_schedule: ``"constant"``, or ``"linear"``: step k (0-based) of a round of T optimizer steps
            (T = ``local_epochs`` x the client's batches per epoch) runs at ``lr (T - k) / T``, so the rate
            decays linearly towards 0 within every round. This is the HF ``Trainer``'s default
            ``lr_scheduler_type="linear"`` with ``warmup_steps=0`` (FedIT), whose ``num_training_steps`` is the
            training's optimizer steps: transformers' ``get_linear_schedule_with_warmup`` multiplies the rate
            by ``max(0, (T - k) / T)`` and steps after every optimizer step, so the last step runs at ``lr / T``.
        max_grad_norm: clip the gradients' total 2-norm to this value before every step
            (``torch.nn.utils.clip_grad_norm_``, as the HF ``Trainer``'s ``max_grad_norm``, default 1.0 there);
            ``None``: no clipping.
        drop_last: drop each epoch's last incomplete batch (PFLlib's ``DataLoader(drop_last=True)``); ``False``
            trains on it as a smaller batch, as torch's ``DataLoader`` does by default (FlexiFed's official code).
        loss_fn: the task's minibatch loss of outputs against targets (:meth:`pfl.tasks.Task.loss`; default
            cross-entropy).
    """

    def __init__(self, batch_size: int, lr: float, local_epochs: int, optimizer: str = "sgd",
                 autocast: torch.dtype | None = None, weight_decay: float | None = None,
                 lr_schedule: str = "constant", max_grad_norm: float | None = None, drop_last: bool = True,
                 loss_fn: nn.Module | None = None):
        self.batch_size = batch_size
        self.lr = lr
        self.local_epochs = local_epochs
        self.optimizer_name = optimizer
        self.autocast = autocast
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.max_grad_norm = max_grad_norm
        self.drop_last = drop_last
        self.loss_fn = loss_fn if loss_fn is not None else nn.CrossEntropyLoss()

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments, for a subclass built on the run's update (``Sub(**update.settings())``)."""
        return {"batch_size": self.batch_size, "lr": self.lr, "local_epochs": self.local_epochs,
                "optimizer": self.optimizer_name, "autocast": self.autocast, "weight_decay": self.weight_decay,
                "lr_schedule": self.lr_schedule, "max_grad_norm": self.max_grad_norm, "drop_last": self.drop_last,
                "loss_fn": self.loss_fn}

    def with_epochs(self, local_epochs: int) -> SGDUpdate:
        """The same plain local update (this class's, none of a subclass's) for ``local_epochs`` epochs."""
        return SGDUpdate(**{**self.settings(), "local_epochs": local_epochs})

    @property
    def plain(self) -> bool:
        """Plain fp32 SGD at a constant rate, without weight decay or clipping, on full batches only (what vectorized
        training computes)."""
        return (self.optimizer_name == "sgd" and self.autocast is None and not self.weight_decay
                and self.lr_schedule == "constant" and self.max_grad_norm is None and self.drop_last)

    def optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer | None:
        """The optimizer of one client's round, created afresh each round (``None``: SGD without weight decay as
        one fused step, :meth:`_sgd_step`). Subclasses return e.g. ``torch.optim.SGD`` with momentum."""
        if self.optimizer_name == "adamw":
            decay = {} if self.weight_decay is None else {"weight_decay": self.weight_decay}  # None: torch's 0.01
            return torch.optim.AdamW(params, lr=self.lr, **decay)
        return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay) if self.weight_decay else None

    def step_lr(self, step: int, steps: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) of a round of ``steps`` steps: ``lr``, or under
        the linear schedule ``lr (steps - step) / steps`` (class docstring)."""
        return self.lr if self.lr_schedule == "constant" else self.lr * (steps - step) / steps

    def result_state(self, model: nn.Module) -> State:
        """What the client uploads after training: its full state (subclasses send less, e.g. FedLoRA's adapters)."""
        return model_state(model)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ins: FitIns) -> torch.Tensor:
        """The minibatch objective: the task loss of ``model(x)`` (B, K) against targets ``y`` (cross-entropy
        against labels (B,); MSE against regression targets (B, K)). Subclasses add their regularizers here."""
        return self.loss_fn(model(x), y)

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        """``local_epochs`` epochs of SGD on ``indices`` (n,), batch order from a generator seeded with ``seed``
        (so results do not depend on which clients trained before); no host sync inside the loop."""
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = self.optimizer(params)
        gen = torch.Generator().manual_seed(seed)
        n = len(indices)
        bs = min(self.batch_size, n)
        steps = n // bs if self.drop_last else -(-n // bs)  # the last, incomplete batch is order[(steps - 1) * bs:]
        total = steps * self.local_epochs
        loss_sum = torch.zeros((), device=data.device)
        for epoch in range(self.local_epochs):
            order = indices[torch.randperm(n, generator=gen).to(indices.device)]
            for b in range(steps):
                x, y = data.batch(order[b * bs:(b + 1) * bs], gen)
                with autocast(data.device, self.autocast):
                    loss = self.loss(model, x, y, ins)
                for p in params:
                    p.grad = None
                loss.backward()
                self._step(opt, params, self.step_lr(epoch * steps + b, total))
                loss_sum += loss.detach()
        return self.result_state(model), loss_sum / total

    def correct_gradients(self) -> None:
        """Change the gradients between clipping and the optimizer step (default: nothing). Subclasses add their
        corrections here: FedProx's pull ``mu (w - g)``, SCAFFOLD's ``c - c_i``."""

    def _step(self, opt: torch.optim.Optimizer | None, params: list[torch.Tensor], lr: float) -> None:
        """One optimizer step at rate ``lr``, after clipping the gradients' norm to ``max_grad_norm`` (if set) and
        :meth:`correct_gradients`."""
        if self.max_grad_norm is not None:
            nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.correct_gradients()
        if opt is None:
            self._sgd_step(params, lr)
            return
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()

    @torch.no_grad()
    def _sgd_step(self, params: list[torch.Tensor], lr: float) -> None:
        """theta <- theta - lr * grad: torch.optim.SGD's update (no momentum, no weight decay), bit for bit,
        as one fused multi-tensor op without the optimizer's per-step bookkeeping (5% of a CNN step on CPU)."""
        params = [p for p in params if p.grad is not None]  # as SGD, skip parameters without a gradient
        torch._foreach_add_(params, [p.grad for p in params], alpha=-lr)
