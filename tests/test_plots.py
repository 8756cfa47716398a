"""Paper-style figure builders in :mod:`reports.plots`: bar heights, colours, lines, error bars,
reliability panels, their global ECE, count histograms and sparse bins, the rc context, fonts in
the saved PDF, and input errors."""

from __future__ import annotations

import math
import re

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib import font_manager
from matplotlib.colors import to_rgba
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

from reports import plots
from reports.plots import (METHOD_COLORS, METHOD_ORDER, bar_line_figure, binned_ece, paper_style,
                           reliability_figure, resolve_serif_font, save_figure)

HEAD_METHODS = METHOD_ORDER[:3]  # w/o, APH, LoRAPH: the methods of these frames (new clients: FL runs' own)

# x = alpha, unsorted on purpose; LoRAPH has no run at alpha = 0.05 (missing cell).
MEANS = {(0.1, "w/o"): 0.112, (0.05, "w/o"): 0.153, (0.5, "w/o"): 0.081,
         (0.1, "APH"): 0.051, (0.05, "APH"): 0.072, (0.5, "APH"): 0.043,
         (0.1, "LoRAPH"): 0.034, (0.5, "LoRAPH"): 0.021}
STDS = {(0.1, "w/o"): 0.011, (0.05, "w/o"): 0.021, (0.5, "w/o"): math.nan,
        (0.1, "APH"): 0.004, (0.05, "APH"): 0.006, (0.5, "APH"): 0.003,
        (0.1, "LoRAPH"): 0.002, (0.5, "LoRAPH"): 0.001}
X_SORTED = [0.05, 0.1, 0.5]


def _frame(with_std: bool = False) -> pd.DataFrame:
    rows = [{"alpha": a, "method": m, "ece": v} | ({"ece_std": STDS[a, m]} if with_std else {})
            for (a, m), v in MEANS.items()]
    return pd.DataFrame(rows)


def _bars(ax) -> dict[str, BarContainer]:
    return {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}


def _line(ax, method: str):
    (line,) = [ln for ln in ax.get_lines() if ln.get_gid() == method]
    return line


def _font_name(text) -> str:
    """Family name of the font file matplotlib picks for a Text artist."""
    path = font_manager.findfont(text.get_fontproperties(), fallback_to_default=False)
    return font_manager.get_font(path).family_name


@pytest.fixture(scope="module")
def bar_fig() -> Figure:
    return bar_line_figure(_frame(), "alpha")


def test_bar_heights_follow_method_order_within_sorted_x_groups(bar_fig):
    ax = bar_fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.05", "0.1", "0.5"]
    # All bars, read left to right, are the cells in x-sorted, HEAD_METHODS order, missing cell skipped.
    patches = sorted(ax.patches, key=lambda p: p.get_x())
    expected = [MEANS[a, m] for a in X_SORTED for m in HEAD_METHODS if (a, m) in MEANS]
    assert len(patches) == len(MEANS) == 8
    assert [p.get_height() for p in patches] == pytest.approx(expected)
    # Each bar sits inside its x group's slot, methods left to right in HEAD_METHODS.
    bars = _bars(ax)
    assert list(bars) == list(HEAD_METHODS)
    for method, container in bars.items():
        centres = [p.get_x() + p.get_width() / 2 for p in container.patches]
        groups = [round(c) for c in centres]
        xs = [a for a in X_SORTED if (a, method) in MEANS]
        assert groups == [X_SORTED.index(a) for a in xs]
        assert [p.get_height() for p in container.patches] == pytest.approx([MEANS[a, method] for a in xs])
    for i, a in enumerate(X_SORTED):
        lefts = [p.get_x() for m in HEAD_METHODS for p in bars[m].patches if round(p.get_x() + p.get_width() / 2) == i]
        assert lefts == sorted(lefts), f"bars of group {a} not in HEAD_METHODS"


