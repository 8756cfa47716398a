"""The algorithm contract: a few hooks called by the shared round loop (:mod:`pfl.algorithms.engine`).

Modelled on Flower's ``Strategy``: an algorithm never owns the loop. Per round the
engine calls :meth:`Algorithm.configure_fit` for every sampled client (the
parameters that client starts local training from), trains it, and hands all
updates to :meth:`Algorithm.aggregate_fit` (where FedALA also initializes every client).
Evaluation asks :meth:`Algorithm.personalized_model` for every client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pfl.algorithms.inference import batched_logits
from pfl.algorithms.local import LocalTrainer
from pfl.algorithms.store import ClientStore
from pfl.algorithms.vectorized import can_vectorize
from pfl.data.loader import ClientData


@dataclass(frozen=True)
class ClientUpdate:
    """What a sampled client returns after local training.

    Attributes:
        client_id: the client.
        params: trained flat parameters (P,) on the host.
        num_samples: samples local training used (FedAvg's aggregation weight).
        loss: mean minibatch training loss (nats), a 0-d tensor on the training device
            (read once per round, so local training never waits on the device).
    """

    client_id: int
    params: torch.Tensor
    num_samples: int
    loss: torch.Tensor


@dataclass
class FederatedContext:
    """What algorithms may use: client data, the local trainer, the initial model and the run seed.

    Attributes:
        clients: per-client index tensors on the training device.
        trainer: local training / inference on the training device.
        init_params: the initial global model as a flat host vector (P,).
        num_join_clients: clients sampled per round.
        seed: run seed; algorithms derive their own random streams from it.
        store_budget_bytes: memory budget of each per-client store (``None``: unlimited).
        client_parallelism: ``"sequential"``, or ``"vectorized"``: the round's clients train, and
            several models are scored or evaluated, as one batched computation.
    """

    clients: list[ClientData]
    trainer: LocalTrainer
    init_params: torch.Tensor
    num_join_clients: int
    seed: int
    store_budget_bytes: int | None = None
    client_parallelism: str = "sequential"

    def new_store(self, default: torch.Tensor) -> ClientStore:
        """A per-client vector store holding at most ``store_budget_bytes`` in memory (the rest on disk)."""
        return ClientStore(default, self.store_budget_bytes)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    @property
    def batched(self) -> bool:
        """Whether several clients' models run as one batched computation (vectorized, buffer-free model)."""
        return self.client_parallelism == "vectorized" and can_vectorize(self.trainer.model)

    def logits(self, vectors: list[torch.Tensor], indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Logits (n_c, K) on the training device of each model (flat vector (P,)) on its own indices (n_c,)."""
        if self.batched:
            return batched_logits(self.trainer, vectors, indices)
        return [self.trainer.logits(v, i) for v, i in zip(vectors, indices)]

    def losses(self, vectors: list[torch.Tensor], indices: torch.Tensor, batch_size: int | None = None,
               drop_last: bool = False) -> torch.Tensor:
        """Cross-entropy (nats) of each of M models on the same indices (n,): a float64 tensor (M,) on the host.

        Without ``batch_size``, the mean over the n samples. With it, the mean of the per-batch
        means over consecutive batches of ``batch_size`` (the last partial batch dropped when
        ``drop_last`` and at least one full batch exists), as a PyTorch ``DataLoader`` loop that
        sums ``loss.item()`` and divides by ``len(loader)`` computes it.
        """
        labels = self.trainer.data.labels[indices]
        logits = self.logits(vectors, [indices] * len(vectors))
        if batch_size is None:
            return torch.stack([nn.functional.cross_entropy(z, labels) for z in logits]).double().cpu()
        n = len(indices)
        batches = [slice(b, min(b + batch_size, n)) for b in range(0, n, batch_size)]
        if drop_last and n % batch_size and n > batch_size:
            batches.pop()
        per_sample = [nn.functional.cross_entropy(z, labels, reduction="none") for z in logits]
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


class Algorithm:
    """Base class of federated algorithms; subclasses override the hooks.

    Class attributes:
        name: registry name (``"fedavg"``).
        needs_validation: whether clients hold out a validation split of their train data.
        hyperparameters: names of :class:`pfl.config.RunConfig` fields passed to the constructor.
        search_space: default search ranges of tunable config fields (:class:`SearchParam`).
    """

    name = ""
    needs_validation = False
    hyperparameters: tuple[str, ...] = ()
    search_space: dict[str, SearchParam] = {}

    def __init__(self, ctx: FederatedContext):
        self.ctx = ctx

    def configure_fit(self, client_id: int, rnd: int) -> torch.Tensor:
        """Flat parameters (P,) the client starts local training from in round ``rnd`` (1-based)."""
        raise NotImplementedError

    def aggregate_fit(self, rnd: int, updates: list[ClientUpdate]) -> None:
        """Server update from the round's client updates."""
        raise NotImplementedError

    def personalized_model(self, client_id: int) -> torch.Tensor:
        """The client's personalized model as flat parameters (P,) on the host."""
        raise NotImplementedError

    def state_for_logging(self) -> dict[str, torch.Tensor]:
        """Extra server state worth saving with the run (e.g. FedFomo's affinity matrix)."""
        return {}
