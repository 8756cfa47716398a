"""Evaluators: how the engine scores clients' personalized models on their own splits.

The run's task (:mod:`pfl.tasks`) picks the evaluator. :class:`ClassificationEvaluator` runs each model on its
split and computes accuracy, NLL, ECE and the Brier score (:func:`pfl.metrics.classification_metrics`), then
summarizes the clients in the names of :mod:`pfl.vocabulary` (``acc``, ``nll``, ``f_ece``, ``ece_mean``,
``global_ece``, ``brier`` and their stds across clients). :class:`RegressionEvaluator` reports ``mse`` and, for 3-D
positions, the great-circle error ``orthodromic_deg`` (overall and per horizon step). A self-supervised algorithm
supplies its own :class:`Evaluator` (kNN accuracy, a linear probe) returning its own metric names; the default
:meth:`Evaluator.summarize` aggregates whatever names it returns.

A client's score may carry additive statistics under :data:`POOLED` (name -> list of floats),
which :meth:`Evaluator.summarize` sums over clients for metrics of the pooled predictions (the
global ECE's per-bin gaps). They live in the engine's score cache and checkpoints but are no
per-client metric.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pfl.federated.state import State, state_digest
from pfl.metrics import (aggregate_clients, calibration_gaps, classification_metrics, ece_from_gaps, knn_accuracy,
                         regression_metrics)
from pfl.models.split import ModelSpec

if TYPE_CHECKING:
    from pfl.federated.base import FederatedContext

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

    def metrics_of(self, outputs: torch.Tensor, targets: torch.Tensor, ece_bins: int) -> dict[str, float]:
        """One model's per-client metrics from its outputs (n, K) and targets on the host (what :meth:`score` gives a
        client, without :data:`POOLED`); :func:`pfl.train.evaluate_client_model` scores a saved model with it."""
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
            probs, labels = torch.softmax(z.float(), dim=1).cpu(), ctx.runner.data.targets[idx].cpu()
            out.append({**classification_metrics(probs, labels, ece_bins),
                        POOLED: {"gaps": calibration_gaps(probs, labels, GLOBAL_ECE_BINS)}})
        return out

    def metrics_of(self, outputs: torch.Tensor, targets: torch.Tensor, ece_bins: int) -> dict[str, float]:
        """:func:`pfl.metrics.classification_metrics` of the softmax of logits (n, K) against labels (n,)."""
        return classification_metrics(torch.softmax(outputs.float(), dim=1), targets, ece_bins)

    def summarize(self, scores: list[dict[str, Any]], weights: list[int]) -> dict[str, float]:
        out = super().summarize(scores, weights)
        out["f_ece"], out["f_ece_std"] = out.pop("ece"), out.pop("ece_std")
        out["ece_mean"] = sum(s["ece"] for s in scores) / len(scores)
        gaps = [sum(g) for g in zip(*(s[POOLED]["gaps"] for s in scores))]
        out["global_ece"] = ece_from_gaps(gaps, sum(weights))
        return out


class RegressionEvaluator(Evaluator):
    """Regression metrics per client (:func:`pfl.metrics.regression_metrics`): ``mse`` (mean over the outputs'
    elements, as ``torch.nn.MSELoss``), and with ``positions`` (targets are 3-D unit vectors, (n, 3 * H) for H
    horizon steps) ``orthodromic_deg``, the mean great-circle error in degrees, with ``orthodromic_deg_h1`` ..
    ``orthodromic_deg_hH`` per step when H > 1. :meth:`summarize` gives each metric's test-sample-weighted mean
    over clients and its std across clients (``mse_std``, ...).

    Args:
        positions: the targets are flattened 3-D positions (viewport prediction).
    """

    def __init__(self, positions: bool = False):
        self.positions = positions

    def score(self, ctx: FederatedContext, spec: ModelSpec, states: list[State], indices: list[torch.Tensor],
              ece_bins: int) -> list[dict[str, float]]:
        targets = ctx.runner.data.targets
        return [self.metrics_of(z.cpu(), targets[idx].cpu(), ece_bins)
                for idx, z in zip(indices, ctx.logits(spec, states, indices))]

    def metrics_of(self, outputs: torch.Tensor, targets: torch.Tensor, ece_bins: int) -> dict[str, float]:
        """:func:`pfl.metrics.regression_metrics` of outputs (n, D) against targets (n, D) (``ece_bins`` unused)."""
        return regression_metrics(outputs.float(), targets.float(), self.positions)


class KNNEvaluator(Evaluator):
    """Self-supervised models' weighted kNN accuracy (``knn_acc``; :func:`pfl.metrics.knn_accuracy`, the standard
    protocol: k=200, cosine, votes weighted by ``exp(similarity / 0.1)``) and, when :attr:`final`, a linear
    probe's accuracy (``linear_acc``, :func:`linear_probe`).

    Each model's features are its base's output (B, D) (for MocoSFL: the client's stem composed with the
    server's trunk, before the projection MLP; the official monitor reads the MLP's output). The bank is
    every client's un-augmented training split, featurized by the same model; each model classifies its
    own indices. The bank (and the probe) of the latest distinct model are kept, so clients synchronized by
    FedAvg share one.

    Args:
        k: neighbours.
        temperature: vote temperature.
        linear_epochs: the probe's epochs over the bank (0: no probe).
        linear_lr: the probe's Adam learning rate.
        seed: the probe's initialization and batch order.
    """

    def __init__(self, k: int = 200, temperature: float = 0.1, linear_epochs: int = 0, linear_lr: float = 1e-3,
                 seed: int = 0):
        self.k, self.temperature = k, temperature
        self.linear_epochs, self.linear_lr, self.seed = linear_epochs, linear_lr, seed
        self.final = False  # set by the algorithm: the last round's evaluation also trains the linear probe
        self._bank: tuple[bytes, torch.Tensor, nn.Linear | None] | None = None

    def score(self, ctx: FederatedContext, spec: ModelSpec, states: list[State], indices: list[torch.Tensor],
              ece_bins: int) -> list[dict[str, float]]:
        data = ctx.runner.data
        bank_idx = torch.cat([c.fit for c in ctx.clients])
        probe = self.final and self.linear_epochs > 0
        out = []
        for state, idx in zip(states, indices):
            digest = state_digest(state)
            if self._bank is None or self._bank[0] != digest or (probe and self._bank[2] is None):
                bank = base_features(ctx, spec, state, bank_idx)
                classifier = linear_probe(bank, data.targets[bank_idx], data.num_classes, self.linear_epochs,
                                          self.linear_lr, self.seed) if probe else None
                self._bank = (digest, bank, classifier)
            _, bank, classifier = self._bank
            queries = base_features(ctx, spec, state, idx)
            labels = data.targets[idx]
            score = {"knn_acc": knn_accuracy(bank, data.targets[bank_idx], queries, labels, data.num_classes,
                                             self.k, self.temperature)}
            if probe:
                with torch.no_grad():
                    score["linear_acc"] = (classifier(queries).argmax(1) == labels).float().mean().item()
            out.append(score)
        return out


def linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int, lr: float = 1e-3,
                 seed: int = 0, batch_size: int = 128) -> nn.Linear:
    """A linear classifier trained on frozen features (the linear evaluation protocol; MocoSFL's ``linear_eval``):
    ``Linear(D, K)`` with Xavier-uniform weights and zero bias, Adam at ``lr``, cross-entropy, ``epochs`` passes
    over shuffled batches of ``batch_size``.

    Args:
        features: (N, D) float features on any device.
        labels: (N,) int64 labels in [0, K).
        num_classes: K.
        epochs: passes over the features.
        seed: initialization and batch order.

    Returns:
        the classifier, on the features' device.
    """
    gen = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(features.shape[1], num_classes).to(features.device)
    with torch.no_grad():
        classifier.weight.copy_(nn.init.xavier_uniform_(torch.empty_like(classifier.weight, device="cpu"),
                                                        generator=gen))
        classifier.bias.zero_()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=gen).to(features.device)
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                loss = nn.functional.cross_entropy(classifier(features[batch]), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return classifier


@torch.inference_mode()
def base_features(ctx: FederatedContext, spec: ModelSpec, state: State, indices: torch.Tensor) -> torch.Tensor:
    """The base's output (n, D) of the model ``state`` (architecture ``spec``) on pool ``indices`` (n,), un-augmented,
    in eval mode, in inference batches."""
    runner = ctx.runner
    model = runner.load(spec, state).eval()
    step = runner.eval_batch_size
    return torch.cat([model.base(runner.data.batch(indices[i:i + step])[0]).float()
                      for i in range(0, len(indices), step)])
