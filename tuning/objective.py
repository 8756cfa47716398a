"""The objective: one FL run with a trial's hyperparameters, scored on the clients' tuning splits.

Every client holds out the last ``tuning_val_ratio`` of its train split (whatever the
algorithm). The ratio is fixed for a study and searched by no trial, so every trial scores
on the same samples and the pruner compares like with like. FedFomo's own validation split
(``val_ratio``, which may be searched) is carved from the rest; local training uses what
remains. Evaluation reads only the tuning splits (``val/*`` metrics, :mod:`pfl.vocabulary`), never
the test split. Each evaluation round is reported to the trial, so the pruner can stop weak trials
early. Each trial is a nested MLflow run whose id the trial keeps as its ``mlflow_run_id`` user attribute.
"""

from __future__ import annotations

from typing import Any

import optuna

from pfl import vocabulary
from pfl.federated.engine import Callback, Evaluation
from pfl.config import ConfigError, RunConfig
from pfl.data.datasets import CATALOG
from pfl.tasks import task_of
from pfl.train import build_algorithm, prepare, run_rounds
from tuning.spaces import SearchParam, suggest

# validation metric -> Optuna direction: accuracies (also kNN and linear-probe) are maximized, NLL, the ECEs and the Brier score minimized
DIRECTIONS = {vocabulary.metric("val", q): "maximize" if q.endswith("acc") else "minimize"
              for q in vocabulary.QUALITY}
# names of the metrics before the vocabulary (``val_ece`` was F-ECE) -> their names now
OLD_NAMES = {"val_acc": "val/acc", "val_nll": "val/nll", "val_ece": "val/f_ece", "val_brier": "val/brier"}


def validation_metric(name: str) -> str:
    """The tuning metric ``name`` in the vocabulary: a ``val/*`` name as is, an old spelling mapped
    (:data:`OLD_NAMES`: ``val_acc`` -> ``val/acc``, ``val_nll`` -> ``val/nll``, ``val_ece`` -> ``val/f_ece``,
    ``val_brier`` -> ``val/brier``).

    Raises:
        ConfigError: ``name`` is neither (the message lists the valid names and their directions).
    """
    name = OLD_NAMES.get(name, name)
    if name not in DIRECTIONS:
        minimized = ", ".join(m for m, d in DIRECTIONS.items() if d == "minimize")
        raise ConfigError(f"tuning metric {name!r} is not a validation metric; use val/acc (maximized) or "
                          f"{minimized} (minimized)")
    return name


def task_metric(cfg: RunConfig, name: str | None) -> str:
    """The tuning metric of a study on ``cfg``: ``name`` (:func:`validation_metric`), or the dataset's task's headline
    (``val/acc``; viewport prediction: ``val/orthodromic_deg``).

    Raises:
        ConfigError: ``name`` is no validation metric, or one the task does not report (``val/acc`` on a regression);
            the message lists the task's metrics.
    """
    task = task_of(CATALOG[cfg.dataset].task)
    metric = validation_metric(name or vocabulary.metric("val", task.metrics[0]))
    if metric.partition("/")[2] not in task.metrics:
        names = ", ".join(vocabulary.metric("val", m) for m in task.metrics)
        raise ConfigError(f"metric: {metric} is not reported for {cfg.dataset} ({task.title}); use {names}")
    return metric


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
    """Train ``cfg`` (its ``seed``) and return the final ``metric`` (e.g. ``val/acc``) on the tuning splits.

    Raises:
        ConfigError: ``metric`` is not a validation metric (:func:`validation_metric`).
    """
    metric = validation_metric(metric)
    prepared = prepare(cfg)
    algorithm = build_algorithm(prepared, cfg.seed, holdout=True)
    return run_rounds(algorithm, cfg, callbacks, eval_split="holdout").metrics[metric]


def trial_config(base: RunConfig, params: dict[str, Any]) -> RunConfig:
    """``base`` with a trial's params (validated)."""
    return RunConfig(**{**base.model_dump(), **params})


class Objective:
    """``objective(trial) -> validation score`` with every trial a nested MLflow run of the active study run.

    The trial keeps that run's id as its ``mlflow_run_id`` user attribute (shown by optuna-dashboard);
    the run has the trial number as its ``optuna.trial`` tag.

    Args:
        base: the run config the trials modify.
        space: the searched fields.
        metric: validation metric to optimize (``val/acc``, ``val/nll``, ...: :func:`validation_metric`).

    Raises:
        ConfigError: ``metric`` is not a validation metric.
    """

    def __init__(self, base: RunConfig, space: dict[str, SearchParam], metric: str):
        self.base, self.space, self.metric = base, space, validation_metric(metric)

    def __call__(self, trial: optuna.Trial) -> float:
        from pfl import tracking

        params = suggest(trial, self.space, self.base.num_clients)
        cfg = trial_config(self.base, params)
        with tracking.trial_run(trial.number, cfg.flat_params(), pruned=optuna.TrialPruned) as run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
            pruning = PruningCallback(trial, self.metric, cfg.global_rounds)
            return validation_score(cfg, self.metric, [tracking.MLflowCallback(), pruning])
