"""The query layer: FL runs and their head runs from the tracking store, as pandas frames.

Everything goes through ``mlflow.search_runs`` and the artifact API; no file behind
MLflow's back is read. Only FINISHED runs count. The long frame of :func:`results` has
one row per (FL run, method): ``method`` is ``"w/o"`` (the FL run's own evaluation of the
unmodified personalized models), ``"APH"`` or ``"LoRAPH"`` (the latest finished head run of
that method nested under the FL run), or ``"new clients"`` (an FL run that held clients out: its final
new-client evaluation, ``new/*``; always the final round). Metrics: ``acc``, ``nll`` and ``ece`` = F-ECE
(test-sample-weighted mean of per-client ECE, ``ece_bins`` = 20 equal-mass bins), for every method
alike, and ``ood_auroc``: the AUROC of the maximum softmax probability separating each client's
test split (in-distribution, the positive class) from its OOD sample (test-sample-weighted
over clients; NaN where no head run scored OOD data).

Metric names follow :mod:`pfl.vocabulary` (``test/acc``, ``test/f_ece``, ``ood/auroc_msp``,
``wo/ood_auroc_msp``, ...). Per run, a metric missing under its name is read under the name stores
held before that vocabulary (:func:`pfl.vocabulary.legacy_fl`, :data:`pfl.vocabulary.LEGACY_HEADS`:
``test_acc``, ``test_ece``, ``f_ece``, ...), so a store mixing old and new runs reads as one.

The setting of a run (:data:`SETTING`) holds only the partition params its partition uses
(:data:`pfl.config.PARTITION_FIELDS`: ``alpha`` for Dirichlet, ``classes_per_client`` for
pathological, ``partition_name`` for PFLlib imports), NaN otherwise, also for old stores that
logged ``alpha`` for every partition. Group these frames with ``dropna=False``.

:func:`architecture_results` reads runs that mix client architectures (FlexiFed): one row per
(FL run, architecture group) with that group's ``test/acc_<arch>`` and the run's model family
(``pfl report --by architecture``).

Regression FL runs (viewport prediction; :func:`is_regression`: they log ``test/mse``) have neither accuracy nor
ECE: :func:`results` and :func:`architecture_results` leave them out, and :func:`regression_results` reads them,
one row per FL run with its ``mse``, ``orthodromic_deg`` and per-horizon-step ``orthodromic_deg_h<k>``
(:mod:`reports.regression` tabulates and plots them).

``stat`` picks the FL runs' numbers: ``final`` reads the last evaluation (``test/*``),
``best`` the evaluation at the round of best test accuracy (``best/test_*``). Head runs are
post-hoc on the final client models, so APH / LoRAPH rows, and the w/o ``ood_auroc`` (the
unmodified final models, scored by the latest head run of the FL run), are the same for both.
:func:`aggregate` groups repeats (seeds) of the same setting.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import mlflow
import numpy as np
import pandas as pd

from pfl.config import PARTITION_FIELDS
from pfl.heads import METHOD_LABELS
from pfl.models import FAMILIES
from pfl.vocabulary import LEGACY_HEADS, best_name, legacy_fl
from reports.plots import NEW_CLIENTS

METRICS = ("acc", "nll", "ece", "ood_auroc")
SETTING = ("algo", "dataset", "partition", "alpha", "classes_per_client", "partition_name", "join_ratio")
INFO = ("num_clients", "global_rounds", "ece_bins")  # params the captions state
STATS = ("final", "best")
FL_METRICS = {"acc": "test/acc", "nll": "test/nll", "ece": "test/f_ece"}  # final; best: best_name(...)
NEW_METRICS = {"acc": "new/acc", "nll": "new/nll", "ece": "new/f_ece"}  # new-client evaluation (final round)
ARCH_ACC = {"final": "test/acc", "best": "best/test_acc"}  # + "_<arch>": an architecture group's accuracy
ARCH_COLUMNS = ("fl_run_id", "row", "algo", "scheme", "family", *SETTING[1:], "seed", *INFO, "arch", "acc")
MEAN_ARCH = "mean"  # the arch label of a run's accuracy over all its clients (test/acc)
_HEAD_METRICS = {"acc": "test/acc", "nll": "test/nll", "ece": "test/f_ece", "ood_auroc": "ood/auroc_msp"}
_WO_OOD_METRIC = "wo/ood_auroc_msp"
_NUMERIC = ("alpha", "classes_per_client", "join_ratio", *INFO)
# Regression runs: the setting params beyond SETTING, the row params, and the metrics (final names; best: best_name)
REGRESSION_SETTING = ("split_by", "num_test_keys", "history", "horizon", "predict")
# the row of a regression run: its model and arm (the downlink knobs; FedGen's warm-up and diversity weight)
REGRESSION_ROW = ("model", "downlink", "downlink_blend", "generator_warmup_rounds", "diversity_weight")
REGRESSION_METRICS = {"mse": "test/mse", "orthodromic_deg": "test/orthodromic_deg"}
STEP_METRIC = "test/orthodromic_deg_h"  # + k: the error at horizon step k (1-based)
_STEP = re.compile(re.escape(f"metrics.{STEP_METRIC}") + r"(\d+)")


def search(kind: str, experiments: list[str] | None = None, filter_string: str = "") -> pd.DataFrame:
    """FINISHED runs tagged ``pfl.kind = kind`` (``fl``, ``heads``, ...), as ``mlflow.search_runs`` returns them.

    Args:
        experiments: experiment names; ``None`` searches all experiments.
        filter_string: extra MLflow filter, e.g. ``"params.dataset = 'cifar10'"``.
    """
    clauses = [f"tags.`pfl.kind` = '{kind}'", "attributes.status = 'FINISHED'"]
    clauses += [filter_string] if filter_string else []
    return mlflow.search_runs(experiment_names=experiments, search_all_experiments=experiments is None,
                              filter_string=" and ".join(clauses), output_format="pandas")


def is_regression(fl: pd.DataFrame) -> pd.Series:
    """Which FL runs of a search frame are regressions (viewport prediction, ...): those that logged ``test/mse``,
    the metric every regression task logs and no classification does."""
    return _column(fl, f"metrics.{REGRESSION_METRICS['mse']}").notna()


def _fl_runs(experiments: list[str] | None, filter_string: str, regression: bool) -> pd.DataFrame:
    """The finished FL runs of a selection that are regressions (``regression=True``) or not."""
    fl = search("fl", experiments, filter_string)
    return fl[is_regression(fl) == regression] if not fl.empty else fl


def _column(runs: pd.DataFrame, column: str, dtype=float) -> pd.Series:
    """Column ``column`` of a search frame; NaN / None where no run has it."""
    return runs[column] if column in runs else pd.Series(None, index=runs.index, dtype=dtype)


def _metric(runs: pd.DataFrame, name: str, legacy: str) -> pd.Series:
    """Metric ``name`` of a search frame, per run ``legacy`` (its pre-vocabulary name) where ``name`` is missing."""
    return _column(runs, f"metrics.{name}").fillna(_column(runs, f"metrics.{legacy}"))


def _fl_metric(fl: pd.DataFrame, name: str) -> pd.Series:
    """An FL-run metric (``test/acc``, ``best/test_acc``, ...), legacy names (``test_acc``) as fallback."""
    return _metric(fl, name, legacy_fl(name))


def _head_metric(heads: pd.DataFrame, name: str) -> pd.Series:
    """A head-run metric (``test/f_ece``, ``ood/auroc_msp``, ...), legacy names (``f_ece``) as fallback."""
    return _metric(heads, name, LEGACY_HEADS[name])


def _param(runs: pd.DataFrame, name: str) -> pd.Series:
    """Param column ``name`` of a search frame (None where no run has it)."""
    return _column(runs, f"params.{name}", object)


def _settings(fl: pd.DataFrame) -> pd.DataFrame:
    """``fl_run_id``, :data:`SETTING`, ``seed`` and :data:`INFO` of FL runs; partition params their partition
    does not use are NaN (old stores logged ``alpha`` for every partition); numbers numeric."""
    frame = pd.DataFrame({"fl_run_id": fl["run_id"], **{k: _param(fl, k) for k in (*SETTING, "seed", *INFO)}})
    for col in _NUMERIC:
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    frame["seed"] = pd.to_numeric(frame["seed"], errors="coerce").astype("Int64")
    for col in ("alpha", "classes_per_client", "partition_name"):
        frame[col] = frame[col].where(frame["partition"].isin(PARTITION_FIELDS[col]))
    return frame


def _fl_metrics(fl: pd.DataFrame, stat: str) -> dict[str, np.ndarray]:
    """The FL runs' ``acc``, ``nll``, ``ece`` (arrays) for ``stat``.

    Raises:
        ValueError: ``best`` on runs that logged neither ``best/test_acc`` nor ``best_test_acc``.
    """
    names = {m: best_name(n) if stat == "best" else n for m, n in FL_METRICS.items()}
    values = {m: _fl_metric(fl, name).to_numpy() for m, name in names.items()}
    lacking = fl["run_id"][pd.isna(values["acc"])].tolist() if stat == "best" else []
    if lacking:
        raise ValueError(f"--stat best: FL run(s) {', '.join(lacking[:3])} did not log best/test_acc (trained "
                         "before pfl logged it); use --stat final")
    return values


def _latest_heads(experiments: list[str] | None, fl_run_ids: pd.Series) -> pd.DataFrame:
    """Finished head runs of the given FL runs, oldest first."""
    heads = search("heads", experiments)
    if heads.empty:
        return heads
    return heads[heads["params.fl_run_id"].isin(fl_run_ids)].sort_values("start_time")


def _wo_ood(heads: pd.DataFrame) -> pd.DataFrame:
    """Per FL run, the w/o ``ood_auroc`` and ``ood_dataset`` of its latest head run that scored OOD data."""
    columns = ["fl_run_id", "ood_auroc", "ood_dataset"]
    if heads.empty:
        return pd.DataFrame(columns=columns)
    scored = heads[_head_metric(heads, _WO_OOD_METRIC).notna()].drop_duplicates("params.fl_run_id", keep="last")
    return pd.DataFrame({"fl_run_id": scored["params.fl_run_id"].to_numpy(),
                         "ood_auroc": _head_metric(scored, _WO_OOD_METRIC).to_numpy(),
                         "ood_dataset": _param(scored, "ood_dataset").to_numpy()}, columns=columns)


def _method_rows(base: pd.DataFrame, heads: pd.DataFrame) -> pd.DataFrame:
    """One row per FL run of ``base`` and head-run method, from the latest head run of each method."""
    heads = heads.drop_duplicates(["params.fl_run_id", "params.method"], keep="last")
    found = pd.DataFrame({"fl_run_id": heads["params.fl_run_id"].to_numpy(),
                          "method": heads["params.method"].map(METHOD_LABELS).to_numpy(),
                          **{m: _head_metric(heads, src).to_numpy() for m, src in _HEAD_METRICS.items()},
                          "ood_dataset": _param(heads, "ood_dataset").to_numpy()})
    return base.merge(found, on="fl_run_id")


def _new_client_rows(fl: pd.DataFrame, base: pd.DataFrame) -> pd.DataFrame:
    """One ``new clients`` row per FL run that held clients out: its final ``new/*`` (new-client evaluation)."""
    values = {m: _column(fl, f"metrics.{name}").to_numpy() for m, name in NEW_METRICS.items()}
    rows = base.assign(method=NEW_CLIENTS, **values, ood_auroc=float("nan"), ood_dataset=None)
    return rows[~np.isnan(values["acc"])]


def results(experiments: list[str] | None = None, filter_string: str = "", stat: str = "final") -> pd.DataFrame:
    """Long frame of FL runs x methods: ``fl_run_id``, SETTING, ``seed``, INFO, ``method``, METRICS, ``ood_dataset``.

    ``filter_string`` selects FL runs (their params), regressions left out (:func:`is_regression`); head runs
    follow their FL run. ``stat``
    (``final`` or ``best``) picks the FL runs' numbers (module docstring). Metrics are fractions
    (NLL in nats); ``alpha``, ``classes_per_client``, ``join_ratio``, ``seed`` and INFO are numeric
    (NaN where not logged or not used by the run's partition).

    Raises:
        ValueError: unknown ``stat``, or ``best`` on FL runs without best-round metrics.
    """
    if stat not in STATS:
        raise ValueError(f"unknown stat {stat!r}; use --stat final or --stat best")
    fl = _fl_runs(experiments, filter_string, regression=False)
    columns = ["fl_run_id", *SETTING, "seed", *INFO, "method", *METRICS, "ood_dataset"]
    if fl.empty:
        return pd.DataFrame(columns=columns)
    base = _settings(fl)
    heads = _latest_heads(experiments, base["fl_run_id"])
    wo = base.assign(method="w/o", **_fl_metrics(fl, stat)).merge(_wo_ood(heads), on="fl_run_id", how="left")
    rows = [wo, _new_client_rows(fl, base)] if heads.empty else [wo, _new_client_rows(fl, base),
                                                                 _method_rows(base, heads)]
    long = pd.concat(rows, ignore_index=True)[columns]
    long[list(METRICS)] = long[list(METRICS)].astype(float)
    return long


def _architectures(fl: pd.DataFrame) -> list[str]:
    """Architecture groups (sorted) with a ``test/acc_<arch>`` (or legacy ``test_acc_<arch>``) metric in a search
    frame; ``test/acc_std`` is none."""
    found = set()
    for name in (ARCH_ACC["final"], legacy_fl(ARCH_ACC["final"])):
        prefix = f"metrics.{name}_"
        found |= {c[len(prefix):] for c in fl.columns if c.startswith(prefix) and fl[c].notna().any()}
    return sorted(n for n in found if n != "std" and not n.endswith("_std"))


def model_family(architectures: Iterable[str]) -> str:
    """The model family of a run's architectures: ``["vgg11", "vgg19"]`` -> ``vgg`` (:data:`pfl.models.FAMILIES`;
    an architecture without a family is one of its own, ``["cnn"]`` -> ``cnn``); several joined by ``+``, sorted."""
    return "+".join(sorted({FAMILIES.get(name, name) for name in architectures}))


def architecture_results(experiments: list[str] | None = None, filter_string: str = "",
                         stat: str = "final") -> pd.DataFrame:
    """Long frame of FL runs x architecture groups, for runs whose clients mix architectures (e.g. FlexiFed).

    One row per FL run and architecture group it logged ``test/acc_<arch>`` for (``acc`` =
    ``test/acc_<arch>``, or ``best/test_acc_<arch>`` with ``stat="best"``; legacy names
    ``test_acc_<arch>`` / ``best_test_acc_<arch>`` where missing), plus one row with ``arch = "mean"``
    holding its accuracy over all clients (``test/acc`` / ``best/test_acc``, sample-weighted). ``row``
    is the run's ``scheme`` param (FlexiFed's sharing scheme), else its ``algo``. Runs without
    per-architecture metrics get the ``mean`` row only. ``family`` is the run's model family
    (:func:`model_family` of its ``model`` param, else of the architectures it logged).

    Returns:
        columns :data:`ARCH_COLUMNS`; the setting as in :func:`results`, ``acc`` a fraction.

    Raises:
        ValueError: unknown ``stat``; no FL run matches; no FL run logs ``test/acc_<arch>``;
            ``stat="best"`` on runs without ``best/test_acc`` or ``best/test_acc_<arch>``.
    """
    if stat not in STATS:
        raise ValueError(f"unknown stat {stat!r}; use --stat final or --stat best")
    fl = _fl_runs(experiments, filter_string, regression=False)
    if fl.empty:
        raise ValueError("no finished FL runs match the selection; check --experiment and the filters")
    archs = _architectures(fl)
    if not archs:
        where = ", ".join(experiments) if experiments else "any experiment"
        raise ValueError(f"--by architecture: no FL run in {where} logs per-architecture accuracy "
                         "(test/acc_<arch>); run a mixed-architecture algorithm such as flexifed")
    logged = {arch: _fl_metric(fl, f"{ARCH_ACC['final']}_{arch}").notna().to_numpy() for arch in archs}
    models = [m.split(",") if isinstance(m, str) and m else [a for a in archs if logged[a][i]]
              for i, m in enumerate(_param(fl, "model"))]
    scheme = _param(fl, "scheme")
    base = _settings(fl)
    base = base.assign(row=scheme.where(scheme.notna() & (scheme != ""), base["algo"]), scheme=scheme,
                       family=[model_family(m) for m in models])
    frames = [base.assign(arch=MEAN_ARCH, acc=_fl_metrics(fl, stat)["acc"])]
    for arch in archs:
        values = _fl_metric(fl, f"{ARCH_ACC[stat]}_{arch}").to_numpy()
        lacking = fl["run_id"][logged[arch] & pd.isna(values)].tolist()
        if lacking:
            raise ValueError(f"--stat best: FL run(s) {', '.join(lacking[:3])} logged test/acc_{arch} but not "
                             f"best/test_acc_{arch}; use --stat final")
        frames.append(base[logged[arch]].assign(arch=arch, acc=values[logged[arch]]))
    return pd.concat(frames, ignore_index=True)[list(ARCH_COLUMNS)]


def _steps(fl: pd.DataFrame) -> list[int]:
    """The horizon steps k, ascending, of which a search frame holds a ``test/orthodromic_deg_h<k>`` value."""
    return sorted({int(m[1]) for c in fl.columns if (m := _STEP.fullmatch(c)) and fl[c].notna().any()})


def regression_results(experiments: list[str] | None = None, filter_string: str = "",
                       stat: str = "final") -> pd.DataFrame:
    """One row per regression FL run (:func:`is_regression`) of the selection, with its setting and metrics.

    Columns: ``fl_run_id``, SETTING, REGRESSION_SETTING (``split_by``, ``num_test_keys``, ``history``, ``horizon``,
    ``predict``), ``seed``, INFO, REGRESSION_ROW (``model``, ``downlink``, ``downlink_blend``; the downlink
    params are None / NaN for algorithms that download nothing, e.g. ``local``; FedGen's ``generator_warmup_rounds``
    and ``diversity_weight``, NaN for other algorithms), then the metrics of ``stat``:
    ``mse`` (test MSE over the outputs' elements), ``orthodromic_deg`` (mean great-circle error in degrees; NaN
    for a regression without it) and ``orthodromic_deg_h<k>`` for every horizon step k any selected run logged
    (NaN for runs that predict one position). ``final`` reads ``test/*``, ``best`` ``best/test_*``: the round of
    lowest error (``best/round``). Numeric params are numbers; no legacy metric names (regressions are newer).

    Raises:
        ValueError: unknown ``stat``, or ``best`` on runs that did not log ``best/test_mse``.
    """
    if stat not in STATS:
        raise ValueError(f"unknown stat {stat!r}; use --stat final or --stat best")
    fl = _fl_runs(experiments, filter_string, regression=True)
    names = {**REGRESSION_METRICS, **{f"orthodromic_deg_h{k}": f"{STEP_METRIC}{k}" for k in _steps(fl)}}
    columns = ["fl_run_id", *SETTING, *REGRESSION_SETTING, "seed", *INFO, *REGRESSION_ROW, *names]
    if fl.empty:
        return pd.DataFrame(columns=columns)
    frame = _settings(fl).assign(**{k: _param(fl, k) for k in (*REGRESSION_SETTING, *REGRESSION_ROW)})
    for col in ("num_test_keys", "history", "horizon", "downlink_blend", "generator_warmup_rounds", "diversity_weight"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    values = {m: _column(fl, f"metrics.{best_name(n) if stat == 'best' else n}") for m, n in names.items()}
    lacking = fl["run_id"][values["mse"].isna()].tolist()
    if lacking:
        raise ValueError(f"--stat best: FL run(s) {', '.join(lacking[:3])} did not log best/test_mse; use --stat final")
    return frame.assign(**values)[columns]


def aggregate(long: pd.DataFrame) -> pd.DataFrame:
    """Mean, population std (ddof=0) and count over seeds of every (setting, method).

    NaN setting fields (a partition's unused params) form groups of their own (``dropna=False``).

    Returns:
        one row per SETTING + ``method``; columns ``<metric>_mean``, ``<metric>_std``, ``<metric>_n``
        (runs with a value: seeds) and ``seeds`` (distinct seeds of the group).
    """
    grouped = long.groupby([*SETTING, "method"], sort=True, dropna=False)
    out = grouped[list(METRICS)].agg(["mean", lambda v: v.std(ddof=0), "count"])
    suffix = {"mean": "mean", "count": "n"}
    out.columns = [f"{m}_{suffix.get(stat, 'std')}" for m, stat in out.columns]
    out["seeds"] = grouped["seed"].nunique()
    return out.reset_index()


def reliability_bins(fl_run_id: str, method: str) -> dict | None:
    """The pooled reliability-diagram bins (``reliability.json``) of the latest head run of ``method`` on an FL run.

    Returns:
        ``{"w/o": bins, "<METHOD>": bins}`` (see :func:`pfl.metrics.reliability_bins`), or ``None``
        when the FL run has no finished head run of that method.
    """
    heads = search("heads", None, f"params.fl_run_id = '{fl_run_id}' and params.method = '{method}'")
    if heads.empty:
        return None
    run_id = heads.sort_values("start_time")["run_id"].iloc[-1]
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/reliability.json")