def test_missing_cell_has_no_bar_and_no_line_point(bar_fig):
    ax = bar_fig.axes[0]
    bars = _bars(ax)
    assert len(bars["LoRAPH"].patches) == 2 and len(bars["w/o"].patches) == 3
    assert len(_line(ax, "LoRAPH").get_xdata()) == 2
    assert 0.0 not in list(_line(ax, "LoRAPH").get_ydata())


def test_lines_join_bar_tops_in_method_colour(bar_fig):
    ax = bar_fig.axes[0]
    for method, container in _bars(ax).items():
        line = _line(ax, method)
        tops = [p.get_height() for p in container.patches]
        centres = [p.get_x() + p.get_width() / 2 for p in container.patches]
        assert list(line.get_ydata()) == pytest.approx(tops)
        assert list(line.get_xdata()) == pytest.approx(centres)
        assert line.get_marker() == "o"
        assert to_rgba(line.get_color()) == pytest.approx(to_rgba(METHOD_COLORS[method]))


def test_bars_are_edge_coloured_by_method(bar_fig):
    for method, container in _bars(bar_fig.axes[0]).items():
        for patch in container.patches:
            assert patch.get_edgecolor() == pytest.approx(to_rgba(METHOD_COLORS[method]))
            assert patch.get_facecolor() == pytest.approx(to_rgba(METHOD_COLORS[method], plots.BAR_FACE_ALPHA))
            assert patch.get_linewidth() == pytest.approx(2.0)


def test_legend_lists_methods_in_order_and_y_starts_at_zero(bar_fig):
    ax = bar_fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(HEAD_METHODS)
    assert ax.get_ylim()[0] == 0
    assert ax.get_ylim()[1] >= max(MEANS.values())
    assert ax.get_xlabel() == "Dirichlet α" and ax.get_ylabel() == "ECE"


