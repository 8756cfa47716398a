"""FedProto, federated prototype learning (Tan et al., AAAI 2022), with PFLlib's semantics (TsingZ0/PFLlib
``system/flcore/servers/serverproto.py``, ``system/flcore/clients/clientproto.py``, ``system/main.py``; commit
d832e76).

Only class prototypes travel; every client's model stays its own, so clients may run different architectures
(VGG-11 beside VGG-16) as long as their features have one dimension D. A client's features are PFLlib's: the output
of its ``model.base``, everything below the final Linear ``model.fc`` (``main.py``'s ``BaseHeadSplit``), i.e. the
input of pfl's :func:`pfl.federated.partial.personal_layer` (the 512 outputs of the CNN's first FC layer; the hidden
layer of VGG's classifier). A prototype of class j is a mean of the features of samples labelled j.

A sampled client's round (``clientproto.py:21-67``): ``local_epochs`` epochs of the run's SGD on

    CE(fc(z), y) + lamda * MSE(t, z),    z = base(x) (B, D)

where ``t`` is ``z`` detached with the rows of labels that have a global prototype replaced by it (so rows without
one add 0 but still count in the mean over B x D elements, ``clientproto.py:46-52``); until the first prototypes
arrive (round 1) the term is absent. Meanwhile it collects every training sample's detached ``z`` (train mode, before
that minibatch's step, over all epochs) and uploads their per-class means (``clientproto.py:54-56,67``,
``agg_func``). The server averages each class's uploaded prototypes without weights, over the clients of the round
that hold the class (``serverproto.py:44-45,107-122``, ``proto_aggregation``), and these replace the global
prototypes entirely: a class that no client of the round held has none until one does. Every client receives them
(``serverproto.py:46,63-72``).

Evaluation is PFLlib's ``test_metrics`` (``clientproto.py:101-131``): a client classifies a test sample by the nearest
global prototype, the MSE (mean over D) between its features (eval mode) and each prototype, classes without a
prototype never chosen; not by its own ``fc``. pfl carries this classifier in the model itself: nearest-prototype
under the MSE is a linear rule, ``argmax_j (2 z.p_j - |p_j|^2) / D`` (the ``|z|^2`` term is the same for every class),
so ``personalized_state(c)`` is client c's own model (the initial model of its architecture until it is sampled)
with its final Linear replaced by that rule: weight ``2 P / D`` (K, D), bias ``-|p_j|^2 / D``, and bias
:data:`ABSENT` for a class without a prototype. Its argmax is PFLlib's prediction (``acc``), its logits are the
negative MSE distances up to a per-sample constant, so the run's classifier evaluator also reports the NLL and
calibration of ``softmax(-MSE)`` (PFLlib reports accuracy only), and the saved client model, ``load_client_model``
and head methods (APH) all run the prototype classifier. The client's trained ``fc`` stays in its own model for its
next round.

New-client evaluation (:meth:`FedProto.adapt`, pfl's rule: PFLlib's FedProto has none): a held-out client trains its
initial model with the local objective above toward the current global prototypes and is scored as the others.

Buffer policy (BatchNorm): everything is the client's own; nothing of a model travels.

Knob: ``lamda`` (PFLlib's ``-lam``, default 1.0, ``main.py:447``).

Differences from PFLlib: a client's prototype sums are accumulated per class with ``index_add_`` in float32 (PFLlib
adds the samples one at a time: the same sums up to float rounding); ``comm/bytes_up`` counts the present classes'
prototypes and their labels, ``comm/bytes_down`` the global prototypes and their presence mask; the learning-rate
decay (off by default) is not offered; the logged ``train/loss`` is the mean minibatch objective during training;
before the first aggregation (never evaluated: evaluations follow aggregations) a client would score its own ``fc``.
Ties between equally near prototypes may break differently from PFLlib's ``argmin`` (float rounding of the linear
form).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pfl.data.loader import DeviceData
from pfl.federated.base import Algorithm, FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.partial import personal_layer, personal_layer_inputs
from pfl.federated.state import State

PROTO = "proto/"  # prefix of a client's uploaded prototypes in its result ("/" never occurs in model state keys)
ABSENT = -1e30  # the prototype classifier's bias of a class without a global prototype: never predicted


class FedProtoParams(HyperParams):
    """FedProto's knob."""

    lamda: float = Field(1.0, ge=0)
    """Weight of the prototype regularizer (PFLlib's ``-lam``, default 1.0)."""


class ProtoUpdate(SGDUpdate):
    """The run's local update with FedProto's regularizer toward the global prototypes (``ins.extras["protos"]``
    (K, D) and ``ins.extras["present"]`` (K,) bool; absent before the first aggregation), collecting the client's
    per-class mean features (the input of the final Linear, :func:`pfl.federated.partial.personal_layer_inputs`).

    Returns the trained model's entries plus ``"proto/protos"`` (K, D) (per-class means, zero where the class had
    no sample) and ``"proto/present"`` (K,) bool.

    Args:
        base: the run's local update.
        lamda: weight of the regularizer.
        num_classes: K.
    """

    def __init__(self, base: SGDUpdate, lamda: float, num_classes: int):
        super().__init__(**base.settings())
        self.lamda, self.num_classes = lamda, num_classes
        self._feats: list[torch.Tensor] = []
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._targets: tuple[torch.Tensor, torch.Tensor] | None = None

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        protos = ins.extras.get("protos")
        self._targets = None if protos is None else (protos.to(data.device), ins.extras["present"].to(data.device))
        self._sums, self._counts = None, torch.zeros(self.num_classes, dtype=torch.long, device=data.device)
        try:
            with personal_layer_inputs(model) as self._feats:
                state, loss = super().fit(model, data, ins, indices, seed)
            present = self._counts > 0
            means = self._sums / self._counts.clamp(min=1).unsqueeze(1).to(self._sums.dtype)
            return {**state, PROTO + "protos": means.cpu(), PROTO + "present": present.cpu()}, loss
        finally:
            self._sums = self._counts = self._targets = None
            self._feats = []

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ins: FitIns) -> torch.Tensor:
        loss = self.loss_fn(model(x), y)
        z = self._feats.pop()
        if self._targets is not None:
            protos, present = self._targets
            target = torch.where(present[y].unsqueeze(1), protos[y].to(z.dtype), z.detach())
            loss = loss + self.lamda * nn.functional.mse_loss(target, z)
        feats = z.detach().float()
        if self._sums is None:
            self._sums = torch.zeros(self.num_classes, feats.shape[1], device=feats.device)
        self._sums.index_add_(0, y, feats)
        self._counts += torch.bincount(y, minlength=self.num_classes)
        return loss


