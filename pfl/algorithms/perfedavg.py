"""Per-FedAvg (Fallah, Mokhtari & Ozdaglar, "Personalized Federated Learning with Theoretical Guarantees: A
Model-Agnostic Meta-Learning Approach", NeurIPS 2020), first-order variant (FO), with PFLlib's semantics
(TsingZ0/PFLlib ``system/flcore/servers/serverperavg.py``, ``system/flcore/clients/clientperavg.py``,
``system/flcore/optimizers/fedoptimizer.py`` ``PerAvgOptimizer``, ``system/main.py``; commit d832e76).

A sampled client starts from the global model and runs ``train`` twice in a row (``serverperavg.py:34-36``), each
``local_epochs`` epochs over batches of ``2 * batch_size`` samples (``clientperavg.py:23``, drop_last); so a round is
``2 * local_epochs`` epochs, each with a fresh shuffle. Per batch (``clientperavg.py:34-72``):

1. the first ``batch_size`` samples: one SGD step at ``lr``, w' = w - lr grad f_1(w) (``clientperavg.py:37-51``,
   ``fedoptimizer.py:18-19``);
2. the other ``batch_size`` samples: the gradient at w', grad f_2(w'), then the parameters go back to w and take the
   step w <- w - beta grad f_2(w') (``clientperavg.py:53-72``, ``fedoptimizer.py:16-17``).

``beta`` is the run's ``lr`` in PFLlib: ``clientperavg.py:13-14`` ignores ``-bt`` (``main.py:445-446``, default 0.0)
and sets ``self.beta = self.learning_rate``. pfl's ``beta`` knob defaults to ``None``, which is that (the step's
``lr``); a number sets the paper's outer rate. The server averages the uploads weighted by training samples
(``serverperavg.py:43-46``, ``serverbase.py:114-150``).

``personalized_state(c)``: the global model after one SGD step at ``lr`` on one batch of ``batch_size`` samples drawn
at random from client c's *train* split, with the model in training mode (``serverperavg.py:71-79``
``evaluate_one_step``, ``clientperavg.py:83-99`` ``train_one_step``: the first batch of a shuffled train loader). PFLlib
takes that step on every client before scoring and then restores the parameters; here it is taken afresh, from the
global model of the last aggregated round, whenever the personalized model is asked for (it depends on the round and
the client only, so an evaluation and the saved model agree). PFLlib's step reads train data, so nothing of the test
split leaks.

Buffer policy (BatchNorm): the uploads' float buffers are averaged with the parameters, sample-weighted, and integer
buffers keep the global model's, as pfl's FedAvg (:mod:`pfl.algorithms.fedavg`); the steps run in training mode, so
running statistics move with both halves of every batch (the restore of step 2 covers parameters only, as PFLlib's)
and with the evaluation step. PFLlib sends and averages parameters only, so each PFLlib client keeps its own buffers
(a deliberate difference).

Knobs: ``beta`` (``None``: the run's ``lr``, PFLlib's behaviour; searched 0.001..0.1, log).

Differences from PFLlib: the buffer policy above; a client with fewer than ``2 * batch_size`` training samples trains
on one batch of all of them, split in halves (PFLlib's drop_last loader yields no batch, so it does not train), and
with ``drop_last=false`` the last incomplete batch is split in halves likewise; ``train/loss`` is the mean loss of
step 1's halves at w (PFLlib's ``train_metrics`` reports step 2's loss after a step 1); the evaluation step's batch
order is drawn from a seed derived from the run seed, the round and the client (``pfl.seed`` stream
``local_batches`` with an extra part, apart from the training batches); with ``optimizer=adamw`` (or weight decay,
clipping) both steps go through that optimizer, which then steps twice per batch (PFLlib: plain SGD); no
learning-rate decay; clients train sequentially even under ``client_parallelism=vectorized``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pfl.algorithms.fedavg import FedAvg
from pfl.data.loader import DeviceData
from pfl.federated.base import FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes, SGDUpdate, autocast
from pfl.federated.state import State
from pfl.seed import derive_seed

EVAL_STEP = 1  # extra part of the evaluation step's seed: derive_seed(seed, "local_batches", round, client, EVAL_STEP)


class PerFedAvgParams(HyperParams):
    """Per-FedAvg's knobs."""

    beta: float | None = Field(None, gt=0.0)
    """The outer (meta) step size; ``None``: the run's ``lr`` (PFLlib's ``self.beta = self.learning_rate``)."""


