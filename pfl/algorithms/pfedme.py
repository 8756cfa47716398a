"""pFedMe (T. Dinh, N. Tran & T. D. Nguyen, "Personalized Federated Learning with Moreau Envelopes", NeurIPS 2020),
with PFLlib's semantics (TsingZ0/PFLlib ``system/flcore/servers/serverpFedMe.py``,
``system/flcore/clients/clientpFedMe.py``, ``system/flcore/optimizers/fedoptimizer.py``, ``system/main.py``; commit
d832e76).

A sampled client receives the global model; both its local model w and its personalized model theta start from it
(``set_parameters``, ``clientpFedMe.py:74-77``). For every minibatch (``clientpFedMe.py:39-61``):

1. K times, on the same batch: the gradient of the task loss at theta, then (``pFedMeOptimizer.step``,
   ``fedoptimizer.py:38-47``)

       theta <- theta - plr (grad + lamda (theta - w) + mu theta),  mu = 0.001

   (an approximate solution of the Moreau envelope's inner problem; ``mu`` is the optimizer's default, which PFLlib
   never overrides, ``fedoptimizer.py:34``, ``clientpFedMe.py:21-22``); theta carries over to the next batch;
2. the local model moves toward theta: ``w <- w - lamda lr (w - theta)`` (``clientpFedMe.py:59-61``).

After ``local_epochs`` epochs the client uploads w (``clientpFedMe.py:68``). The server averages the uploads
sample-weighted (``serverbase.py:138-150``) and mixes the result with the previous global model
(``serverpFedMe.py:51-56,88-91``):

    global <- (1 - beta) previous + beta average

What :class:`PFedMeUpdate` returns: w's entries (the model's buffers with w's parameters), plus theta's under the
prefix ``"personal/"``; only w travels up.

``personalized_state(c)``: client c's theta at the end of its last local round (the paper's personalized model, and
the one PFLlib's ``evaluate_personalized`` means to score through ``personalized_params``,
``serverpFedMe.py:38-41,125-137``, ``clientpFedMe.py:79-101``); the initial model until c is first sampled.
New-client evaluation (``new_client_state``): a held-out client starts from the global model, fine-tuned with plain
SGD by the default adaptation, as PFLlib's ``evaluate`` does for new clients (``serverpFedMe.py:80-85``,
``serverbase.py:337-356``).

Buffer policy (BatchNorm): the K inner steps run theta in training mode, so the running statistics move with theta;
w and theta carry the same buffers. The server's mix covers every averaged entry: float buffers are averaged
sample-weighted and mixed by beta with the parameters (at beta 1 they are FedAvg's, at beta 0 they stay the initial
ones, as PFLlib's never-averaged buffers do); integer buffers keep the global model's.

Knobs (PFLlib's ``main.py:446-453`` defaults): ``lamda`` (``-lam``, 1.0), ``K`` (``-K``, 5), ``personal_learning_rate``
(``-lrp``, 0.01), ``beta`` (``-bt``, 0.0). Under PFLlib's default beta 0 the global model never moves (every round
restarts w and theta from the initial model); the paper uses beta 1 (and 2 in places), as the templates do.

Differences from PFLlib:

* the scored model: PFLlib's ``personalized_params`` is the list its optimizer returns, i.e. the model's own parameter
  objects (``fedoptimizer.py:47``, ``clientpFedMe.py:56``), so ``update_parameters(self.model, self.local_params)``
  (``:68``) overwrites it with w, and the next ``send_models`` (``serverbase.py:103-109``, before
  ``evaluate_personalized``) with the global model: PFLlib's personalized accuracy is in effect the global model's
  (a sampled client's; a never-sampled client keeps its initial copy, ``:19``). pfl keeps theta, the paper's and
  PFLlib's evident intent;
* the buffers above (PFLlib averages and mixes parameters only);
* ``train/loss`` is the mean over batches of the task loss of each batch's first inner step (PFLlib's
  ``train_metrics_personalized`` adds ``0.5 lamda ||w - theta||``, unsquared, to a separate evaluation);
* the run's ``lr_schedule`` scales the step of w (PFLlib's decay scheduler acts on its pFedMe optimizer's rate, off by
  default); ``max_grad_norm`` clips each inner gradient; ``optimizer=adamw`` and ``weight_decay`` are refused (pFedMe's
  inner step is its own optimizer);
* clients train sequentially under ``client_parallelism=vectorized``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pfl.data.loader import DeviceData
from pfl.federated.base import HyperParams, SearchParam
from pfl.federated.local import FitIns, SGDUpdate, autocast
from pfl.federated.personal import GlobalAndPersonal
from pfl.federated.state import State, with_personal

MU = 0.001  # pFedMeOptimizer's default mu (fedoptimizer.py:34), never set by PFLlib's client


class PFedMeParams(HyperParams):
    """pFedMe's knobs."""

    lamda: float = Field(1.0, ge=0)
    """Weight of the Moreau envelope's pull between theta and w (PFLlib's ``-lam``, default 1.0)."""
    K: int = Field(5, ge=1)
    """Inner steps of theta per minibatch (PFLlib's ``-K``, default 5)."""
    personal_learning_rate: float = Field(0.01, gt=0)
    """Step size of theta's inner steps (PFLlib's ``-lrp``, default 0.01)."""
    beta: float = Field(0.0, ge=0)
    """Mixing of the average into the previous global model (PFLlib's ``-bt``, default 0.0: the global model never
    moves; the paper's 1.0 is plain averaging)."""


