"""Paper-style figures for the ECE and OOD AUROC of unmodified models ("w/o"), APH and LoRAPH heads.

The builders take plain data (a long pandas DataFrame, or reliability-diagram bins as logged in a
head run's ``reliability.json``) and return :class:`matplotlib.figure.Figure` objects made without
pyplot, so nothing here touches pyplot's figure registry, the backend or the global rcParams:
every builder and :func:`save_figure` apply :func:`paper_style` inside ``matplotlib.rc_context``.
Fonts and sizes are also pinned on the artists themselves (tick labels included, which matplotlib
creates lazily), so a figure saved later without the style context still looks the same.

* :func:`bar_line_figure`: grouped, edge-coloured bars (one per method) at each value of a swept
  setting (Dirichlet alpha or join ratio), with a line per method joining the tops of its bars
  (any metric: ECE, OOD AUROC, ...).
* :func:`reliability_figure`: one reliability diagram per method, side by side, each over a
  histogram of its samples per bin; sparse bins (fewer than ``min_count`` samples) greyed.
* :func:`save_figure`: PNG (200 dpi) and PDF (TrueType fonts embedded) next to each other.

Values are plotted in the units given (:mod:`reports.report` passes F-ECE and OOD AUROC in percent).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import font_manager
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

NEW_CLIENTS = "new clients"  # an FL run's new-client evaluation (new/*): held-out clients after adapting
METHOD_ORDER = ("w/o", "APH", "LoRAPH", NEW_CLIENTS)
METHOD_COLORS = {"w/o": "#4E79A7", "APH": "#F28E2B", "LoRAPH": "#59A14F", NEW_CLIENTS: "#B07AA1"}

PREFERRED_SERIF = "Times New Roman"
# Metric-compatible Times substitutes, in order of preference.
SERIF_FALLBACKS = ("Liberation Serif", "Nimbus Roman", "TeX Gyre Termes", "FreeSerif", "STIXGeneral")
LAST_RESORT_SERIF = "DejaVu Serif"  # ships with matplotlib, so always available (STIXGeneral does too)

FONT_SIZE = 20
BAR_FACE_ALPHA = 0.35  # bar face = method colour at this alpha; bar edge = method colour, opaque
BAR_EDGE_WIDTH = 2.0
GROUP_WIDTH = 0.8  # share of one categorical x slot taken by a group of bars
GAP_COLOR = "#E15759"
SPARSE_COLOR = "0.55"  # reliability bins with fewer than min_count samples
MIN_BIN_COUNT = 10  # default min_count of reliability_figure
PNG_DPI = 200

# Default x-axis labels for the settings the query layer sweeps; other columns get their own name.
DEFAULT_X_LABELS = {"alpha": "Dirichlet α", "join_ratio": "Join ratio"}


def resolve_serif_font() -> str:
    """Name of the serif family used for paper figures.

    "Times New Roman" when installed, else the first installed of "Liberation Serif",
    "Nimbus Roman", "TeX Gyre Termes", "FreeSerif" (Times substitutes) and "STIXGeneral" (a
    Times-like serif that ships with matplotlib), else "DejaVu Serif". Installed families are
    read from ``matplotlib.font_manager.fontManager.ttflist`` at every call (no caching).
    """
    installed = {entry.name for entry in font_manager.fontManager.ttflist}
    for name in (PREFERRED_SERIF, *SERIF_FALLBACKS):
        if name in installed:
            return name
    return LAST_RESORT_SERIF


def _font_family() -> list[str]:
    """Concrete family list: the resolved serif, then DejaVu Serif for glyphs it lacks."""
    chosen = resolve_serif_font()
    return [chosen] if chosen == LAST_RESORT_SERIF else [chosen, LAST_RESORT_SERIF]


def paper_style() -> dict:
    """rcParams for paper figures; use as ``with matplotlib.rc_context(paper_style()): ...``.

    Serif text (``font.family`` names :func:`resolve_serif_font` itself, not the generic "serif",
    so lookups do not depend on the global ``font.serif``), 20 pt text everywhere (titles, labels,
    ticks, legend), Type 42 (TrueType) fonts in PDF and PS output, ASCII minus signs, PNG at 200 dpi.
    """
    family = _font_family()
    return {
        "font.family": family,
        "font.serif": [*family, *(n for n in (PREFERRED_SERIF, *SERIF_FALLBACKS) if n not in family)],
        "font.size": FONT_SIZE,
        "axes.titlesize": FONT_SIZE,
        "axes.labelsize": FONT_SIZE,
        "xtick.labelsize": FONT_SIZE,
        "ytick.labelsize": FONT_SIZE,
        "legend.fontsize": FONT_SIZE,
        "figure.titlesize": FONT_SIZE,
        "mathtext.fontset": "stix",
        "pdf.fonttype": 42,
        "ps.fonttype": 42,
        "axes.unicode_minus": False,
        "savefig.dpi": PNG_DPI,
    }


def _pin_tick_fonts(ax) -> None:
    """Store the paper font on the axes' tick settings, so ticks created later (at draw) keep it."""
    ax.tick_params(labelsize=FONT_SIZE, labelfontfamily=_font_family())


