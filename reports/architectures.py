"""The per-architecture table of mixed-architecture FL runs (``pfl report --by architecture``).

For algorithms whose clients train different architectures (FlexiFed, Wang et al., WWW 2023,
Table 1): one row per sharing scheme (``standalone``, ``clustered_fl``, ``basic_common``,
``clustered_common``, ``max_common``, then any other; a run without a ``scheme`` param is
labelled by its ``algo``), one column per architecture group (``vgg11``, ``vgg13``, ...) and
``mean`` (the run's ``test/acc``, sample-weighted over all clients; stores written before
:mod:`pfl.vocabulary` hold ``test_acc`` / ``test_acc_<arch>``, read alike). Each cell is mean ± std
(population std, ddof=0, as :func:`reports.query.aggregate`) over the FL runs (seeds) of that row,
in percent with one decimal as the paper prints it (``64.4``; the value alone for one seed); the
best row of each column is in bold where the column has two rows or more, and a row without runs
of an architecture shows "—". The caption states the setting (:func:`reports.settings.setting_sentence`)
and the seeds. The table covers one setting: runs at several datasets, partitions, alphas or join
ratios are refused, naming the option (``--datasets``, ``--partition``, ``--alpha``, ``--join-ratio``)
that selects one. The writers are :class:`reports.table.ResultsTable`'s (no LaTeX scaling: the table is narrow).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import ClassVar

import pandas as pd

from reports.names import number
from reports.query import ARCH_ACC, MEAN_ARCH
from reports.settings import TABLE_SETTING, setting_sentence
from reports.table import ResultsTable, best_flags

SCHEME_ORDER = ("standalone", "clustered_fl", "basic_common", "clustered_common", "max_common")
_SETTING = ("dataset", *TABLE_SETTING)
_OPTION = {"dataset": "--datasets", "partition": "--partition", "alpha": "--alpha", "join_ratio": "--join-ratio"}
_DEPTH = re.compile(r"(\D*?)(\d+)(.*)")


class ArchitectureTable(ResultsTable):
    """Means, stds and best-of-column flags indexed by scheme, columns architectures then ``mean``; a caption.

    Cells are accuracies in percent with one decimal; the CSV holds the unscaled fractions
    (``<arch>_mean``, ``<arch>_std``, ``mean_mean``, ``mean_std``).
    """

    index_name: ClassVar[str] = "scheme"
    fit_width: ClassVar[bool] = False

    def header(self, col) -> tuple[str, ...]:
        """The architecture name (or ``mean``), one header level."""
        return (col,)

    def scale_digits(self, col) -> tuple[float, int]:
        """Percent, one decimal (FlexiFed's Table 1)."""
        return 100.0, 1

    def csv_name(self, col) -> str:
        """The architecture name (or ``mean``)."""
        return col


def _depth_key(name: str) -> tuple[str, float, str]:
    """``(family, depth, rest)`` of an architecture name: ``vgg16`` -> ``("vgg", 16, "")``; no digits: depth inf."""
    match = _DEPTH.fullmatch(name)
    return (match[1], int(match[2]), match[3]) if match else (name, math.inf, "")


def architecture_order(names: Iterable[str]) -> list[str]:
    """Architectures by depth number within a family, families by their shallowest member.

    ``["resnet20", "vgg16", "vgg11", "resnet56"]`` -> ``["vgg11", "vgg16", "resnet20", "resnet56"]``;
    names without a number come after those of the same family, ties in name order.
    """
    keys = {n: _depth_key(n) for n in set(names)}
    shallowest: dict[str, float] = {}
    for family, depth, _ in keys.values():
        shallowest[family] = min(depth, shallowest.get(family, math.inf))
    return sorted(keys, key=lambda n: (shallowest[keys[n][0]], keys[n][0], keys[n][1], keys[n][2], n))


def row_order(labels: Iterable[str]) -> list[str]:
    """Rows: the FlexiFed schemes of :data:`SCHEME_ORDER` in that order, then the other labels sorted."""
    present = set(labels)
    return [s for s in SCHEME_ORDER if s in present] + sorted(present - set(SCHEME_ORDER))


def _check_one_setting(long: pd.DataFrame) -> None:
    """Refuse runs at several datasets / partition settings / join ratios (one table, one setting)."""
    for col in _SETTING:
        values = long[col].dropna().unique()
        if len(values) > 1:
            first = number(values[0]) if isinstance(values[0], float) else values[0]
            option = _OPTION.get(col) or f"--filter \"params.{col} = '{first}'\""
            raise ValueError(f"--by architecture: the FL runs hold several {col} values "
                             f"{sorted(map(str, values))}; select one with {option}")


def architecture_caption(long: pd.DataFrame, stat: str) -> str:
    """What the table shows: the setting, the statistic (final or best round), the mean column."""
    acc = ARCH_ACC[stat]
    when = {"final": "the FL runs' final round", "best": "the FL runs' round of best test accuracy"}[stat]
    return (f"{setting_sentence(long)}. Test accuracy (%) of each architecture's clients ({acc}_<arch>) at {when}; "
            f"mean: all clients, sample-weighted ({acc}).")


def build_architecture_table(long: pd.DataFrame, caption: str = "") -> ArchitectureTable:
    """The per-architecture table of :func:`reports.query.architecture_results`'s long frame, with ``caption``.

    Raises:
        ValueError: the frame is empty, or its runs hold several datasets, partition settings or
            join ratios (the message names the option that selects one).
    """
    if long.empty:
        raise ValueError("no finished FL runs match the selection; check --experiment and the filters")
    _check_one_setting(long)
    grouped = long.groupby(["row", "arch"])["acc"]
    stats = {"mean": grouped.mean(), "std": grouped.agg(lambda v: v.std(ddof=0)), "n": grouped.count()}
    rows = row_order(long["row"])
    columns = architecture_order(a for a in long["arch"].unique() if a != MEAN_ARCH) + [MEAN_ARCH]
    mean, std, count = (stats[k].unstack("arch").reindex(index=rows, columns=columns).rename_axis(None)
                        .rename_axis(None, axis=1).astype(float) for k in ("mean", "std", "n"))
    return ArchitectureTable(mean, std, best_flags(mean, lambda col: True), count.fillna(0).astype(int), caption)