class PerFedAvgUpdate(SGDUpdate):
    """A Per-FedAvg client's round (module docstring): the run's SGD over batches of ``2 * batch_size`` for
    ``2 * local_epochs`` epochs, each batch one first-order MAML step.

    Args:
        base: the run's local update (its batch size, lr, optimizer, task loss).
        beta: the outer step size (``None``: the step's ``lr``).
    """

    def __init__(self, base: SGDUpdate, beta: float | None):
        super().__init__(**{**base.settings(), "batch_size": 2 * base.batch_size,
                            "local_epochs": 2 * base.local_epochs})  # serverperavg.py:34-36; clientperavg.py:23
        self.beta = beta
        self._model: nn.Module | None = None
        self._ins: FitIns | None = None
        self._device: torch.device | None = None
        self._second: tuple[torch.Tensor, torch.Tensor] | None = None

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        if len(indices) < 2:
            raise ValueError(f"perfedavg needs at least 2 training samples per client, a client has {len(indices)}")
        self._model, self._ins, self._device = model, ins, data.device
        try:
            return super().fit(model, data, ins, indices, seed)
        finally:
            self._model = self._ins = self._device = self._second = None

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ins: FitIns) -> torch.Tensor:
        """Step 1's loss on the batch's first half; the second half waits for :meth:`_step`."""
        half = len(x) // 2  # batch_size for a full batch (clientperavg.py:43-44, 59-60)
        self._second = (x[half:], y[half:])
        return super().loss(model, x[:half], y[:half], ins)

    def _step(self, opt: torch.optim.Optimizer | None, params: list[torch.Tensor], lr: float) -> None:
        """Step 1 at ``lr`` (gradient of the first half already computed), the second half's gradient at the stepped
        parameters, the parameters restored, then step 2 at ``beta`` (clientperavg.py:35-72)."""
        with torch.no_grad():
            start = [p.detach().clone() for p in params]  # clientperavg.py:35
        super()._step(opt, params, lr)
        x, y = self._second
        with autocast(self._device, self.autocast):
            loss = super().loss(self._model, x, y, self._ins)
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            for p, s in zip(params, start):  # clientperavg.py:68-70: parameters only
                p.copy_(s)
        super()._step(opt, params, lr if self.beta is None else self.beta)


class PerFedAvg(FedAvg):
    """FedAvg's server with :class:`PerFedAvgUpdate` clients; a client's model is the global model after one SGD step
    on a batch of its train split.

    Raises:
        ValueError: the clients' architectures differ.
    """

    name = "perfedavg"
    Params = PerFedAvgParams
    search_space = {"beta": SearchParam("float", 1e-3, 0.1, log=True)}
    state_attributes = ("global_state", "round")

    takes_downlink = False

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.spec = ctx.single_spec(self.name)
        self.round = 0  # the last aggregated round (seeds the evaluation step)
        self.update = PerFedAvgUpdate(ctx.update, self.hp.beta) if ctx.update else None
        # the evaluation step (clientperavg.py:83-99): one step of the run's update on one batch
        self.one_step = ctx.update.with_epochs(1) if ctx.update else None

    @property
    def local_update(self) -> PerFedAvgUpdate:
        return self.update

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        super().aggregate_fit(rnd, results)
        self.round = rnd

    def personalized_state(self, client_id: int) -> State:
        """The global model after one step on a random batch of the client's train split (module docstring)."""
        seed = derive_seed(self.ctx.seed, "local_batches", self.round, client_id, EVAL_STEP)
        idx = self.ctx.clients[client_id].fit
        batch = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed)).to(idx.device)]
        batch = batch[:self.one_step.batch_size]  # the first batch of a shuffled loader (clientperavg.py:84-89)
        model = self.ctx.runner.load(self.spec, self.global_state)
        with torch.inference_mode(False), torch.enable_grad():
            state, _ = self.one_step.fit(model, self.ctx.runner.data, FitIns(self.global_state), batch, seed)
        return state
