"""The metric vocabulary: one name per quantity, the same in every run type, grouped with ``/``.

MLflow's UI groups charts by the part of a metric name before the first ``/``, and one sort
column then ranks FL runs and head runs together (``test/f_ece``). :data:`QUALITY_METRICS` names the
quality metrics an evaluation computes, :data:`METRICS` every name and name pattern a run logs (``<quality>``
stands for a quality metric, ``<score>`` for an OOD score of :data:`OOD_SCORES`, ``<arch>`` for an architecture,
``<k>``, ``<c>``, ``<name>``, ``<cell>``, ``<flat name>`` and ``<count>`` for what they say), and
:func:`documented` finds the entry a logged name falls under. The docs' metric reference is generated from them.

Algorithms of later issues place their own metrics the same way (``test/knn_acc``, ``comm/bytes_up``,
``server/<name>``) and add them to :data:`METRICS`. :data:`LEGACY_HEADS` and :func:`legacy_fl` map names to those
of stores written before this vocabulary, so reports read old runs too.
"""

from __future__ import annotations

import re

# quality metric -> what it is (the suffix of test/, val/, new/, finetuned/, wo/ and best/ names)
QUALITY_METRICS = {
    "acc": "test-sample-weighted mean of the clients' accuracies (fraction)",
    "nll": "test-sample-weighted mean negative log-likelihood (nats)",
    "f_ece": "F-ECE: the test-sample-weighted mean of the clients' expected calibration errors (equal-mass bins, "
             "``ece_bins``; fraction)",
    "ece_mean": "the unweighted mean of the clients' ECE (fraction)",
    "global_ece": "ECE of all clients' predictions pooled (uniform bins; fraction)",
    "brier": "test-sample-weighted mean Brier score",
    "knn_acc": "self-supervised runs: weighted kNN accuracy of the frozen features (fraction)",
    "linear_acc": "self-supervised runs: linear-probe accuracy (fraction)",
    "mse": "a regression's test-sample-weighted mean squared error (over the outputs' elements)",
    "orthodromic_deg": "viewport prediction: mean great-circle (orthodromic) error in degrees",
}
QUALITY = tuple(QUALITY_METRICS)
# an evaluation's headline, by preference: accuracy, else a regression's error
HEADLINE = ("test/acc", "val/acc", "test/knn_acc", "val/knn_acc", "test/orthodromic_deg", "val/orthodromic_deg",
            "test/mse", "val/mse")
LOWER_IS_BETTER = ("orthodromic_deg", "mse")  # headline metrics that are errors
OOD_SCORES = ("auroc_msp", "aupr_msp", "auroc_entropy", "aupr_entropy")
SEP = "/"
# every name or name pattern a run logs -> what it is (the metric reference is generated from this)
METRICS = {
    "test/<quality>": "the evaluated models on every client's own test split (FL runs: the personalized models; "
                      "head runs: the method's ensemble)",
    "test/<quality>_std": "the unweighted std of the metric across clients",
    "test/<quality>_<arch>": "the weighted mean over one architecture's clients (runs that mix architectures)",
    "test/orthodromic_deg_h<k>": "viewport prediction: the orthodromic error at horizon step k (1-based), degrees",
    "val/<quality>": "the same on the tuning splits (hyperparameter search)",
    "new/<quality>": "new-client evaluation (``new_clients=K``): the held-out clients, each adapted for "
                     "``finetune_epochs`` by the algorithm's rule, on their test splits",
    "finetuned/<quality>": "an algorithm's locally fine-tuned models beside its personalized ones (FedGen's "
                           "``eval_personalized``)",
    "wo/<quality>": "a head run's unmodified models (w/o the method), beside its ``test/*``",
    "ood/<score>": "OOD detection by a head run's ensemble (in-distribution is the positive class)",
    "wo/ood_<score>": "OOD detection by a head run's unmodified models",
    "best/<split>_<quality>": "the evaluation at the round of the best headline (highest accuracy, lowest error)",
    "best/round": "the round of the best headline",
    "train/loss": "the round's mean local training loss",
    "train/samples": "the round's training samples, summed over its clients",
    "time/round": "seconds of the round's local training and aggregation",
    "time/local": "seconds of the round's local training",
    "time/aggregate": "seconds of the round's aggregation",
    "time/eval": "seconds of the evaluation",
    "time/checkpoint": "seconds of writing the checkpoint",
    "time/heads": "seconds of a head run's fitting and scoring",
    "time/total": "seconds of the whole run",
    "comm/bytes_down": "bytes of the model states in the round's downlink payloads, summed over its clients",
    "comm/bytes_up": "bytes of the model states in the round's uplink payloads, summed over its clients",
    "memory/peak_mb": "the round's peak memory in MB (CUDA: allocated by torch; CPU: the process's peak RSS so far)",
    "memory/client_param_bytes": "split learning: one client's parameter bytes",
    "memory/client_activation_bytes": "split learning: one client's activation bytes per step",
    "eval/reused": "clients whose unchanged models kept their previous scores in this evaluation",
    "checkpoint/mb": "size of the checkpoint in MB",
    "model/<count>": "bookkeeping counts of a run's models (``model/trainable_params_per_member``)",
    "server/<name>": "an algorithm's server-side quantities (FedGen's ``server/generator_teacher_loss``, "
                     "``server/generator_diversity_loss``, ``server/generated_acc``, ``server/generated_acc_c<c>``; "
                     "MocoSFL's ``server/embedding_spread``)",
    "<name>_seed_std": "launch runs: the std over seeds of a final or best metric (the metric itself: the mean)",
    "seeds": "launch runs: the number of seeds",
    "<cell>/<flat name>": "sweep launch runs: a cell's summary (``dir0.1-jr0.2/test_f_ece``)",
    "study/best_trial": "study runs: the number of the best trial (its value under its ``val/<quality>`` name)",
    "study/n_<state>": "study runs: trials by state (``study/n_complete``, ``study/n_pruned``, ``study/n_failed``)",
    "final/<flat name>": "study runs: the final repeats of the best config (``final/test_acc``, "
                         "``final/test_acc_seed_std``)",
}


