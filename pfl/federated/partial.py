"""Partial sharing: the algorithms that average one part of the model and leave the rest each client's own (FedPer,
LG-FedAvg, FedRep, FedBN). Each says which parameters it shares (:meth:`PartialSharing.shares`); the round is the
same for all, as PFLlib runs it (``serverbase.py:103-109`` sends the global part to every client, whose received
parameters overwrite its own; ``serverbase.py:138-150`` averages the uploads' ``parameters()``, weighted by training
samples):

* ``configure_fit``: a sampled client starts from its own last model with the latest global part merged in; only the
  global part travels down (``comm/bytes_down``);
* ``aggregate_fit``: each sampled client's whole trained state is kept as its own; the global part becomes the
  sample-weighted average of the shared parameters, the only thing that travels up (``comm/bytes_up``);
* ``personalized_state(c)``: client c's own last model (the initial model until it trains) with the latest global
  part: the model PFLlib evaluates right after ``send_models``;
* new-client evaluation (:meth:`PartialSharing.adapt`): a held-out client fine-tunes its personal part on top of the
  received global part (PFLlib fine-tunes the whole global model for every algorithm: a deliberate difference).

Buffers (BatchNorm running statistics, ``num_batches_tracked``) never travel: PFLlib moves ``parameters()`` only, so
every buffer stays each client's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pfl.federated.base import Algorithm, FederatedContext
from pfl.federated.local import FitIns, FitRes
from pfl.federated.state import State, param_keys, weighted_average


def personal_layer(model: nn.Module) -> str:
    """The module path of PFLlib's ``model.fc`` in a pfl model: its head when that is one Linear, else the last entry
    of a Sequential head ending with a Linear (``head.2`` for the CNN, ``head.4`` for VGG, ``head`` for the CIFAR
    ResNets). PFLlib's ``BaseHeadSplit`` (``main.py:225-228``, ``trainmodel/models.py:9-20``) makes that layer the
    head of FedPer, LG-FedAvg and FedRep.

    Raises:
        ValueError: the head neither is nor ends with a Linear layer.
    """
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        return "head"
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
        return f"head.{len(head) - 1}"
    raise ValueError(f"the model's final Linear is PFLlib's head (model.fc), and {type(model).__name__} has no head "
                     "that is or ends with a Linear")


@contextmanager
def personal_layer_inputs(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block every forward pass of ``model`` appends the input of its :func:`personal_layer`, flattened to
    (B, d), to the list it yields: PFLlib's features, the output of its ``model.base``, which is the input of
    ``model.fc`` (FedProto's prototypes). The tensors keep their graph (detach them to collect).

    Raises:
        ValueError: see :func:`personal_layer`.
    """
    captured: list[torch.Tensor] = []
    layer = model.get_submodule(personal_layer(model))
    hook = layer.register_forward_pre_hook(lambda _module, args: captured.append(args[0].flatten(1)))
    try:
        yield captured
    finally:
        hook.remove()


def under(keys: list[str], prefix: str) -> list[str]:
    """The entries of ``keys`` in module ``prefix`` (a module path, e.g. ``head.2``)."""
    return [k for k in keys if k.startswith(prefix + ".")]


def outside_personal_layer(model: nn.Module) -> list[str]:
    """The parameter names outside :func:`personal_layer`, in ``state_dict`` order: what FedPer and FedRep average
    (PFLlib's ``model.base``, everything but ``model.fc``).

    Raises:
        ValueError: see :func:`personal_layer`.
    """
    keys = param_keys(model)
    personal = set(under(keys, personal_layer(model)))
    return [k for k in keys if k not in personal]


class PartialSharing(Algorithm):
    """The round of partial sharing (module docstring); subclasses define :meth:`shares`.

    Raises:
        ValueError: the clients' architectures differ, or the model has no parameter to share.
    """

    tasks = ("classification", "viewport")
    state_attributes = ("global_state", "own")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        spec = ctx.single_spec(self.name)
        self.shared_keys = self.shares(ctx.runner.models[spec])
        if not self.shared_keys:
            raise ValueError(f"{self.name}: model {spec.name} has no parameter it shares")
        init = ctx.init_states[spec]
        self.global_state: State = {k: init[k] for k in self.shared_keys}  # the global part, initially the initial one
        self.own = ctx.new_store()  # each client's own model as it last trained (the initial model until then)

    @classmethod
    def shares(cls, model: nn.Module) -> list[str]:
        """The parameter names averaged across clients, in ``state_dict`` order."""
        raise NotImplementedError

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        return FitIns(self.personalized_state(client_id), sent=self.global_state)

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        for r in results:
            self.own[r.client_id] = r.state
        self.global_state = weighted_average([r.state for r in results], [r.num_samples for r in results],
                                             keys=self.shared_keys)

    def upload(self, result: FitRes) -> State:
        return {k: result.state[k] for k in self.shared_keys}

    def personalized_state(self, client_id: int) -> State:
        return {**self.own[client_id], **self.global_state}

    def adapt(self, client_id: int, epochs: int, seed: int) -> State:
        """New-client evaluation: the client's personal part (every parameter not shared: FedPer's and FedRep's
        head, LG-FedAvg's base, FedBN's BatchNorm layers), fine-tuned with the run's SGD on top of the global part,
        which stays as received (PFLlib fine-tunes the whole global model for every algorithm)."""
        personal = [n for n, _ in self.ctx.model(client_id).named_parameters() if n not in set(self.shared_keys)]
        return self.ctx.finetune(client_id, self.new_client_state(client_id), self.ctx.update.with_epochs(epochs),
                                 seed, trains=personal)