class PFedMeUpdate(SGDUpdate):
    """A pFedMe client's round: per minibatch, K steps of theta (the model's parameters) on the task loss plus
    ``lamda/2 ||theta - w||^2`` (and PFLlib's ``mu/2 ||theta||^2``), then w moves toward theta.

    The batch order, augmentation and first forward pass are :meth:`SGDUpdate.fit`'s; :meth:`_step` runs the K inner
    steps (re-using that batch) and the step of w.

    Args:
        base: the run's local update (batch size, lr: the step of w, epochs, task loss).
        lamda, K, personal_learning_rate: the knobs of :class:`PFedMeParams`.

    Raises:
        ValueError: the run's optimizer is not plain SGD (``adamw``, or ``weight_decay``).
    """

    def __init__(self, base: SGDUpdate, lamda: float, K: int, personal_learning_rate: float):
        super().__init__(**base.settings())
        if self.optimizer_name != "sgd" or self.weight_decay:
            raise ValueError("pfedme runs its own inner optimizer (PFLlib's pFedMeOptimizer): set optimizer=sgd "
                             "without weight_decay")
        self.lamda, self.K, self.plr = lamda, K, personal_learning_rate
        self._round: tuple | None = None  # (model, ins, device, [(theta, w)]) during fit
        self._batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ins: FitIns) -> torch.Tensor:
        self._batch = (x, y)  # the K inner steps re-use this batch (clientpFedMe.py:50-56)
        return super().loss(model, x, y, ins)

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        pairs = [(p, ins.state[n].to(p.device, copy=True)) for n, p in named]  # w starts at the received model
        self._round = (model, ins, data.device, pairs)
        try:
            theta, loss = super().fit(model, data, ins, indices, seed)
        finally:
            self._round, self._batch = None, None
        local = {**theta, **{n: w.detach().to("cpu", copy=True) for (n, _), (_, w) in zip(named, pairs)}}
        return with_personal(local, theta), loss

    def _step(self, opt: torch.optim.Optimizer | None, params: list[torch.Tensor], lr: float) -> None:
        model, ins, device, pairs = self._round
        x, y = self._batch
        for i in range(self.K):
            if i:  # the first inner step's gradient is the one SGDUpdate.fit has just computed
                with autocast(device, self.autocast):
                    loss = super().loss(model, x, y, ins)
                for p in params:
                    p.grad = None
                loss.backward()
            if self.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            with torch.no_grad():  # fedoptimizer.py:45, op by op in its order (multi-tensor ops, bit for bit the same)
                thetas = [theta for theta, _ in pairs if theta.grad is not None]
                ws = [w for theta, w in pairs if theta.grad is not None]
                step = torch._foreach_sub(thetas, ws)  # theta - w
                torch._foreach_mul_(step, self.lamda)  # lamda (theta - w)
                torch._foreach_add_(step, [theta.grad for theta in thetas])  # grad + lamda (theta - w)
                torch._foreach_add_(step, torch._foreach_mul(thetas, MU))  # ... + mu theta
                torch._foreach_mul_(step, self.plr)
                torch._foreach_sub_(thetas, step)  # theta <- theta - plr (...)
        with torch.no_grad():
            for theta, w in pairs:  # clientpFedMe.py:61: lamda * lr first, as Python evaluates it
                w.copy_(w - self.lamda * lr * (w - theta))


class PFedMe(GlobalAndPersonal):
    """Clients learn personalized models theta by the Moreau envelope and upload local models w; the server mixes
    their average into the previous global model with ``beta`` (the round:
    :class:`pfl.federated.personal.GlobalAndPersonal`, theta the personal model).

    Raises:
        ValueError: the clients' architectures differ, or the run's optimizer is not plain SGD.
    """

    name = "pfedme"
    Params = PFedMeParams
    search_space = {"lamda": SearchParam("float", 0.1, 30.0, log=True), "K": SearchParam("int", 1, 10),
                    "personal_learning_rate": SearchParam("float", 1e-3, 0.1, log=True),
                    "beta": SearchParam("float", 0.5, 2.0)}

    def make_update(self, base: SGDUpdate) -> PFedMeUpdate:
        return PFedMeUpdate(base, self.hp.lamda, self.hp.K, self.hp.personal_learning_rate)

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        return FitIns(self.global_state)  # w and theta both restart from it (clientpFedMe.py:74-77)

    def server_mix(self, avg: State) -> State:
        """``(1 - beta) previous + beta avg`` per averaged entry, ``previous`` the global model before this round
        (``serverpFedMe.py:91``)."""
        beta, previous = self.hp.beta, self.global_state
        return {k: (1 - beta) * previous[k] + beta * v for k, v in avg.items()}

    def new_client_state(self, client_id: int) -> State:
        """A held-out client joins with the global model, which the default adaptation fine-tunes with plain SGD:
        PFLlib's pFedMe scores new clients through ``evaluate`` (``serverpFedMe.py:80-85``), i.e. the base server's
        ``fine_tuning_new_clients`` of the global model (``serverbase.py:194-197,337-356``)."""
        return self.global_state
