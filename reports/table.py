"""The results table: one row per algorithm, columns dataset x {w/o, APH, LoRAPH} x {Acc, NLL, F-ECE, OOD AUROC},
plus a ``new clients`` group when runs held clients out (new-client evaluation, the FL runs' ``new/*``). Rows are
in :func:`reports.names.algo_order`: FedAvg first, then the personalized algorithms.

Cells are mean ± population std (ddof=0) over seeds (from :func:`reports.query.aggregate`); a
cell of a single seed shows its value alone (no ``± 0.00``). The best value of each column
(highest accuracy and OOD AUROC, lowest NLL and F-ECE) is in bold when the column has at least
two rows to compare. A (dataset, method) without runs shows as missing (an em dash), never as
zero. Accuracy, F-ECE (test-sample-weighted mean of per-client ECE) and OOD AUROC (of the maximum
softmax probability) are in percent, NLL in nats. Row labels and headers use the display names of
:mod:`reports.names` (FedFomo, CIFAR-10); the CSV keeps the ids (``fedfomo``, ``cifar10/APH/acc``).

The caption (above the Markdown table as ``Table: ...``, pandoc's syntax, and in LaTeX's
``\\caption``) is the caller's text followed by the seeds: ``Mean ± std (population) over n=3
seeds.`` when every cell has the same number n of seeds (``Single seed (n=1): values without
std.`` for one), else a last column ``n`` gives each row's seeds (``2–3`` where its cells differ). The LaTeX
table (booktabs) is scaled to the line width (``\\resizebox``: needs ``graphicx``), so a
per-dataset table fits a page; :mod:`reports.report` writes one per dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from reports.names import algo_name, algo_order, dataset_name, number
from reports.plots import METHOD_ORDER, NEW_CLIENTS
from reports.query import METRICS
from reports.settings import TABLE_SETTING, partition_label

_HEADERS = {"acc": "Acc (%)", "nll": "NLL", "ece": "F-ECE (%)", "ood_auroc": "OOD AUROC (%)"}
_SCALE = {"acc": 100.0, "nll": 1.0, "ece": 100.0, "ood_auroc": 100.0}
_DECIMALS = {"acc": 2, "nll": 3, "ece": 2, "ood_auroc": 2}
_HIGHER_IS_BETTER = {"acc": True, "nll": False, "ece": False, "ood_auroc": True}
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "%": r"\%", "_": r"\_", "&": r"\&", "#": r"\#", "$": r"\$",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "α": r"$\alpha$", "±": r"$\pm$"}
_FIT_WIDTH = "\\resizebox{\\linewidth}{!}{%\n"
MISSING = "—"
N_HEADER = "n"  # the per-row seeds column, present when the cells' seed counts differ


def _latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (``%`` -> ``\\%``, ``_`` -> ``\\_``, ``α`` -> ``$\\alpha$``,
    ...)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _sparse(index: pd.MultiIndex) -> pd.MultiIndex:
    """``index`` with each outer label blank ("") where the row continues the previous row's block."""
    rows = list(index)
    labels = [tuple("" if i and rows[i][:level + 1] == rows[i - 1][:level + 1] and level < index.nlevels - 1
                    else label for level, label in enumerate(row)) for i, row in enumerate(rows)]
    return pd.MultiIndex.from_tuples(labels, names=index.names)


def best_flags(mean: pd.DataFrame, higher_is_better: Callable[[object], bool]) -> pd.DataFrame:
    """True at the best value of every column of ``mean`` holding at least two values (one value: nothing to compare).

    ``higher_is_better(col)`` says whether the column's maximum (else its minimum) is best; NaN cells never are.
    """
    best = pd.DataFrame(False, index=mean.index, columns=mean.columns)
    for col in mean.columns:
        values = mean[col].dropna()
        if len(values) > 1:
            best.at[values.idxmax() if higher_is_better(col) else values.idxmin(), col] = True
    return best


