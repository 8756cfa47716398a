"""``pfl report --by architecture`` on a real MLflow SQLite store holding launch runs with nested FL runs, logged
with the metric vocabulary's names (``test/acc_<arch>``) or the legacy ones (``test_acc_<arch>``)."""

from __future__ import annotations

import statistics

import mlflow
import pandas as pd
import pytest

from pfl import tracking
from pfl.vocabulary import best_name, legacy_fl
from reports.architectures import architecture_order, row_order
from reports.query import architecture_results
from reports.report import Selection, build_report
from reports.table import MISSING

ARCHS = ("vgg11", "vgg13", "vgg16", "vgg19")
SETTING = {"algo": "flexifed", "dataset": "cifar10", "partition": "dirichlet", "alpha": 0.1, "join_ratio": 1.0,
           "model": ",".join(ARCHS)}
# (scheme, seed) -> final test accuracy per architecture group, and "mean" = test_acc over all clients
FINAL = {
    ("standalone", 0): {"vgg11": 0.600, "vgg13": 0.620, "vgg16": 0.640, "vgg19": 0.580, "mean": 0.610},
    ("standalone", 1): {"vgg11": 0.620, "vgg13": 0.600, "vgg16": 0.660, "vgg19": 0.600, "mean": 0.630},
    ("max_common", 0): {"vgg11": 0.644, "vgg13": 0.650, "vgg16": 0.700, "vgg19": 0.692, "mean": 0.671},
    ("max_common", 1): {"vgg11": 0.652, "vgg13": 0.670, "vgg16": 0.720, "vgg19": 0.682, "mean": 0.679},
}
BEST_GAIN = 0.01  # best_test_acc_<arch> = test_acc_<arch> + 0.01 in every run


def _fl_run(params: dict, metrics: dict) -> str:
    """An FL run nested under the active launch run, in its experiment; returns its run id."""
    parent = mlflow.active_run().info
    with mlflow.start_run(experiment_id=parent.experiment_id, nested=True, tags={"pfl.kind": "fl"}) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
    return run.info.run_id


def _rows(markdown: str) -> dict[str, list[str]]:
    """Cells of a Markdown pipe table by row label (the header row under ``"scheme"``)."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
             if line.startswith("|") and not line.startswith("|--") and not line.startswith("|:")]
    return {row[0]: row[1:] for row in cells}


def _metrics(acc: dict[str, float], best: bool = True, legacy: bool = True) -> dict[str, float]:
    """``test_acc_<arch>`` and ``best_test_acc_<arch>`` (legacy), else ``test/acc_<arch>``, ``best/test_acc_<arch>``."""
    out = {("test/acc" if k == "mean" else f"test/acc_{k}"): v for k, v in acc.items()}
    out["test/acc_std"] = 0.2  # across-client std of the engine: not an architecture
    if best:
        out.update({best_name(k): v + BEST_GAIN for k, v in out.items() if k != "test/acc_std"})
    return {legacy_fl(k) if legacy else k: v for k, v in out.items()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment ``arch``: FlexiFed launch runs (standalone, max_common) x seeds 0, 1 with nested FL runs, and a
    launch run of a scheme-less algorithm; experiment ``homog``: an FL run without per-architecture metrics."""
    tmp = tmp_path_factory.mktemp("arch_store")
    old = mlflow.get_tracking_uri()
    tracking.configure_tracking("sqlite:///" + str(tmp / "mlflow.db"))
    ids = {}
    exp = mlflow.create_experiment("arch", artifact_location=str(tmp / "artifacts"))
    for scheme in ("max_common", "standalone"):  # logged in the wrong order: rows must still follow FlexiFed's
        with mlflow.start_run(experiment_id=exp, tags={"pfl.kind": "launch"}):
            for seed in (0, 1):  # max_common: new metric names, standalone: legacy ones
                ids[scheme, seed] = _fl_run({**SETTING, "scheme": scheme, "seed": seed},
                                            _metrics(FINAL[scheme, seed], legacy=scheme == "standalone"))
    with mlflow.start_run(experiment_id=exp, tags={"pfl.kind": "launch"}):
        ids["fedproto"] = _fl_run({**SETTING, "algo": "fedproto", "model": "vgg11,vgg19", "seed": 0},
                                  _metrics({"vgg11": 0.50, "vgg19": 0.55, "mean": 0.52}))
    homog = mlflow.create_experiment("homog", artifact_location=str(tmp / "artifacts_homog"))
    with mlflow.start_run(experiment_id=homog, tags={"pfl.kind": "launch"}):
        _fl_run({**SETTING, "algo": "fedavg", "model": "cnn", "seed": 0}, {"test_acc": 0.5, "test_acc_std": 0.1})
    yield ids
    mlflow.set_tracking_uri(old)


