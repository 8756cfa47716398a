"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020), with PFLlib's semantics
(TsingZ0/PFLlib ``system/flcore/servers/serverprox.py``, ``system/flcore/clients/clientprox.py``,
``system/flcore/optimizers/fedoptimizer.py``, ``system/main.py``; commit d832e76).

FedAvg whose clients are pulled towards the global model they started the round from. The paper adds the proximal
term ``mu / 2 ||w - w_global||^2`` to each client's objective; PFLlib does not touch the loss but perturbs the gradient
inside its optimizer step (``PerturbedGradientDescent``, ``fedoptimizer.py:64-75``): for every parameter ``p`` with
the round's global copy ``g`` (``clientprox.py:16``, refreshed by ``set_parameters``, ``clientprox.py:61-64``),

    d = grad + mu * (p - g);    p <- p - lr * d

at every minibatch step (``clientprox.py:46-50``). :class:`ProximalSGD` does exactly this: it adds ``mu * (p - g)`` to
the gradient of every trained parameter just before the run's optimizer step, so with the run's plain SGD the update
is PFLlib's bit for bit (``tests/test_fedprox.py`` pins it). The proximal term never enters the loss: ``train/loss``
is the task loss alone, and autograd does no work for it.

Server side (``serverprox.py:23-45``): FedAvg's round: every client receives the global model, the sampled clients
train, the server averages their models weighted by training samples (``serverbase.py:138-150``).

``personalized_state(c)``: the global model for every client (PFLlib evaluates the global model it has just sent,
``serverprox.py:27-32``).

Buffer policy (BatchNorm): FedAvg's (:mod:`pfl.algorithms.fedavg`): float buffers (running statistics) are averaged
with the parameters, sample-weighted; integer buffers keep the global model's. PFLlib averages parameters only and
its optimizer perturbs parameters only; the proximal perturbation here, too, touches parameters only (buffers have
no gradient).

Differences from PFLlib: the buffer policy above (FedAvg's); with a run's other optimizer settings (``weight_decay``,
``adamw``, ``max_grad_norm``) the perturbation is added to the (clipped) gradient the optimizer then consumes, where
PFLlib knows only plain SGD; ``mu`` defaults to PFLlib's 0.0 (``main.py:449``), under which the update equals FedAvg's
(``grad + 0 * (p - g)`` is ``grad``), so a FedProx run sets ``mu`` (the paper tunes it over {0.001, 0.01, 0.1, 1});
clients train sequentially even under ``client_parallelism=vectorized`` (the batched path runs only the plain update).
PFLlib's ``train_metrics`` adds ``0.5 * mu * ||g - w||_2`` (the norm, not its square) to its logged training loss
(``clientprox.py:84-86``); pfl logs the task loss only.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pfl.algorithms.fedavg import FedAvg
from pfl.data.loader import DeviceData
from pfl.federated.base import FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, SGDUpdate
from pfl.federated.state import State


class FedProxParams(HyperParams):
    """FedProx's knobs."""

    mu: float = Field(0.0, ge=0)
    """Weight of the proximal term (PFLlib's ``-mu``, default 0.0; 0 is FedAvg's update)."""


class ProximalSGD(SGDUpdate):
    """The run's local update with PFLlib's perturbed gradient: before every optimizer step, each trained parameter's
    gradient becomes ``grad + mu * (p - g)``, ``g`` the parameter in the state the client started from
    (``fedoptimizer.py:70-75``).

    Args:
        base: the run's local update (its batch size, lr, optimizer, task loss).
        mu: the proximal weight.
    """

    def __init__(self, base: SGDUpdate, mu: float):
        super().__init__(**base.settings())
        self.mu = mu
        self._anchors: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        # the round's global parameters on the device, beside the parameters they anchor (PFLlib: global_params)
        self._anchors = [(p, ins.state[n].to(p.device)) for n, p in model.named_parameters() if p.requires_grad]
        try:
            return super().fit(model, data, ins, indices, seed)
        finally:
            self._anchors = None

    @torch.no_grad()
    def correct_gradients(self) -> None:
        """Each trained parameter's gradient plus ``mu * (p - g)`` (after clipping, if any, before the step)."""
        for p, g in self._anchors:
            if p.grad is not None:  # as the base step, a parameter without a gradient does not move
                p.grad = p.grad + self.mu * (p - g)  # fedoptimizer.py:74, in its order of operations


class FedProx(FedAvg):
    """FedAvg's server with :class:`ProximalSGD` clients.

    Raises:
        ValueError: the clients' architectures differ.
    """

    name = "fedprox"
    Params = FedProxParams
    search_space = {"mu": SearchParam("float", 1e-3, 1.0, log=True)}
    state_attributes = ("global_state",)

    takes_downlink = False

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.update = ProximalSGD(ctx.update, self.hp.mu) if ctx.update else None

    @property
    def local_update(self) -> ProximalSGD:
        return self.update
