"""The single round loop shared by every algorithm.

Round r (1-based): sample ``num_join_clients`` clients without replacement, ask the
algorithm where each sampled client starts, train each
locally, let the algorithm aggregate, and every ``eval_gap`` rounds (and after the
last) evaluate every client's personalized model on its own test split. Observers (MLflow logging, progress
bars, pruning) are :class:`Callback` objects; the engine imports neither mlflow
nor optuna.
"""

from __future__ import annotations

import math
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from pfl.federated.base import Algorithm
from pfl.federated.evaluation import client_metrics
from pfl.federated.checkpoint import Checkpointer
from pfl.federated.local import FitRes
from pfl.federated.state import State, state_bytes, state_digest
from pfl.federated.vectorized import train_vectorized, vectorizable
from pfl.models.split import ModelSpec
from pfl.seed import derive_seed, rng_state, set_rng_state


@dataclass(frozen=True)
class Evaluation:
    """Evaluation of all clients' personalized models after a round.

    Attributes:
        round: the global round just finished (1-based).
        metrics: the evaluator's summary of the clients (:meth:`Evaluator.summarize`), named as in
            :mod:`pfl.vocabulary`: ``test/acc``, ``test/nll``, ``test/f_ece``, ``test/ece_mean``,
            ``test/global_ece``, ``test/brier`` and stds across clients (``test/acc_std``, ...); ``val/*``
            when scoring the tuning splits; in a run that mixes architectures the summary per architecture
            (``test/acc_vgg11``, ...); ``time/eval`` (seconds) and ``eval/reused``.
        per_client: one dict per client: ``client``, ``architecture``, ``num_test`` (or ``num_val``) and
            its metrics (``acc``, ``nll``, ``ece``, ``brier``).
    """

    round: int
    metrics: dict[str, float]
    per_client: list[dict[str, float]] = field(default_factory=list)


_METRIC_GROUP = {"test": "test", "holdout": "val"}  # evaluated split -> metric group (pfl.vocabulary)


class RunInterrupted(Exception):
    """A stop signal (SIGINT, SIGTERM) arrived: the run stopped after round ``round``, checkpointed."""

    def __init__(self, signum: int, rnd: int):
        super().__init__(f"stopped by signal {signum} after round {rnd}")
        self.signum, self.round = signum, rnd
        self.run_id: str | None = None  # set by the tracked job that ran it


class DivergenceError(ValueError):
    """A round's training loss is not finite (the run diverged)."""


class Callback:
    """Observer of a federated run; override any hook. Raising from a hook aborts the run.

    Callbacks with state that must survive a resume (MLflow logging's best round) return it from
    :meth:`state_dict` as JSON; checkpoints keep it by class name.
    """

    def state_dict(self) -> dict:
        """JSON state to checkpoint (default: none)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""

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
    ``val_*`` metrics), which never reads the test split. With clients held out (the context's ``new_clients``),
    each test evaluation (or the last only: ``new_client_eval="final"``) adapts them for ``finetune_epochs``."""

    global_rounds: int
    num_join_clients: int
    eval_gap: int = 1
    ece_bins: int = 20
    eval_split: str = "test"  # "holdout" scores the clients' tuning splits (hyperparameter search)
    finetune_epochs: int = 0  # new-client evaluation: the epochs each held-out client adapts for
    new_client_eval: str = "every"  # new-client evaluation at every evaluation, or "final": after the last round