def test_only_methods_present_get_bars_and_labels_are_used():
    data = _frame()
    fig = bar_line_figure(data[data["method"] != "APH"], "alpha", x_label="α", y_label="ECE (%)", title="T")
    ax = fig.axes[0]
    assert list(_bars(ax)) == ["w/o", "LoRAPH"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["w/o", "LoRAPH"]
    assert (ax.get_xlabel(), ax.get_ylabel(), fig.get_suptitle()) == ("α", "ECE (%)", "T")


def test_error_bars_drawn_only_with_std():
    ax = bar_line_figure(_frame(with_std=True), "alpha").axes[0]
    errorbars = [c for c in ax.containers if c.__class__.__name__ == "ErrorbarContainer"]
    # w/o at alpha 0.5 has NaN std: 7 of its 8 cells get an error bar.
    assert sum(len(c.lines[2][0].get_segments()) for c in errorbars) == 7
    segs = {tuple(np.round(s[0], 6)): s for c in errorbars for s in c.lines[2][0].get_segments()}
    for method, container in _bars(ax).items():
        for patch, a in zip(container.patches, [a for a in X_SORTED if (a, method) in MEANS]):
            key = tuple(np.round([patch.get_x() + patch.get_width() / 2, MEANS[a, method] - STDS[a, method]], 6))
            if math.isnan(STDS[a, method]):
                continue
            assert key in segs, f"no error bar for {method} at alpha={a}"
            assert segs[key][1][1] == pytest.approx(MEANS[a, method] + STDS[a, method])
    no_std = bar_line_figure(_frame(), "alpha").axes[0]
    assert not [c for c in no_std.containers if c.__class__.__name__ == "ErrorbarContainer"]


def _aggregated() -> pd.DataFrame:
    """An aggregated frame (as reports.query.aggregate returns) over alpha x join ratio; no OOD at join ratio 1."""
    rows = []
    for alpha in (0.1, 0.5):
        for jr in (0.5, 1.0):
            for k, method in enumerate(HEAD_METHODS):
                auroc = math.nan if jr == 1.0 else 0.6 + 0.1 * k + alpha / 10
                rows.append({"algo": "fedavg", "dataset": "cifar10", "partition": "dirichlet", "alpha": alpha,
                             "classes_per_client": math.nan, "partition_name": math.nan, "join_ratio": jr,
                             "method": method, "ece_mean": 0.1 / (k + 1) + alpha, "ece_std": 0.01,
                             "ood_auroc_mean": auroc, "ood_auroc_std": 0.02, "ece_n": 2,
                             "ood_auroc_n": 0 if math.isnan(auroc) else 2, "seeds": 2})
    return pd.DataFrame(rows)


def test_report_sweep_figures_draw_ece_and_ood_auroc_bar_lines_in_percent():
    from reports.report import Selection, sweep_figures

    agg = _aggregated()
    figures = sweep_figures(agg, Selection(alpha=0.1, join_ratio=0.5))
    # OOD AUROC has no value at alpha 0.1 for join ratio 1.0 only, so ood_vs_join_ratio still has its 0.5 group.
    assert set(figures) == {"ece_vs_alpha_fedavg_cifar10_jr0.5", "ece_vs_join_ratio_fedavg_cifar10_dir0.1",
                            "ood_vs_alpha_fedavg_cifar10_jr0.5", "ood_vs_join_ratio_fedavg_cifar10_dir0.1"}
    ax = figures["ood_vs_alpha_fedavg_cifar10_jr0.5"].axes[0]
    assert ax.get_ylabel() == "OOD AUROC (MSP, %)" and ax.get_ylim()[0] == 0
    assert figures["ece_vs_alpha_fedavg_cifar10_jr0.5"].axes[0].get_ylabel() == "F-ECE (%)"
    at = agg[agg.join_ratio == 0.5].set_index(["method", "alpha"])
    for method, container in _bars(ax).items():
        heights = [p.get_height() for p in container.patches]
        assert heights == pytest.approx([100 * at.at[(method, a), "ood_auroc_mean"] for a in (0.1, 0.5)])
        assert _line(ax, method).get_ydata() == pytest.approx(heights)
    by_jr = _bars(figures["ood_vs_join_ratio_fedavg_cifar10_dir0.1"].axes[0])
    assert all(len(c.patches) == 1 for c in by_jr.values())  # the NaN cells at join ratio 1 are gaps
    no_ood = sweep_figures(agg, Selection(alpha=0.1, join_ratio=1.0))
    assert "ood_vs_alpha_fedavg_cifar10_jr1" not in no_ood and "ece_vs_alpha_fedavg_cifar10_jr1" in no_ood


def test_text_uses_paper_style_and_global_rc_is_untouched(tmp_path):
    with matplotlib.rc_context({"font.size": 11, "font.family": "sans-serif"}):
        fig = bar_line_figure(_frame(), "alpha")
        assert matplotlib.rcParams["font.size"] == 11
        assert matplotlib.rcParams["font.family"] == ["sans-serif"]
    ax = fig.axes[0]
    family = resolve_serif_font()
    # Axis label made inside the builder; y tick labels are created lazily here, outside the style.
    for text in [ax.xaxis.label, ax.get_xticklabels()[0], ax.get_yticklabels()[0]]:
        assert text.get_fontsize() == 20
        assert text.get_fontfamily()[0] == family
        assert _font_name(text) == family
    # Saving outside any context keeps the size too (ticks re-created at draw).
    fig.savefig(tmp_path / "plain.png")
    assert all(t.get_fontsize() == 20 for t in ax.get_yticklabels())


def test_paper_style_params():
    style = paper_style()
    assert style["font.size"] == 20
    assert style["pdf.fonttype"] == 42 and style["ps.fonttype"] == 42
    assert style["font.family"][0] == resolve_serif_font()
    with matplotlib.rc_context(style):  # every key is a valid rcParam
        assert matplotlib.rcParams["font.size"] == 20


class _Entry:
    def __init__(self, name: str):
        self.name = name


@pytest.mark.parametrize("installed, expected", [
    (["DejaVu Sans", "FreeSerif", "Times New Roman", "Liberation Serif"], "Times New Roman"),
    (["FreeSerif", "TeX Gyre Termes", "Nimbus Roman", "Liberation Serif"], "Liberation Serif"),
    (["FreeSerif", "TeX Gyre Termes", "Nimbus Roman"], "Nimbus Roman"),
    (["FreeSerif", "TeX Gyre Termes"], "TeX Gyre Termes"),
    (["FreeSerif", "DejaVu Serif", "STIXGeneral"], "FreeSerif"),
    (["STIXGeneral", "Liberation Serif"], "Liberation Serif"),
    (["DejaVu Sans", "DejaVu Serif", "STIXGeneral"], "STIXGeneral"),
    (["DejaVu Sans", "DejaVu Serif"], "DejaVu Serif"),
])
def test_resolve_serif_font_preference_order(monkeypatch, installed, expected):
    monkeypatch.setattr(font_manager.fontManager, "ttflist", [_Entry(n) for n in installed])
    assert resolve_serif_font() == expected


def test_save_figure_writes_png_and_truetype_pdf(tmp_path, bar_fig):
    stem = tmp_path / "nested" / "dir" / "ece_alpha0.1"  # dotted stem is kept whole
    paths = save_figure(bar_fig, stem)
    assert paths == [tmp_path / "nested" / "dir" / "ece_alpha0.1.png", tmp_path / "nested" / "dir" / "ece_alpha0.1.pdf"]
    png, pdf = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert pdf.startswith(b"%PDF") and len(pdf) > 1000
    assert b"/FontFile2" in pdf or b"/TrueType" in pdf
    assert b"/Type3" not in pdf
    assert resolve_serif_font().replace(" ", "").encode() in pdf  # the serif font is what got embedded
    # 200 dpi: pixel width = figure width in inches * 200 (PNG IHDR width at bytes 16..20).
    assert int.from_bytes(png[16:20], "big") == round(bar_fig.get_figwidth() * 200)
    assert save_figure(bar_fig, tmp_path / "again.pdf")[0] == tmp_path / "again.png"


def test_save_figure_rejects_non_figure(tmp_path):
    with pytest.raises(TypeError, match="Figure"):
        save_figure("not a figure", tmp_path / "x")


# --- reliability diagrams ------------------------------------------------------------------------

def _bins() -> dict[str, dict]:
    """As logged in reliability.json: empty bins hold None (w/o), NaN or 0 (LoRAPH)."""
    return {
        "LoRAPH": {"n_bins": 5, "confidence": [math.nan, 0.0, 0.51, 0.71, 0.93],
                   "accuracy": [math.nan, 0.0, 0.49, 0.72, 0.92], "count": [0, 0, 30, 40, 130]},
        "w/o": {"n_bins": 5, "confidence": [None, 0.32, 0.52, 0.73, 0.95],
                "accuracy": [None, 0.25, 0.40, 0.60, 0.85], "count": [0, 10, 30, 40, 120]},
        "APH": {"n_bins": 5, "confidence": [0.15, 0.31, 0.50, 0.72, 0.93],
                "accuracy": [0.0, 0.35, 0.52, 0.70, 0.91], "count": [2, 10, 30, 40, 118]},
    }


def _independent_ece(entry: dict) -> float:
    total = sum(entry["count"])
    return sum(c / total * abs(a - f) for a, f, c in zip(entry["accuracy"], entry["confidence"], entry["count"])
               if c > 0)


@pytest.fixture(scope="module")
def rel_fig() -> Figure:
    return reliability_figure(_bins(), title="CIFAR-10")


def _panels(fig: Figure) -> tuple[list, list]:
    """(reliability diagrams, count histograms) of a reliability figure."""
    k = len(fig.axes) // 2
    return fig.axes[:k], fig.axes[k:]


def test_reliability_one_panel_per_method_in_order_over_count_histograms(rel_fig):
    top, bottom = _panels(rel_fig)
    assert len(top) == len(bottom) == 3
    assert [ax.get_title().splitlines()[0] for ax in top] == list(HEAD_METHODS)
    two = reliability_figure({"APH": _bins()["APH"]})
    assert [ax.get_title().splitlines()[0] for ax in _panels(two)[0]] == ["APH"] and len(two.axes) == 2
    # shared y axis per row, x shared with the histogram below, [0, 1] x [0, 1], labels
    assert top[0].get_shared_y_axes().joined(top[0], top[1])
    assert bottom[0].get_shared_y_axes().joined(bottom[0], bottom[2])
    for ax, hist in zip(top, bottom):
        assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1) and hist.get_xlim() == (0, 1)
        assert hist.get_xlabel() == "Confidence" and hist.get_yscale() == "log"
    assert top[0].get_ylabel() == "Accuracy" and bottom[0].get_ylabel() == "Samples"


