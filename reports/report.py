"""``pfl report``: the results tables and the paper's figures, built from the tracking store.

Writes into ``out_dir`` and logs the same files as artifacts of a *report* run
(tag ``pfl.kind = report``). The FL runs are those of :class:`Selection`'s experiments and
filter, narrowed to its ``partition``, ``datasets``, ``alpha`` and ``join_ratio`` where set
(:func:`reports.settings.narrow`); a store mixing partitions, alphas and join ratios needs none of them.

* Tables (:mod:`reports.table`), one per table setting among the selected runs (a partition
  setting, e.g. Dir(α=0.1) or Pat(2 classes/client), and a join ratio): rows algorithms, columns
  dataset x {w/o, APH, LoRAPH} x {Acc, NLL, F-ECE, OOD AUROC}. With a single setting the files are
  ``table.md``, ``table.csv``, ``table.tex``; with several, ``table_<partition>_jr<ratio>.*``
  (``table_dir0.1_jr0.2``, ``table_pat2_jr0.2``, ``table_iid_jr1``, ``table_exdir0.1c2_jr0.2``,
  the import's name for PFLlib partitions: :func:`reports.settings.table_stem`). The Markdown and
  CSV files hold every dataset of the setting side by side; the ``.tex`` file holds one LaTeX table
  per dataset (``\\label{tab:<stem>-<dataset>}``), each with its own caption and scaled to the line
  width, so each fits a page. Captions state the setting (datasets, partition, join ratio, clients,
  global rounds), the ECE (F-ECE, in %), the FL-run statistic of the w/o columns (``--stat final``:
  last round; ``best``: round of best test accuracy), the head runs, the OOD sets and the seeds.
* ``ece_vs_alpha_<algo>_<dataset>_jr<ratio>.{png,pdf}``: F-ECE (%) of w/o, APH, LoRAPH at each
  Dirichlet alpha (Dirichlet runs only), one figure per join ratio (the selected one only, with
  ``join_ratio``);
* ``ece_vs_join_ratio_<algo>_<dataset>_<partition>.{png,pdf}``: the same over join ratios, one
  figure per partition setting (``dir0.1``, ``pat2``, ...; at the selected alpha only, with ``alpha``);
* ``ood_vs_alpha_...``, ``ood_vs_join_ratio_...``: the same for the OOD AUROC (%) of the maximum
  softmax probability (where head runs scored OOD data). A sweep needs two values or more.
* ``reliability_<fl run id>.{png,pdf}``: reliability diagrams of one FL run's methods (pooled test
  predictions, global ECE in %), over the samples per bin, titled with the run's setting.

Regression FL runs (viewport prediction; :func:`reports.query.is_regression`) get their own outputs beside these
(:mod:`reports.regression`): ``table_regression_<dataset>.{md,csv,tex}`` (arms x model x {MSE, orthodromic
error}) and ``orthodromic_per_step_<dataset>_<model>.{png,pdf}``; the selection narrows them alike (``alpha``
selects none of them). A store of regression runs only writes only these.

With ``by="architecture"`` (``pfl report --by architecture``) it writes only
``table_architectures.md``, ``.csv``, ``.tex``: :mod:`reports.architectures`, FlexiFed's Table 1 layout for
every selected mixed-architecture FL run in one table: a block of rows per dataset and model family, a row per
scheme, columns V1, V2, ... (the block's architectures by depth) and mean; one setting per dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from pfl.heads import METHOD_LABELS
from reports.architectures import architecture_caption, build_architecture_table
from reports.names import algo_name, dataset_name, number, partition_stem
from reports.plots import bar_line_figure, reliability_figure, save_figure
from reports.query import aggregate, architecture_results, regression_results, reliability_bins, results
from reports.regression import regression_outputs
from reports.settings import (PARTITION_SETTING, at, narrow, partition_label, run_title, select, table_caption,
                              table_groups, table_stem)
from reports.table import ResultsTable, build_table

BY = ("method", "architecture")


@dataclass(frozen=True)
class Selection:
    """Which runs a report covers.

    Attributes:
        experiments: experiment names (``None``: all).
        filter_string: extra MLflow filter on FL run params, e.g. ``"params.algo = 'fedfomo'"``.
        alpha: only runs at this Dirichlet alpha (``None``: every alpha, and runs of partitions without
            one); the ECE-vs-join-ratio figures are drawn at it.
        join_ratio: only runs at this join ratio (``None``: all); the ECE-vs-alpha figures are drawn at it.
        reliability_run: FL run whose reliability diagrams to draw (``None``: the first selected with head runs).
        stat: the FL runs' numbers, ``final`` (last round, ``test/*``) or ``best`` (round of best
            test accuracy, ``best/test_*``); head-run columns are the same for both.
        by: ``method`` (algorithms x dataset / method / metric, and the figures) or ``architecture``
            ((dataset, family, scheme) x versions V1, V2, ... of mixed-architecture runs; no figures).
        partition: only runs of this partition (``dirichlet``, ``pathological``, ``iid``, ``exdir``,
            ``pfllib``; PFLlib's ``dir`` / ``pat`` too); ``None``: all. Tables and figures alike.
        datasets: only runs on these datasets (ids: ``cifar10``, ...; each must have runs), so the
            tables' columns and the ``.tex`` file's per-dataset tables; ``None``: all.
    """

    experiments: list[str] | None = None
    filter_string: str = ""
    alpha: float | None = None
    join_ratio: float | None = None
    reliability_run: str | None = None
    stat: str = "final"
    by: str = "method"
    partition: str | None = None
    datasets: list[str] | None = None


@dataclass
class Report:
    """The files a report wrote, its Markdown tables (blank-line separated) and their captions (one a line)."""

    files: list[Path] = field(default_factory=list)
    table_markdown: str = ""
    caption: str = ""

    def add(self, other: Report) -> None:
        """Append ``other``'s files, tables and captions to this report's."""
        self.files += other.files
        self.table_markdown = "\n\n".join(t for t in (self.table_markdown, other.table_markdown) if t)
        self.caption = "\n".join(c for c in (self.caption, other.caption) if c)


# Swept figures: (aggregated metric, file stem prefix, y label); values in percent.
SWEEP_METRICS = (("ece", "ece", "F-ECE (%)"), ("ood_auroc", "ood", "OOD AUROC (MSP, %)"))
X_LABELS = {"alpha": "Dirichlet $\\alpha$"}  # mathtext alpha; other axes: plots.DEFAULT_X_LABELS


def _bar_lines(rows: pd.DataFrame, x: str, stem: str, title: str) -> dict[str, Figure]:
    """Bar-line figures of :data:`SWEEP_METRICS` over ``x`` (aggregated rows), ``<prefix>_vs_<x>_<stem>``; error
    bars (std) only on cells of two seeds or more."""
    figures = {}
    for metric, prefix, y_label in SWEEP_METRICS:
        if rows[f"{metric}_mean"].isna().all():
            continue
        data = pd.DataFrame({x: rows[x], "method": rows["method"], metric: 100 * rows[f"{metric}_mean"],
                             f"{metric}_std": (100 * rows[f"{metric}_std"]).where(rows[f"{metric}_n"] > 1)})
        figures[f"{prefix}_vs_{x}_{stem}"] = bar_line_figure(data, x=x, y=metric, x_label=X_LABELS.get(x),
                                                             y_label=y_label, title=title)
    return figures


def sweep_figures(agg: pd.DataFrame, sel: Selection) -> dict[str, Figure]:
    """Bar-line figures by file stem (module docstring): ``<ece|ood>_vs_alpha_<algo>_<dataset>_jr<ratio>`` and
    ``<ece|ood>_vs_join_ratio_<algo>_<dataset>_<partition>``.

    ``agg``: :func:`reports.query.aggregate`'s frame. Over alpha: Dirichlet runs, per (algorithm, dataset,
    join ratio), at ``sel.join_ratio`` if set; over join ratios: per (algorithm, dataset, partition
    setting), at ``sel.alpha`` if set. A group with fewer than two swept values gets no figure, a metric
    without values in it (e.g. no head run scored OOD data) none either. F-ECE and OOD AUROC in percent.
    """
    figures = {}
    dirichlet = at(agg[agg["partition"] == "dirichlet"], "join_ratio", sel.join_ratio)
    for (algo, dataset, jr), rows in dirichlet.groupby(["algo", "dataset", "join_ratio"]):
        if rows["alpha"].nunique() > 1:
            title = f"{algo_name(algo)}, {dataset_name(dataset)}, jr {number(jr)}"
            figures.update(_bar_lines(rows, "alpha", f"{algo}_{dataset}_jr{number(jr)}", title))
    for key, rows in at(agg, "alpha", sel.alpha).groupby(["algo", "dataset", *PARTITION_SETTING], dropna=False):
        if rows["join_ratio"].nunique() > 1:
            (algo, dataset), partition = key[:2], dict(zip(PARTITION_SETTING, key[2:]))
            title = f"{algo_name(algo)}, {dataset_name(dataset)}, {partition_label(partition)}"
            figures.update(_bar_lines(rows, "join_ratio", f"{algo}_{dataset}_{partition_stem(*key[2:])}", title))
    return figures


def _reliability(chosen: pd.DataFrame, long: pd.DataFrame, sel: Selection, out: Path) -> list[Path]:
    """The reliability diagrams of ``sel.reliability_run``, else of the first run of ``chosen`` with head runs."""
    candidates = [sel.reliability_run] if sel.reliability_run else \
        chosen[chosen["method"] != "w/o"]["fl_run_id"].drop_duplicates().tolist()
    for fl_run_id in candidates:
        bins: dict = {}
        for method in METHOD_LABELS:
            bins.update(reliability_bins(fl_run_id, method) or {})
        if bins:
            runs = long[long["fl_run_id"] == fl_run_id]
            title = run_title(runs.iloc[0]) if len(runs) else f"FL run {fl_run_id[:8]}"
            return save_figure(reliability_figure(bins, title=title), out / f"reliability_{fl_run_id}")
    return []


def _write_table(table: ResultsTable, latex: str, out_dir: Path, stem: str) -> list[Path]:
    """Write ``<stem>.md`` (``table``), ``.tex`` (``latex``) and ``.csv`` (``table``) into ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(table.to_markdown() + "\n")
    (out_dir / f"{stem}.tex").write_text(latex)
    table.to_csv(out_dir / f"{stem}.csv")
    return [out_dir / f"{stem}.md", out_dir / f"{stem}.tex", out_dir / f"{stem}.csv"]


