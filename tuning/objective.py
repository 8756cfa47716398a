"""The objective: one FL run with a trial's hyperparameters, scored on the clients' tuning splits.

Every client holds out the last ``tuning_val_ratio`` of its train split (whatever the
algorithm). The ratio is fixed for a study and searched by no trial, so every trial scores
on the same samples and the pruner compares like with like. FedFomo's own validation split
(``val_ratio``, which may be searched) is carved from the rest; local training uses what
remains. Evaluation reads only the tuning splits (``val_*`` metrics), never the test split.
Each evaluation round is reported to the trial, so the pruner can stop weak trials early.
"""

from __future__ import annotations

from typing import Any

import optuna

from pfl.algorithms.engine import Callback, Evaluation
from pfl.config import RunConfig
from pfl.train import build_algorithm, prepare, run_rounds
from tuning.spaces import SearchParam, suggest


class PruningCallback(Callback):
    """Reports ``metric`` of every evaluation to the trial and raises ``TrialPruned`` when the pruner says so.

    The last round is reported but never pruned: the trial has done all its work by then.
    """

    def __init__(self, trial: optuna.Trial, metric: str, last_round: int):
        self.trial, self.metric, self.last_round = trial, metric, last_round

    def on_evaluate(self, evaluation: Evaluation) -> None:
        self.trial.report(evaluation.metrics[self.metric], evaluation.round)
        if evaluation.round < self.last_round and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after round {evaluation.round}")


def validation_score(cfg: RunConfig, metric: str, callbacks: list[Callback]) -> float:
    """Train ``cfg`` (its ``seed``) and return the final ``metric`` (e.g. ``val_acc``) on the validation splits.

    Raises:
        ValueError: ``metric`` is not a validation metric (``val_*``).
    """
    if not metric.startswith("val_"):
        raise ValueError(f"tuning scores validation splits only; use a val_* metric, not {metric!r}")
    prepared = prepare(cfg)
    algorithm = build_algorithm(prepared, cfg.seed, holdout=True)
    return run_rounds(algorithm, cfg, callbacks, eval_split="holdout").metrics[metric]


def trial_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """``base`` with a trial's params (validated)."""
    return RunConfig(**{**base.model_dump(), **params})


class Objective:
    """``objective(trial) -> validation score`` with every trial a nested MLflow run of the active study run.

    Args:
        base: the run config the trials modify.
        space: the searched fields.
        metric: validation metric to optimize (``val_acc``, ``val_nll``, ...).
    """

    def __init__(self, base: RunConfig, space: dict[str, SearchParam], metric: str):
        self.base, self.space, self.metric = base, space, metric

    def __call__(self, trial: optuna.Trial) -> float:
        from pfl import tracking

        params = suggest(trial, self.space, self.base.num_clients)
        cfg = trial_config(self.base, params)
        with tracking.trial_run(trial.number, cfg.flat_params(), pruned=optuna.TrialPruned):
            pruning = PruningCallback(trial, self.metric, cfg.global_rounds)
            return validation_score(cfg, self.metric, [tracking.MLflowCallback(), pruning])