def test_reliability_bars_are_bin_accuracies_and_sparse_bins_are_greyed(rel_fig):
    bins = _bins()
    for ax, hist in zip(*_panels(rel_fig)):
        method = ax.get_title().splitlines()[0]
        entry = bins[method]
        dense = [i for i, c in enumerate(entry["count"]) if c >= plots.MIN_BIN_COUNT]
        sparse = [i for i, c in enumerate(entry["count"]) if 0 < c < plots.MIN_BIN_COUNT]
        acc_bars = _bars(ax)["Accuracy"].patches
        assert [p.get_height() for p in acc_bars] == pytest.approx([entry["accuracy"][i] for i in dense])
        assert [p.get_x() + p.get_width() / 2 for p in acc_bars] == pytest.approx([(i + 0.5) / 5 for i in dense])
        assert all(p.get_width() == pytest.approx(0.2) for p in acc_bars)
        assert all(p.get_edgecolor() == pytest.approx(to_rgba(METHOD_COLORS[method])) for p in acc_bars)
        few = _bars(ax).get("n < 10")
        assert ([p.get_height() for p in few.patches] if few else []) == pytest.approx(
            [entry["accuracy"][i] for i in sparse])
        assert all(p.get_hatch() == "xx" and p.get_edgecolor() == pytest.approx(to_rgba(plots.SPARSE_COLOR))
                   for p in (few.patches if few else []))
        # gap bars span accuracy..confidence of the dense bins
        gaps = _bars(ax)["Gap"].patches
        assert [v for p in gaps for v in (p.get_y(), p.get_y() + p.get_height())] == pytest.approx(
            [v for i in dense for v in sorted((entry["accuracy"][i], entry["confidence"][i]))])
        # dashed diagonal; the histogram holds every non-empty bin's count
        (diag,) = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
        assert list(diag.get_xdata()) == [0, 1] and list(diag.get_ydata()) == [0, 1]
        assert [p.get_height() for p in _bars(hist)["Samples"].patches] == [c for c in entry["count"] if c > 0]
    assert len(_bars(_panels(rel_fig)[0][1])["n < 10"].patches) == 1  # APH's first bin holds 2 samples
    everything = reliability_figure(bins, min_count=0)
    assert len(_bars(everything.axes[1])["Accuracy"].patches) == 5 and "n < 0" not in _bars(everything.axes[1])


