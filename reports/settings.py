"""What a report covers and what it says about it: narrowing the runs, one table per setting, captions, titles.

A run's setting is :data:`reports.query.SETTING`. A results table covers one *table setting*
(:data:`TABLE_SETTING`): a partition setting (partition and the params it uses: Dirichlet
``alpha``, pathological ``classes_per_client``, a PFLlib import's ``partition_name``) and a join
ratio; its rows are algorithms, its columns datasets x methods x metrics. Unused partition params
are NaN, so every grouping here keeps NaN keys (``dropna=False``); a store mixing pathological and
Dirichlet runs gives one table per partition setting.

Captions state the setting with the display names of :mod:`reports.names` (datasets, partition,
join ratio, clients and global rounds where the runs logged ``num_clients`` / ``global_rounds``)
and which ECE the numbers are: F-ECE, the test-sample-weighted mean of per-client ECE over
``ece_bins`` equal-mass bins, in percent.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from pfl.config import PARTITION_ALIASES
from reports.names import algo_name, dataset_name, number, partition_name, partition_stem

PARTITION_SETTING = ("partition", "alpha", "classes_per_client", "partition_name")
TABLE_SETTING = (*PARTITION_SETTING, "join_ratio")
TABLE_STEM = "table"


def at(frame: pd.DataFrame, column: str, value: float | None) -> pd.DataFrame:
    """Rows of ``frame`` whose numeric ``column`` equals ``value`` (within 1e-12); all rows when ``value`` is None."""
    return frame if value is None else frame[(frame[column] - value).abs() < 1e-12]


def _at_value(long: pd.DataFrame, column: str, value: float | None) -> pd.DataFrame:
    rows = at(long, column, value)
    if rows.empty:
        held = [number(v) for v in sorted(long[column].dropna().unique())]
        raise ValueError(f"no runs at {column}={value:g}; the runs hold {held}")
    return rows


def select(long: pd.DataFrame, partition: str | None = None, datasets: list[str] | None = None,
           alpha: float | None = None, join_ratio: float | None = None) -> pd.DataFrame:
    """The rows of a long frame in the selection, as :func:`narrow` but without its checks (possibly none)."""
    if partition is not None:
        long = long[long["partition"] == PARTITION_ALIASES.get(partition, partition)]
    if datasets:
        long = long[long["dataset"].isin(datasets)]
    return at(at(long, "alpha", alpha), "join_ratio", join_ratio)


def narrow(long: pd.DataFrame, partition: str | None = None, datasets: list[str] | None = None,
           alpha: float | None = None, join_ratio: float | None = None) -> pd.DataFrame:
    """The rows of a long frame (:func:`reports.query.results`) in the selection; ``None`` selects everything.

    Args:
        long: one row per run (and method), with the columns of :data:`reports.query.SETTING`.
        partition: ``dirichlet``, ``pathological``, ``iid``, ``exdir`` or ``pfllib`` (PFLlib's ``dir`` and
            ``pat`` too).
        datasets: dataset ids (``cifar10``, ...), every one of them must have runs.
        alpha: Dirichlet alpha (selects only partitions that use alpha).
        join_ratio: the join (participation) ratio.

    Raises:
        ValueError: no finished FL runs at all, or a selected value without runs; the message lists
            the values the runs hold.
    """
    if long.empty:
        raise ValueError("no finished FL runs match the selection; check --experiment and the filters")
    if partition is not None:
        wanted = PARTITION_ALIASES.get(partition, partition)
        if not (long["partition"] == wanted).any():
            raise ValueError(f"no runs with partition {wanted!r}; the runs hold {sorted(long['partition'].unique())}")
    long = select(long, partition)
    missing = sorted(set(datasets or ()) - set(long["dataset"]))
    if missing:
        raise ValueError(f"no runs on dataset(s) {missing}; the runs hold {sorted(long['dataset'].unique())}")
    return _at_value(_at_value(select(long, datasets=datasets), "alpha", alpha), "join_ratio", join_ratio)


def table_groups(long: pd.DataFrame) -> list[tuple[dict, pd.DataFrame]]:
    """``(table setting, rows)`` for every :data:`TABLE_SETTING` in a long frame, sorted; NaN fields kept."""
    groups = long.groupby(list(TABLE_SETTING), dropna=False, sort=True)
    return [(dict(zip(TABLE_SETTING, key)), rows) for key, rows in groups]


def table_stem(setting: Mapping, several: bool) -> str:
    """``table`` for the only table of a report, else ``table_<partition stem>_jr<join ratio>``
    (``table_dir0.1_jr0.2``, ``table_pat2_jr1``, ``table_iid_jr0.5``)."""
    if not several:
        return TABLE_STEM
    return f"{TABLE_STEM}_{partition_stem(*(setting[k] for k in PARTITION_SETTING))}_jr{number(setting['join_ratio'])}"


def partition_label(setting: Mapping) -> str:
    """Display name of the partition setting of a row or dict holding :data:`PARTITION_SETTING` (``Dir(α=0.1)``)."""
    return partition_name(*(setting[k] for k in PARTITION_SETTING))


def _joined(values: pd.Series) -> str:
    """The distinct non-NaN numbers, ascending, in shortest form, joined by ``/`` (``""`` when none)."""
    return "/".join(number(v) for v in sorted(values.dropna().unique()))


def setting_sentence(long: pd.DataFrame) -> str:
    """``CIFAR-10, CIFAR-100; Dir(α=0.1), join ratio 0.2, 20 clients, 100 global rounds`` of a long frame's runs.

    Clients and rounds only where the runs logged ``num_clients`` / ``global_rounds``; several values are
    joined by ``/``.
    """
    datasets = ", ".join(dataset_name(d) for d in sorted(long["dataset"].unique()))
    parts = ["/".join(sorted({partition_label(row) for _, row in long.iterrows()})),
             f"join ratio {_joined(long['join_ratio'])}"]
    for column, unit in (("num_clients", "client"), ("global_rounds", "global round")):
        values = _joined(long[column])
        parts += [f"{values} {unit}{'' if values == '1' else 's'}"] if values else []
    return f"{datasets}; {', '.join(parts)}"


def ece_text(long: pd.DataFrame) -> str:
    """``ECE: F-ECE (test-sample-weighted mean of per-client ECE, 20 equal-mass bins), in %``, with the runs'
    ``ece_bins`` (left out where not logged)."""
    bins = _joined(long["ece_bins"])
    bins = f"{bins} " if bins else ""
    return f"ECE: F-ECE (test-sample-weighted mean of per-client ECE, {bins}equal-mass bins), in %"


def table_caption(long: pd.DataFrame, stat: str) -> str:
    """Caption of a results table over a long frame's runs: the setting, the ECE, the FL-run statistic of the w/o
    Acc/NLL/F-ECE columns (``final`` or ``best``), the head runs and the OOD sets."""
    fl = {"final": "the FL runs' final round (test/*)",
          "best": "the FL runs' round of best test accuracy (best/test_*)"}[stat]
    text = (f"{setting_sentence(long)}. {ece_text(long)}. w/o Acc, NLL, F-ECE: {fl}. APH, LoRAPH and every OOD "
            "AUROC: head runs, post-hoc on the final client models")
    text += ", the same for --stat final and best." if stat == "best" else "."
    text += " OOD AUROC: maximum softmax probability, in-distribution as the positive class"
    scored = long[long["ood_auroc"].notna()]
    pairs = scored.groupby("dataset")["ood_dataset"].unique()
    if len(pairs):
        text += "; OOD sets: " + ", ".join(
            f"{dataset_name(d)} vs {'/'.join(sorted(dataset_name(str(n)) for n in o))}" for d, o in pairs.items())
    return text + "."


def run_title(row: Mapping) -> str:
    """``FedFomo, CIFAR-10, Dir(α=0.1), jr 0.2, seed 0``: one FL run's setting (a row of a long frame)."""
    tail = "" if pd.isna(row["seed"]) else f", seed {row['seed']}"
    return (f"{algo_name(row['algo'])}, {dataset_name(row['dataset'])}, {partition_label(row)}, "
            f"jr {number(row['join_ratio'])}{tail}")
