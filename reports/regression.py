"""The arms x model table and the per-horizon-step plot of regression FL runs (viewport prediction on David MMSys'18).

The rows are *arms*: an algorithm and its downlink knobs (``algo``, ``downlink``, ``downlink_blend``;
:mod:`pfl.federated.downlink`), named as the researchers name their arms (issue 28): ``local`` (``algo=local``),
``FedAvg`` (full downlink, blend 1), ``partial`` (``downlink=head_layers:2``, their partialFedAvg), ``blend``
(``downlink_blend=0.5``) and ``partial+blend`` (both), in that order, then any other arm sorted by name: a FedAvg
variant by its knobs joined with ``+`` (``head_layers:1``, ``blend 0.3``, ``no downlink`` for ``downlink=none``,
``head_layers:1+blend 0.3``), another algorithm by its display name with its knobs in parentheses
(``FedGen (no downlink)``; FedGen's ``generator_warmup_rounds`` and ``diversity_weight=0`` join its knobs as
``warm-up 200`` and ``no diversity``, so each is an arm of its own), an algorithm that downloads nothing by its name
alone.

* Tables ``table_regression_<dataset>.{md,csv,tex}``, one per table setting (:data:`TABLE_FIELDS`: dataset,
  partition and its split, join ratio, clients, rounds, history, horizon, predict). When a dataset's runs hold
  several settings, the stems get the fields that differ: ``table_regression_david_r300`` and
  ``table_regression_david_r20`` (:func:`setting_stems`). Columns: model (LSTM, Transformer, then others) x {MSE,
  Orthodromic (deg)}, from ``test/mse`` and ``test/orthodromic_deg`` (``--stat best``: ``best/test_*``, the round of
  lowest orthodromic error); the orthodromic column only where runs logged it. A cell is mean ± population std
  (ddof=0) over the runs (seeds) of that arm and model, the value alone for one seed, "—" without runs; MSE with 4
  decimals (the researchers' figures: 0.0086), degrees with 2. The lowest value of a column with two rows or more
  is bold. The writers are :class:`reports.table.ResultsTable`'s; the caption states the setting, the statistic,
  the arms' knobs and the seeds.
* Figures ``orthodromic_per_step_<dataset>_<model>.{png,pdf}`` (the table's stem suffix too, with several
  settings): the mean orthodromic error in degrees (``test/orthodromic_deg_h<k>``, or ``best/...``) at horizon step
  k = 1..H, one line per arm (mean over seeds, a ± population-std band where an arm has two seeds or more), with
  the seconds ahead on the top axis where the dataset's sampling period is known (David: 0.2 s, 5 Hz). TRACK
  reports its errors the same way, the mean orthodromic distance at each step ahead (Romero Rondon et al., PAMI
  2021; code at 6364a558, ``David_MMSys_18/Baselines.py:44-61``, ``compute_no_motion_baseline_error_xyz``, one
  error list per step, printed as a mean per step). Runs that predict one position (``predict=point``) log no
  per-step error: their figure is not written, and a warning (logger ``reports.regression``) says so.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import ClassVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pfl.data.datasets import CATALOG
from reports.names import MODELS, algo_name, dataset_name, given, model_name, number, partition_name
from reports.plots import FONT_SIZE, _pin_tick_fonts, paper_style
from reports.query import REGRESSION_METRICS, REGRESSION_ROW, STEP_METRIC
from reports.table import ResultsTable, best_flags

log = logging.getLogger(__name__)

ARM_ORDER = ("local", "FedAvg", "partial", "blend", "partial+blend")
PARTIAL_LAYERS = "head_layers:2"  # the researchers' partialFedAvg: the last two layers go down
BLEND = 0.5  # the researchers' beta
TABLE_FIELDS = ("dataset", "partition", "split_by", "num_test_keys", "join_ratio", "num_clients", "global_rounds",
                "history", "horizon", "predict")
TABLE_PREFIX, PLOT_PREFIX = "table_regression", "orthodromic_per_step"
# Colours of the arms, in ARM_ORDER then the others (Tableau 10, as reports.plots' method colours)
ARM_COLORS = ("#BAB0AC", "#4E79A7", "#F28E2B", "#59A14F", "#E15759", "#76B7B2", "#EDC948", "#B07AA1", "#FF9DA7",
              "#9C755F")
_HEADERS = {"mse": "MSE", "orthodromic_deg": "Orthodromic (deg)"}
_DECIMALS = {"mse": 4, "orthodromic_deg": 2}
_STEM_CODES = {"partition": "", "split_by": "", "num_test_keys": "test", "join_ratio": "jr", "num_clients": "c",
               "global_rounds": "r", "history": "m", "horizon": "h", "predict": ""}
_STEP_COLUMN = re.compile(r"orthodromic_deg_h(\d+)")


def _step_seconds(dataset: str) -> float | None:
    """Seconds between a time series' steps (:attr:`pfl.data.datasets.DatasetInfo.step_seconds`; David: 0.2)."""
    info = CATALOG.get(dataset)
    return None if info is None else info.step_seconds


