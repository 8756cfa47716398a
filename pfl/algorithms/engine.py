"""The single round loop shared by every algorithm.

Round r (1-based): sample ``num_join_clients`` clients without replacement, ask the
algorithm where each sampled client starts, train each
locally, let the algorithm aggregate, and every ``eval_gap`` rounds (and after the
last) evaluate every client's personalized model on its own test split. Observers (MLflow logging, progress
bars, pruning) are :class:`Callback` objects; the engine imports neither mlflow
nor optuna.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pfl.algorithms.base import Algorithm, ClientUpdate
from pfl.algorithms.vectorized import train_vectorized, vectorizable
from pfl.metrics import aggregate_clients, classification_metrics
from pfl.seed import derive_seed


@dataclass(frozen=True)
class Evaluation:
    """Evaluation of all clients' personalized models after a round.

    Attributes:
        round: the global round just finished (1-based).
        metrics: sample-weighted means over clients (``test_acc``, ``test_nll``, ``test_ece`` = F-ECE,
            ``test_brier``; ``val_*`` when scoring validation splits), unweighted stds across
            clients (``test_acc_std``, ...) and ``eval_time`` (seconds).
        per_client: one dict per client: ``client``, ``num_test`` (or ``num_val``), ``acc``, ``nll``,
            ``ece``, ``brier``.
    """

    round: int
    metrics: dict[str, float]
    per_client: list[dict[str, float]] = field(default_factory=list)


_METRIC_PREFIX = {"test": "test", "holdout": "val"}  # evaluated split -> metric name prefix


def _digest(vector: torch.Tensor) -> bytes:
    """SHA-256 of a flat parameter vector's bytes: equal digests mean a bit-identical model."""
    return hashlib.sha256(vector.detach().cpu().contiguous().numpy()).digest()


class Callback:
    """Observer of a federated run; override any hook. Raising from a hook aborts the run."""

    def on_round_end(self, rnd: int, metrics: dict[str, float]) -> None:
        """After aggregation; ``metrics`` as returned by :meth:`Engine.run_round`."""

    def on_evaluate(self, evaluation: Evaluation) -> None:
        """After an evaluation of all clients."""

    def on_run_end(self, final: Evaluation) -> None:
        """After the last round's evaluation."""


@dataclass(frozen=True)
class Schedule:
    """Round schedule: ``global_rounds`` rounds, ``num_join_clients`` per round, evaluation every ``eval_gap``
    on each client's ``eval_split``: ``test``, or ``holdout`` for tuning (the fixed tuning split, logged as
    ``val_*`` metrics), which never reads the test split."""

    global_rounds: int
    num_join_clients: int
    eval_gap: int = 1
    ece_bins: int = 20
    eval_split: str = "test"  # "holdout" scores the clients' tuning splits (hyperparameter search)