def prototype_classifier(protos: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Linear layer whose argmax is the nearest prototype by MSE (mean over D) of features (n, D) among the present
    rows of ``protos`` (K, D) (``clientproto.py:120-126``): ``(weight (K, D), bias (K,))`` = ``2 P / D`` and
    ``-|p_j|^2 / D``, :data:`ABSENT` for absent classes. Its logits are ``-MSE(z, p_j) + |z|^2 / D``."""
    d = protos.shape[1]
    weight = torch.where(present.unsqueeze(1), 2 * protos / d, torch.zeros_like(protos))
    bias = torch.where(present, -(protos * protos).sum(1) / d, torch.full_like(protos[:, 0], ABSENT))
    return weight, bias


class FedProto(Algorithm):
    """Per-client models that share only class prototypes (:class:`ProtoUpdate`), each scored by the nearest global
    prototype (:func:`prototype_classifier` in place of its final Linear). Runs on mixed architectures whose
    features have one dimension.

    Raises:
        ValueError: a model without a final Linear; (at aggregation) clients' feature dimensions differ.
    """

    name = "fedproto"
    Params = FedProtoParams
    search_space = {"lamda": SearchParam("float", 0.01, 10.0, log=True)}
    state_attributes = ("own", "global_protos")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.num_classes = ctx.specs[0].num_classes
        self.fc = {spec: personal_layer(ctx.runner.models[spec]) for spec in ctx.architectures}
        self.own = ctx.new_store()  # each client's model, from its architecture's initial state
        self.global_protos: State = {}  # {"protos": (K, D), "present": (K,) bool} once a round has aggregated
        self.update = ProtoUpdate(ctx.update, self.hp.lamda, self.num_classes) if ctx.update else None

    @property
    def local_update(self) -> ProtoUpdate:
        return self.update

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        return FitIns(self.own[client_id], extras=dict(self.global_protos), sent=dict(self.global_protos))

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        dims = {r.state[PROTO + "protos"].shape[1] for r in results}
        if len(dims) > 1:
            raise ValueError(f"fedproto needs one feature dimension (the input of the final Linear) for every "
                             f"architecture, the clients' are {sorted(dims)}")
        sums, counts = None, torch.zeros(self.num_classes, dtype=torch.long)
        for r in results:
            self.own[r.client_id] = {k: v for k, v in r.state.items() if not k.startswith(PROTO)}
            protos, present = r.state[PROTO + "protos"], r.state[PROTO + "present"]
            sums = torch.zeros_like(protos) if sums is None else sums
            sums[present] += protos[present]  # proto_aggregation: an unweighted mean over the holders of a class
            counts += present
        present = counts > 0
        self.global_protos = {"protos": sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype), "present": present}

    def upload(self, result: FitRes) -> State:
        """The present classes' prototypes and their labels (the model never travels)."""
        present = result.state[PROTO + "present"]
        return {"protos": result.state[PROTO + "protos"][present], "labels": torch.nonzero(present).flatten()}

    def personalized_state(self, client_id: int) -> State:
        """Client ``client_id``'s own model with the prototype classifier as its final Linear (module docstring); its
        own model as it is before any prototype exists."""
        return self._with_prototypes(client_id, self.own[client_id])

    def _with_prototypes(self, client_id: int, state: State) -> State:
        if not self.global_protos:
            return state
        weight, bias = prototype_classifier(self.global_protos["protos"], self.global_protos["present"])
        fc = self.fc[self.ctx.specs[client_id]]
        return {**state, f"{fc}.weight": weight.to(state[f"{fc}.weight"].dtype),
                f"{fc}.bias": bias.to(state[f"{fc}.bias"].dtype)}

    def adapt(self, client_id: int, epochs: int, seed: int) -> State:
        """New-client evaluation: the held-out client's initial model after ``epochs`` of FedProto's own local
        objective toward the current global prototypes (:class:`ProtoUpdate`), scored by them; PFLlib's FedProto runs
        no new-client evaluation (``serverproto.py:26-60``), and its server's ``global_model``, which
        ``fine_tuning_new_clients`` would send, is never trained, so this rule is pfl's."""
        start = self.ctx.init_state(client_id)
        update = ProtoUpdate(self.ctx.update.with_epochs(epochs), self.hp.lamda, self.num_classes)
        trained = self.ctx.finetune(client_id, start, update, seed, ins=FitIns(start, extras=dict(self.global_protos)))
        return self._with_prototypes(client_id, {k: v for k, v in trained.items() if not k.startswith(PROTO)})
