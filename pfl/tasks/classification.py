"""Classification: int64 class labels, cross-entropy (PFLlib's client loss), and the softmax metrics of
:class:`pfl.federated.evaluation.ClassificationEvaluator` (accuracy, NLL, F-ECE, global ECE, Brier)."""

from __future__ import annotations

from torch import nn

from pfl.federated.evaluation import ClassificationEvaluator, Evaluator
from pfl.tasks import Task


class Classification(Task):
    """Image (and later text and speech) classification; every partition applies, and so do the head methods."""

    name = "classification"
    title = "classification"
    partitions = ("pathological", "dirichlet", "iid", "exdir", "shards", "pfllib", "natural")
    classifier = True
    metrics = ("acc", "nll", "f_ece", "ece_mean", "global_ece", "brier")

    def loss(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def evaluator(self) -> Evaluator:
        return ClassificationEvaluator()
