"""Viewport prediction in 360-degree video: from a viewer's recent head positions, predict a future one.

Inputs are float (B, history, 3) unit vectors of head direction; targets are the position ``horizon`` steps
ahead (B, 3), or the whole horizon (B, 3 * horizon) flattened (TRACK, Romero Rondon et al., PAMI 2021). Local
training minimizes the mean squared error on the unit vectors (as TRACK's full model, ``TRACK_model.py``; its
position-only baseline trains on the orthodromic distance, ``position_only_baseline.py``); evaluation reports ``mse`` and the domain's error, the mean great-circle (orthodromic) distance in
degrees, overall and per horizon step (:func:`pfl.metrics.regression_metrics`). The best round is the one of
lowest orthodromic error. Only label-free partitions apply: one client per viewer (``natural``), or ``iid``.
"""

from __future__ import annotations

from torch import nn

from pfl.federated.evaluation import Evaluator, RegressionEvaluator
from pfl.tasks import Task


class ViewportPrediction(Task):
    """Regression of 3-D head positions; MSE loss, ``mse`` and ``orthodromic_deg`` metrics."""

    name = "viewport"
    title = "viewport prediction, a regression"
    partitions = ("natural", "iid")
    classifier = False
    metrics = ("orthodromic_deg", "mse")

    def loss(self) -> nn.Module:
        return nn.MSELoss()

    def evaluator(self) -> Evaluator:
        return RegressionEvaluator(positions=True)