def _per_dataset_latex(long: pd.DataFrame, stat: str, stem: str) -> str:
    """One captioned LaTeX table per dataset of a table setting's runs, labelled ``tab:<stem>-<dataset>``."""
    return "\n".join(build_table(aggregate(rows), table_caption(rows, stat)).to_latex(label=f"tab:{stem}-{dataset}")
                     for dataset, rows in long.groupby("dataset"))


def _method_tables(long: pd.DataFrame, stat: str, out_dir: Path) -> Report:
    """The results tables of the selected runs, one per table setting (module docstring)."""
    report, markdowns, captions = Report(), [], []
    groups = table_groups(long)
    for setting, rows in groups:
        stem = table_stem(setting, len(groups) > 1)
        table = build_table(aggregate(rows), table_caption(rows, stat))
        report.files += _write_table(table, _per_dataset_latex(rows, stat, stem), out_dir, stem)
        markdowns.append(table.to_markdown())
        captions.append(table.full_caption())
    report.table_markdown, report.caption = "\n\n".join(markdowns), "\n".join(captions)
    return report


def _regression_report(long: pd.DataFrame, stat: str, out_dir: Path) -> Report:
    """The tables and per-step figures of regression runs (:func:`reports.regression.regression_outputs`)."""
    report = Report()
    tables, figures = regression_outputs(long, stat)
    for stem, table in tables.items():
        report.add(Report(_write_table(table, table.to_latex(label=f"tab:{stem}"), out_dir, stem),
                          table.to_markdown(), table.full_caption()))
    for stem, fig in figures.items():
        report.files += save_figure(fig, out_dir / stem)
    return report


