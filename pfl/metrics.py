"""Classification, reliability and regression metrics, shared by FL evaluation and head methods.

All functions take predicted class probabilities ``probs`` (N, K) (rows sum to 1;
softmax outputs or an ensemble's mean of softmaxes) and integer ``labels`` (N,).

* ECE (Guo et al., ICML 2017; Naeini et al., AAAI 2015): confidences (max prob)
  are binned, ECE = sum_b |B_b|/N * |acc(B_b) - conf(B_b)|. ``adaptive`` bins hold
  equal numbers of samples (equal-mass, Nixon et al., CVPR-W 2019); ``uniform``
  bins split [0, 1] evenly.
* F-ECE (Chen et al., AAAI 2024, "Watch Your Head", Sec. 5): the mean of per-client
  ECE weighted by test samples, i.e. :func:`weighted_mean` of client ECEs.
* Global ECE: ECE of all clients' predictions pooled, 15 uniform bins (Guo et al.'s setting).
* OOD detection (Hendrycks & Gimpel, ICLR 2017): maximum softmax probability and negative
  entropy as in-distribution scores; AUROC and AUPR (torchmetrics) with in-distribution positive.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_EPS = 1e-12


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose argmax class equals the label, in [0, 1]."""
    return (probs.argmax(dim=1) == labels).float().mean().item()


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class, in nats (probabilities clamped at 1e-12)."""
    p_true = probs.gather(1, labels.view(-1, 1)).squeeze(1)
    return -(p_true.clamp_min(_EPS).log()).mean().item()


def brier(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over samples of the squared L2 distance between probs and the one-hot label, in [0, 2]."""
    onehot = torch.nn.functional.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(dim=1).mean().item()