@dataclass(frozen=True)
class ResultsTable:
    """Means, stds, best-of-column flags and seed counts, indexed by algorithm, columns (dataset, method, metric).

    ``count`` holds the number of seeds behind each cell (0 where missing); ``caption`` the caller's
    text, completed by :meth:`full_caption`. Subclasses with other rows or columns
    (:class:`reports.architectures.ArchitectureTable`, :class:`reports.regression.RegressionTable`) override
    ``index_name`` or :meth:`row_labels`, :meth:`header`, :meth:`scale_digits` and :meth:`csv_name` (or
    :meth:`to_csv`) and keep the other writers. Row labels of several levels (a :class:`pandas.MultiIndex`, e.g.
    block then row) become leading columns, an outer label printed on the first row of its block only.
    """

    mean: pd.DataFrame
    std: pd.DataFrame
    best: pd.DataFrame
    count: pd.DataFrame
    caption: str = ""

    index_name: ClassVar[str] = "algorithm"  # the row header, and the CSV's index column
    fit_width: ClassVar[bool] = True  # LaTeX: scaled to the line width

    def row_labels(self) -> pd.Index:
        """The rows' labels as displayed, one per row of :attr:`mean`: the algorithms' names (``FedFomo``), the
        index named :attr:`index_name`."""
        return pd.Index([algo_name(r) for r in self.mean.index], name=self.index_name)

    def header(self, col) -> tuple[str, ...]:
        """Header levels of column ``col``: ``(dataset, method, metric header)``, e.g. ``(CIFAR-10, APH, Acc (%))``."""
        dataset, method, metric = col
        return dataset_name(dataset), method, _HEADERS[metric]

    def scale_digits(self, col) -> tuple[float, int]:
        """``(scale, decimals)`` of column ``col``'s cells: percent with 2 decimals, NLL in nats with 3."""
        return _SCALE[col[2]], _DECIMALS[col[2]]

    def csv_name(self, col) -> str:
        """CSV column stem of ``col`` (``_mean`` / ``_std`` / ``_n`` are appended): ``<dataset>/<method>/<metric>``."""
        return "/".join(col)

    def _counts(self) -> np.ndarray:
        """The seed counts of the non-missing cells."""
        return self.count.to_numpy()[self.mean.notna().to_numpy()]

    def _uniform_seeds(self) -> bool:
        return len(set(self._counts().tolist())) <= 1

    def full_caption(self) -> str:
        """``caption`` followed by the seeds behind the cells (module docstring); ``""`` when both are empty."""
        counts = set(self._counts().astype(int).tolist())
        if not counts:
            return self.caption
        if counts == {1}:
            note = "Single seed (n=1): values without std."
        elif len(counts) == 1:
            note = f"Mean ± std (population) over n={counts.pop()} seeds."
        else:
            note = "Mean ± std (population) over the n seeds of each row (column n); n=1: the value alone."
        return f"{self.caption} {note}" if self.caption else note

    def _cell(self, row, col, pm: str, bold: str) -> str:
        """One formatted cell: ``mean{pm}std`` (the mean alone for one seed), ``bold % text`` if best, or missing."""
        m, s = self.mean.at[row, col], self.std.at[row, col]
        if pd.isna(m):
            return MISSING
        scale, digits = self.scale_digits(col)
        text = f"{m * scale:.{digits}f}" + (f"{pm}{s * scale:.{digits}f}" if self.count.at[row, col] > 1 else "")
        return bold % text if self.best.at[row, col] else text

    def _row_seeds(self, row) -> str:
        """``3`` or ``2–3``: the seeds behind a row's non-missing cells."""
        counts = self.count.loc[row].to_numpy()[self.mean.loc[row].notna().to_numpy()]
        low, high = int(counts.min()), int(counts.max())
        return str(low) if low == high else f"{low}–{high}"

    def cells(self, pm: str, bold: str) -> pd.DataFrame:
        """Formatted cells (:meth:`_cell`), best ones wrapped by ``bold % text``; row labels and headers as
        displayed, plus a last column ``n`` (each row's seeds) when the cells' seed counts differ."""
        columns = {self.header(col): [self._cell(row, col, pm, bold) for row in self.mean.index]
                   for col in self.mean.columns}
        if not self._uniform_seeds():
            levels = len(next(iter(columns)))
            columns[(N_HEADER, *[""] * (levels - 1))] = [self._row_seeds(row) for row in self.mean.index]
        return pd.DataFrame(list(zip(*columns.values())), index=self.row_labels(),
                            columns=pd.MultiIndex.from_tuples(list(columns)))

    def to_markdown(self) -> str:
        """A pipe table (one header row ``dataset / method / metric``), best cells in bold, the caption above."""
        cells = self.cells(" ± ", "**%s**")
        cells.columns = [" / ".join(p for p in c if p) for c in cells.columns]
        caption = self.full_caption()
        if cells.index.nlevels > 1:
            cells.index = _sparse(cells.index)
            table = cells.reset_index().to_markdown(index=False, disable_numparse=True)
        else:
            table = cells.to_markdown(disable_numparse=True)
        return (f"Table: {caption}\n\n" if caption else "") + table

    def to_latex(self, label: str | None = None) -> str:
        """A booktabs table (``\\toprule``/``\\midrule``/``\\bottomrule``), multicolumn headers, a caption.

        Headers, row names and the caption are LaTeX-escaped (``Acc (\\%)``); the cells are LaTeX already.
        With :attr:`fit_width` the tabular is scaled to ``\\linewidth`` (``\\resizebox``, package graphicx).
        ``label``: a ``\\label`` for ``\\ref``.
        """
        cells = self.cells(r" $\pm$ ", r"\textbf{%s}")
        headers = [tuple(map(_latex_escape, c)) for c in cells.columns]
        # one header level: a plain Index (the Styler prints a one-level MultiIndex's labels as tuples)
        cells.columns = pd.Index([h[0] for h in headers]) if cells.columns.nlevels == 1 else \
            pd.MultiIndex.from_tuples(headers)
        levels = cells.index.nlevels
        escape = (lambda r: tuple(map(_latex_escape, r))) if levels > 1 else _latex_escape
        cells.index = cells.index.map(escape).set_names([None] * levels)  # no separate index-name row
        caption = _latex_escape(self.full_caption()) or None
        # multirow_align="naive": an outer row label on its block's first row, no multirow package needed
        latex = cells.style.to_latex(hrules=True, multicol_align="c", multirow_align="naive",
                                     column_format="l" * levels + "c" * cells.shape[1], caption=caption,
                                     label=label, position_float="centering" if caption else None)
        if not self.fit_width:
            return latex
        return latex.replace("\\begin{tabular}", _FIT_WIDTH + "\\begin{tabular}").replace(
            "\\end{tabular}\n", "\\end{tabular}}\n")

    def to_csv(self, path: Path) -> None:
        """Numbers only: ``<dataset>/<method>/<metric>_mean``, ``_std`` (unscaled) and ``_n`` (seeds); missing cells
        empty (``_n`` 0); rows by id."""
        flat = {}
        for col in self.mean.columns:
            for suffix, frame in (("mean", self.mean), ("std", self.std), ("n", self.count)):
                flat[f"{self.csv_name(col)}_{suffix}"] = frame[col]
        pd.DataFrame(flat).rename_axis(self.index_name).to_csv(path)