def build_architecture_report(sel: Selection, out_dir: Path) -> Report:
    """The scheme x version table of mixed-architecture FL runs as ``table_architectures.{md,tex,csv}``.

    ``sel.partition``, ``sel.datasets``, ``sel.alpha`` and ``sel.join_ratio`` narrow the runs as for the
    method tables; ``sel.reliability_run`` is not used.

    Raises:
        ValueError: no matching runs, no run logs ``test/acc_<arch>``, several settings left in a dataset's
            runs (the message names the option to set), or ``stat="best"`` on runs without best-round metrics.
    """
    long = architecture_results(sel.experiments, sel.filter_string, sel.stat)
    long = narrow(long, sel.partition, sel.datasets, sel.alpha, sel.join_ratio)
    table = build_architecture_table(long, architecture_caption(long, sel.stat))
    files = _write_table(table, table.to_latex(), out_dir, "table_architectures")
    return Report(files, table.to_markdown(), table.full_caption())


def build_report(sel: Selection, out_dir: Path) -> Report:
    """Query, tabulate and plot; returns the written files, the Markdown tables and their captions.

    ``sel.by == "architecture"`` builds :func:`build_architecture_report` instead.

    Raises:
        ValueError: unknown ``sel.by``, no matching runs, a selected partition, dataset, alpha or
            join ratio without runs (classification and regression runs together; the message lists those the
            runs hold), or ``stat="best"`` on FL runs without best-round metrics.
    """
    if sel.by not in BY:
        raise ValueError(f"unknown --by {sel.by!r}; use --by method or --by architecture")
    if sel.by == "architecture":
        return build_architecture_report(sel, out_dir)
    long = results(sel.experiments, sel.filter_string, sel.stat)
    regression = regression_results(sel.experiments, sel.filter_string, sel.stat)
    every = pd.concat([frame[["partition", "dataset", "alpha", "join_ratio"]] for frame in (long, regression)])
    narrow(every, sel.partition, sel.datasets, sel.alpha, sel.join_ratio)  # refuses a selection no run matches
    scope = select(long, sel.partition, sel.datasets)
    chosen = select(scope, alpha=sel.alpha, join_ratio=sel.join_ratio)
    report = _method_tables(chosen, sel.stat, out_dir) if not chosen.empty else Report()
    if not scope.empty:
        for stem, fig in sweep_figures(aggregate(scope), sel).items():
            report.files += save_figure(fig, out_dir / stem)
    report.files += _reliability(chosen, long, sel, out_dir)
    regression = select(regression, sel.partition, sel.datasets, sel.alpha, sel.join_ratio)
    if not regression.empty:
        report.add(_regression_report(regression, sel.stat, out_dir))
    return report
