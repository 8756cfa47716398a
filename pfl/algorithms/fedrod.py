"""FedRoD (Chen & Chao, "On Bridging Generic and Personalized Federated Learning for Image Classification", ICLR 2022),
with PFLlib's semantics (TsingZ0/PFLlib ``system/flcore/servers/serverrod.py``, ``system/flcore/clients/clientrod.py``,
``system/main.py``; commit d832e76).

Every client holds the generic model (body + generic head, the FedAvg model) and a personal head beside it, a copy of
the initial generic head (``clientrod.py:15``). The heads are PFLlib's ``model.fc`` (``main.py:240-244``): the model's
final Linear (:func:`pfl.federated.partial.personal_layer`: ``head.2`` for the CNN, ``head.4`` for VGG, ``head`` for
the CIFAR ResNets); its input is the representation ``rep``.

A sampled client's round (``clientrod.py:29-68``), for every minibatch (x, y) of ``local_epochs`` epochs:

1. ``out_g`` = the generic model's logits; the generic model takes one SGD step on the balanced softmax loss
   ``CE(out_g + log n_y, y)`` (``clientrod.py:48-53``, ``142-156``), ``n`` the client's training samples per class;
2. ``out_p`` = the personal head on ``rep.detach()``, both from the forward pass of step 1 (before its update); the
   personal head takes one SGD step on ``CE(out_g.detach() + out_p, y)`` (``clientrod.py:55-59``).

:class:`RoDUpdate` computes both losses from one forward pass and sums them: the detaches make the generic model's
gradient the balanced loss's alone and the personal head's the second loss's alone, so one backward and the two steps
at the same rate are PFLlib's two steps exactly. The label counts are computed once per client from its train split's
labels, on the training device.

The server averages the generic models' parameters, sample-weighted (``serverbase.py:138-150``), and every client takes
them into its generic model (``serverbase.py:103-109``, ``clientbase.py:67-69``: parameters only). The personal heads
never travel. Personal heads and buffers ride beside the model as in :mod:`pfl.algorithms.ditto`: down in
``FitIns.extras``, up under the key prefix ``"personal/"`` of ``FitRes.state``
(:func:`pfl.federated.state.with_personal`); the round is :class:`pfl.federated.partial.PartialSharing`'s with every
parameter shared.

``personalized_state(c)``: the personalized model ``out = out_g + out_p`` (``clientrod.py:88-91``), the latest generic
model (with c's buffers) plus c's personal head, what PFLlib evaluates after ``send_models`` (``serverrod.py:26-31``).
Both heads are Linear layers on the same ``rep``, so ``W_g rep + b_g + W_p rep + b_p = (W_g + W_p) rep + (b_g + b_p)``:
the personalized model is the run's own architecture whose final Linear holds the sums of the two heads' weights and
biases. It is therefore a plain state of the client's spec: saved, reloaded (``load_client_model``) and rearranged by
``pfl heads`` as any other; its logits equal PFLlib's sum of outputs up to float rounding (one rounding of the weight
sums instead of one of the output sums). The generic model and personal head themselves are the algorithm's state.

Buffer policy (BatchNorm): running statistics and ``num_batches_tracked`` stay each client's own (parameters only are
set and averaged in PFLlib); they move in training mode during local training.

Knobs: none (PFLlib has none of its own). Classification only (the balanced softmax needs classes).

Differences from PFLlib: PFLlib counts the labels of its shuffled ``drop_last=True`` train loader
(``clientrod.py:22-26``, ``clientbase.py:59``), which leaves out a random remainder of fewer than ``batch_size``
samples; pfl counts the whole train split. The personal head always takes plain SGD steps at the round's rate
(PFLlib's ``opt_head``); with a run's ``optimizer=adamw``, ``weight_decay`` or ``max_grad_norm`` those apply to the
generic model only (PFLlib knows plain SGD only). ``train/loss`` is the sum of the two minibatch losses (PFLlib's
``train_metrics`` reports the personalized model's cross-entropy). The weight sums of the personalized model (above).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pfl.data.loader import DeviceData
from pfl.federated.base import FederatedContext
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.partial import PartialSharing, personal_layer, personal_layer_inputs, under
from pfl.federated.state import State, param_keys, split_personal, weighted_average, with_personal


def label_counts(targets: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float samples per class (K,) of the labels at ``indices``, on their device (``clientrod.py:22-26``)."""
    return torch.bincount(targets[indices], minlength=num_classes).float()