def test_cells_are_mean_and_std_over_seeds_in_percent(store, tmp_path):
    report = build_report(Selection(["arch"], by="architecture"), tmp_path)
    assert [p.name for p in report.files] == ["table_architectures.md", "table_architectures.tex",
                                              "table_architectures.csv"]
    frame = pd.read_csv(tmp_path / "table_architectures.csv", index_col="scheme")
    # rows: FlexiFed's scheme order, then the scheme-less run under its algo; columns by depth, then mean
    assert frame.index.tolist() == ["standalone", "max_common", "fedproto"]
    assert frame.columns.tolist() == [f"{a}_{s}" for a in (*ARCHS, "mean") for s in ("mean", "std", "n")]
    for scheme in ("standalone", "max_common"):
        for arch in (*ARCHS, "mean"):
            values = [FINAL[scheme, seed][arch] for seed in (0, 1)]
            assert frame.at[scheme, f"{arch}_mean"] == pytest.approx(statistics.mean(values))
            assert frame.at[scheme, f"{arch}_std"] == pytest.approx(statistics.pstdev(values))
    assert frame.at["fedproto", "vgg19_mean"] == pytest.approx(0.55) and frame.at["fedproto", "vgg19_std"] == 0
    assert pd.isna(frame.at["fedproto", "vgg13_mean"]) and frame.at["fedproto", "vgg13_n"] == 0
    assert frame.at["standalone", "vgg13_n"] == 2 and frame.at["fedproto", "vgg19_n"] == 1
    # the paper's format: percent, one decimal; by hand, max_common vgg11 = (64.4 + 65.2) / 2 ± 0.4
    row = _rows((tmp_path / "table_architectures.md").read_text())
    # seeds differ per row (2, 2, 1): a column n; the single seed shows its value alone
    assert row["scheme"] == [*ARCHS, "mean", "n"]
    assert row["standalone"] == ["61.0 ± 1.0", "61.0 ± 1.0", "65.0 ± 1.0", "59.0 ± 1.0", "62.0 ± 1.0", "2"]
    assert row["max_common"] == ["**64.8 ± 0.4**", "**66.0 ± 1.0**", "**71.0 ± 1.0**", "**68.7 ± 0.5**",
                                 "**67.5 ± 0.4**", "2"]
    assert row["fedproto"] == ["50.0", MISSING, MISSING, "55.0", "52.0", "1"]
    assert "final round" in report.caption and "CIFAR-10; Dir(α=0.1), join ratio 1." in report.caption
    assert "over the n seeds of each row (column n)" in report.caption
    tex = (tmp_path / "table_architectures.tex").read_text()
    assert "\\toprule" in tex and "\\textbf{64.8 $\\pm$ 0.4}" in tex and "\\caption{" in tex
    assert " & vgg11 & vgg13 & vgg16 & vgg19 & mean & n \\\\" in tex and "max\\_common & " in tex


def test_stat_best_reads_best_test_acc_per_architecture(store, tmp_path):
    report = build_report(Selection(["arch"], stat="best", by="architecture"), tmp_path)
    frame = pd.read_csv(tmp_path / "table_architectures.csv", index_col="scheme")
    for arch in (*ARCHS, "mean"):
        values = [FINAL["standalone", seed][arch] + BEST_GAIN for seed in (0, 1)]
        assert frame.at["standalone", f"{arch}_mean"] == pytest.approx(statistics.mean(values))
    assert _rows(report.table_markdown)["standalone"][0] == "62.0 ± 1.0"   # (61.0 + 63.0) / 2 ± 1.0
    assert "best/test_acc_<arch>" in report.caption