class PeakMemory:
    """The peak memory of a stretch of work on ``device``, in MiB: on CUDA the most memory torch allocated
    since construction (``torch.cuda.max_memory_allocated``, reset at construction); elsewhere the process's
    peak resident set so far (``ru_maxrss``, which never decreases)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def peak_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Engine:
    """Runs an :class:`Algorithm` for ``schedule.global_rounds`` rounds.

    Args:
        algorithm: the federated algorithm (holds the context: clients, runner, seed).
        schedule: rounds, participation and evaluation cadence.
        callbacks: observers, called in order.
        checkpointer: where and how often the complete run state is saved (``None``: never).
        stop: returns the number of a stop signal that arrived (``None``: none); checked after every
            round, which then ends with a checkpoint and :class:`RunInterrupted`.
    """

    def __init__(self, algorithm: Algorithm, schedule: Schedule, callbacks: list[Callback] | None = None,
                 checkpointer: Checkpointer | None = None, stop: Callable[[], int | None] | None = None):
        self.algorithm = algorithm
        self.ctx = algorithm.ctx
        self.schedule = schedule
        self.callbacks = callbacks or []
        self.checkpointer = checkpointer
        self.stop = stop
        self.last: Evaluation | None = None  # the latest evaluation
        # model set ("": the personalized models, else an extra_models() name) -> client -> (model digest, metrics)
        self._scores: dict[str, dict[int, tuple[bytes, dict[str, float]]]] = {"": {}}
        self._bytes_down = 0  # bytes of the model states sent to the current round's clients

    def sample_clients(self, rnd: int) -> list[int]:
        """Sorted ids of the clients taking part in round ``rnd`` (uniform, without replacement, among the clients
        that train: :attr:`~pfl.federated.base.FederatedContext.train_clients`)."""
        rng = np.random.default_rng(derive_seed(self.ctx.seed, "client_sampling", rnd))
        pool = np.array(self.ctx.train_clients)  # with none held out, the same draws as choice(num_clients, ...)
        return sorted(rng.choice(pool, self.schedule.num_join_clients, replace=False).tolist())

    def fit_clients(self, selected: list[int], rnd: int) -> list[FitRes]:
        """Configure and locally train the selected clients (the default round's client side).

        Sequential: one client at a time through the algorithm's local update. Vectorized: the
        clients of each architecture train as one batched computation (:mod:`pfl.federated.vectorized`)
        when it qualifies, else sequentially.
        """
        ins = {cid: self.algorithm.configure_fit(cid, rnd) for cid in selected}
        indices = {cid: self.ctx.clients[cid].fit if ins[cid].indices is None else ins[cid].indices
                   for cid in selected}
        seeds = {cid: derive_seed(self.ctx.seed, "local_batches", rnd, cid) for cid in selected}
        update = self.algorithm.local_update
        trained: dict[int, tuple[State, torch.Tensor]] = {}
        if self.ctx.client_parallelism == "vectorized":
            for spec in dict.fromkeys(self.ctx.specs[cid] for cid in selected):
                group = [cid for cid in selected if self.ctx.specs[cid] == spec]
                model = self.ctx.runner.models[spec]
                if vectorizable(model, update, self.ctx.runner.data, [indices[c] for c in group]):
                    out = train_vectorized(model, self.ctx.runner.data, update, [ins[c].state for c in group],
                                           [indices[c] for c in group], [seeds[c] for c in group])
                    trained.update(zip(group, out))
        for cid in selected:
            if cid not in trained:
                model = self.ctx.runner.load(self.ctx.specs[cid], ins[cid].state)
                trained[cid] = update.fit(model, self.ctx.runner.data, ins[cid], indices[cid], seeds[cid])
        self._bytes_down += sum(state_bytes(ins[cid].state if ins[cid].sent is None else ins[cid].sent)
                                for cid in selected)
        return [FitRes(cid, trained[cid][0], len(indices[cid]), trained[cid][1]) for cid in selected]

    def run_round(self, rnd: int) -> dict[str, float]:
        """One round; returns ``train/loss`` (sample-weighted mean over the round's clients), ``train/samples``
        (the round's clients' training samples), seconds: ``time/round`` = ``time/local`` (round
        starting points and local training) + ``time/aggregate`` (server update, FedALA's ALA), the bytes of
        model state that travelled, summed over the round's clients (``comm/bytes_down``: the states of their
        :class:`FitIns`, or what of them travelled (``FitIns.sent``); ``comm/bytes_up``: what of their :class:`FitRes`
        travelled, :meth:`~pfl.federated.base.Algorithm.upload`), the peak memory (``memory/peak_mb``,
        :class:`PeakMemory`), and the algorithm's :meth:`~pfl.federated.base.Algorithm.round_metrics`."""
        start = time.perf_counter()
        local = 0.0
        self._bytes_down = 0
        memory = PeakMemory(self.ctx.runner.data.device)

        def fit(selected: list[int], r: int) -> list[FitRes]:
            nonlocal local
            t = time.perf_counter()
            results = self.fit_clients(selected, r)
            local += time.perf_counter() - t
            return results

        results = self.algorithm.run_round(rnd, self.sample_clients(rnd), fit)
        losses = torch.stack([r.loss for r in results]).double().cpu()  # one host sync per round
        samples = torch.tensor([r.num_samples for r in results], dtype=torch.float64)
        bytes_up = sum(state_bytes(self.algorithm.upload(r)) for r in results)
        end = time.perf_counter()
        return {"train/loss": float((losses * samples).sum() / samples.sum()), "train/samples": float(samples.sum()),
                "time/round": end - start, "time/local": local, "time/aggregate": end - start - local,
                "comm/bytes_down": float(self._bytes_down), "comm/bytes_up": float(bytes_up),
                "memory/peak_mb": memory.peak_mb(), **self.algorithm.round_metrics()}

    def evaluate(self, rnd: int) -> Evaluation:
        """Every client's personalized model on its own ``eval_split``; aggregates weighted by its sample counts.

        A client whose model is bit-identical to the one scored at its previous evaluation (a
        FedFomo client that did not take part since) keeps those scores: the same model on the
        same samples gives the same metrics, so only changed models are run: one at a time, or
        ``num_join_clients`` of one architecture at a time as one batched computation when vectorized.
        Adds ``time/eval`` (seconds) and ``eval/reused`` (clients whose scores were kept) to the metrics,
        and in a run that mixes architectures the summary per architecture (``test/acc_vgg11``, ...). The
        algorithm's :meth:`~pfl.federated.base.Algorithm.extra_models` are scored the same way and logged under
        their name (``finetuned/acc``; ``finetuned/val_acc`` on the tuning splits), per client as ``finetuned_acc``.

        Raises:
            ValueError: ``eval_split="holdout"`` but the clients hold no tuning split.
        """
        start = time.perf_counter()
        split = self.schedule.eval_split
        ids = self.ctx.train_clients
        indices = {cid: self._split_indices(cid, split) for cid in ids}
        weights = [len(indices[cid]) for cid in ids]
        group = _METRIC_GROUP[split]
        names = [self.ctx.specs[cid].name for cid in ids]
        scores, reused = self._scores_of("", self.algorithm.personalized_state, indices)
        per_client = [{"client": cid, "architecture": name, f"num_{group}": n, **client_metrics(m)}
                      for cid, name, n, m in zip(ids, names, weights, scores)]
        metrics = self._summary(f"{group}/", scores, weights, names)
        for name, state_of in self.algorithm.extra_models().items():
            extra, _ = self._scores_of(name, state_of, indices)
            metrics.update(self._summary(f"{name}/" if split == "test" else f"{name}/val_", extra, weights, names))
            for row, m in zip(per_client, extra):
                row.update({f"{name}_{k}": v for k, v in client_metrics(m).items()})
        if self.ctx.new_clients and split == "test" and (self.schedule.new_client_eval == "every"
                                                          or rnd == self.schedule.global_rounds):
            metrics.update(self.evaluate_new_clients(rnd))
        metrics["eval/reused"] = float(reused)
        metrics["time/eval"] = time.perf_counter() - start
        return Evaluation(rnd, metrics, per_client)

    def evaluate_new_clients(self, rnd: int) -> dict[str, float]:
        """New-client evaluation after round ``rnd``: every held-out client adapts the algorithm's state for
        ``finetune_epochs`` (:meth:`~pfl.federated.base.Algorithm.adapt`, its batch order seeded per round and
        client) and the adapted model is scored on its test split; returns the evaluator's summary under ``new/``
        (``new/acc``, ``new/f_ece``, ...; per architecture in a mixed run). Nothing is cached: the adaptation is
        rerun at each evaluation, and the algorithm's state is untouched."""
        ids = list(self.ctx.new_clients)
        states = {cid: self.algorithm.adapt(cid, self.schedule.finetune_epochs,
                                            derive_seed(self.ctx.seed, "new_client_batches", rnd, cid))
                  for cid in ids}
        scores: dict[int, dict] = {}
        for spec in dict.fromkeys(self.ctx.specs[cid] for cid in ids):
            group = [cid for cid in ids if self.ctx.specs[cid] == spec]
            results = self.algorithm.evaluator.score(self.ctx, spec, [states[c] for c in group],
                                                     [self.ctx.clients[c].test for c in group], self.schedule.ece_bins)
            scores.update(zip(group, results))
        return self._summary("new/", [scores[c] for c in ids], [len(self.ctx.clients[c].test) for c in ids],
                             [self.ctx.specs[c].name for c in ids])

    def _scores_of(self, models: str, state_of: Callable[[int], State],
                   indices: dict[int, torch.Tensor]) -> tuple[list[dict], int]:
        """Every training client's score of model set ``models`` (``state_of(client)``) on its ``indices``,
        re-running only the models whose digest changed since their last score; returns the scores in the order of
        :attr:`~pfl.federated.base.FederatedContext.train_clients` and how many were kept."""
        cache = self._scores.setdefault(models, {})
        pending: dict[ModelSpec, list] = defaultdict(list)  # architecture -> [(client, state, digest)]
        reused = 0
        for cid in indices:
            spec = self.ctx.specs[cid]
            state = state_of(cid)
            key = state_digest(state)
            if cache.get(cid, (None,))[0] == key:
                reused += 1
                continue
            pending[spec].append((cid, state, key))
            if len(pending[spec]) == (self.ctx.num_join_clients if self.ctx.batched(spec) else 1):
                self._score(cache, spec, pending.pop(spec), indices)
        for spec, items in pending.items():
            self._score(cache, spec, items, indices)
        return [cache[cid][1] for cid in indices], reused

    def _summary(self, prefix: str, scores: list[dict], weights: list[int], names: list[str]) -> dict[str, float]:
        """``<prefix><metric>``: the evaluator's summary of the clients, and per architecture in a mixed run."""
        summarize = self.algorithm.evaluator.summarize
        metrics = {f"{prefix}{k}": v for k, v in summarize(scores, weights).items()}
        for arch in dict.fromkeys(names) if len(set(names)) > 1 else ():
            clients = [c for c, n in enumerate(names) if n == arch]
            summary = summarize([scores[c] for c in clients], [weights[c] for c in clients])
            metrics.update({f"{prefix}{k}_{arch}": v for k, v in summary.items() if not k.endswith("_std")})
        return metrics

    def _split_indices(self, cid: int, split: str) -> torch.Tensor:
        idx = getattr(self.ctx.clients[cid], split)
        if idx is None:
            raise ValueError(f"client {cid} has no {split} split; build the algorithm with holdout=True")
        return idx

    def _score(self, cache: dict, spec: ModelSpec, pending: list[tuple[int, State, bytes]],
               indices: dict[int, torch.Tensor]) -> None:
        """Metrics of the pending clients' models (architecture ``spec``) on their splits, stored in ``cache`` with
        each digest."""
        results = self.algorithm.evaluator.score(self.ctx, spec, [s for _, s, _ in pending],
                                                 [indices[cid] for cid, _, _ in pending], self.schedule.ece_bins)
        for (cid, _, key), metrics in zip(pending, results):
            cache[cid] = (key, metrics)

    def run(self, start_round: int = 1) -> Evaluation:
        """Rounds ``start_round`` .. ``global_rounds`` (after :meth:`restore`, the checkpoint's next round);
        returns the final evaluation.

        Raises:
            DivergenceError: a round's training loss is not finite (before its metrics reach any callback).
            RunInterrupted: a stop signal arrived; the round it arrived in was finished and checkpointed.
        """
        last = self.schedule.global_rounds
        for rnd in range(start_round, last + 1):
            metrics = self.run_round(rnd)
            if not math.isfinite(metrics["train/loss"]):
                raise DivergenceError(f"round {rnd}: the training loss is {metrics['train/loss']} (the run "
                                      "diverged); lower lr, e.g. to a tenth")
            for cb in self.callbacks:
                cb.on_round_end(rnd, metrics)
            if rnd % self.schedule.eval_gap == 0 or rnd == last:
                self.last = self.evaluate(rnd)
                for cb in self.callbacks:
                    cb.on_evaluate(self.last)
            signum = self.stop() if self.stop else None
            if self.checkpointer is not None and (signum or self.checkpointer.due(rnd, last)):
                self.checkpointer.save(*self.snapshot(rnd))
            if signum:
                raise RunInterrupted(signum, rnd)
        for cb in self.callbacks:
            cb.on_run_end(self.last)
        return self.last

    def snapshot(self, rnd: int) -> tuple[dict[str, torch.Tensor], dict]:
        """The complete run state after round ``rnd`` as named tensors plus JSON: the algorithm's server and
        client state, every global generator, the evaluation cache, the latest evaluation and the callbacks'."""
        algo_tensors, algo_meta = self.algorithm.state_dict()
        rng_tensors, rng_meta = rng_state()
        tensors = {**{f"algorithm/{k}": v for k, v in algo_tensors.items()}, **rng_tensors}
        meta = {"round": rnd, "algorithm": algo_meta, "rng": rng_meta,
                "scores": {models: {str(cid): [key.hex(), m] for cid, (key, m) in cache.items()}
                           for models, cache in self._scores.items()},
                "last_evaluation": asdict(self.last) if self.last else None,
                "callbacks": {type(cb).__name__: cb.state_dict() for cb in self.callbacks}}
        return tensors, meta

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> int:
        """Load a :meth:`snapshot` (into an engine built from the same config and seed); returns the next round."""
        prefix = "algorithm/"
        self.algorithm.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                       meta["algorithm"])
        set_rng_state(tensors, meta["rng"])
        saved = meta["scores"]
        if any(isinstance(v, list) for v in saved.values()):  # a checkpoint from before extra_models(): one set
            saved = {"": saved}
        self._scores = {models: {int(cid): (bytes.fromhex(key), m) for cid, (key, m) in cache.items()}
                        for models, cache in saved.items()}
        self.last = Evaluation(**meta["last_evaluation"]) if meta["last_evaluation"] else None
        for cb in self.callbacks:
            cb.load_state_dict(meta["callbacks"].get(type(cb).__name__, {}))
        return meta["round"] + 1
