"""The metric vocabulary: one name per quantity, the same in every run type, grouped with ``/``.

MLflow's UI groups charts by the part of a metric name before the first ``/``, and one sort
column then ranks FL runs and head runs together (``test/f_ece``).

* ``test/<metric>``: the evaluated models on every client's own test split. Quality metrics
  (:data:`QUALITY`):

  - ``acc``: test-sample-weighted mean of the clients' accuracies (fraction);
  - ``nll``: test-sample-weighted mean NLL (nats);
  - ``f_ece``: F-ECE, the test-sample-weighted mean of per-client ECE (equal-mass bins);
  - ``ece_mean``: the unweighted mean of per-client ECE;
  - ``global_ece``: ECE of all clients' predictions pooled (uniform bins);
  - ``brier``: test-sample-weighted mean Brier score;
  - ``knn_acc``, ``linear_acc``: self-supervised runs' weighted kNN accuracy and linear-probe accuracy (fraction);
  - ``mse``: a regression's test-sample-weighted mean squared error (over the outputs' elements);
  - ``orthodromic_deg``: viewport prediction's mean great-circle error in degrees, ``orthodromic_deg_h<k>`` at
    horizon step k (1-based).

  ``test/<metric>_std`` is the unweighted std across clients; ``test/<metric>_<arch>`` the
  weighted mean over one architecture's clients (runs that mix architectures).
  FL runs score the personalized models; head runs the method's ensemble.
* ``val/<metric>``: the same on the tuning splits (hyperparameter search).
* ``new/<metric>``: new-client evaluation (``new_clients=K``): the K clients held out of training, each after
  adapting for ``finetune_epochs`` by the algorithm's rule, on their test splits (``new/acc``, ``new/f_ece``, ...).
* ``finetuned/<metric>``: an algorithm's locally fine-tuned models beside its personalized ones (FedGen).
* ``wo/<metric>``: a head run's unmodified models (w/o the method), beside its ``test/*``.
* ``ood/<score>``: OOD detection of a head run's ensemble (``ood/auroc_msp``, ...);
  ``wo/ood_<score>`` of its unmodified models.
* ``train/loss``, ``train/samples``: the round's local training.
* ``time/<part>``: seconds (``time/round``, ``time/local``, ``time/aggregate``, ``time/eval``,
  ``time/checkpoint``, ``time/heads``, ``time/total``).
* ``best/<split>_<metric>``: the evaluation at the round of the best headline (:func:`headline`: highest accuracy,
  lowest error; ``best/test_acc``, ``best/round``), :func:`best_name`.
* ``comm/bytes_down``, ``comm/bytes_up``: bytes of the model states in the round's payloads, summed over its clients.
* ``memory/peak_mb``: the round's peak memory (CUDA: allocated by torch; CPU: the process's peak RSS so far);
  split learning's ``memory/client_param_bytes`` and ``memory/client_activation_bytes``: one client's per step.
* ``eval/reused``, ``checkpoint/mb``, ``model/<count>``: bookkeeping.
* Launch runs: the mean over seeds of every final and best metric under its own name, ``<name>_seed_std`` and
  ``seeds``; a sweep's per cell, ``<cell>/<flat name>`` (``dir0.1-jr0.2/test_f_ece``). Study runs: the best value
  under its ``val/<metric>`` name, ``study/best_trial``, ``study/n_complete`` ...; their final repeats
  ``final/test_acc``, ``final/test_acc_seed_std`` ...

Algorithms of later issues place their own metrics the same way: ``test/knn_acc``,
``comm/bytes_up``, ``server/<name>``. :data:`LEGACY` maps names to those of stores written
before this vocabulary, so reports read old runs too.
"""

from __future__ import annotations

QUALITY = ("acc", "nll", "f_ece", "ece_mean", "global_ece", "brier", "knn_acc", "linear_acc", "mse", "orthodromic_deg")
# an evaluation's headline, by preference: accuracy, else a regression's error
HEADLINE = ("test/acc", "val/acc", "test/knn_acc", "val/knn_acc", "test/orthodromic_deg", "val/orthodromic_deg",
            "test/mse", "val/mse")
LOWER_IS_BETTER = ("orthodromic_deg", "mse")  # headline metrics that are errors
OOD_SCORES = ("auroc_msp", "aupr_msp", "auroc_entropy", "aupr_entropy")
SEP = "/"


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
