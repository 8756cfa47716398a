"""MOON, model-contrastive federated learning (Li, He & Song, CVPR 2021), with PFLlib's semantics
(TsingZ0/PFLlib ``system/flcore/servers/servermoon.py``, ``system/flcore/clients/clientmoon.py``,
``system/flcore/servers/serverbase.py``, ``system/main.py``; commit d832e76).

FedAvg whose clients add a model-contrastive term to their loss. Every minibatch (``clientmoon.py:39-46``) the client
computes its representation ``z``, PFLlib's ``model.base`` output: everything below the final Linear ``model.fc``
(``main.py``'s ``BaseHeadSplit``), i.e. the input of pfl's :func:`pfl.federated.partial.personal_layer` (the CNN's 512
FC features), the representation ``z_g`` of the global model it received this round (the positive) and ``z_o`` of
its own previous local model (the negative), both without gradient, and minimizes

    CE(fc(z), y) + mu * mean_i -log(p_i),    p_i = e^{s_i} / (e^{s_i} + e^{o_i}),
    s_i = cos(z_i, z_g,i) / tau,    o_i = cos(z_i, z_o,i) / tau

with ``cos`` the cosine similarity along the feature dimension (``torch.nn.functional.cosine_similarity``). After its
local epochs the client's trained model becomes its previous local model (``clientmoon.py:53``); before its first
round that is the initial model (``clientmoon.py:17``), equal to the first global model, so the term is the constant
log 2 and has no gradient in round 1. A client keeps its previous model until it is sampled again (it is a
per-client state here, checkpointed with the run). The global and previous models run in training mode, as PFLlib's
copies of training-mode models do (``clientmoon.py:17,53``; ``serverbase.py:141``): BatchNorm normalizes their
representations with the batch's statistics; the running statistics that this moves are discarded (PFLlib moves
those of its copies, which nothing reads in train mode).

Server side (``servermoon.py:23-45``): FedAvg's round: every client receives the global model (``send_models``), the
sampled clients train, the server averages their models weighted by training samples (``serverbase.py:138-150``).

``personalized_state(c)``: the global model for every client (PFLlib evaluates right after ``send_models``, i.e. the
global model, ``servermoon.py:27-32``).

Buffer policy (BatchNorm): FedAvg's (:mod:`pfl.algorithms.fedavg`): float buffers (running statistics) are averaged
with the parameters, sample-weighted; integer buffers keep the global model's. The previous local model keeps its
whole state (buffers included).

Knobs: ``mu`` (PFLlib's ``-mu``, default 0.0, ``main.py:449``; 0 makes the update FedAvg's, so a MOON run sets it:
the templates use 1.0, pfl's choice, to be tuned with ``pfl tune --algo moon``) and ``tau`` (PFLlib's ``-tau``,
default 1.0, ``main.py:469``). Search ranges (PFLlib ships none): ``mu`` in [0.01, 10], ``tau`` in [0.1, 1] (log).

Differences from PFLlib: the buffer policy above (PFLlib averages parameters only, and ``set_parameters`` copies
only parameters into a client's model, so PFLlib scores the global parameters with each client's own last BatchNorm
statistics; the 4-layer CNN has none, so there the two agree); the learning-rate decay (off by default) is not
offered; the logged ``train/loss`` is the mean minibatch objective during training (PFLlib's ``train_metrics``
re-evaluates the objective after training). Clients train sequentially even under ``client_parallelism=vectorized``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.func import functional_call

from pfl.algorithms.fedavg import FedAvg
from pfl.data.loader import DeviceData
from pfl.federated.base import FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.partial import personal_layer_inputs
from pfl.federated.state import State


class MOONParams(HyperParams):
    """MOON's knobs."""

    mu: float = Field(0.0, ge=0)
    """Weight of the model-contrastive term (PFLlib's ``-mu``, default 0.0: FedAvg's update)."""
    tau: float = Field(1.0, gt=0)
    """Temperature of the cosine similarities (PFLlib's ``-tau``, default 1.0)."""


def contrastive_loss(z: torch.Tensor, z_global: torch.Tensor, z_old: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample model-contrastive loss (B,) of representations (B, D): positive ``z_global``, negative ``z_old``
    (``clientmoon.py:45``)."""
    pos = torch.exp(F.cosine_similarity(z, z_global) / tau)
    neg = torch.exp(F.cosine_similarity(z, z_old) / tau)
    return -torch.log(pos / (pos + neg))


class MOONUpdate(SGDUpdate):
    """The run's local update with MOON's objective: the task loss plus ``mu`` times the mean model-contrastive loss
    of the representation (the input of the final Linear) against the received global model's (``ins.state``) and
    the previous local model's (``ins.extras["old"]``).

    Args:
        base: the run's local update (batch size, lr, optimizer, task loss).
        mu: weight of the contrastive term.
        tau: temperature.
    """

    def __init__(self, base: SGDUpdate, mu: float, tau: float):
        super().__init__(**base.settings())
        self.mu, self.tau = mu, tau
        self._frozen: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        def on_device(state: State) -> dict[str, torch.Tensor]:  # copies: train-mode BatchNorm writes buffers
            return {k: v.to(data.device, copy=True) for k, v in state.items()}

        self._frozen = (on_device(ins.state), on_device(ins.extras["old"]))
        try:
            return super().fit(model, data, ins, indices, seed)
        finally:
            self._frozen = None

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ins: FitIns) -> torch.Tensor:
        """Task loss plus ``mu`` times the mean contrastive loss of the representations: the inputs (B, D) of the
        final Linear (:func:`pfl.federated.partial.personal_layer_inputs`) of this model, the global and the previous
        one on the same batch."""
        with personal_layer_inputs(model) as reps:
            out = model(x)
            with torch.no_grad():  # PFLlib's .detach() of both representations
                for state in self._frozen:
                    functional_call(model, state, (x,))
        z, z_global, z_old = reps
        return self.loss_fn(out, y) + self.mu * contrastive_loss(z, z_global, z_old, self.tau).mean()


class MOON(FedAvg):
    """FedAvg's server with :class:`MOONUpdate` clients, each keeping its previous local model.

    Raises:
        ValueError: the clients' architectures differ.
    """

    name = "moon"
    Params = MOONParams
    search_space = {"mu": SearchParam("float", 0.01, 10.0, log=True), "tau": SearchParam("float", 0.1, 1.0, log=True)}
    state_attributes = ("global_state", "old")
    takes_downlink = False

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.old = ctx.new_store()  # each client's previous local model, from the initial model (clientmoon.py:17)
        self.update = MOONUpdate(ctx.update, self.hp.mu, self.hp.tau) if ctx.update else None

    @property
    def local_update(self) -> MOONUpdate:
        return self.update

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        # the previous local model stays on the client: only the global model travels
        return FitIns(self.global_state, extras={"old": self.old[client_id]})

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        for r in results:
            self.old[r.client_id] = r.state  # clientmoon.py:53
        super().aggregate_fit(rnd, results)