def test_reliability_title_global_ece_in_percent_matches_independent_computation(rel_fig):
    bins = _bins()
    for ax in _panels(rel_fig)[0]:
        method, second = ax.get_title().splitlines()
        shown = float(re.fullmatch(r"Global ECE = ([0-9.]+)%", second).group(1))
        expected = _independent_ece(bins[method])
        assert shown / 100 == pytest.approx(expected, abs=5e-5)
        assert binned_ece(bins[method]) == pytest.approx(expected, rel=1e-12)
    assert rel_fig.get_suptitle() == "CIFAR-10"


def test_reliability_bins_from_metrics_match_logged_global_ece():
    torch = pytest.importorskip("torch")
    from pfl.metrics import ece, reliability_bins

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(500, 10, generator=gen) * 2, dim=1)
    labels = torch.randint(0, 10, (500,), generator=gen)
    entry = reliability_bins(probs, labels, 15)
    assert binned_ece(entry) == pytest.approx(ece(probs, labels, 15, "uniform"), abs=1e-9)
    ax = reliability_figure({"w/o": entry}, min_count=1).axes[0]
    assert len(_bars(ax)["Accuracy"].patches) == sum(c > 0 for c in entry["count"])


# --- errors --------------------------------------------------------------------------------------

def test_bar_line_missing_column():
    with pytest.raises(ValueError, match=r"lacks required column\(s\) \['ece'\]"):
        bar_line_figure(_frame().drop(columns="ece"), "alpha")
    with pytest.raises(ValueError, match="join_ratio"):
        bar_line_figure(_frame(), "join_ratio")