def _bin_ids(conf: torch.Tensor, n_bins: int, binning: str) -> torch.Tensor:
    n = len(conf)
    if binning == "adaptive":
        order = torch.argsort(conf, stable=True)
        ids = torch.empty(n, dtype=torch.long)
        # equal-mass bins: sample at rank r goes to bin floor(r * n_bins / n)
        ids[order] = torch.arange(n) * n_bins // n
        return ids
    if binning == "uniform":
        # bins (b/n_bins, (b+1)/n_bins]; confidence 0 falls into bin 0
        return (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    raise ValueError(f"unknown binning {binning!r}; use 'adaptive' or 'uniform'")


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 20, binning: str = "adaptive") -> float:
    """Expected calibration error with ``n_bins`` bins (default: 20 equal-mass bins), in [0, 1].

    Raises:
        ValueError: unknown ``binning`` or empty input.
    """
    if len(labels) == 0:
        raise ValueError("ECE of an empty set is undefined")
    probs, labels = probs.detach().double().cpu(), labels.cpu()
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    ids = _bin_ids(conf, n_bins, binning)
    count = torch.bincount(ids, minlength=n_bins).double()
    gap = torch.bincount(ids, weights=correct - conf, minlength=n_bins)
    return (gap.abs().sum() / count.sum()).item()


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """Per-bin statistics of a reliability diagram with ``n_bins`` uniform confidence bins (Guo et al. 2017, Fig. 1).

    Returns:
        JSON-ready ``{"n_bins", "confidence", "accuracy", "count"}``: mean confidence and accuracy
        of each bin (``None`` for empty bins) and its sample count. ECE = sum_b count_b / N *
        |accuracy_b - confidence_b|, equal to :func:`ece` with ``binning="uniform"``.
    """
    probs, labels = probs.detach().double().cpu(), labels.cpu()
    conf, pred = probs.max(dim=1)
    ids = _bin_ids(conf, n_bins, "uniform")
    count = torch.bincount(ids, minlength=n_bins).double()
    conf_sum = torch.bincount(ids, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(ids, weights=(pred == labels).double(), minlength=n_bins)

    def mean(total: torch.Tensor) -> list[float | None]:
        return [t / c if c else None for t, c in zip(total.tolist(), count.tolist())]

    return {"n_bins": n_bins, "confidence": mean(conf_sum), "accuracy": mean(acc_sum),
            "count": [int(c) for c in count.tolist()]}


def calibration_gaps(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> list[float]:
    """Per uniform confidence bin, the sum over its samples of ``correct - confidence`` (``n_bins`` floats).

    Additive over disjoint sample sets, so the gaps of several clients sum to those of their pooled
    predictions, and :func:`ece_from_gaps` of the sum is the global ECE: equal to :func:`ece` of the
    pooled ``probs`` with ``binning="uniform"``, without holding the pooled predictions.
    """
    probs, labels = probs.detach().double().cpu(), labels.cpu()
    conf, pred = probs.max(dim=1)
    ids = _bin_ids(conf, n_bins, "uniform")
    return torch.bincount(ids, weights=(pred == labels).double() - conf, minlength=n_bins).tolist()


def ece_from_gaps(gaps: Sequence[float], num_samples: int) -> float:
    """ECE = sum_b |gap_b| / N from per-bin gaps (:func:`calibration_gaps`, summed over clients) and N samples."""
    if num_samples <= 0:
        raise ValueError("ECE of an empty set is undefined")
    return sum(abs(g) for g in gaps) / num_samples


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 20) -> dict[str, float]:
    """``acc``, ``nll``, ``ece`` (adaptive, ``n_bins``) and ``brier`` of one set of predictions."""
    return {"acc": accuracy(probs, labels), "nll": nll(probs, labels),
            "ece": ece(probs, labels, n_bins), "brier": brier(probs, labels)}


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """``sum(w * v) / sum(w)``; with client ECEs and test-sample weights this is F-ECE.

    Raises:
        ValueError: lengths differ or the weights sum to zero.
    """
    if len(values) != len(weights):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must sum to a positive number")
    return sum(v * w for v, w in zip(values, weights)) / total


def aggregate_clients(per_client: Sequence[dict[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """Test-sample-weighted means of every metric, plus the unweighted std across clients (``<name>_std``).

    Args:
        per_client: one dict of metric name -> value per client (same keys).
        weights: test samples per client.
    """
    out: dict[str, float] = {}
    for name in per_client[0]:
        values = torch.tensor([m[name] for m in per_client], dtype=torch.float64)
        out[name] = weighted_mean(values.tolist(), weights)
        out[f"{name}_std"] = values.std(unbiased=False).item() if len(values) > 1 else 0.0
    return out


def reliability_summary(per_client: Sequence[dict[str, float]], weights: Sequence[float], pooled_probs: torch.Tensor,
                        pooled_labels: torch.Tensor, global_bins: int = 15) -> dict[str, float]:
    """The head-run summary of per-client metrics (keys ``acc``, ``nll``, ``ece``, ``brier``).

    Returns:
        ``acc``, ``nll``, ``brier``: test-sample-weighted means over clients (equal to the pooled values);
        ``ece_mean``: unweighted mean of the client ECEs; ``f_ece``: their test-sample-weighted mean
        (F-ECE, Chen et al. 2024); ``global_ece``: ECE of the pooled predictions (N, K) with
        ``global_bins`` uniform bins (the names of :mod:`pfl.vocabulary`).
    """
    out = {name: weighted_mean([m[name] for m in per_client], weights) for name in ("acc", "nll", "brier")}
    eces = [m["ece"] for m in per_client]
    out["ece_mean"] = sum(eces) / len(eces)
    out["f_ece"] = weighted_mean(eces, weights)
    out["global_ece"] = ece(pooled_probs, pooled_labels, global_bins, "uniform")
    return out


# ---------------------------------------------------------------- out-of-distribution detection
# Scores follow Hendrycks & Gimpel (ICLR 2017, "A Baseline for Detecting Misclassified and Out-of-Distribution
# Examples"): a higher score means "more in-distribution". Metrics treat in-distribution as the positive class.


def max_softmax_probability(probs: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability (MSP) of each row of ``probs`` (N, K) -> (N,), in [1/K, 1]."""
    return probs.max(dim=1).values


def negative_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Negative predictive entropy ``sum_k p_k log p_k`` of each row of ``probs`` (N, K) -> (N,), in nats, <= 0.

    ``0 log 0`` counts as 0 (``torch.special.entr``).
    """
    return -torch.special.entr(probs.double()).sum(dim=1)


OOD_SCORES = {"msp": max_softmax_probability, "entropy": negative_entropy}


def detection_auroc_aupr(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> tuple[float, float]:
    """AUROC and AUPR of separating in-distribution (positive class) from OOD samples by a score.

    Computed by torchmetrics (``binary_auroc``: trapezoidal ROC area, tied scores count 1/2;
    ``binary_average_precision``: AUPR as average precision, sum over thresholds of
    (R_t - R_{t-1}) P_t, as scikit-learn's ``average_precision_score``). torchmetrics reads scores
    outside [0, 1] as logits and applies a sigmoid, so scores are first min-max rescaled to [0, 1]
    in float64: an increasing affine map, which changes neither metric.

    Args:
        id_scores: (N_id,) scores of in-distribution samples (higher = more in-distribution).
        ood_scores: (N_ood,) scores of OOD samples.

    Returns:
        ``(auroc, aupr)``, both in [0, 1]; AUROC 1 when every ID score exceeds every OOD score,
        0 when every one is below, 0.5 for chance.

    Raises:
        ValueError: either set is empty.
    """
    if len(id_scores) == 0 or len(ood_scores) == 0:
        raise ValueError(f"OOD detection needs samples of both sets, got {len(id_scores)} ID and "
                         f"{len(ood_scores)} OOD scores")
    from pfl._torchvision import import_torchvision

    import_torchvision()  # torchmetrics imports torchvision, whose CPU import needs the shim
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    scores = torch.cat([id_scores.detach().cpu().double().flatten(), ood_scores.detach().cpu().double().flatten()])
    span = scores.max() - scores.min()
    scores = (scores - scores.min()) / span if span > 0 else torch.full_like(scores, 0.5)
    target = torch.cat([torch.ones(len(id_scores)), torch.zeros(len(ood_scores))]).long()
    return binary_auroc(scores, target).item(), binary_average_precision(scores, target).item()


def ood_detection(id_probs: torch.Tensor, ood_probs: torch.Tensor) -> dict[str, float]:
    """``auroc_<score>`` and ``aupr_<score>`` for every score of :data:`OOD_SCORES` (``msp``, ``entropy``).

    Args:
        id_probs: (N_id, K) predicted probabilities on in-distribution samples (the positive class).
        ood_probs: (N_ood, K) predicted probabilities on OOD samples.

    Raises:
        ValueError: either set is empty.
    """
    out = {}
    for name, score in OOD_SCORES.items():
        out[f"auroc_{name}"], out[f"aupr_{name}"] = detection_auroc_aupr(score(id_probs), score(ood_probs))
    return out


def knn_accuracy(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.1) -> float:
    """Weighted kNN accuracy (fraction), the standard monitor of self-supervised training (Wu et al., CVPR 2018;
    MocoSFL's ``knn_monitor``): features are L2-normalized, each query's ``k`` most cosine-similar bank samples
    vote for their labels with weight ``exp(similarity / temperature)``, the top class is the prediction.
    Computed by lightly's ``knn_predict``.

    Args:
        bank: features (N, D) of the labeled bank (e.g. the un-augmented train split).
        bank_labels: int64 labels (N,).
        queries: features (B, D) to classify.
        labels: their int64 labels (B,).
        num_classes: C.
        k: neighbours (at most N are used).
        temperature: vote temperature.
    """
    from pfl._torchvision import import_torchvision

    import_torchvision()  # lightly imports torchvision (pfl's shim on CPU-only torch)
    from lightly.utils.benchmarking import knn_predict

    bank = torch.nn.functional.normalize(bank.float(), dim=1)
    queries = torch.nn.functional.normalize(queries.float(), dim=1)
    pred = knn_predict(queries, bank.T.contiguous(), bank_labels, num_classes, knn_k=min(k, len(bank)),
                       knn_t=temperature)
    return (pred[:, 0] == labels).float().mean().item()


# ---------------------------------------------------------------- regression: viewport prediction
# Positions are 3-D head directions (unit vectors); the domain error is the great-circle (orthodromic) angle, as
# TRACK (Romero Rondon et al., PAMI 2021) and the viewport-prediction literature report it.


def orthodromic_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Great-circle angle between directions, in radians in [0, pi]: (..., 3), (..., 3) -> (...).

    Both are normalized first, then the angle is ``atan2(|u x v|, u . v)``. TRACK computes the same angle as
    ``arccos(clip(u . v, -1, 1))`` (``Utils.py:160-170``, ``compute_orthodromic_distance``; ``models_utils.py:4-18``,
    ``metric_orth_dist``, in github.com/MiguelFRomeroR/Analysis-of-head-motion-prediction-in-VR at 6364a558); the
    values agree up to rounding, but arccos loses precision near 0 and pi (in float32 it cannot resolve angles
    below about 0.02 degrees) where the atan2 form stays accurate. As in TRACK, a zero vector has no direction: its
    distance is NaN. Differentiable (a usable loss) except at exactly equal or opposite directions.

    Raises:
        ValueError: the shapes differ or their last dimension is not 3.
    """
    if pred.shape != target.shape or pred.shape[-1:] != (3,):
        raise ValueError(f"orthodromic_distance needs two (..., 3) tensors of one shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    u = pred / torch.linalg.vector_norm(pred, dim=-1, keepdim=True)
    v = target / torch.linalg.vector_norm(target, dim=-1, keepdim=True)
    return torch.atan2(torch.linalg.vector_norm(torch.linalg.cross(u, v), dim=-1), (u * v).sum(dim=-1))


def regression_metrics(pred: torch.Tensor, target: torch.Tensor, positions: bool) -> dict[str, float]:
    """Metrics of one set of regression predictions (N, D) against targets (N, D), computed in float64.

    Returns:
        ``mse``: the mean squared error over all N x D elements (torch's ``MSELoss``, reduction ``mean``). When
        ``positions`` (targets are H flattened 3-D positions, D = 3 H, step-major as ``predict=sequence`` windows),
        also ``orthodromic_deg``: the mean great-circle error (:func:`orthodromic_distance`) in degrees over all N x H
        predicted positions, and, when H > 1, ``orthodromic_deg_h1`` .. ``orthodromic_deg_hH``: its mean over the N
        samples at each horizon step. TRACK reports these per-step means, in radians
        (``training_procedure.py``, ``errors_per_timestep``); pfl reports degrees.

    Raises:
        ValueError: the shapes differ, no sample, or ``positions`` with D not a multiple of 3.
    """
    if pred.shape != target.shape or pred.dim() != 2 or len(pred) == 0:
        raise ValueError(f"regression_metrics needs predictions and targets of one shape (N, D), N >= 1, got "
                         f"{tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.detach().double().cpu(), target.detach().double().cpu()
    out = {"mse": torch.nn.functional.mse_loss(pred, target).item()}
    if not positions:
        return out
    if pred.shape[1] % 3:
        raise ValueError(f"positions need D = 3 x horizon outputs, got D = {pred.shape[1]}")
    steps = pred.shape[1] // 3
    degrees = torch.rad2deg(orthodromic_distance(pred.view(-1, steps, 3), target.view(-1, steps, 3)))  # (N, H)
    out["orthodromic_deg"] = degrees.mean().item()
    if steps > 1:
        out.update({f"orthodromic_deg_h{k + 1}": step.item() for k, step in enumerate(degrees.mean(dim=0))})
    return out