def _knobs(downlink: str, blend: float) -> list[str]:
    """The downlink knobs that differ from FedAvg's: ``partial`` / ``head_layers:K`` / ``no downlink``, ``blend`` /
    ``blend <beta>``."""
    layers = {"full": "", "none": "no downlink", PARTIAL_LAYERS: "partial"}.get(downlink, downlink)
    beta = "" if not given(blend) or blend == 1 else "blend" if blend == BLEND else f"blend {number(blend)}"
    return [k for k in (layers, beta) if k]


def arm_name(algo: str, downlink: str | None = None, blend: float | None = None, warmup: float | None = None,
             diversity: float | None = None) -> str:
    """The arm of a run (module docstring): ``local``, ``FedAvg``, ``partial``, ``blend``, ``partial+blend``,
    ``head_layers:1+blend 0.3``, ``FedGen (no downlink)``, ``FedGen (partial+warm-up 200)``,
    ``FedGen (no diversity)``, ...

    Args:
        algo: the ``algo`` param.
        downlink: the ``downlink`` param (``full``, ``none``, ``head_layers:K``); None for algorithms without one.
        blend: the ``downlink_blend`` param (NaN / None: 1).
        warmup: FedGen's ``generator_warmup_rounds`` (NaN / None / 0: none).
        diversity: FedGen's ``diversity_weight`` (0: ``no diversity``; other values are the default arm's).
    """
    if not given(downlink):
        return algo_name(algo)
    knobs = _knobs(downlink, blend)
    knobs += [f"warm-up {number(warmup)}"] if given(warmup) and warmup > 0 else []
    knobs += ["no diversity"] if given(diversity) and diversity == 0 else []
    if algo == "fedavg":
        return "+".join(knobs) or algo_name(algo)
    return f"{algo_name(algo)} ({'+'.join(knobs)})" if knobs else algo_name(algo)


def _ordered(values: Iterable[str], known: Iterable[str]) -> list[str]:
    """The distinct ``values`` that are ``known``, in that order, then the others sorted."""
    present, known = set(values), list(known)
    return [v for v in known if v in present] + sorted(present - set(known))


def arm_order(arms: Iterable[str]) -> list[str]:
    """The arms of :data:`ARM_ORDER` present, in that order, then the others sorted."""
    return _ordered(arms, ARM_ORDER)


def model_order(models: Iterable[str]) -> list[str]:
    """The models of :data:`reports.names.MODELS` present (``vp_lstm``, ``vp_transformer``), then the others sorted."""
    return _ordered(models, MODELS)


class RegressionTable(ResultsTable):
    """Means, stds, best (lowest) flags and seed counts indexed by arm, columns (model, metric); a caption.

    Cells in the metrics' units (MSE 4 decimals, degrees 2); the CSV holds ``<model>/<metric>_mean``, ``_std``,
    ``_n``.
    """

    index_name: ClassVar[str] = "arm"
    fit_width: ClassVar[bool] = False  # a few columns: fits a page as it is

    def header(self, col) -> tuple[str, ...]:
        """``(model display name, metric header)``, e.g. ``(LSTM, Orthodromic (deg))``."""
        model, metric = col
        return model_name(model), _HEADERS[metric]

    def scale_digits(self, col) -> tuple[float, int]:
        """Unscaled; MSE with 4 decimals, degrees with 2."""
        return 1.0, _DECIMALS[col[1]]

    def csv_name(self, col) -> str:
        """``<model>/<metric>``, e.g. ``vp_lstm/orthodromic_deg``."""
        return "/".join(col)


def with_arms(long: pd.DataFrame) -> pd.DataFrame:
    """:func:`reports.query.regression_results`' frame with an ``arm`` column (:func:`arm_name`)."""
    arms = [arm_name(*row) for row in long[["algo", *REGRESSION_ROW[1:]]].itertuples(index=False)]
    return long.assign(arm=arms)


