"""Evaluators: how the engine scores clients' personalized models on their own splits.

:class:`ClassificationEvaluator` (the default) runs each model on its split and computes
accuracy, NLL, ECE and the Brier score (:func:`pfl.metrics.classification_metrics`), then
summarizes the clients in the names of :mod:`pfl.vocabulary` (``acc``, ``nll``, ``f_ece``,
``ece_mean``, ``global_ece``, ``brier`` and their stds across clients). A self-supervised
algorithm supplies its own :class:`Evaluator` (kNN accuracy, a linear probe) returning its own
metric names; the default :meth:`Evaluator.summarize` aggregates whatever names it returns.

A client's score may carry additive statistics under :data:`POOLED` (name -> list of floats),
which :meth:`Evaluator.summarize` sums over clients for metrics of the pooled predictions (the
global ECE's per-bin gaps). They live in the engine's score cache and checkpoints but are no
per-client metric.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pfl.algorithms.state import State
from pfl.metrics import aggregate_clients, calibration_gaps, classification_metrics, ece_from_gaps
from pfl.models.split import ModelSpec

if TYPE_CHECKING:
    from pfl.algorithms.base import FederatedContext

POOLED = "pooled"  # key of a client score's additive statistics (not a metric)
GLOBAL_ECE_BINS = 15  # uniform bins of the global ECE (Guo et al. 2017), as head runs use by default


def client_metrics(score: dict[str, Any]) -> dict[str, float]:
    """A client score's metrics, without its :data:`POOLED` statistics."""
    return {k: v for k, v in score.items() if k != POOLED}


class Evaluator:
    """Scores models of one architecture, each on its own sample indices."""

    def score(self, ctx: FederatedContext, spec: ModelSpec, states: list[State], indices: list[torch.Tensor],
              ece_bins: int) -> list[dict[str, float]]:
        """One score dict per model: ``states[c]`` (architecture ``spec``) on pool ``indices[c]`` (n_c,):
        metric name -> float, and optionally :data:`POOLED`. ``ece_bins``: bins of calibration metrics."""
        raise NotImplementedError

    def summarize(self, scores: list[dict[str, Any]], weights: list[int]) -> dict[str, float]:
        """The clients' scores as run metrics (names without split prefix): by default every metric's
        ``weights``-weighted mean (``weights``: samples per client) and its unweighted std (``<name>_std``)."""
        return aggregate_clients([client_metrics(s) for s in scores], weights)


class ClassificationEvaluator(Evaluator):
    """Softmax classification metrics per client: ``acc``, ``nll`` (nats), ``ece`` (``ece_bins`` equal-mass bins),
    ``brier``, and the per-bin calibration gaps of the global ECE (:func:`pfl.metrics.calibration_gaps`).

    :meth:`summarize` gives test-sample-weighted ``acc``, ``nll``, ``brier``, ``f_ece`` (F-ECE: the weighted mean
    of client ECEs, Chen et al. AAAI 2024), ``ece_mean`` (their unweighted mean), ``global_ece`` (ECE of all
    clients' predictions pooled, :data:`GLOBAL_ECE_BINS` uniform bins) and the stds across clients
    (``acc_std``, ``nll_std``, ``f_ece_std``: of the client ECEs, ``brier_std``).
    """

    def score(self, ctx: FederatedContext, spec: ModelSpec, states: list[State], indices: list[torch.Tensor],
              ece_bins: int) -> list[dict[str, float]]:
        out = []
        for idx, z in zip(indices, ctx.logits(spec, states, indices)):
            probs, labels = torch.softmax(z.float(), dim=1).cpu(), ctx.runner.data.labels[idx].cpu()
            out.append({**classification_metrics(probs, labels, ece_bins),
                        POOLED: {"gaps": calibration_gaps(probs, labels, GLOBAL_ECE_BINS)}})
        return out

    def summarize(self, scores: list[dict[str, Any]], weights: list[int]) -> dict[str, float]:
        out = super().summarize(scores, weights)
        out["f_ece"], out["f_ece_std"] = out.pop("ece"), out.pop("ece_std")
        out["ece_mean"] = sum(s["ece"] for s in scores) / len(scores)
        gaps = [sum(g) for g in zip(*(s[POOLED]["gaps"] for s in scores))]
        out["global_ece"] = ece_from_gaps(gaps, sum(weights))
        return out