def test_long_frame_labels_rows_and_skips_std_metrics(store):
    long = architecture_results(["arch"])
    assert set(long["arch"]) == {*ARCHS, "mean"}               # test/acc_std, test_acc_std are no architecture
    fedproto = long[long["fl_run_id"] == store["fedproto"]]
    assert set(fedproto["row"]) == {"fedproto"} and set(fedproto["arch"]) == {"vgg11", "vgg19", "mean"}
    assert len(long[long["row"] == "max_common"]) == 2 * 5    # 2 seeds x (4 architectures + mean)


def test_no_per_architecture_metrics_is_a_one_line_error(store, tmp_path, capsys):
    from pfl.cli import main

    message = ("--by architecture: no FL run in homog logs per-architecture accuracy (test/acc_<arch>); "
               "run a mixed-architecture algorithm such as flexifed")
    with pytest.raises(ValueError) as info:
        build_report(Selection(["homog"], by="architecture"), tmp_path)
    assert str(info.value) == message
    assert main(["report", "--experiment", "homog", "--by", "architecture", "--out", str(tmp_path / "r")]) == 2
    assert f"pfl: error: report: {message}" in capsys.readouterr().err.splitlines()
    assert mlflow.search_runs(experiment_names=["homog"], filter_string="tags.`pfl.kind` = 'report'").empty
    with pytest.raises(ValueError, match="unknown --by 'arch'; use --by method or --by architecture"):
        build_report(Selection(["arch"], by="arch"), tmp_path)


def test_stat_best_without_best_per_architecture_metrics_is_refused(store, tmp_path):
    tracking_exp = mlflow.create_experiment("nobest", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=tracking_exp, tags={"pfl.kind": "launch"}):
        run = _fl_run({**SETTING, "scheme": "standalone", "seed": 0},
                      {**_metrics(FINAL["standalone", 0], best=False), "best_test_acc": 0.7})
    with pytest.raises(ValueError, match=f"FL run\\(s\\) {run} logged test/acc_vgg11 but not best/test_acc_vgg11"):
        build_report(Selection(["nobest"], stat="best", by="architecture"), tmp_path)
    build_report(Selection(["nobest"], by="architecture"), tmp_path)  # --stat final works


def test_several_settings_are_refused_with_the_option_to_set(store, tmp_path):
    exp = mlflow.create_experiment("mixed", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp, tags={"pfl.kind": "launch"}):
        for alpha in (0.1, 0.5):
            _fl_run({**SETTING, "scheme": "standalone", "seed": 0, "alpha": alpha}, _metrics(FINAL["standalone", 0]))
    with pytest.raises(ValueError, match=r"several alpha values \['0.1', '0.5'\]; select one with --alpha"):
        build_report(Selection(["mixed"], by="architecture"), tmp_path)
    report = build_report(Selection(["mixed"], alpha=0.5, by="architecture"), tmp_path)
    assert "Dir(α=0.5)" in report.caption


def test_report_command_logs_the_table_with_a_report_run(store, tmp_path, capsys):
    from pfl.cli import main

    out = tmp_path / "rep"
    assert main(["report", "--experiment", "arch", "--by", "architecture", "--out", str(out)]) == 0
    assert "| max_common" in capsys.readouterr().out
    (run,) = mlflow.search_runs(experiment_names=["arch"], filter_string="tags.`pfl.kind` = 'report'",
                                output_format="list")
    assert run.data.params["by"] == "architecture"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"table_architectures.md", "table_architectures.csv", "table_architectures.tex"} <= arts
    assert not (out / "table.md").exists()
    # the default stays the method table
    assert main(["report", "--experiment", "arch", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "table.md").is_file() and not (tmp_path / "m" / "table_architectures.md").exists()


def test_architecture_and_row_order():
    assert architecture_order(["vgg19", "resnet56", "vgg11", "resnet20", "vgg16", "vgg13"]) == \
        ["vgg11", "vgg13", "vgg16", "vgg19", "resnet20", "resnet56"]
    assert architecture_order(["vgg16", "vgg9", "vgg11"]) == ["vgg9", "vgg11", "vgg16"]   # by number, not text
    assert row_order(["fedavg", "max_common", "clustered_common", "standalone", "basic_common", "clustered_fl"]) \
        == ["standalone", "clustered_fl", "basic_common", "clustered_common", "max_common", "fedavg"]
