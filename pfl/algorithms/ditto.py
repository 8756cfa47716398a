"""Ditto (Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021),
with PFLlib's semantics (TsingZ0/PFLlib ``system/flcore/servers/serverditto.py``,
``system/flcore/clients/clientditto.py``, ``system/flcore/optimizers/fedoptimizer.py``, ``system/main.py``; commit
d832e76).

Every client holds two models: its copy of the global model and its personal model (``clientditto.py:19``, a copy of
the initial model). A sampled client's round (``serverditto.py:38-40``: ``ptrain`` then ``train``):

1. ``ptrain`` (``clientditto.py:64-89``): ``plocal_epochs`` epochs of SGD on the personal model w with the proximal
   pull toward the global model g just received (``send_models`` has replaced the client's global copy, which
   ``train`` has not touched yet): every step is ``w <- w - lr (grad + mu (w - g))``, PFLlib's
   ``PerturbedGradientDescent`` (``fedoptimizer.py:64-75``), on parameters only; the personal model is in training
   mode, so its BatchNorm statistics move;
2. ``train`` (``clientditto.py:27-61``): ``local_epochs`` epochs of plain SGD on the copy of the global model, as a
   FedAvg client.

The two trainings are independent (the pull's target is the received global model, not the freshly trained copy), so
here the personal phase runs first as in PFLlib and the global copy starts from the received model. The server averages
the uploaded global copies weighted by training samples (``serverbase.py``'s ``aggregate_parameters``, as FedAvg); the
personal models never travel. Both trainings are the run's local update (:class:`pfl.federated.local.SGDUpdate`); the
personal one is :class:`ProximalSGD`, which adds ``mu (w - g)`` to each gradient before the run's optimizer step.

``personalized_state(c)``: client c's personal model, the model PFLlib scores (``serverditto.py:35-36,76-92``,
``evaluate_personalized``; ``clientditto.py:95-128``, ``model_per``); the initial model until c is first sampled.

Buffer policy (BatchNorm): the personal model's running statistics and ``num_batches_tracked`` are its own, never sent
(PFLlib's pull and aggregation touch parameters only). The global copies' float buffers are averaged with the
parameters, sample-weighted, and integer buffers are not averaged, as pfl's FedAvg (:mod:`pfl.algorithms.fedavg`):
PFLlib averages parameters only and leaves the global model's buffers at their initial values (a deliberate
difference; the global model's buffers never reach a personal model and are only read by a global evaluation).

Knobs: ``mu`` (PFLlib's ``-mu``, default 0.0, ``main.py:449``; the paper's lambda) and ``plocal_epochs`` (PFLlib's
``-pls``, default 1, ``main.py:466-467``). PFLlib ships no search ranges; pfl's are ``mu`` in [0.001, 2] (log) and
``plocal_epochs`` in 1..10.

Differences from PFLlib: the personal phase draws its batch order from a generator seeded from the client's round seed
(PFLlib's two shuffling DataLoaders draw from one global stream), while the global copy trains with the round seed
itself, so Ditto's global model follows FedAvg's run bit for bit; the round's training loss is the mean minibatch task
loss over both trainings, the pull excluded (PFLlib's ``train_metrics_personalized`` reports the personal model's loss
plus ``0.5 mu ||g - w||``, unsquared); PFLlib's learning-rate decay (off by default) is not offered. With a run's
``optimizer=adamw``, weight decay or ``max_grad_norm``, the pull enters the gradient before that optimizer's step
(PFLlib's personal optimizer is plain SGD).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pfl.algorithms.fedprox import ProximalSGD
from pfl.data.loader import DeviceData
from pfl.federated.base import HyperParams, SearchParam
from pfl.federated.local import FitIns, SGDUpdate
from pfl.federated.personal import GlobalAndPersonal
from pfl.federated.state import State, load_state, with_personal


class DittoParams(HyperParams):
    """Ditto's knobs."""

    mu: float = Field(0.0, ge=0.0)
    """Strength of the personal model's pull toward the received global model (PFLlib's ``-mu``, default 0.0; 0
    trains the personal model as local training does)."""
    plocal_epochs: int = Field(1, ge=0)
    """Epochs of the personal model per round (PFLlib's ``-pls``, default 1); 0 leaves it unchanged."""


class DittoUpdate(SGDUpdate):
    """A Ditto client's round: the personal model (``ins.extras["personal"]``) for ``plocal_epochs`` with the pull
    toward the received global model ``ins.state`` (FedProx's :class:`pfl.algorithms.fedprox.ProximalSGD`), then the
    global copy for ``local_epochs`` of the run's SGD from ``ins.state``.

    Returns the trained global copy's entries plus the personal model's under the prefix ``"personal/"``
    (:func:`pfl.federated.state.with_personal`).

    Args:
        base: the run's local update.
        plocal_epochs: epochs of the personal model.
        mu: the pull's strength.
    """

    def __init__(self, base: SGDUpdate, plocal_epochs: int, mu: float):
        super().__init__(**base.settings())
        self.personal_update = ProximalSGD(base.with_epochs(plocal_epochs), mu)

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        received = ins.state
        personal_seed = torch.randint(2 ** 62, (1,), generator=torch.Generator().manual_seed(seed)).item()
        epochs = self.personal_update.local_epochs
        personal, personal_loss = ins.extras["personal"], None
        if epochs:
            load_state(model, ins.extras["personal"])
            # pulled toward ins.state, the received global model (FedProx's update: fedoptimizer.py:69-75)
            personal, personal_loss = self.personal_update.fit(model, data, ins, indices, personal_seed)
        load_state(model, received)
        trained, loss = super().fit(model, data, ins, indices, seed)  # the global copy, as a FedAvg client
        if personal_loss is not None:  # both trainings run the same steps per epoch: mean over all minibatches
            loss = (loss * self.local_epochs + personal_loss * epochs) / (self.local_epochs + epochs)
        return with_personal(trained, personal), loss


class Ditto(GlobalAndPersonal):
    """FedAvg on the global model; each client's personal model trains beside it, pulled toward the received global
    model (:class:`DittoUpdate`), and is what the client is scored with (the round:
    :class:`pfl.federated.personal.GlobalAndPersonal`).

    Raises:
        ValueError: the clients' architectures differ.
    """

    name = "ditto"
    Params = DittoParams
    search_space = {"mu": SearchParam("float", 0.001, 2.0, log=True), "plocal_epochs": SearchParam("int", 1, 10)}

    def make_update(self, base: SGDUpdate) -> DittoUpdate:
        return DittoUpdate(base, self.hp.plocal_epochs, self.hp.mu)

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        # the personal model stays on the client: only the global model travels (FitIns.state)
        return FitIns(self.global_state, extras={"personal": self.personal[client_id]})

    def adapt(self, client_id: int, epochs: int, seed: int) -> State:
        """New-client evaluation: the client trains its personal model (the initial model, as every Ditto client's
        starts) for ``epochs`` with the pull toward the current global model, as its ``ptrain`` would; PFLlib
        instead fine-tunes the global model for every algorithm (a deliberate difference)."""
        update = ProximalSGD(self.ctx.update.with_epochs(epochs), self.hp.mu)
        return self.ctx.finetune(client_id, self.new_client_state(client_id), update, seed,
                                 ins=FitIns(self.global_state))
