"""The label distribution of a partition as stacked bars, one bar per client (``pfl data partition``).

After flwr-datasets' ``plot_label_distributions`` with ``plot_type="bar"`` (``flwr_datasets/visualization/
label_distribution.py`` and ``bar_plot.py``): client ids on the x axis, the count of each label stacked in label
order on the y axis, label colours spread evenly over the ``RdYlGn`` colormap (its default, assigned as pandas'
``DataFrame.plot(colormap=...)`` does), title "Per Partition Label Distribution". Differences: two panels sharing
the x axis, the clients' train splits ("Train count") above their test splits ("Test count"), where flwr-datasets
has one ("Count"; its partitions have no split, and a partition that keeps the official split deals the two
apart); the legend of labels (titled "Labels", by class name, outside on the right) is drawn when there are at most
:data:`MAX_LEGEND_LABELS` labels (flwr-datasets draws it on request); the x axis reads "Client ID" (flwr-datasets:
"Partition ID") and its ticks are integer client ids that matplotlib spaces out (flwr-datasets hides every other
tick label past 20 partitions); the figure is built without pyplot in the paper style of :mod:`reports.plots` and
saved with its :func:`~reports.plots.save_figure` (PNG and PDF).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from reports.plots import _pin_tick_fonts, paper_style

COLORMAP = "RdYlGn"  # flwr-datasets' default
TITLE = "Per Partition Label Distribution"  # flwr-datasets' default
MAX_LEGEND_LABELS = 20
SPLITS = ("train", "test")


def client_label_matrix(label_counts: Mapping, num_classes: int, split: str) -> np.ndarray:
    """int64 (clients, num_classes): each client's count of every label in its ``split`` (``train`` or ``test``).

    Args:
        label_counts: a partition's label counts as an FL run logs them (``partition/label_counts.json``:
            ``{"clients": [{"client": 0, "train": {"<label>": count}, "test": {...}}, ...]}``, labels absent where
            the count is 0; :meth:`pfl.data.partition.Partition.label_counts`).
        num_classes: the dataset's label count.
        split: ``train`` or ``test``.

    Raises:
        ValueError: no clients, or a label outside ``0 .. num_classes - 1``.
    """
    clients = label_counts.get("clients") or []
    if not clients:
        raise ValueError("label counts: no clients; pass a partition's label_counts.json")
    matrix = np.zeros((len(clients), num_classes), dtype=np.int64)
    for row, client in zip(matrix, clients):
        for label, count in client[split].items():
            if not 0 <= int(label) < num_classes:
                raise ValueError(f"label counts: client {client['client']} has label {label} in its {split} split, "
                                 f"outside 0..{num_classes - 1}")
            row[int(label)] = count
    return matrix


def _stacked_bars(ax, matrix: np.ndarray, class_names: Sequence[str], colors: np.ndarray) -> None:
    """One bar per client (row of ``matrix``) on ``ax``, its labels' counts stacked in label order."""
    bottom = np.zeros(len(matrix), dtype=np.int64)
    for label, name in enumerate(class_names):
        ax.bar(np.arange(len(matrix)), matrix[:, label], 0.8, bottom=bottom, color=colors[label], label=name)
        bottom += matrix[:, label]
    ax.set_ylim(0, 1.05 * max(bottom.max(), 1))
    ax.set_xlim(-0.5, len(matrix) - 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _pin_tick_fonts(ax)


def label_distribution_figure(label_counts: Mapping, class_names: Sequence[str], title: str = TITLE) -> Figure:
    """Stacked bars of every client's label counts, train split above test split (module docstring).

    Args:
        label_counts: the partition's label counts (:func:`client_label_matrix`).
        class_names: the dataset's class names, one per label (their number is the label count).
        title: the figure's title.

    Returns:
        A figure with two Axes (train, then test; y labels "Train count" and "Test count"), each holding one
        ``BarContainer`` per label (labelled with its class name) whose bar ``k`` sits at x = client ``k``, stacked
        in label order, so the top of client ``k``'s stack is its split's size.

    Raises:
        ValueError: see :func:`client_label_matrix`.
    """
    matrices = [client_label_matrix(label_counts, len(class_names), split) for split in SPLITS]
    colors = matplotlib.colormaps[COLORMAP](np.linspace(0, 1, len(class_names)))
    with matplotlib.rc_context(paper_style()):
        fig = Figure(figsize=(max(8.0, min(24.0, 3.0 + 0.2 * len(matrices[0]))), 9.0), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True)
        for ax, split, matrix in zip(axes, SPLITS, matrices):
            _stacked_bars(ax, matrix, class_names, colors)
            ax.set_ylabel(f"{split.capitalize()} count")
        axes[-1].set_xlabel("Client ID")
        fig.suptitle(title)
        if len(class_names) <= MAX_LEGEND_LABELS:
            handles, names = axes[0].get_legend_handles_labels()
            fig.legend(handles[::-1], names[::-1], title="Labels", loc="outside right center", frameon=False,
                       ncols=1 if len(class_names) <= 10 else 2)
    return fig