def build_regression_table(rows: pd.DataFrame, caption: str = "") -> RegressionTable:
    """The arms x (model, metric) table of one table setting's runs (:func:`with_arms`' frame), with ``caption``.

    Raises:
        ValueError: no runs.
    """
    if rows.empty:
        raise ValueError("no finished regression FL runs match the selection; check --experiment and the filters")
    metrics = [m for m in REGRESSION_METRICS if rows[m].notna().any()]
    values = rows.melt(id_vars=["arm", "model"], value_vars=metrics, var_name="metric").dropna(subset=["value"])
    grouped = values.groupby(["arm", "model", "metric"])["value"]
    columns = pd.MultiIndex.from_tuples([(m, k) for m in model_order(rows["model"]) for k in metrics])
    mean, std, count = (stat.unstack(["model", "metric"]).reindex(index=arm_order(rows["arm"]), columns=columns)
                        .astype(float) for stat in (grouped.mean(), grouped.std(ddof=0), grouped.count()))
    return RegressionTable(mean, std, best_flags(mean, lambda col: False), count.fillna(0).astype(int), caption)


def _seconds(dataset: str, steps: float) -> str:
    """`` (2 s)`` for 10 steps of David (5 Hz); ``""`` where the dataset's sampling period is unknown."""
    period = _step_seconds(dataset)
    return f" ({number(steps * period)} s)" if period and given(steps) else ""


def _count(value, unit: str) -> str:
    """``10 clients``, ``1 global round``; ``""`` when not logged."""
    return f"{number(value)} {unit}{'' if value == 1 else 's'}" if given(value) else ""


def _partition_text(setting: Mapping) -> str:
    """``natural partition, split by video (4 test videos)``, ``natural partition, split by time``, ``IID``."""
    if setting["partition"] != "natural":
        return partition_name(setting["partition"])
    split = setting["split_by"]
    keys = f" ({number(setting['num_test_keys'])} test {split}s)" if split != "time" and \
        given(setting["num_test_keys"]) else ""
    return f"natural partition (one client per group), split by {split}{keys}"


def _arm_text(rows: pd.DataFrame) -> str:
    """``local: algo=local; FedAvg: algo=fedavg, downlink=full, downlink_blend=1; ...`` for the arms present."""
    first = rows.drop_duplicates("arm").set_index("arm")
    parts = []
    for arm in arm_order(first.index):
        row = first.loc[arm]
        knobs = f", downlink={row['downlink']}, downlink_blend={number(row['downlink_blend'])}" \
            if given(row["downlink"]) else ""
        knobs += "".join(f", {k}={number(row[k])}" for k in ("generator_warmup_rounds", "diversity_weight")
                         if k in row and given(row[k]))
        parts.append(f"{arm}: algo={row['algo']}{knobs}")
    return "; ".join(parts)


def regression_caption(rows: pd.DataFrame, stat: str) -> str:
    """What a regression table shows: the setting (dataset, partition, clients, join ratio, rounds, history,
    horizon, predict), the metrics and the statistic, and each arm's knobs; :meth:`RegressionTable.full_caption`
    adds the seeds."""
    s = rows.iloc[0]
    per = " (mean over the horizon's steps)" if s["predict"] == "sequence" else ""
    federation = [_partition_text(s), _count(s["num_clients"], "client"), f"join ratio {number(s['join_ratio'])}",
                  _count(s["global_rounds"], "global round")]
    windows = [f"{field} {number(s[field])}{_seconds(s['dataset'], s[field])}" for field in ("history", "horizon")
               if given(s[field])] + ([f"predict {s['predict']}"] if given(s["predict"]) else [])
    setting = "; ".join([dataset_name(s["dataset"]), ", ".join(p for p in federation if p)] +
                        ([", ".join(windows)] if windows else []))
    error = "orthodromic error" if rows["orthodromic_deg"].notna().any() else "MSE"
    when = {"final": "the FL runs' final round (test/*)",
            "best": f"the FL runs' round of lowest test {error} (best/test_*)"}[stat]
    metrics = "MSE: test/mse" + (f"; Orthodromic: mean great-circle error in degrees{per}, test/orthodromic_deg"
                                 if error != "MSE" else "")
    return (f"{setting}. {metrics}; test-sample-weighted over the clients' own test splits, at {when}. "
            f"Arms: {_arm_text(rows)}.")


def _step_columns(rows: pd.DataFrame) -> list[tuple[int, str]]:
    """``(k, column)`` of the per-step error columns holding a value, by step."""
    found = [(int(m[1]), c) for c in rows.columns if (m := _STEP_COLUMN.fullmatch(c)) and rows[c].notna().any()]
    return sorted(found)