def test_bar_line_unknown_method():
    data = _frame()
    data.loc[0, "method"] = "aph"
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['aph'\].*'w/o', 'APH', 'LoRAPH'"):
        bar_line_figure(data, "alpha")


def test_bar_line_empty_frame():
    with pytest.raises(ValueError, match="empty"):
        bar_line_figure(_frame().iloc[0:0], "alpha")
    all_nan = _frame().assign(ece=math.nan)
    with pytest.raises(ValueError, match="only NaN"):
        bar_line_figure(all_nan, "alpha")


def test_bar_line_duplicate_cells_and_bad_values():
    data = pd.concat([_frame(), _frame().iloc[:1]])
    with pytest.raises(ValueError, match=r"several rows.*\('0.1', 'w/o'\).*aggregate over seeds"):
        bar_line_figure(data, "alpha")
    with pytest.raises(ValueError, match="NaN"):
        bar_line_figure(_frame().assign(alpha=[math.nan] + [0.1] * 7), "alpha")
    with pytest.raises(ValueError, match="numeric"):
        bar_line_figure(_frame().assign(ece="high"), "alpha")
    with pytest.raises(TypeError, match="DataFrame"):
        bar_line_figure(MEANS, "alpha")


def test_nan_mean_is_a_missing_cell():
    data = _frame()
    data.loc[(data["alpha"] == 0.1) & (data["method"] == "APH"), "ece"] = math.nan
    ax = bar_line_figure(data, "alpha").axes[0]
    assert len(_bars(ax)["APH"].patches) == 2
    assert list(_line(ax, "APH").get_ydata()) == pytest.approx([MEANS[0.05, "APH"], MEANS[0.5, "APH"]])


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b.clear(), "non-empty dict"),
    (lambda b: b.update({"TS": b["APH"]}), r"unknown method\(s\) \['TS'\]"),
    (lambda b: b["APH"].pop("count"), r"lacks key\(s\) \['count'\]"),
    (lambda b: b["APH"].update(accuracy=[0.5, 0.5]), "n_bins=5"),
    (lambda b: b["APH"].update(count=[0] * 5), "no samples"),
    (lambda b: b["APH"].update(count=[-1, 10, 30, 40, 118]), "non-negative"),
    (lambda b: b["w/o"].update(count=[3, 10, 30, 40, 120]), "non-empty bin"),
])
def test_reliability_errors(mutate, message):
    bins = _bins()
    mutate(bins)
    with pytest.raises(ValueError, match=message):
        reliability_figure(bins)
    with pytest.raises(ValueError, match="min_count must be >= 0"):
        reliability_figure(_bins(), min_count=-1)