class RoDUpdate(SGDUpdate):
    """A FedRoD client's round (module docstring): the run's update on the generic model with the balanced softmax
    loss, and plain SGD on the personal head ``ins.extras["personal_head"]`` (entries named as the model's final
    Linear) with ``CE(out_g.detach() + head(rep.detach()), y)``; the class counts are ``ins.extras["label_counts"]``
    (K,) on the training device.

    Returns the trained generic model's entries plus the personal head's under the prefix ``"personal/"``.

    Args:
        base: the run's local update.
        personal: module path of the final Linear (:func:`pfl.federated.partial.personal_layer`).
    """

    def __init__(self, base: SGDUpdate, personal: str):
        super().__init__(**base.settings())
        self.personal = personal
        self._head: nn.Module | None = None
        self._rep: list[torch.Tensor] = []
        self._log_prior: torch.Tensor | None = None

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        layer = model.get_submodule(self.personal)
        head = copy.deepcopy(layer)
        prefix = self.personal + "."
        with torch.no_grad():
            for n, p in head.named_parameters():
                p.copy_(ins.extras["personal_head"][prefix + n])
                p.requires_grad_(True)
        self._head, self._log_prior = head, ins.extras["label_counts"].log()
        try:
            with personal_layer_inputs(model) as self._rep:
                state, loss = super().fit(model, data, ins, indices, seed)
        finally:
            self._head, self._log_prior, self._rep = None, None, []
        personal_head = {prefix + n: p.detach().to("cpu", copy=True) for n, p in head.named_parameters()}
        return with_personal(state, personal_head), loss

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ins: FitIns) -> torch.Tensor:
        """Balanced softmax of the generic logits (``clientrod.py:48-50``) plus the personal head's cross-entropy of
        the summed logits (``clientrod.py:55-56``)."""
        out_g = model(x)
        rep = self._rep.pop()
        out_p = self._head(rep.detach())
        return self.loss_fn(out_g + self._log_prior, y) + self.loss_fn(out_g.detach() + out_p, y)

    def _step(self, opt: torch.optim.Optimizer | None, params: list[torch.Tensor], lr: float) -> None:
        """The run's step of the generic model, then a plain SGD step of the personal head (``clientrod.py:57-59``)."""
        super()._step(opt, params, lr)
        head = list(self._head.parameters())
        self._sgd_step(head, lr)
        for p in head:
            p.grad = None


class FedRoD(PartialSharing):
    """FedAvg of generic models trained with the balanced softmax; each client's personal head, trained on the
    detached representation, is added to the generic head (module docstring).

    Raises:
        ValueError: the clients' architectures differ, or the head does not end with a Linear.
    """

    name = "fedrod"
    tasks = ("classification",)
    state_attributes = ("global_state", "own", "heads")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        spec = ctx.single_spec(self.name)
        self.personal = personal_layer(ctx.runner.models[spec])
        init = ctx.init_states[spec]
        initial_head = {k: init[k] for k in under(list(init), self.personal)}  # clientrod.py:15: the initial fc
        self.heads = ctx.new_store(lambda cid: initial_head)  # each client's personal head
        self.num_classes = spec.num_classes
        self._counts: dict[int, torch.Tensor] = {}  # label counts on the device, computed once per client
        self.update = RoDUpdate(ctx.update, self.personal) if ctx.update else None

    @classmethod
    def shares(cls, model: nn.Module) -> list[str]:
        """The whole generic model's parameters (buffers never travel)."""
        return param_keys(model)

    @property
    def local_update(self) -> RoDUpdate:
        return self.update

    def label_counts(self, client_id: int) -> torch.Tensor:
        """The client's training samples per class (K,) on the training device."""
        if client_id not in self._counts:
            self._counts[client_id] = label_counts(self.ctx.runner.data.targets, self.ctx.clients[client_id].fit,
                                                   self.num_classes)
        return self._counts[client_id]

    def generic_state(self, client_id: int) -> State:
        """The client's generic model: the latest average with its own buffers."""
        return {**self.own[client_id], **self.global_state}

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        # the personal head stays on the client: only the generic model's parameters travel (sent)
        return FitIns(self.generic_state(client_id), sent=self.global_state,
                      extras={"personal_head": self.heads[client_id], "label_counts": self.label_counts(client_id)})

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        for r in results:
            self.own[r.client_id], self.heads[r.client_id] = split_personal(r.state)
        self.global_state = weighted_average([r.state for r in results], [r.num_samples for r in results],
                                             keys=self.shared_keys)

    def personalized_state(self, client_id: int) -> State:
        """The generic model whose final Linear holds the sums of the generic and personal heads' entries."""
        state = dict(self.generic_state(client_id))
        for k, v in self.heads[client_id].items():
            state[k] = state[k] + v
        return state

    def adapt(self, client_id: int, epochs: int, seed: int) -> State:
        """New-client evaluation: the received generic model frozen, the personal head (the initial ``fc``) trained on
        the cross-entropy of the summed outputs (``clientrod.py:55-59``). The final Linear holding the sum, its
        gradient is the personal head's, so this is that Linear fine-tuned alone with the run's SGD."""
        fc = under(list(self.ctx.init_state(client_id)), self.personal)
        return self.ctx.finetune(client_id, self.new_client_state(client_id), self.ctx.update.with_epochs(epochs),
                                 seed, trains=fc)
