"""FedRep (Collins et al., "Exploiting Shared Representations for Personalized Federated Learning", ICML 2021),
with PFLlib's semantics (TsingZ0/PFLlib ``system/flcore/servers/serverrep.py``,
``system/flcore/clients/clientrep.py``, ``system/main.py``; commit d832e76).

The model is split into a shared representation and a personal head. PFLlib's head is the model's final Linear
(``main.py:226-228``: ``head = model.fc``, the rest wrapped as ``base`` by ``BaseHeadSplit``), so here the personal
part is the last Linear of pfl's head (:func:`pfl.federated.partial.personal_layer`: ``head.2`` for the CNN,
``head.4`` for VGG, ``head`` for the CIFAR ResNets) and everything below it, pfl's ``base`` and any lower head layers,
is the shared representation.

A sampled client's round (``clientrep.py:24-74``): starting from the latest global representation and its own head,

1. ``plocal_epochs`` epochs of SGD on the head alone, the representation frozen (``clientrep.py:32-50``);
2. ``local_epochs`` epochs of SGD on the representation alone, the head frozen (``clientrep.py:56-74``).

Both phases are the run's local update (:class:`pfl.federated.local.SGDUpdate`) restricted by ``requires_grad``; the
model stays in training mode throughout, so BatchNorm statistics move in both phases, as in PFLlib. The server
averages the uploaded representations' parameters weighted by training samples (``serverrep.py:70-87`` uploads
``model.base``; ``serverbase.py:138-150`` averages ``parameters()``), and every client takes the new average into its
model (``serverbase.py:103-109``, ``clientrep.py:86-88``: parameters only).

``personalized_state(c)``: client c's own last model (its head, its buffers) with the latest global representation's
parameters, the model PFLlib evaluates after ``send_models`` (``serverrep.py:27-32``). A client never sampled has the
initial head.

Buffer policy (BatchNorm): running statistics and ``num_batches_tracked`` stay each client's own, never averaged nor
sent: PFLlib's ``set_parameters`` copies parameters only, and its aggregation averages parameters only.

Differences from PFLlib: the two phases draw their batch orders from two seeded generators (PFLlib's one shuffling
DataLoader continues across phases); the round's training loss is the mean minibatch loss over both phases (PFLlib
logs none). The paper's head update runs many more epochs than the representation's (PFLlib's default
``plocal_epochs`` is 1, kept here).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pfl.data.loader import DeviceData
from pfl.federated.base import FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, SGDUpdate, training_only
from pfl.federated.partial import PartialSharing, outside_personal_layer, personal_layer
from pfl.federated.state import State


class FedRepParams(HyperParams):
    """FedRep's knobs."""

    plocal_epochs: int = Field(1, ge=0)
    """Epochs of head-only training before the representation's ``local_epochs`` (PFLlib's ``-pls``, default 1); 0
    skips the head phase."""


class RepresentationSGD(SGDUpdate):
    """FedRep's local update: the run's SGD on the personal layer for ``plocal_epochs``, then on everything else for
    ``local_epochs`` (``clientrep.py:24-74``).

    Args:
        base: the run's local update (its batch size, lr, optimizer, loss).
        plocal_epochs: epochs of the head phase.
        personal: module path of the personal layer (:func:`pfl.federated.partial.personal_layer`).
    """

    def __init__(self, base: SGDUpdate, plocal_epochs: int, personal: str):
        super().__init__(**base.settings())
        self.head_phase = base.with_epochs(plocal_epochs)
        self.personal = personal

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        prefix = self.personal + "."
        head = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
        body = [n for n, _ in model.named_parameters() if not n.startswith(prefix)]
        seeds = torch.randint(2 ** 62, (2,), generator=torch.Generator().manual_seed(seed)).tolist()
        phases = [(head, self.head_phase.local_epochs, self.head_phase.fit, seeds[0]),
                  (body, self.local_epochs, super().fit, seeds[1])]
        losses, epochs = [], []
        for names, n_epochs, fit, phase_seed in phases:
            if n_epochs == 0:
                continue
            with training_only(model, names):
                _, loss = fit(model, data, ins, indices, phase_seed)
            losses.append(loss * n_epochs)
            epochs.append(n_epochs)
        # both phases run the same steps per epoch: the epoch-weighted mean is the mean over all minibatches
        return self.result_state(model), sum(losses) / sum(epochs)


class FedRep(PartialSharing):
    """A shared representation averaged over the sampled clients; each client's final Linear stays its own, trained
    first on its own (:class:`RepresentationSGD`).

    Raises:
        ValueError: the clients' architectures differ, or the head does not end with a Linear.
    """

    name = "fedrep"
    Params = FedRepParams
    search_space = {"plocal_epochs": SearchParam("int", 1, 10)}

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.personal = personal_layer(ctx.runner.models[ctx.single_spec(self.name)])
        self.update = RepresentationSGD(ctx.update, self.head_epochs(), self.personal) if ctx.update else None

    def head_epochs(self) -> int:
        """Epochs of the local update's head phase (:class:`RepresentationSGD`): ``plocal_epochs``."""
        return self.hp.plocal_epochs

    @classmethod
    def shares(cls, model: nn.Module) -> list[str]:
        """The representation: every parameter outside the personal layer (buffers never travel)."""
        return outside_personal_layer(model)

    @property
    def local_update(self) -> RepresentationSGD:
        return self.update
