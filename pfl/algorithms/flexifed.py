"""FlexiFed: personalized FL across heterogeneous architectures of one family (Wang et al., WWW 2023).

Clients run different depths of one family (VGG-11/13/16/19, CIFAR ResNet-20/32/44/56) and
share what their architectures have in common. Layers are matched by position in the
forward order, state-dict name and shape: two architectures' *common prefix* is the longest
run of leading state entries that agree on all three (:func:`common_prefix`). After local
training the server aggregates the round's uploads by ``scheme`` (paper Sec. 3):

* ``standalone``: no aggregation.
* ``clustered_fl``: FedAvg within each group of identical architectures.
* ``basic_common``: the prefix common to all participants is averaged over all of them;
  everything else stays local.
* ``clustered_common``: clustered FedAvg, then the all-participant common prefix averaged over all.
* ``max_common``: every entry is averaged over all participants whose architectures share the prefix
  up to and including it (the paper's recursive Max-Common), so identical architectures share
  everything and VGG-16 / VGG-19 share more than VGG-11 / VGG-19.

All five are one rule (:func:`aggregation_groups`): entry i of client c becomes the sample-weighted
mean of entry i over a group G(c, i) of participants, whose aggregated entries are written back to
their models (non-participants keep theirs).

Buffer policy (BatchNorm): running means and variances are averaged with their layer;
``num_batches_tracked`` is a counter and is not averaged (each client keeps its own).

Local training follows the FlexiFed-IMP reimplementation (``src/core/Client.py``): each round a
client trains ``local_epochs`` epochs of SGD with momentum 0.9 and weight decay 5e-4 (the
optimizer created afresh each round) on a random ``sample_fraction`` of its training shard.
The run's ``lr``, ``lr_schedule`` and ``max_grad_norm`` apply; ``momentum`` and ``weight_decay`` are
FlexiFed's hyperparameters (a ``weight_decay`` set anywhere in a FlexiFed run sets this one), and
``optimizer=adamw`` is refused before any run is created (:class:`pfl.config.RunConfig`).

What it accepts: the architectures of one family (:func:`check_families`; across families the common
prefix is empty, so FlexiFed cannot mean a mix: it is refused before any run is created). A single architecture is
accepted with a warning: every scheme but ``standalone`` is then FedAvg over the round's participants
(clustered FedAvg with one cluster).

Deliberate differences from the reference code: averages are weighted by the samples trained
on (FedAvg's weights; with the paper's equal IID shards they equal the reimplementation's plain
mean); ``num_batches_tracked`` is not averaged; the round's fraction of the shard is a fresh
random sample per client and round (the reimplementation slides a contiguous window); clients
of one architecture start from one initialization; evaluation runs in eval mode (the original
code scores in train mode, a bug); the VGG classifier is CIFAR-sized (:mod:`pfl.models.vgg`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from pfl.federated.base import Algorithm, FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import State, weighted_average
from pfl.models import FAMILIES
from pfl.seed import derive_seed

SCHEMES = ("standalone", "clustered_fl", "basic_common", "clustered_common", "max_common")
Signature = tuple[tuple[str, tuple[int, ...]], ...]  # an architecture's state entries: (name, shape) in order


def signature(state: State) -> Signature:
    """An architecture's state entries as ``(name, shape)`` pairs in forward (``state_dict``) order."""
    return tuple((k, tuple(v.shape)) for k, v in state.items())


def check_families(models: Sequence[str]) -> None:
    """Refuse architectures of several families (:data:`pfl.models.FAMILIES`; any other architecture is a family of its own), e.g. ``vgg11,resnet20``.

    Raises:
        ValueError: one line naming each family and its architectures, and a one-family example.
    """
    families: dict[str, list[str]] = {}
    for name in dict.fromkeys(models):
        families.setdefault(FAMILIES.get(name, name), []).append(name)
    if len(families) > 1:
        named = "; ".join(f"{family}: {', '.join(names)}" for family, names in families.items())
        raise ValueError(f"model={','.join(models)} mixes architecture families ({named}); FlexiFed shares layers "
                         "within one family (across families they share no leading layer): use depths "
                         "of one family, e.g. model=vgg11,vgg13,vgg16,vgg19 or model=resnet20,resnet32,resnet44,"
                         "resnet56")


