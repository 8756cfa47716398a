"""The algorithm contract: a few hooks called by the shared round loop (:mod:`pfl.federated.engine`).

Modelled on Flower's ``Strategy`` (``configure_fit`` / ``aggregate_fit`` with ``FitIns`` /
``FitRes``) and FL-bench's hyperparameters-beside-the-method: an algorithm never owns the
loop. Per round the engine asks :meth:`Algorithm.run_round`, whose default is

    configure_fit (a :class:`FitIns` per sampled client) -> local update -> aggregate_fit (all :class:`FitRes`)

and which a step-synchronous algorithm (split learning) replaces whole. Evaluation asks
:meth:`Algorithm.personalized_state` for every client and scores it with the algorithm's
:attr:`Algorithm.evaluator` (by default the run's task's: :mod:`pfl.tasks`).

Everything travels as named state (:data:`pfl.federated.state.State`); each client has its
own architecture (:class:`pfl.models.ModelSpec`), and a run may mix them.

An algorithm module declares, beside its class: its hyperparameters (a :class:`HyperParams`
pydantic model with types, defaults and ranges), their search space, and the attributes
that make up its state (:attr:`Algorithm.state_attributes`, saved and restored by
:meth:`Algorithm.state_dict` / :meth:`Algorithm.load_state_dict`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from pfl.federated.checkpoint import export_state, import_state
from pfl.federated.downlink import Downlink
from pfl.federated.evaluation import Evaluator
from pfl.federated.inference import batched_logits
from pfl.federated.local import FitIns, FitRes, LocalUpdate, ModelRunner, SGDUpdate, training_only
from pfl.federated.state import State
from pfl.federated.store import ClientStore
from pfl.federated.vectorized import can_vectorize
from pfl.data.loader import ClientData
from pfl.models.split import ModelSpec
from pfl.tasks import Task
from pfl.tasks.classification import Classification


@dataclass
class FederatedContext:
    """What algorithms may use: client data and architectures, the device models, the default local update.

    Attributes:
        clients: per-client index tensors on the training device.
        specs: each client's architecture (a run may mix them).
        runner: the device model of every architecture, the data and inference.
        update: the default local update (plain SGD on the task's loss).
        init_states: the initial named state of every architecture.
        num_join_clients: clients sampled per round.
        seed: run seed; algorithms derive their own random streams from it.
        store_budget_bytes: memory budget of each per-client store (``None``: unlimited).
        client_parallelism: ``"sequential"``, or ``"vectorized"``: the round's clients train, and
            several models are scored or evaluated, as one batched computation.
        global_rounds: the run's rounds (learning-rate schedules, MocoSFL's final linear probe).
        task: the run's task (:mod:`pfl.tasks`): the loss of ``update``, the default evaluator.
        downlink: what of a server model goes down to a client and how it merges into the client's own model
            (:class:`pfl.federated.downlink.Downlink`; algorithms with one global model apply it).
        new_clients: ids of the clients held out of training for new-client evaluation (never sampled, never scored
            as training clients; :meth:`Algorithm.adapt`).
    """

    clients: list[ClientData]
    specs: list[ModelSpec]
    runner: ModelRunner
    update: SGDUpdate
    init_states: dict[ModelSpec, State]
    num_join_clients: int
    seed: int
    store_budget_bytes: int | None = None
    client_parallelism: str = "sequential"
    global_rounds: int = 1
    task: Task = field(default_factory=Classification)
    downlink: Downlink = field(default_factory=Downlink)
    new_clients: tuple[int, ...] = ()

    @functools.cached_property
    def train_clients(self) -> list[int]:
        """The ids of the clients that take part in training, ascending (all but :attr:`new_clients`); computed once
        (the round loop, evaluation and FedFomo's selection read it every round)."""
        held_out = set(self.new_clients)
        return [c for c in range(self.num_clients) if c not in held_out]

    def finetune(self, client_id: int, state: State, update: SGDUpdate, seed: int,
                 trains: Collection[str] | None = None, ins: FitIns | None = None) -> State:
        """``state`` after ``update`` on the client's train split (its ``fit`` indices), batch order from ``seed``:
        only the parameters named in ``trains`` move (``None``: every trainable one). ``ins`` is what the update
        reads (``None``: ``FitIns(state)``). Nothing of the algorithm changes; returns the trained state on the host
        (``state`` itself when ``update`` runs no epoch or ``trains`` names nothing, e.g. FedBN on a model without
        BatchNorm)."""
        if not update.local_epochs or (trains is not None and not trains):
            return state
        model = self.runner.load(self.specs[client_id], state)
        names = [n for n, _ in model.named_parameters()] if trains is None else trains
        with training_only(model, names):
            trained, _ = update.fit(model, self.runner.data, ins or FitIns(state), self.clients[client_id].fit, seed)
        return trained

    def init_state(self, client_id: int) -> State:
        """The initial state of the client's architecture (shared, never to be modified in place)."""
        return self.init_states[self.specs[client_id]]

    def new_store(self, default: State | Callable[[int], State] | None = None) -> ClientStore:
        """A per-client state store (default: each client's initial state) holding at most
        ``store_budget_bytes`` in memory (the rest on disk)."""
        return ClientStore(self.init_state if default is None else default, self.store_budget_bytes)

    def model(self, client_id: int) -> nn.Module:
        """The device instance of the client's architecture (its values are whichever state was loaded last)."""
        return self.runner.models[self.specs[client_id]]

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def architectures(self) -> list[ModelSpec]:
        """The distinct architectures, in order of first client."""
        return list(dict.fromkeys(self.specs))

    def single_spec(self, algorithm: str) -> ModelSpec:
        """The one architecture of a homogeneous run.

        Raises:
            ValueError: the clients' architectures differ (``algorithm`` needs one).
        """
        if len(self.architectures) != 1:
            names = ", ".join(s.name for s in self.architectures)
            raise ValueError(f"{algorithm} needs one architecture for every client, the run mixes {names}; "
                             "set model to one name, or use algo=flexifed")
        return self.specs[0]

    def batched(self, spec: ModelSpec) -> bool:
        """Whether several models of ``spec`` run as one batched computation (vectorized, buffer-free model)."""
        return self.client_parallelism == "vectorized" and can_vectorize(self.runner.models[spec])

    def logits(self, spec: ModelSpec, states: list[State], indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits (n_c, K) on the training device of each model (architecture ``spec``) on its own indices (n_c,)."""
        if self.batched(spec):
            return batched_logits(self.runner, spec, states, indices)
        return [self.runner.logits(spec, s, i) for s, i in zip(states, indices)]

    def losses(self, spec: ModelSpec, states: list[State], indices: torch.Tensor, batch_size: int | None = None,
               drop_last: bool = False) -> torch.Tensor:
        """Cross-entropy (nats) of each of M models on the same indices (n,): a float64 tensor (M,) on the host.

        Without ``batch_size``, the mean over the n samples. With it, the mean of the per-batch
        means over consecutive batches of ``batch_size`` (the last partial batch dropped when
        ``drop_last`` and at least one full batch exists), as a PyTorch ``DataLoader`` loop that
        sums ``loss.item()`` and divides by ``len(loader)`` computes it.
        """
        labels = self.runner.data.targets[indices]
        logits = self.logits(spec, states, [indices] * len(states))
        ce = torch.nn.functional.cross_entropy
        if batch_size is None:
            return torch.stack([ce(z, labels) for z in logits]).double().cpu()
        n = len(indices)
        batches = [slice(b, min(b + batch_size, n)) for b in range(0, n, batch_size)]
        if drop_last and n % batch_size and n > batch_size:
            batches.pop()
        per_sample = [ce(z, labels, reduction="none") for z in logits]
        return torch.stack([torch.stack([p[b].mean() for b in batches]).mean() for p in per_sample]).double().cpu()


@dataclass(frozen=True)
class SearchParam:
    """The search range of one hyperparameter (used by ``tuning/``).

    Attributes:
        kind: ``"int"`` or ``"float"``.
        low: lower bound (inclusive).
        high: upper bound (inclusive), or a function of the number of clients.
        log: sample on a log scale.
    """

    kind: str
    low: float
    high: float | Callable[[int], float]
    log: bool = False

    def bounds(self, num_clients: int) -> tuple[float, float]:
        """``(low, high)`` for a run with ``num_clients`` clients."""
        return self.low, self.high(num_clients) if callable(self.high) else self.high


class HyperParams(BaseModel):
    """An algorithm's hyperparameters: subclass beside the algorithm with typed fields, defaults and ranges
    (pydantic ``Field(ge=..., le=...)``, plus validators for anything else), each field followed by its docstring
    (its description in the generated algorithm reference; a test requires one). Unknown names are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class Algorithm:
    """Base class of federated algorithms; subclasses override the hooks.

    Class attributes:
        name: registry name (``"fedavg"``).
        Params: its :class:`HyperParams` (fields are set by name in configs: ``M=3`` or ``fedfomo: {M: 3}``).
        search_space: default search ranges of tunable hyperparameters or run fields (``lr``).
        state_attributes: attributes holding its full server and client state (client stores,
            named states, tensors and JSON values), saved by :meth:`state_dict`.
        classifier: whether the models end in a classifier (False: a self-supervised projection, which head
            methods cannot rearrange).
        tasks: the tasks (:mod:`pfl.tasks`) it trains (default: classification only; FedFomo's and FedALA's
            client-side scoring is cross-entropy).
        takes_downlink: whether it takes the ``downlink`` and ``downlink_blend`` knobs (one global model that clients
            merge into their own: :class:`pfl.federated.downlink.Downlink`).

    Args:
        ctx: the federated context.
        **hparams: values of ``Params`` fields (validated; pydantic's ``ValidationError`` is a ``ValueError``).
    """

    name = ""
    Params: ClassVar[type[HyperParams]] = HyperParams
    search_space: ClassVar[dict[str, SearchParam]] = {}
    state_attributes: ClassVar[tuple[str, ...]] = ()
    classifier: ClassVar[bool] = True
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    takes_downlink: ClassVar[bool] = False

    def __init__(self, ctx: FederatedContext, **hparams: Any):
        self.ctx = ctx
        self.hp = self.Params(**hparams)

    @classmethod
    def run_label(cls, hparams: dict[str, Any]) -> str:
        """The algorithm in run names: its ``name``; an algorithm with variants adds the one chosen in ``hparams``
        (validated hyperparameters), so runs of two variants get different names."""
        return cls.name

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: HyperParams) -> ModelSpec:
        """The architecture the algorithm trains for a client configured with ``spec`` (default: ``spec``; FedLoRA
        adds its adapters), so a saved client's spec rebuilds exactly its model."""
        return spec

    @classmethod
    def validation_ratio(cls, hp: HyperParams) -> float | None:
        """Fraction of each client's train split held out as the algorithm's own validation split (``None``: none)."""
        return None

    @property
    def local_update(self) -> LocalUpdate:
        """The clients' local update (default: the context's plain SGD)."""
        return self.ctx.update

    @property
    def evaluator(self) -> Evaluator:
        """How personalized models are scored (default: the run's task's evaluator)."""
        return self.ctx.task.evaluator()

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        """What the client starts local training from in round ``rnd`` (1-based)."""
        raise NotImplementedError

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        """Server update from the round's client results."""
        raise NotImplementedError

    def run_round(self, rnd: int, selected: list[int], fit: Callable[[list[int], int], list[FitRes]]) -> list[FitRes]:
        """One round for the sampled clients: ``fit`` (the engine's configure_fit + local update of every
        selected client) then :meth:`aggregate_fit`. Step-synchronous algorithms override the whole round."""
        results = fit(selected, rnd)
        self.aggregate_fit(rnd, results)
        return results

    def personalized_state(self, client_id: int) -> State:
        """The client's personalized model as a named state on the host."""
        raise NotImplementedError

    def new_client_state(self, client_id: int) -> State:
        """Where a client that never trained starts its adaptation in new-client evaluation (:meth:`adapt`): by
        default its :meth:`personalized_state`, which for such a client is what joining gives it (FedAvg's global
        model; in partial sharing the global part over its initial personal part; Ditto's initial personal model)."""
        return self.personalized_state(client_id)

    def adapt(self, client_id: int, epochs: int, seed: int) -> State:
        """New-client evaluation (PFLlib's ``-nnc`` / ``-ften``, ``serverbase.py:337-356``): the model that client
        ``client_id``, held out of training, holds after ``epochs`` local epochs of the algorithm's personalization
        rule on its train split, batch order from ``seed``; it must leave the algorithm's state untouched.

        Default, PFLlib's: every parameter of :meth:`new_client_state` fine-tuned with the run's local SGD (PFLlib
        fine-tunes its global model with plain SGD at the run's lr). Algorithms with a rule of their own override it
        (partial sharing fine-tunes its personal part; Ditto trains a personal model pulled toward the global one).
        """
        return self.ctx.finetune(client_id, self.new_client_state(client_id), self.ctx.update.with_epochs(epochs), seed)

    def upload(self, result: FitRes) -> State:
        """What of a client's result travelled up (``comm/bytes_up``): by default what the run's downlink sends up
        (:meth:`pfl.federated.downlink.Downlink.upload`: everything, or the top K layers)."""
        return self.ctx.downlink.upload(result.state)

    def state_for_logging(self) -> dict[str, torch.Tensor]:
        """Extra server state worth saving with the run as JSON (e.g. FedFomo's affinity matrix)."""
        return {}

    def server_models(self) -> dict[str, State]:
        """Server-side models saved with the run as ``server/<name>.safetensors`` (e.g. FedGen's generator)."""
        return {}

    def shared_backbone(self) -> State:
        """Entries of every client's model that all clients share and never train (FedLoRA's frozen backbone):
        saved once with the run, while each client's artifact holds the rest; default none."""
        return {}

    def extra_models(self) -> dict[str, Callable[[int], State]]:
        """Other model sets the engine evaluates beside the personalized models, by name: client id -> its
        state (e.g. FedGen's locally fine-tuned models, ``finetuned``, logged as ``finetuned/acc``); default none."""
        return {}

    def round_metrics(self) -> dict[str, float]:
        """Server-side metrics of the round just run, logged with the engine's (names of :mod:`pfl.vocabulary`,
        e.g. ``server/generator_teacher_loss``); default none."""
        return {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The algorithm's full state as named tensors plus JSON (:mod:`pfl.federated.checkpoint`)."""
        return export_state(self, self.state_attributes)

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on an algorithm built from the same config and seed).

        Raises:
            ValueError: the saved state lacks an attribute or holds one of another kind.
        """
        import_state(self, self.state_attributes, tensors, meta)
