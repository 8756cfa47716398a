"""FedBABU (Oh, Kim & Yun, "FedBABU: Toward Enhanced Representation for Federated Image Classification", ICLR 2022),
with PFLlib's semantics (TsingZ0/PFLlib ``system/flcore/servers/serverbabu.py``,
``system/flcore/clients/clientbabu.py``, ``system/main.py``; commit d832e76).

The model is split as PFLlib splits it (``main.py:261-265``: ``head = model.fc``, the rest wrapped as ``base`` by
``BaseHeadSplit``): the head is the model's final Linear (:func:`pfl.federated.partial.personal_layer`: ``head.2`` for
the CNN, ``head.4`` for VGG, ``head`` for the CIFAR ResNets) and everything below it is the body.

During federation (``serverbabu.py:23-51``) the head is frozen at its initial value in every client
(``clientbabu.py:12-13``: ``requires_grad = False``), so it is never trained nor averaged; a sampled client trains the
body alone for ``local_epochs`` (``clientbabu.py:16-49``), uploads it (``serverbabu.py:95``: ``client.model.base``) and
the server averages the bodies' parameters, sample-weighted (``serverbase.py:138-150``); every client takes the new
body's parameters into its model (``serverbase.py:103-109`` with ``clientbabu.py:51-53``). During federation FedBABU
is FedRep with no head phase: :class:`FedBABU` subclasses :class:`pfl.algorithms.fedrep.FedRep`, whose local update
:class:`pfl.algorithms.fedrep.RepresentationSGD` runs here with ``plocal_epochs=0`` (the run's SGD on everything but
the frozen final Linear), and the round is :class:`pfl.federated.partial.PartialSharing`'s.

Fine-tuning happens once, after the last round (``serverbabu.py:60-63``), not at every evaluation: every training
client, sampled or not, fine-tunes its model for ``fine_tuning_epochs`` (PFLlib's ``-fte``, default 10,
``main.py:471``) with body and head both trainable (``clientbabu.py:55-82``: ``fine_tune()`` is called with its default
``which_module=['base', 'head']``), by the run's local update (PFLlib: the client's own SGD optimizer), and PFLlib's
final evaluation scores the fine-tuned models. PFLlib fine-tunes the model each client holds after the last round's
local training, before the last aggregate reaches it (``train`` ends with ``aggregate_parameters`` and no
``send_models`` follows): a client sampled in the last round starts from its own freshly trained body, any other from
the body it received at the start of that round (the previous average). pfl does the same, right after the last
round's aggregation (round ``global_rounds`` of the run); the batch order of client c's fine-tuning is the run's
``local_batches`` stream at round 0 (rounds are 1-based, so no training round uses it).

``personalized_state(c)``: before the fine-tuning, client c's model (initial head, its own buffers) with the latest
averaged body, the model PFLlib evaluates after ``send_models`` (``serverbabu.py:27-32``); after the last round, c's
fine-tuned model, what PFLlib's last evaluation scores (``serverbabu.py:62-63``). ``fine_tuning_epochs=0`` skips the
fine-tuning and keeps the former. A held-out new client is never fine-tuned here: it joins with the latest averaged
body over its initial head (``new_client_state``), which new-client evaluation adapts.

Buffer policy (BatchNorm): running statistics and ``num_batches_tracked`` stay each client's own, never averaged nor
sent (PFLlib's ``set_parameters`` and aggregation move parameters only); they move during local training and
fine-tuning (training mode).

Differences from PFLlib: pfl runs ``global_rounds`` rounds, each evaluated after its aggregation (PFLlib: rounds
0..``global_rounds``, evaluated before training), so the last evaluation of the un-fine-tuned models is replaced by
the fine-tuned one (PFLlib logs both); the batch orders come from seeded generators (above). A held-out new client
(``new_clients``) joins with the latest averaged body over its initial head and fine-tunes the head alone for
``finetune_epochs`` (:meth:`pfl.federated.partial.PartialSharing.adapt`; PFLlib's ``-ften`` fine-tunes the whole
global model). The paper fine-tunes the head only or the whole model at evaluation; PFLlib's default (whole model,
at the end) is kept for the training clients.
"""

from __future__ import annotations

from pydantic import Field

from pfl.algorithms.fedrep import FedRep
from pfl.federated.base import FederatedContext, HyperParams
from pfl.federated.local import FitIns, FitRes
from pfl.federated.state import State
from pfl.seed import derive_seed


class FedBABUParams(HyperParams):
    """FedBABU's knobs."""

    fine_tuning_epochs: int = Field(10, ge=0)
    """Epochs of whole-model fine-tuning of every training client after the last round (PFLlib's ``-fte``, default
    10); 0: none."""


class FedBABU(FedRep):
    """The body averaged over the sampled clients with every head frozen at its initial value (FedRep without its head
    phase); every training client fine-tunes its whole model after the last round (module docstring).

    Raises:
        ValueError: the clients' architectures differ, or the head does not end with a Linear.
    """

    name = "fedbabu"
    Params = FedBABUParams
    search_space = {}
    state_attributes = ("global_state", "own", "tuned", "fine_tuned")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.tuned = ctx.new_store()  # each client's fine-tuned model, written after the last round
        self.fine_tuned = False

    def head_epochs(self) -> int:
        """No head phase: the head stays frozen at its initial value through federation (``clientbabu.py:12-13``)."""
        return 0

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        received = self.global_state  # the body every client received at the start of this round
        super().aggregate_fit(rnd, results)
        if rnd == self.ctx.global_rounds and self.hp.fine_tuning_epochs and self.ctx.update is not None:
            self.fine_tune(received, {r.client_id for r in results})

    def fine_tune(self, received: State, trained: set[int]) -> None:
        """Fine-tune every training client's whole model for ``fine_tuning_epochs`` (``clientbabu.py:55-82``), from the
        model it holds after the last round's local training: its own trained state if it is in ``trained``, else its
        own with the ``received`` body (``serverbabu.py:60-61``). Held-out new clients never train."""
        ctx = self.ctx
        update = ctx.update.with_epochs(self.hp.fine_tuning_epochs)
        for cid in ctx.train_clients:
            start = self.own[cid] if cid in trained else {**self.own[cid], **received}
            model = ctx.runner.load(ctx.specs[cid], start)
            seed = derive_seed(ctx.seed, "local_batches", 0, cid)
            self.tuned[cid], _ = update.fit(model, ctx.runner.data, FitIns(start), ctx.clients[cid].fit, seed)
        self.fine_tuned = True

    def personalized_state(self, client_id: int) -> State:
        return self.tuned[client_id] if self.fine_tuned else super().personalized_state(client_id)

    def new_client_state(self, client_id: int) -> State:
        """A held-out client joins with the latest averaged body over its initial head, fine-tuning or not (only
        training clients are fine-tuned)."""
        return super().personalized_state(client_id)