class Engine:
    """Runs an :class:`Algorithm` for ``schedule.global_rounds`` rounds.

    Args:
        algorithm: the federated algorithm (holds the context: clients, trainer, seed).
        schedule: rounds, participation and evaluation cadence.
        callbacks: observers, called in order.
    """

    def __init__(self, algorithm: Algorithm, schedule: Schedule, callbacks: list[Callback] | None = None):
        self.algorithm = algorithm
        self.ctx = algorithm.ctx
        self.schedule = schedule
        self.callbacks = callbacks or []
        self._scores: dict[int, tuple[bytes, dict[str, float]]] = {}  # client -> (model digest, metrics)

    def sample_clients(self, rnd: int) -> list[int]:
        """Sorted ids of the clients taking part in round ``rnd`` (uniform, without replacement)."""
        rng = np.random.default_rng(derive_seed(self.ctx.seed, "client_sampling", rnd))
        return sorted(rng.choice(self.ctx.num_clients, self.schedule.num_join_clients, replace=False).tolist())

    def train_client(self, client_id: int, rnd: int) -> ClientUpdate:
        """Local training of one client from the algorithm's starting point."""
        start = self.algorithm.configure_fit(client_id, rnd)
        fit = self.ctx.clients[client_id].fit
        params, loss = self.ctx.trainer.train(start, fit, derive_seed(self.ctx.seed, "local_batches", rnd, client_id))
        return ClientUpdate(client_id, params, len(fit), loss)

    def train_clients_vectorized(self, selected: list[int], rnd: int) -> list[ClientUpdate]:
        """All selected clients' local training at once (:mod:`pfl.algorithms.vectorized`).

        Falls back to sequential training when the model or a client does not qualify.
        """
        starts = [self.algorithm.configure_fit(cid, rnd) for cid in selected]
        fits = [self.ctx.clients[cid].fit for cid in selected]
        seeds = [derive_seed(self.ctx.seed, "local_batches", rnd, cid) for cid in selected]
        if vectorizable(self.ctx.trainer, fits):
            results = train_vectorized(self.ctx.trainer, starts, fits, seeds)
        else:
            results = [self.ctx.trainer.train(s, f, seed) for s, f, seed in zip(starts, fits, seeds)]
        return [ClientUpdate(cid, params, len(fit), loss) for cid, fit, (params, loss) in zip(selected, fits, results)]

    def run_round(self, rnd: int) -> dict[str, float]:
        """One round; returns ``train_loss`` (sample-weighted mean over the round's clients), ``train_samples``
        (the round's clients' training samples) and seconds: ``round_time`` = ``local_time`` (round
        starting points and local training) + ``aggregate_time`` (server update, FedALA's ALA)."""
        start = time.perf_counter()
        selected = self.sample_clients(rnd)
        if self.ctx.client_parallelism == "vectorized":
            updates = self.train_clients_vectorized(selected, rnd)
        else:
            updates = [self.train_client(cid, rnd) for cid in selected]
        losses = torch.stack([u.loss for u in updates]).double().cpu()  # one host sync per round
        local = time.perf_counter()
        self.algorithm.aggregate_fit(rnd, updates)
        samples = torch.tensor([u.num_samples for u in updates], dtype=torch.float64)
        end = time.perf_counter()
        return {"train_loss": float((losses * samples).sum() / samples.sum()), "round_time": end - start,
                "local_time": local - start, "aggregate_time": end - local, "train_samples": float(samples.sum())}

    def evaluate(self, rnd: int) -> Evaluation:
        """Every client's personalized model on its own ``eval_split``; aggregates weighted by its sample counts.

        A client whose model is bit-identical to the one scored at its previous evaluation (a
        FedFomo client that did not take part since) keeps those scores: the same model on the
        same samples gives the same metrics, so only changed models are run: one at a time, or
        ``num_join_clients`` at a time as one batched computation when vectorized. Adds
        ``eval_time`` (seconds) and ``eval_reused`` (clients whose scores were kept) to the metrics.

        Raises:
            ValueError: ``eval_split="holdout"`` but the clients hold no tuning split.
        """
        start = time.perf_counter()
        split = self.schedule.eval_split
        indices = [self._split_indices(cid, split) for cid in range(self.ctx.num_clients)]
        group = self.ctx.num_join_clients if self.ctx.batched else 1  # models held at once
        pending: list[tuple[int, torch.Tensor, bytes]] = []
        reused = 0
        for cid in range(self.ctx.num_clients):
            vector = self.algorithm.personalized_model(cid)
            key = _digest(vector)
            if self._scores.get(cid, (None,))[0] == key:
                reused += 1
                continue
            pending.append((cid, vector, key))
            if len(pending) == group:
                self._score(pending, indices)
                pending = []
        if pending:
            self._score(pending, indices)
        scores = [self._scores[cid][1] for cid in range(self.ctx.num_clients)]
        weights = [len(idx) for idx in indices]
        prefix = _METRIC_PREFIX[split]
        per_client = [{"client": cid, f"num_{prefix}": n, **m} for cid, (n, m) in enumerate(zip(weights, scores))]
        metrics = {f"{prefix}_{k}": v for k, v in aggregate_clients(scores, weights).items()}
        metrics["eval_reused"] = float(reused)
        metrics["eval_time"] = time.perf_counter() - start
        return Evaluation(rnd, metrics, per_client)

    def _split_indices(self, cid: int, split: str) -> torch.Tensor:
        idx = getattr(self.ctx.clients[cid], split)
        if idx is None:
            raise ValueError(f"client {cid} has no {split} split; build the algorithm with holdout=True")
        return idx

    def _score(self, pending: list[tuple[int, torch.Tensor, bytes]], indices: list[torch.Tensor]) -> None:
        """Metrics of the pending clients' models on their splits, stored with each model's digest."""
        logits = self.ctx.logits([v for _, v, _ in pending], [indices[cid] for cid, _, _ in pending])
        for (cid, _, key), z in zip(pending, logits):
            probs = torch.softmax(z.float(), dim=1).cpu()
            labels = self.ctx.trainer.data.labels[indices[cid]].cpu()
            self._scores[cid] = (key, classification_metrics(probs, labels, self.schedule.ece_bins))

    def run(self) -> Evaluation:
        """All rounds; returns the final evaluation."""
        final = None
        for rnd in range(1, self.schedule.global_rounds + 1):
            metrics = self.run_round(rnd)
            for cb in self.callbacks:
                cb.on_round_end(rnd, metrics)
            if rnd % self.schedule.eval_gap == 0 or rnd == self.schedule.global_rounds:
                final = self.evaluate(rnd)
                for cb in self.callbacks:
                    cb.on_evaluate(final)
        for cb in self.callbacks:
            cb.on_run_end(final)
        return final