def metric(group: str, name: str) -> str:
    """``<group>/<name>``, e.g. ``metric("test", "acc") == "test/acc"``."""
    return f"{group}{SEP}{name}"


def headline_name(metrics: dict[str, float]) -> str:
    """The name of an evaluation's headline metric: classification's ``test/acc`` (``val/acc`` in tuning), else a
    self-supervised run's kNN accuracy (``test/knn_acc``), else a regression's error (``test/orthodromic_deg`` for
    viewport prediction, else ``test/mse``).

    Raises:
        KeyError: the metrics hold none of :data:`HEADLINE`.
    """
    for name in HEADLINE:
        if name in metrics:
            return name
    raise KeyError(f"no headline among the metrics ({', '.join(sorted(metrics))}); expected one of {HEADLINE}")


def headline(metrics: dict[str, float]) -> float:
    """The value of an evaluation's headline metric (:func:`headline_name`).

    Raises:
        KeyError: the metrics hold none of :data:`HEADLINE`.
    """
    return metrics[headline_name(metrics)]


def headline_score(metrics: dict[str, float]) -> float:
    """The headline as a score where larger is better: an accuracy as it is, an error (:data:`LOWER_IS_BETTER`)
    negated; what picks a run's best round.

    Raises:
        KeyError: the metrics hold none of :data:`HEADLINE`.
    """
    name = headline_name(metrics)
    return -metrics[name] if name.partition(SEP)[2] in LOWER_IS_BETTER else metrics[name]


def best_name(name: str) -> str:
    """The best-round counterpart of an evaluation metric: ``test/acc`` -> ``best/test_acc``."""
    return metric("best", flat(name))


def flat(name: str) -> str:
    """A metric name without its group separators (``test/acc`` -> ``test_acc``), for prefixed copies."""
    return name.replace(SEP, "_")


# new name -> the name stores written before this vocabulary hold; FL runs: :func:`legacy_fl`
LEGACY_HEADS = {
    "test/acc": "acc", "test/nll": "nll", "test/f_ece": "f_ece", "test/ece_mean": "ece", "test/brier": "brier",
    "test/global_ece": "global_ece", "wo/acc": "wo_acc", "wo/nll": "wo_nll", "wo/f_ece": "wo_f_ece",
    "wo/ece_mean": "wo_ece", "wo/brier": "wo_brier", "wo/global_ece": "wo_global_ece",
    **{f"ood/{s}": f"ood_{s}" for s in OOD_SCORES}, **{f"wo/ood_{s}": f"wo_ood_{s}" for s in OOD_SCORES},
}


def legacy_fl(name: str) -> str:
    """The pre-vocabulary name of an FL-run metric: ``test/acc`` -> ``test_acc``, ``test/f_ece`` -> ``test_ece``,
    ``best/test_f_ece`` -> ``best_test_ece``, ``test/acc_vgg11`` -> ``test_acc_vgg11``,
    ``best/round`` -> ``best_round``."""
    return flat(name).replace("f_ece", "ece")


def _pattern(entry: str) -> re.Pattern:
    """The regular expression of a :data:`METRICS` entry: each ``<...>`` placeholder matches one or more characters
    (``<quality>`` and ``<score>`` only the names of :data:`QUALITY` and :data:`OOD_SCORES`)."""
    parts = re.split(r"(<[^>]+>)", entry)
    named = {"<quality>": "|".join(QUALITY), "<score>": "|".join(OOD_SCORES)}
    return re.compile("".join(f"(?:{named.get(p, '.+')})" if p.startswith("<") else re.escape(p) for p in parts))


_PATTERNS = {entry: _pattern(entry) for entry in METRICS}  # compiled once


def documented(name: str) -> str | None:
    """The :data:`METRICS` entry a logged metric name falls under (``test/acc`` -> ``test/<quality>``): of the
    entries that match, the most specific (the most characters outside placeholders); ``None`` for a name the
    vocabulary lacks."""
    matches = [entry for entry, pattern in _PATTERNS.items() if pattern.fullmatch(name)]
    return max(matches, key=lambda entry: len(re.sub(r"<[^>]+>", "", entry)), default=None)