def _check_one_setting(agg: pd.DataFrame) -> None:
    """Refuse an aggregated frame with several table settings (partition setting, join ratio) of one
    (algorithm, dataset)."""
    settings = agg[["algo", "dataset", *TABLE_SETTING]].drop_duplicates()
    several = settings[settings.duplicated(["algo", "dataset"], keep=False)]
    if not several.empty:
        algo, dataset = several["algo"].iloc[0], several["dataset"].iloc[0]
        found = several[(several["algo"] == algo) & (several["dataset"] == dataset)]
        names = [f"{partition_label(row)}, jr {number(row['join_ratio'])}" for _, row in found.iterrows()]
        raise ValueError(f"{algo} on {dataset} has runs at several settings {names}; select one with "
                         "--partition / --alpha / --join-ratio (or a filter)")


def build_table(agg: pd.DataFrame, caption: str = "") -> ResultsTable:
    """The results table of an aggregated frame holding one setting per (algorithm, dataset), with ``caption``.

    Args:
        agg: :func:`reports.query.aggregate`'s frame (fractions; ``<metric>_n`` seeds per cell).
        caption: the table's text; :meth:`ResultsTable.full_caption` adds the seeds.

    Raises:
        ValueError: the frame is empty, or an (algorithm, dataset) has runs at several table
            settings (partition setting, join ratio); the message says how to select one.
    """
    if agg.empty:
        raise ValueError("no finished FL runs match the selection; check --experiment and the filters")
    _check_one_setting(agg)
    datasets = sorted(agg["dataset"].unique())
    methods = [m for m in METHOD_ORDER if m != NEW_CLIENTS or (agg["method"] == NEW_CLIENTS).any()]
    columns = pd.MultiIndex.from_tuples([(d, m, k) for d in datasets for m in methods for k in METRICS])
    algos = algo_order(agg["algo"].unique())
    frames = {stat: pd.DataFrame(0.0 if stat == "n" else float("nan"), index=algos, columns=columns)
              for stat in ("mean", "std", "n")}
    for row in agg.itertuples(index=False):
        for k in METRICS:
            for stat, frame in frames.items():
                frame.at[row.algo, (row.dataset, row.method, k)] = getattr(row, f"{k}_{stat}")
    best = best_flags(frames["mean"], lambda col: _HIGHER_IS_BETTER[col[2]])
    return ResultsTable(frames["mean"], frames["std"], best, frames["n"].astype(int), caption)
