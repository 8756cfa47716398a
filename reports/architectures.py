"""The scheme x depth table of mixed-architecture FL runs (``pfl report --by architecture``), laid out as FlexiFed's.

FlexiFed (Wang et al., WWW 2023) prints in its Table 1 one block of rows per dataset and model family
("CINIC-10 / VGG", "AG News / CharCNN", ...), one row per sharing scheme within a block and one column per
version V1..V4 of the family, shallowest first. This table does the same for every selected FL run at once:

* Blocks: (dataset, model family) in the paper's order, datasets CIFAR-10, CINIC-10, AG News, Speech Commands
  (:data:`DATASET_ORDER`) then the others by id, families VGG, ResNet, CharCNN, VDCNN (:data:`FAMILY_ORDER`)
  then the others by id. A run's family is :func:`reports.query.model_family` of its architectures
  (:data:`pfl.models.FAMILIES`; an architecture without a family is a family of its own).
* Rows within a block: the schemes of :data:`SCHEME_ORDER` (``standalone``, ``clustered_fl``, ``basic_common``,
  ``clustered_common``, ``max_common``) in that order, then any other row label sorted; a run without a
  ``scheme`` param is labelled by its ``algo``. Labels are display names (``CIFAR-10 / VGG``, ``Max-Common``:
  :mod:`reports.names`).
* Columns: ``V1``, ``V2``, ... the k-th shallowest architecture (:func:`architecture_order`) among those a
  block's runs logged ``test/acc_<arch>`` for (a family with more than 4 depths gets V5 and on; a block with
  fewer leaves the last columns "—"), then ``mean``: the run's ``test/acc``, sample-weighted over all clients.
  The caption says which architecture each Vk is, per family (per block where a family's blocks differ).

Stores written before :mod:`pfl.vocabulary` hold ``test_acc`` / ``test_acc_<arch>``, read alike. Each cell is
mean ± std (population std, ddof=0, as :func:`reports.query.aggregate`) over the FL runs (seeds) of that row, in
percent with one decimal as the paper prints it (``64.4``; the value alone for one seed); the best row of each
column within a block is in bold where the block's column has two rows or more, and a row without runs of a
version shows "—". The caption states the setting (:func:`reports.settings.setting_sentence`; one per dataset where
the datasets' settings differ) and the seeds. Each dataset's runs must share one setting: runs of a dataset at
several partitions, alphas or join ratios are refused, naming the option (``--partition``, ``--alpha``,
``--join-ratio``) that selects one. The writers are :class:`reports.table.ResultsTable`'s (no LaTeX scaling: the
table is narrow), except the CSV, which is long: one line per non-empty cell (:meth:`ArchitectureTable.to_csv`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from reports.names import (FAMILIES, SCHEMES, algo_name, architecture_name, dataset_name, family_name, number,
                           scheme_name)
from reports.query import ARCH_ACC, MEAN_ARCH
from reports.settings import TABLE_SETTING, setting_sentence
from reports.table import ResultsTable, best_flags

SCHEME_ORDER = tuple(SCHEMES)  # FlexiFed's Table 1: standalone, clustered_fl, ..., max_common
DATASET_ORDER = ("cifar10", "cinic10", "agnews", "speech_commands")  # FlexiFed's Table 1
FAMILY_ORDER = tuple(FAMILIES)  # vgg, resnet, charcnn, vdcnn
BLOCK = ("dataset", "family")
ROW = (*BLOCK, "row")
ROW_HEADERS = ("dataset / models", "scheme")  # the displayed row-label columns, as in FlexiFed's Table 1
CSV_COLUMNS = ("dataset", "family", "scheme", "version", "architecture", "mean", "std", "n")
_OPTION = {"partition": "--partition", "alpha": "--alpha", "join_ratio": "--join-ratio"}
_DEPTH = re.compile(r"(\D*?)(\d+)(.*)")


@dataclass(frozen=True)
class ArchitectureTable(ResultsTable):
    """Means, stds, best-in-block flags and seed counts; rows (dataset, family, scheme or algo), columns ``V1``, ...
    then ``mean``; a caption.

    Attributes:
        versions: per block ``(dataset, family)``, its architectures by depth: ``versions[block][k - 1]`` is
            column ``Vk`` of that block.

    Cells are accuracies in percent with one decimal; the CSV holds the unscaled fractions.
    """

    versions: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    fit_width: ClassVar[bool] = False

    def row_labels(self) -> pd.MultiIndex:
        """``(dataset / family, scheme)`` display names: ``("CIFAR-10 / VGG", "Max-Common")``, ``(..., "FedAvg")``."""
        labels = [(f"{dataset_name(d)} / {family_name(f)}", row_name(r)) for d, f, r in self.mean.index]
        return pd.MultiIndex.from_tuples(labels, names=ROW_HEADERS)

    def header(self, col) -> tuple[str, ...]:
        """The version (``V1``) or ``mean``, one header level."""
        return (col,)

    def scale_digits(self, col) -> tuple[float, int]:
        """Percent, one decimal (FlexiFed's Table 1)."""
        return 100.0, 1

    def to_csv(self, path: Path) -> None:
        """One line per non-empty cell, columns :data:`CSV_COLUMNS`: ids (``cifar10``, ``vgg``, ``max_common``), the
        column (``V1``, ..., ``mean``), its architecture (``vgg11``; empty for ``mean``), the unscaled mean and
        std (fractions) and the seeds ``n``; in table order."""
        cells = pd.DataFrame({"mean": self.mean.stack(), "std": self.std.stack(), "n": self.count.stack()})
        cells = cells[cells["n"] > 0].rename_axis([*BLOCK, "scheme", "version"]).reset_index()
        cells["architecture"] = [self.versions[d, f][int(v[1:]) - 1] if v != MEAN_ARCH else ""
                                 for d, f, v in cells[[*BLOCK, "version"]].itertuples(index=False)]
        cells[list(CSV_COLUMNS)].to_csv(path, index=False)


def row_name(row: str) -> str:
    """A row's display name: the scheme's (``Max-Common``), else the algorithm's (``FedAvg``)."""
    return scheme_name(row) if row in SCHEMES else algo_name(row)


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


def known_first(values: Iterable[str], known: Iterable[str]) -> list[str]:
    """The distinct ``values`` that are ``known``, in that order, then the others sorted."""
    present, known = set(values), list(known)
    return [v for v in known if v in present] + sorted(present - set(known))


def row_order(labels: Iterable[str]) -> list[str]:
    """Rows: the FlexiFed schemes of :data:`SCHEME_ORDER` in that order, then the other labels sorted."""
    return known_first(labels, SCHEME_ORDER)


def block_versions(long: pd.DataFrame) -> dict[tuple[str, str], list[str]]:
    """Per block ``(dataset, family)`` of :func:`reports.query.architecture_results`' frame, in table order
    (module docstring), its architectures by :func:`architecture_order` (``[]`` for runs with ``mean`` only)."""
    datasets = known_first(long["dataset"], DATASET_ORDER)
    families = known_first(long["family"], FAMILY_ORDER)
    blocks = sorted(set(zip(long["dataset"], long["family"])),
                    key=lambda b: (datasets.index(b[0]), families.index(b[1])))
    archs = long[long["arch"] != MEAN_ARCH].groupby(list(BLOCK))["arch"].unique()
    return {b: architecture_order(archs.get(b, [])) for b in blocks}


def _check_one_setting(long: pd.DataFrame) -> None:
    """Refuse a dataset whose runs hold several partition settings or join ratios (one setting per dataset)."""
    for dataset, rows in long.groupby("dataset"):
        for col in TABLE_SETTING:
            values = rows[col].dropna().unique()
            if len(values) > 1:
                first = number(values[0]) if isinstance(values[0], float) else values[0]
                option = _OPTION.get(col) or f"--filter \"params.{col} = '{first}'\""
                raise ValueError(f"--by architecture: the FL runs on {dataset} hold several {col} values "
                                 f"{sorted(map(str, values))}; select one with {option}")


def _settings_text(long: pd.DataFrame, datasets: list[str]) -> str:
    """The setting of all runs in one sentence, or one sentence per dataset (in ``datasets`` order) where the
    datasets' settings (partition, join ratio, clients, rounds) differ."""
    if len(long[[*TABLE_SETTING, "num_clients", "global_rounds"]].drop_duplicates()) == 1:
        return setting_sentence(long)
    return ". ".join(setting_sentence(long[long["dataset"] == d]) for d in datasets)


def _versions_legend(versions: dict[tuple[str, str], list[str]]) -> str:
    """``VGG: V1..V4 = VGG-11/VGG-13/VGG-16/VGG-19; CharCNN: V1..V4 = charcnn_v1/...``: one entry per family, one per
    block (``CINIC-10 / VGG: ...``) where a family's blocks hold different architectures; blocks without any
    left out."""
    by_family: dict[str, dict[tuple[str, ...], list[str]]] = {}
    for (dataset, family), archs in versions.items():
        if archs:
            by_family.setdefault(family, {}).setdefault(tuple(archs), []).append(dataset)
    parts = []
    for family, lists in by_family.items():
        for archs, datasets in lists.items():
            label = family_name(family) if len(lists) == 1 else \
                f"{'/'.join(map(dataset_name, datasets))} / {family_name(family)}"
            span = "V1" if len(archs) == 1 else f"V1..V{len(archs)}"
            parts.append(f"{label}: {span} = {'/'.join(map(architecture_name, archs))}")
    return "; ".join(parts)


def architecture_caption(long: pd.DataFrame, stat: str) -> str:
    """What the table shows: the setting(s), the statistic (final or best round), the versions, the mean column."""
    acc = ARCH_ACC[stat]
    when = {"final": "the FL runs' final round", "best": "the FL runs' round of best test accuracy"}[stat]
    versions = block_versions(long)
    datasets = list(dict.fromkeys(d for d, _ in versions))
    return (f"{_settings_text(long, datasets)}. Test accuracy (%) of each architecture's clients ({acc}_<arch>) at "
            f"{when}; Vk: the k-th shallowest architecture of a dataset / model family ({_versions_legend(versions)}); "
            f"mean: all clients, sample-weighted ({acc}).")


def build_architecture_table(long: pd.DataFrame, caption: str = "") -> ArchitectureTable:
    """The scheme x version table of :func:`reports.query.architecture_results`' long frame, with ``caption``.

    Raises:
        ValueError: the frame is empty, or a dataset's runs hold several partition settings or join ratios
            (the message names the option that selects one).
    """
    if long.empty:
        raise ValueError("no finished FL runs match the selection; check --experiment and the filters")
    _check_one_setting(long)
    versions = block_versions(long)
    column = {(*b, a): f"V{k}" for b, archs in versions.items() for k, a in enumerate(archs, 1)}
    long = long.assign(column=[column.get(key, MEAN_ARCH) for key in zip(*(long[c] for c in (*BLOCK, "arch")))])
    grouped = long.groupby([*ROW, "column"])["acc"]
    stats = {"mean": grouped.mean(), "std": grouped.agg(lambda v: v.std(ddof=0)), "n": grouped.count()}
    rows = pd.MultiIndex.from_tuples([(*b, r) for b in versions for r in row_order(
        long.loc[(long["dataset"] == b[0]) & (long["family"] == b[1]), "row"])], names=ROW)
    columns = [f"V{k}" for k in range(1, max(map(len, versions.values())) + 1)] + [MEAN_ARCH]
    mean, std, count = (stats[k].unstack("column").reindex(index=rows, columns=columns).rename_axis(None, axis=1)
                        .astype(float) for k in ("mean", "std", "n"))
    best = pd.concat([best_flags(block, lambda col: True) for _, block in mean.groupby(level=list(BLOCK), sort=False)])
    return ArchitectureTable(mean, std, best.reindex(mean.index), count.fillna(0).astype(int), caption, versions)