def common_prefix(a: Signature, b: Signature) -> int:
    """Number of leading state entries two architectures share (same position, name and shape)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def aggregation_groups(scheme: str, signatures: dict[int, Signature]) -> Callable[[int, int], tuple[int, ...]]:
    """The rule of ``scheme``: ``(client, entry position) -> participants whose entry it is averaged over``.

    Args:
        scheme: one of :data:`SCHEMES`.
        signatures: participant id -> its architecture's :func:`signature`.

    Raises:
        ValueError: unknown scheme.
    """
    ids = sorted(signatures)
    prefix = {(a, b): common_prefix(signatures[a], signatures[b]) for a in ids for b in ids}
    common_all = min(prefix.values())
    same = {c: tuple(o for o in ids if signatures[o] == signatures[c]) for c in ids}
    rules: dict[str, Callable[[int, int], tuple[int, ...]]] = {
        "standalone": lambda c, i: (c,),
        "clustered_fl": lambda c, i: same[c],
        "basic_common": lambda c, i: tuple(ids) if i < common_all else (c,),
        "clustered_common": lambda c, i: tuple(ids) if i < common_all else same[c],
        "max_common": lambda c, i: tuple(o for o in ids if prefix[c, o] > i),
    }
    if scheme not in rules:
        raise ValueError(f"unknown FlexiFed scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    return rules[scheme]


def aggregate(scheme: str, states: dict[int, State], weights: dict[int, float]) -> dict[int, State]:
    """Every participant's state after ``scheme``'s aggregation (module docstring).

    Args:
        states: participant id -> its uploaded state.
        weights: participant id -> its aggregation weight (samples trained on).

    Returns:
        participant id -> new state: each float entry the weighted mean over its group, integer
        entries (``num_batches_tracked``) the client's own. Each group's mean is computed once.
    """
    group_of = aggregation_groups(scheme, {c: signature(s) for c, s in states.items()})
    means: dict[tuple[tuple[int, ...], str], torch.Tensor] = {}
    out = {}
    for c, state in states.items():
        new = dict(state)
        for i, (key, value) in enumerate(state.items()):
            group = group_of(c, i)
            if not value.is_floating_point() or group == (c,):
                continue
            if (group, key) not in means:
                avg = weighted_average([states[g] for g in group], [weights[g] for g in group], [key])
                means[group, key] = avg[key]
            new[key] = means[group, key]
        out[c] = new
    return out


class MomentumSGD(SGDUpdate):
    """SGD with momentum and weight decay, a fresh ``torch.optim.SGD`` per client and round (FlexiFed-IMP); the
    rest (lr, its schedule, clipping, batches) is the run's update ``base``."""

    def __init__(self, base: SGDUpdate, momentum: float, weight_decay: float):
        super().__init__(**{**base.settings(), "weight_decay": weight_decay})
        self.momentum = momentum

    def optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)


class FlexiFedParams(HyperParams):
    """FlexiFed's hyperparameters."""

    scheme: Literal["standalone", "clustered_fl", "basic_common", "clustered_common", "max_common"] = "max_common"
    """Aggregation scheme (:data:`SCHEMES`)."""
    sample_fraction: float = Field(0.1, gt=0, le=1)
    """Fraction of its training shard a client trains on per round (paper: a tenth)."""
    momentum: float = Field(0.9, ge=0, lt=1)
    """Local SGD momentum (FlexiFed-IMP: 0.9)."""
    weight_decay: float = Field(5e-4, ge=0)
    """Local SGD weight decay (FlexiFed-IMP: 5e-4); in a FlexiFed run the ``weight_decay`` name sets this
    hyperparameter, not the run field of the same name."""


class FlexiFed(Algorithm):
    """FlexiFed (module docstring): each client keeps its own architecture's model; the server averages
    the layers the round's participants have in common, by ``scheme``.

    Warns:
        UserWarning: every client runs one architecture (FlexiFed is then clustered FedAvg).
    """

    name = "flexifed"
    Params = FlexiFedParams
    search_space = {"sample_fraction": SearchParam("float", 0.05, 1.0, log=True),
                    "momentum": SearchParam("float", 0.0, 0.95)}
    state_attributes = ("models",)

    @classmethod
    def run_label(cls, hparams: dict[str, Any]) -> str:
        """``flexifed-<scheme>``: the schemes are the variants the paper compares."""
        return f"{cls.name}-{hparams['scheme']}"

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        if len(ctx.architectures) == 1:
            warnings.warn(f"flexifed with one architecture ({ctx.specs[0].name}) is clustered FedAvg: every scheme "
                          "but standalone averages whole models over the round's participants; give several depths "
                          "of one family (e.g. model=vgg11,vgg13,vgg16,vgg19) to compare FlexiFed's schemes",
                          stacklevel=2)
        self.models = ctx.new_store()  # each client's model (= its personalized model)
        self.update = MomentumSGD(ctx.update, self.hp.momentum, self.hp.weight_decay)

    @property
    def local_update(self) -> MomentumSGD:
        return self.update

    def round_sample(self, client_id: int, rnd: int) -> torch.Tensor:
        """The client's training indices of round ``rnd``: a random ``sample_fraction`` of its shard (at least
        one sample), in shard order."""
        fit = self.ctx.clients[client_id].fit
        k = max(1, round(self.hp.sample_fraction * len(fit)))
        rng = np.random.default_rng(derive_seed(self.ctx.seed, "local_subsample", rnd, client_id))
        return fit[torch.as_tensor(np.sort(rng.choice(len(fit), k, replace=False))).to(fit.device)]

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        return FitIns(self.models[client_id], indices=self.round_sample(client_id, rnd))

    def aggregate_fit(self, rnd: int, results: Sequence[FitRes]) -> None:
        states = {r.client_id: r.state for r in results}
        new = aggregate(self.hp.scheme, states, {r.client_id: r.num_samples for r in results})
        for cid, state in new.items():
            self.models[cid] = state

    def personalized_state(self, client_id: int) -> State:
        return self.models[client_id]
