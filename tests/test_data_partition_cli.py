"""``pfl data partition``: the partition a run would train on, printed, as the run's label_counts.json and as a
stacked-bar plot, with nothing trained or tracked; and the plot builder of :mod:`reports.partitions`."""

from __future__ import annotations

import json

import matplotlib
import mlflow
import numpy as np
import pytest
from matplotlib.container import BarContainer

from pfl.cli import main
from reports.partitions import COLORMAP, client_label_matrix, label_distribution_figure

# 5 of the 10 classes pathologically dealt to 5 clients (2 each) of the real CIFAR-10 slice
SETTING = ["num_clients=5", "partition=pathological", "classes_per_client=2", "seed=3", "device=cpu"]


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A fresh working folder; MLflow pointed at a store file in it (which must not appear), and put back after."""
    old = mlflow.get_tracking_uri()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "PFL_DATA_DIR", "PFL_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path
    mlflow.set_tracking_uri(old)


def test_partition_command_writes_the_runs_label_counts_and_a_plot_without_tracking(cifar10_dir, isolated,
                                                                                     capsys):
    tmp = isolated
    config = [f"data_dir={cifar10_dir}", f"cache_dir={tmp / 'cache'}", *SETTING]

    assert main(["data", "partition", *config, "--out", str(tmp / "part")]) == 0

    out = capsys.readouterr().out
    assert {p.name for p in (tmp / "part").iterdir()} == {"label_counts.json", "label_distribution.png",
                                                         "label_distribution.pdf"}
    assert (tmp / "part" / "label_distribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp / "part" / "label_distribution.pdf").read_bytes()[:5] == b"%PDF-"
    assert not (tmp / "mlflow.db").exists() and not (tmp / "mlruns").exists()  # nothing tracked
    counts = json.loads((tmp / "part" / "label_counts.json").read_text())
    clients = counts["clients"]
    assert len(clients) == 5 and sum(c["num_train"] + c["num_test"] for c in clients) == 3600
    for c in clients:  # one printed line per client: id, train and test sizes, label:count of each split
        train, test = (" ".join(f"{k}:{n}" for k, n in sorted(c[s].items(), key=lambda kv: int(kv[0])))
                       for s in ("train", "test"))
        assert f"{c['client']:6d} {c['num_train']:6d} {c['num_test']:6d}  {train} | {test}" in out.splitlines()
        assert len({*c["train"], *c["test"]}) <= 2  # pathological, 2 classes per client

    # a run with the same config logs the same file
    assert main(["train", "--no-progress", *config, "algo=fedavg", "join_ratio=0.4", "global_rounds=1"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    fl = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`pfl.kind` = 'fl'",
                            output_format="list")
    logged = mlflow.artifacts.load_dict(f"runs:/{fl[0].info.run_id}/partition/label_counts.json")
    assert logged == counts


def test_label_distribution_figure_stacks_each_clients_labels_in_label_order():
    counts = {"clients": [{"client": 0, "num_train": 5, "num_test": 2, "train": {"0": 3, "2": 2}, "test": {"0": 2}},
                          {"client": 1, "num_train": 4, "num_test": 1, "train": {"1": 4}, "test": {"2": 1}}]}
    expected = {"train": np.array([[3, 0, 2], [0, 4, 0]]), "test": np.array([[2, 0, 0], [0, 0, 1]])}  # by hand
    for split, matrix in expected.items():
        np.testing.assert_array_equal(client_label_matrix(counts, 3, split), matrix)

    fig = label_distribution_figure(counts, ("cat", "dog", "frog"))

    assert [ax.get_ylabel() for ax in fig.axes] == ["Train count", "Test count"]
    assert fig.axes[1].get_xlabel() == "Client ID"
    for ax, matrix in zip(fig.axes, expected.values()):
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert [b.get_label() for b in bars] == ["cat", "dog", "frog"]
        for label, container in enumerate(bars):
            assert [p.get_x() + p.get_width() / 2 for p in container] == [0, 1]  # x = client id
            assert [p.get_height() for p in container] == list(matrix[:, label])
            assert [p.get_y() for p in container] == list(matrix[:, :label].sum(axis=1))  # stacked in label order
        colors = [tuple(b.patches[0].get_facecolor()) for b in bars]
        assert colors == [tuple(c) for c in matplotlib.colormaps[COLORMAP](np.linspace(0, 1, 3))]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["frog", "dog", "cat"]  # top of the stack first


def test_label_counts_with_a_label_beyond_the_classes_are_refused():
    counts = {"clients": [{"client": 0, "train": {"3": 1}, "test": {}}]}
    with pytest.raises(ValueError, match="client 0 has label 3 in its train split, outside 0..2"):
        client_label_matrix(counts, 3, "train")