def _format_x(value) -> str:
    """Tick label of one x value: numbers in shortest form ("0.05", "0.1", "1"), else ``str``."""
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return f"{float(value):g}"
    return str(value)


def _check_methods(names, where: str) -> None:
    unknown = sorted({str(n) for n in names} - set(METHOD_ORDER))
    if unknown:
        raise ValueError(f"{where}: unknown method(s) {unknown}; expected names among {list(METHOD_ORDER)}")


def bar_line_figure(data: pd.DataFrame, x: str, y: str = "ece", x_label: str | None = None,
                    y_label: str = "ECE", title: str | None = None) -> Figure:
    """Grouped bars of ``y`` per method at each value of ``x``, with a line per method over its bar tops.

    Args:
        data: long table, one row per (``x`` value, method) cell, with columns ``x`` (the swept
            setting, e.g. "alpha" or "join_ratio"; numeric), ``"method"`` (names among
            :data:`METHOD_ORDER`), ``y`` (the mean over seeds, e.g. "ece", plotted as given) and
            optionally ``y + "_std"`` (std over seeds, drawn as error bars where not NaN).
            A row whose ``y`` is NaN counts as a missing cell. Other columns are ignored.
        x: column of the swept setting.
        y: column of the plotted mean.
        x_label: x-axis label; default "Dirichlet α" for "alpha", "Join ratio" for "join_ratio",
            else the column name.
        y_label: y-axis label.
        title: figure title (above the legend), or none.

    Returns:
        A figure with one Axes. Distinct ``x`` values, sorted ascending, sit at evenly spaced
        categorical positions 0, 1, 2, ... labelled with the value ("0.05", "0.1", "0.5"). Each
        group holds one bar per method present in ``data``, side by side in METHOD_ORDER (a method's
        slot stays fixed across groups, so a missing cell leaves a gap, never a zero bar). Bars are
        edge-coloured: edge = method colour (width 2), face = the method colour at alpha 0.35. Each
        method's bars form one ``BarContainer`` in ``ax.containers`` labelled with the method; its
        line (same colour, marker "o", gid = method name) joins its bar centres and skips missing
        cells. The legend lists the methods in METHOD_ORDER; the y axis starts at 0.

    Raises:
        TypeError: ``data`` is not a DataFrame.
        ValueError: required columns missing, empty frame (or no non-NaN ``y``), unknown method
            name, NaN ``x``, non-numeric ``y``, or several rows for one (``x``, method) cell.
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"bar_line_figure: data must be a pandas DataFrame, got {type(data).__name__}")
    missing = [c for c in (x, "method", y) if c not in data.columns]
    if missing:
        raise ValueError(f"bar_line_figure: data lacks required column(s) {missing}; "
                         f"has {list(map(str, data.columns))}")
    if data.empty:
        raise ValueError("bar_line_figure: data is empty (no rows); nothing to plot")
    _check_methods(data["method"].unique(), "bar_line_figure")
    if data[x].isna().any():
        raise ValueError(f"bar_line_figure: column {x!r} has NaN values")
    std_col = f"{y}_std"
    cols = [x, "method", y] + ([std_col] if std_col in data.columns else [])
    frame = data[cols].copy()
    try:
        frame[y] = pd.to_numeric(frame[y], errors="raise").astype(float)
        if std_col in frame:
            frame[std_col] = pd.to_numeric(frame[std_col], errors="raise").astype(float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"bar_line_figure: columns {cols[2:]} must be numeric ({err})") from None
    frame = frame[frame[y].notna()]
    if frame.empty:
        raise ValueError(f"bar_line_figure: column {y!r} holds only NaN; nothing to plot")
    dup = frame.duplicated(subset=[x, "method"], keep=False)
    if dup.any():
        cells = sorted({(_format_x(a), m) for a, m in frame.loc[dup, [x, "method"]].itertuples(index=False)})
        raise ValueError(f"bar_line_figure: several rows for (x, method) cell(s) {cells}; "
                         "aggregate over seeds first (mean in 'y', std in 'y_std')")

    x_values = sorted(frame[x].unique())
    slot = {value: i for i, value in enumerate(x_values)}
    methods = [m for m in METHOD_ORDER if (frame["method"] == m).any()]
    width = GROUP_WIDTH / len(methods)

    with matplotlib.rc_context(paper_style()):
        fig = Figure(figsize=(max(7.0, 2.2 * len(x_values) + 2.5), 6.0), layout="constrained")
        ax = fig.add_subplot()
        handles = []
        for i, method in enumerate(methods):
            rows = frame[frame["method"] == method].sort_values(x)
            offset = (i - (len(methods) - 1) / 2) * width
            pos = np.array([slot[v] for v in rows[x]], dtype=float) + offset
            heights = rows[y].to_numpy()
            color = METHOD_COLORS[method]
            bars = ax.bar(pos, heights, width, facecolor=to_rgba(color, BAR_FACE_ALPHA), edgecolor=color,
                          linewidth=BAR_EDGE_WIDTH, label=method, zorder=2)
            (line,) = ax.plot(pos, heights, color=color, marker="o", markersize=8, linewidth=2,
                              label=f"_{method} line", gid=method, zorder=3)
            if std_col in rows:
                std = rows[std_col].to_numpy()
                has_std = ~np.isnan(std)
                if has_std.any():
                    ax.errorbar(pos[has_std], heights[has_std], yerr=std[has_std], fmt="none", ecolor=color,
                                elinewidth=1.5, capsize=5, capthick=1.5, zorder=4, label=f"_{method} std")
            handles.append((bars, line))
        ax.set_xticks(range(len(x_values)), [_format_x(v) for v in x_values])
        ax.set_xlim(-0.5, len(x_values) - 0.5)
        ax.set_ylim(bottom=0)
        ax.set_xlabel(x_label if x_label is not None else DEFAULT_X_LABELS.get(x, x))
        ax.set_ylabel(y_label)
        ax.grid(axis="y", alpha=0.3, zorder=0)
        ax.set_axisbelow(True)
        ax.legend(handles, methods, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=len(methods),
                  frameon=False, handlelength=2.5)
        if title is not None:
            fig.suptitle(title)
        _pin_tick_fonts(ax)
    return fig


def _bins_arrays(method: str, entry: Mapping) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(n_bins, confidence, accuracy, count)`` of one method's bins (None/NaN -> NaN)."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"reliability_figure: bins[{method!r}] must be a dict, got {type(entry).__name__}")
    missing = [k for k in ("confidence", "accuracy", "count", "n_bins") if k not in entry]
    if missing:
        raise ValueError(f"reliability_figure: bins[{method!r}] lacks key(s) {missing}")
    n_bins = entry["n_bins"]
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"reliability_figure: bins[{method!r}]['n_bins'] must be a positive int, got {n_bins!r}")

    def as_array(key: str) -> np.ndarray:
        values = entry[key]
        if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) != n_bins:
            raise ValueError(f"reliability_figure: bins[{method!r}][{key!r}] must be a list of n_bins={n_bins} "
                             f"values, got {values!r:.80}")
        return np.array([math.nan if v is None else v for v in values], dtype=float)

    conf, acc, count = as_array("confidence"), as_array("accuracy"), as_array("count")
    if np.isnan(count).any() or (count < 0).any():
        raise ValueError(f"reliability_figure: bins[{method!r}]['count'] must be non-negative numbers")
    if count.sum() == 0:
        raise ValueError(f"reliability_figure: bins[{method!r}] holds no samples (all counts 0); ECE is undefined")
    full = count > 0
    if np.isnan(conf[full]).any() or np.isnan(acc[full]).any():
        raise ValueError(f"reliability_figure: bins[{method!r}] has NaN/None confidence or accuracy "
                         "in a non-empty bin")
    return int(n_bins), conf, acc, count


def binned_ece(entry: Mapping) -> float:
    """ECE of one method's reliability bins: sum_b count_b / N * |accuracy_b - confidence_b|, in [0, 1].

    ``entry`` is ``{"confidence", "accuracy", "count", "n_bins"}`` as in :func:`reliability_figure`;
    empty bins (count 0) are ignored whatever their confidence/accuracy (None, NaN or 0). For the
    bins a head run logs in ``reliability.json`` this equals its ``test/global_ece`` metric
    (``wo/global_ece`` for w/o).

    Raises:
        ValueError: malformed entry (see :func:`reliability_figure`) or no samples.
    """
    _, conf, acc, count = _bins_arrays("entry", entry)
    full = count > 0
    return float((count[full] * np.abs(acc[full] - conf[full])).sum() / count.sum())


def _reliability_panel(ax, method: str, arrays: tuple, min_count: int) -> None:
    """One method's reliability diagram: accuracy bars (grey, hatched where sparse), gap bars, the diagonal."""
    n_bins, conf, acc, count = arrays
    centres, width = (np.arange(n_bins) + 0.5) / n_bins, 1.0 / n_bins
    dense, sparse = count >= max(min_count, 1), (count > 0) & (count < min_count)
    color = METHOD_COLORS[method]
    ax.bar(centres[dense], acc[dense], width, facecolor=to_rgba(color, BAR_FACE_ALPHA), edgecolor=color,
           linewidth=1.5, label="Accuracy", zorder=2)
    if sparse.any():
        ax.bar(centres[sparse], acc[sparse], width, facecolor=to_rgba(SPARSE_COLOR, 0.25), edgecolor=SPARSE_COLOR,
               hatch="xx", linewidth=1.0, label=f"n < {min_count}", zorder=2)
    ax.bar(centres[dense], np.abs(conf[dense] - acc[dense]), width, bottom=np.minimum(acc[dense], conf[dense]),
           facecolor=to_rgba(GAP_COLOR, 0.15), edgecolor=to_rgba(GAP_COLOR, 0.8), hatch="//",
           linewidth=1.0, label="Gap", zorder=3)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.3", linewidth=1.5, label="Perfect calibration", zorder=4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_yticks([0, 0.5, 1], ["0", "0.5", "1"])


