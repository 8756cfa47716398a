"""Tasks: what a run's targets are for. A task owns the loss of local training, the evaluator and its metrics (whose
headline, :func:`pfl.vocabulary.headline`, picks the best round), and which partitions and head methods apply; one
module per task.

* ``classification`` (:mod:`.classification`): int64 class labels; cross-entropy; accuracy, NLL, F-ECE, Brier.
* ``viewport`` (:mod:`.viewport`): 360-degree viewport prediction, a regression on 3-D unit vectors; MSE, and the
  great-circle (orthodromic) error in degrees.

A dataset names its task (:attr:`pfl.data.datasets.Dataset.task`); the run, the local update, the evaluator and
the reports take it from there.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pfl.federated.evaluation import Evaluator


class Task:
    """The contract of a task.

    Class attributes:
        name: registry name (:data:`pfl.data.datasets.TASKS`).
        title: the task in messages (``viewport prediction, a regression``).
        partitions: the partition schemes that apply (Dirichlet and pathological need class labels).
        classifier: whether the models are classifiers, so that APH, LoRAPH and OOD detection apply.
        metrics: the quality metrics its evaluator reports (:data:`pfl.vocabulary.QUALITY`), the headline first:
            what a hyperparameter search may optimize.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    partitions: ClassVar[tuple[str, ...]] = ()
    classifier: ClassVar[bool] = False
    metrics: ClassVar[tuple[str, ...]] = ()

    def loss(self) -> nn.Module:
        """The minibatch objective of local training: ``loss(outputs (B, D), targets)`` -> 0-d mean."""
        raise NotImplementedError

    def evaluator(self) -> Evaluator:
        """How the engine scores a client's model on its split (per-client metrics and their summary)."""
        raise NotImplementedError


def task_of(name: str) -> Task:
    """The task registered as ``name``.

    Raises:
        KeyError: unknown task.
    """
    from pfl.tasks.classification import Classification
    from pfl.tasks.viewport import ViewportPrediction

    return {cls.name: cls for cls in (Classification, ViewportPrediction)}[name]()