def per_step_figure(rows: pd.DataFrame, title: str | None = None, period: float | None = None) -> Figure | None:
    """Mean orthodromic error (degrees) against the horizon step, one line per arm, of one setting's runs of a model.

    Args:
        rows: :func:`with_arms`' frame: one row per run with ``arm`` and ``orthodromic_deg_h<k>`` columns.
        title: the figure title, or none.
        period: seconds between steps (David: 0.2); given, the top axis shows the seconds ahead.

    Returns:
        A figure with one Axes (x: step 1..H, y: degrees from 0): per arm in :func:`arm_order`, a line with
        markers (label and gid: the arm) through the mean over its runs, and a ± population-std band
        (``fill_between``, gid ``<arm> std``) where it has two runs or more; ``None`` when no run logged a
        per-step error (``predict=point``).
    """
    steps = _step_columns(rows)
    if not steps:
        return None
    x = np.array([k for k, _ in steps], dtype=float)
    with matplotlib.rc_context(paper_style()):
        fig = Figure(figsize=(8.0, 6.0), layout="constrained")
        ax = fig.add_subplot()
        for i, arm in enumerate(arm_order(rows["arm"])):
            values = rows.loc[rows["arm"] == arm, [c for _, c in steps]]
            mean, std, n = values.mean().to_numpy(), values.std(ddof=0).to_numpy(), values.count().to_numpy()
            color = ARM_COLORS[i % len(ARM_COLORS)]
            ax.plot(x, mean, color=color, marker="o", markersize=7, linewidth=2, label=arm, gid=arm, zorder=3)
            band = n > 1
            if band.any():
                ax.fill_between(x[band], (mean - std)[band], (mean + std)[band], color=color, alpha=0.2,
                                linewidth=0, gid=f"{arm} std", zorder=2)
        ax.set_xticks(x, [f"{k:g}" for k in x])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("Horizon step")
        ax.set_ylabel("Orthodromic error (deg)")
        ax.grid(alpha=0.3, zorder=0)
        ax.legend(loc="upper left", fontsize=FONT_SIZE * 0.7, frameon=False)
        if period:
            top = ax.secondary_xaxis("top", functions=(lambda k: k * period, lambda t: t / period))
            top.set_xlabel("Seconds ahead")
            _pin_tick_fonts(top)
        if title is not None:
            fig.suptitle(title)
        _pin_tick_fonts(ax)
    return fig


def _token(field: str, value) -> str:
    """One field of a file stem: ``r300``, ``jr0.2``, ``video``; ``""`` when not logged."""
    if not given(value):
        return ""
    return _STEM_CODES[field] + (number(value) if isinstance(value, (int, float, np.number)) else str(value))


def setting_stems(settings: list[Mapping]) -> list[str]:
    """File-stem part of each table setting: the dataset, plus the fields in which its dataset's settings differ
    (``david``; ``david_r300`` beside ``david_r20``). Characters other than letters, digits, ``.``, ``_`` and ``-``
    become ``_``."""
    frame = pd.DataFrame(list(settings), columns=list(TABLE_FIELDS))
    stems = []
    for _, setting in frame.iterrows():
        same = frame[frame["dataset"] == setting["dataset"]]
        varying = [f for f in TABLE_FIELDS[1:] if same[f].astype(str).nunique() > 1]
        tokens = [setting["dataset"], *(_token(f, setting[f]) for f in varying)]
        stems.append(re.sub(r"[^A-Za-z0-9._-]", "_", "_".join(t for t in tokens if t)))
    return stems


def regression_outputs(long: pd.DataFrame, stat: str) -> tuple[dict[str, RegressionTable], dict[str, Figure]]:
    """The tables and per-step figures of regression runs, by file stem (module docstring).

    Args:
        long: :func:`reports.query.regression_results`' frame (non-empty).
        stat: ``final`` or ``best``, which the frame's metrics are (for the captions).
    """
    long = with_arms(long)
    groups = [(dict(zip(TABLE_FIELDS, key)), rows)
              for key, rows in long.groupby(list(TABLE_FIELDS), dropna=False, sort=True)]
    tables, figures = {}, {}
    for (setting, rows), stem in zip(groups, setting_stems([s for s, _ in groups])):
        tables[f"{TABLE_PREFIX}_{stem}"] = build_regression_table(rows, regression_caption(rows, stat))
        for model in model_order(rows["model"]):
            name = f"{PLOT_PREFIX}_{stem}_{re.sub(r'[^A-Za-z0-9._-]', '_', model)}"
            title = f"{dataset_name(setting['dataset'])}, {model_name(model)}"
            fig = per_step_figure(rows[rows["model"] == model], title, _step_seconds(setting["dataset"]))
            if fig is None:
                log.warning("%s not written: its runs logged no per-step error (%s<k>; predict=point or "
                            "horizon 1)", name, STEP_METRIC)
            else:
                figures[name] = fig
    return tables, figures