def _count_panel(ax, method: str, arrays: tuple, min_count: int) -> None:
    """Samples per bin under a reliability diagram (log scale), with the ``min_count`` threshold dotted."""
    n_bins, _, _, count = arrays
    full = count > 0
    color = METHOD_COLORS[method]
    ax.bar((np.arange(n_bins)[full] + 0.5) / n_bins, count[full], 1.0 / n_bins,
           facecolor=to_rgba(color, BAR_FACE_ALPHA), edgecolor=color, linewidth=1.0, label="Samples", zorder=2)
    ax.set_yscale("log")
    ax.set_ylim(0.5, max(count.max(), min_count) * 2)
    if min_count > 1:
        ax.axhline(min_count, color=SPARSE_COLOR, linestyle=":", linewidth=1.5, zorder=3)
    ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
    ax.set_xlabel("Confidence")


def reliability_figure(bins: Mapping[str, Mapping], title: str | None = None,
                       min_count: int = MIN_BIN_COUNT) -> Figure:
    """Reliability diagrams, one column per method, each over a histogram of its samples per bin.

    Args:
        bins: ``{method: {"confidence": [...], "accuracy": [...], "count": [...], "n_bins": int}}``
            with method names among :data:`METHOD_ORDER` (the format of a head run's
            ``reliability.json``, see :func:`pfl.metrics.reliability_bins`: the clients' test
            predictions pooled). The lists have length ``n_bins`` and describe uniform bins over
            [0, 1]: mean confidence, accuracy (both in [0, 1]) and sample count of each bin. Empty
            bins (count 0) may hold None, NaN or 0 and are not drawn.
        title: figure title (the run's setting, e.g. ``FedFomo, CIFAR-10, Dir(α=0.1), jr 0.2, seed 0``), or none.
        min_count: bins with at least one but fewer than ``min_count`` samples are too sparse to
            read: their accuracy is drawn as a grey hatched bar (``BarContainer`` labelled
            ``n < <min_count>``) and gets no gap bar; 0 or 1 draws every non-empty bin alike.

    Returns:
        A figure with 2 x (methods present) Axes: ``fig.axes[:k]`` the reliability diagrams in
        METHOD_ORDER, ``fig.axes[k:]`` the count histograms below them (same x axis, log y,
        ``Samples`` on the first, the ``min_count`` threshold as a dotted line). A diagram is on
        [0, 1] x [0, 1]: the accuracy of every bin with at least ``min_count`` samples as an
        edge-coloured bar at the bin centre (width 1/n_bins, method colour; ``BarContainer``
        labelled "Accuracy"), the gap between accuracy and mean confidence of those bins as red
        hatched bars ("Gap"), and the dashed diagonal of perfect calibration. Panel title: the
        method and its global ECE (:func:`binned_ece` of all bins, in percent with 2 decimals,
        ``APH\\nGlobal ECE = 3.21%``); x label "Confidence" under the histograms, y labels
        "Accuracy" and "Samples" on the first column.

    Raises:
        ValueError: ``bins`` empty, unknown method, missing keys, list lengths other than
            ``n_bins``, negative counts, no samples, NaN/None values in a non-empty bin, or a
            negative ``min_count``.
    """
    if not isinstance(bins, Mapping) or not bins:
        raise ValueError(f"reliability_figure: bins must be a non-empty dict of method -> bins, got {bins!r:.80}")
    _check_methods(bins.keys(), "reliability_figure")
    if min_count < 0:
        raise ValueError(f"reliability_figure: min_count must be >= 0, got {min_count}")
    methods = [m for m in METHOD_ORDER if m in bins]
    parsed = {m: _bins_arrays(m, bins[m]) for m in methods}

    with matplotlib.rc_context(paper_style()):
        fig = Figure(figsize=(5.2 * len(methods) + 1.2, 9.0 if title is None else 9.6), layout="constrained")
        axes = fig.subplots(2, len(methods), sharex="col", sharey="row", squeeze=False, height_ratios=[3, 1])
        for k, method in enumerate(methods):
            top, bottom = axes[0, k], axes[1, k]
            _reliability_panel(top, method, parsed[method], min_count)
            _count_panel(bottom, method, parsed[method], min_count)
            top.set_title(f"{method}\nGlobal ECE = {100 * binned_ece(bins[method]):.2f}%")
            if k == 0:
                top.set_ylabel("Accuracy")
                bottom.set_ylabel("Samples")
                top.legend(loc="upper left", fontsize=FONT_SIZE * 0.7, frameon=False)
            _pin_tick_fonts(top)
            _pin_tick_fonts(bottom)
        if title is not None:
            fig.suptitle(title)
    return fig


def save_figure(fig: Figure, stem: Path | str) -> list[Path]:
    """Write ``fig`` as ``<stem>.png`` (200 dpi) and ``<stem>.pdf`` (TrueType fonts), in the paper style.

    ``stem`` is a path without extension; ".png" and ".pdf" are appended to its name, so dotted
    stems such as ``figs/ece_alpha0.1`` are kept whole (a trailing ".png"/".pdf" is dropped first).
    Parent folders are created. The PDF carries no creation date, so identical figures give
    identical PDFs. Nothing is closed; the figure stays usable.

    Returns:
        ``[png_path, pdf_path]``.

    Raises:
        TypeError: ``fig`` is not a matplotlib Figure.
    """
    if not isinstance(fig, Figure):
        raise TypeError(f"save_figure: fig must be a matplotlib Figure, got {type(fig).__name__}")
    stem = Path(stem)
    if stem.suffix.lower() in (".png", ".pdf"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.pdf"
    with matplotlib.rc_context(paper_style()):
        fig.savefig(png, dpi=PNG_DPI)
        fig.savefig(pdf, metadata={"CreationDate": None})
    return [png, pdf]

