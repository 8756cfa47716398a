"""``pfl report --by architecture`` on a real MLflow SQLite store holding launch runs with nested FL runs, logged
with the metric vocabulary's names (``test/acc_<arch>``) or the legacy ones (``test_acc_<arch>``)."""

from __future__ import annotations

import statistics

import mlflow
import pandas as pd
import pytest

from pfl import tracking
from pfl.vocabulary import best_name, legacy_fl
from pfl.models import FAMILIES
from reports.architectures import architecture_caption, architecture_order, row_order
from reports.names import architecture_name, dataset_name, family_name, scheme_name
from reports.query import architecture_results, model_family
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
HEADER = ("dataset / models", "scheme")


def _fl_run(params: dict, metrics: dict) -> str:
    """An FL run nested under the active launch run, in its experiment; returns its run id."""
    parent = mlflow.active_run().info
    with mlflow.start_run(experiment_id=parent.experiment_id, nested=True, tags={"pfl.kind": "fl"}) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
    return run.info.run_id


def _rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """Cells of a Markdown pipe table by row label ``(dataset / models, scheme)``, a blank block label continuing
    the block above (the header row under :data:`HEADER`)."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.splitlines()
             if line.startswith("|") and not line.startswith("|--") and not line.startswith("|:")]
    rows, block = {}, ""
    for row in cells:
        block = row[0] or block
        rows[block, row[1]] = row[2:]
    return rows


def _csv(folder) -> pd.DataFrame:
    """The long CSV of a report: one line per non-empty cell."""
    return pd.read_csv(folder / "table_architectures.csv", keep_default_na=False, na_values=[""])


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
    frame = _csv(tmp_path)
    # one block (CIFAR-10 / VGG; FedProto's vgg11,vgg19 are VGG too); rows: FlexiFed's scheme order, then the
    # scheme-less run under its algo; V1..V4 the block's architectures by depth
    assert list(dict.fromkeys(frame["scheme"])) == ["standalone", "max_common", "fedproto"]
    assert set(frame["dataset"]) == {"cifar10"} and set(frame["family"]) == {"vgg"}
    assert list(dict.fromkeys(frame["version"])) == ["V1", "V2", "V3", "V4", "mean"]
    versions = dict(zip(frame["version"], frame["architecture"].fillna("")))
    assert versions == {**{f"V{k}": a for k, a in enumerate(ARCHS, 1)}, "mean": ""}
    cell = frame.set_index(["scheme", "version"])
    for scheme in ("standalone", "max_common"):
        for version, arch in (*zip(("V1", "V2", "V3", "V4"), ARCHS), ("mean", "mean")):
            values = [FINAL[scheme, seed][arch] for seed in (0, 1)]
            assert cell.at[(scheme, version), "mean"] == pytest.approx(statistics.mean(values))
            assert cell.at[(scheme, version), "std"] == pytest.approx(statistics.pstdev(values))
    assert cell.at[("fedproto", "V4"), "mean"] == pytest.approx(0.55) and cell.at[("fedproto", "V4"), "std"] == 0
    assert ("fedproto", "V2") not in cell.index       # no run: no line
    assert cell.at[("standalone", "V2"), "n"] == 2 and cell.at[("fedproto", "V4"), "n"] == 1
    # the paper's format: percent, one decimal; by hand, max_common vgg11 = (64.4 + 65.2) / 2 ± 0.4
    row = _rows((tmp_path / "table_architectures.md").read_text())
    # seeds differ per row (2, 2, 1): a column n; the single seed shows its value alone
    assert row[HEADER] == ["V1", "V2", "V3", "V4", "mean", "n"]
    assert row["CIFAR-10 / VGG", "Standalone"] == ["61.0 ± 1.0", "61.0 ± 1.0", "65.0 ± 1.0", "59.0 ± 1.0",
                                                   "62.0 ± 1.0", "2"]
    assert row["CIFAR-10 / VGG", "Max-Common"] == ["**64.8 ± 0.4**", "**66.0 ± 1.0**", "**71.0 ± 1.0**",
                                                   "**68.7 ± 0.5**", "**67.5 ± 0.4**", "2"]
    assert row["CIFAR-10 / VGG", "FedProto"] == ["50.0", MISSING, MISSING, "55.0", "52.0", "1"]
    assert "final round" in report.caption and "CIFAR-10; Dir(α=0.1), join ratio 1." in report.caption
    assert "VGG: V1..V4 = VGG-11/VGG-13/VGG-16/VGG-19" in report.caption
    assert "over the n seeds of each row (column n)" in report.caption
    tex = (tmp_path / "table_architectures.tex").read_text()
    assert "\\toprule" in tex and "\\textbf{64.8 $\\pm$ 0.4}" in tex and "\\caption{" in tex
    assert " &  & V1 & V2 & V3 & V4 & mean & n \\\\" in tex
    assert "CIFAR-10 / VGG & Standalone & " in tex and "\n & Max-Common & " in tex and "\n & FedProto & " in tex


def test_stat_best_reads_best_test_acc_per_architecture(store, tmp_path):
    report = build_report(Selection(["arch"], stat="best", by="architecture"), tmp_path)
    cell = _csv(tmp_path).set_index(["scheme", "version"])
    for version, arch in (*zip(("V1", "V2", "V3", "V4"), ARCHS), ("mean", "mean")):
        values = [FINAL["standalone", seed][arch] + BEST_GAIN for seed in (0, 1)]
        assert cell.at[("standalone", version), "mean"] == pytest.approx(statistics.mean(values))
    assert _rows(report.table_markdown)["CIFAR-10 / VGG", "Standalone"][0] == "62.0 ± 1.0"   # (61.0 + 63.0) / 2 ± 1.0
    assert "best/test_acc_<arch>" in report.caption


def test_long_frame_labels_rows_and_skips_std_metrics(store):
    long = architecture_results(["arch"])
    assert set(long["arch"]) == {*ARCHS, "mean"}               # test/acc_std, test_acc_std are no architecture
    assert set(long["family"]) == {"vgg"}
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
    with pytest.raises(ValueError, match=r"the FL runs on cifar10 hold several alpha values \['0.1', '0.5'\]; "
                                         r"select one with --alpha$"):
        build_report(Selection(["mixed"], by="architecture"), tmp_path)
    report = build_report(Selection(["mixed"], alpha=0.5, by="architecture"), tmp_path)
    assert "Dir(α=0.5)" in report.caption


def test_report_command_logs_the_table_with_a_report_run(store, tmp_path, capsys):
    from pfl.cli import main

    out = tmp_path / "rep"
    assert main(["report", "--experiment", "arch", "--by", "architecture", "--out", str(out)]) == 0
    assert "| Max-Common" in capsys.readouterr().out
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
    assert [model_family(m) for m in (["vgg11", "vgg19"], ["resnet56"], ["cnn"], ["vgg11", "resnet20"])] == \
        ["vgg", "resnet", "cnn", "resnet+vgg"]


def test_display_names_as_flexifeds_table_1():
    assert [dataset_name(d) for d in ("cifar10", "cinic10", "agnews", "speech_commands", "cifar100",
                                      "tinyimagenet", "other")] == \
        ["CIFAR-10", "CINIC-10", "AG News", "Speech Commands", "CIFAR-100", "Tiny-ImageNet", "other"]
    assert [family_name(f) for f in ("vgg", "resnet", "charcnn", "vdcnn", "cnn")] == \
        ["VGG", "ResNet", "CharCNN", "VDCNN", "cnn"]
    assert [scheme_name(s) for s in (*row_order(["standalone", "clustered_fl", "basic_common", "clustered_common",
                                                 "max_common"]), "other")] == \
        ["Standalone", "Clustered-FL", "Basic-Common", "Clustered-Common", "Max-Common", "other"]
    assert [architecture_name(a) for a in ("vgg16", "resnet20", "vdcnn29", "charcnn_v1", "cnn")] == \
        ["VGG-16", "ResNet-20", "VDCNN-29", "charcnn_v1", "cnn"]


CHARCNN = ("charcnn_v1", "charcnn_v2", "charcnn_v3", "charcnn_v4")
IID = {"partition": "iid", "alpha": 0.5}  # alpha: logged by every run, unused by IID
# (dataset, scheme, model) -> final accuracies of one seed; logged out of the table's order
TABLE1 = {
    ("agnews", "max_common", ",".join(CHARCNN)): {"charcnn_v1": 0.860, "charcnn_v2": 0.866, "charcnn_v3": 0.867,
                                                  "charcnn_v4": 0.676, "mean": 0.800},
    ("agnews", "standalone", ""): {"charcnn_v1": 0.520, "charcnn_v2": 0.530, "charcnn_v3": 0.650,
                                   "charcnn_v4": 0.700, "mean": 0.600},  # no model param: family of what it logged
    ("agnews", "", "cnn"): {"mean": 0.400},  # a FedAvg run without per-architecture metrics: family cnn
    ("cifar10", "max_common", "resnet20,resnet32"): {"resnet20": 0.550, "resnet32": 0.570, "mean": 0.560},
    ("cifar10", "max_common", "vgg11,vgg13"): {"vgg11": 0.660, "vgg13": 0.600, "mean": 0.650},
    ("cifar10", "standalone", "vgg11,vgg13"): {"vgg11": 0.600, "vgg13": 0.620, "mean": 0.610},
}


@pytest.fixture
def table1(store, tmp_path, monkeypatch):
    """A new experiment (its name returned): one seed of CIFAR-10 (Dir(α=0.1)) with VGG and ResNet, AG News (IID)
    with CharCNN (its names registered as family ``charcnn`` for the test) and a homogeneous ``cnn`` FedAvg run."""
    for name in CHARCNN:
        monkeypatch.setitem(FAMILIES, name, "charcnn")
    name = f"table1_{tmp_path.name}"
    exp = mlflow.create_experiment(name, artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=exp, tags={"pfl.kind": "launch"}):
        for (dataset, scheme, model), acc in TABLE1.items():
            params = {**SETTING, "dataset": dataset, "scheme": scheme, "model": model, "seed": 0,
                      **(IID if dataset == "agnews" else {})}
            _fl_run({k: v for k, v in params.items() if v != ""} | ({} if scheme else {"algo": "fedavg"}),
                    _metrics(acc))
    return name


def test_one_table_of_datasets_and_families_in_the_papers_layout(table1, tmp_path):
    report = build_report(Selection([table1], by="architecture"), tmp_path)
    row = _rows((tmp_path / "table_architectures.md").read_text())
    # blocks: CIFAR-10 before AG News, VGG before ResNet before CharCNN before the others; V1..V4 per block,
    # a block of 2 depths leaves V3, V4 empty; bold: the best of a column within its block (VGG's V1 66.0 is
    # bold beside CharCNN's 86.0; a block of one row has nothing to compare)
    assert list(row) == [HEADER, ("CIFAR-10 / VGG", "Standalone"), ("CIFAR-10 / VGG", "Max-Common"),
                         ("CIFAR-10 / ResNet", "Max-Common"), ("AG News / CharCNN", "Standalone"),
                         ("AG News / CharCNN", "Max-Common"), ("AG News / cnn", "FedAvg")]
    assert row[HEADER] == ["V1", "V2", "V3", "V4", "mean"]  # one seed everywhere: no column n
    assert row["CIFAR-10 / VGG", "Standalone"] == ["60.0", "**62.0**", MISSING, MISSING, "61.0"]
    assert row["CIFAR-10 / VGG", "Max-Common"] == ["**66.0**", "60.0", MISSING, MISSING, "**65.0**"]
    assert row["CIFAR-10 / ResNet", "Max-Common"] == ["55.0", "57.0", MISSING, MISSING, "56.0"]
    assert row["AG News / CharCNN", "Standalone"] == ["52.0", "53.0", "65.0", "**70.0**", "60.0"]
    assert row["AG News / CharCNN", "Max-Common"] == ["**86.0**", "**86.6**", "**86.7**", "67.6", "**80.0**"]
    assert row["AG News / cnn", "FedAvg"] == [MISSING] * 4 + ["40.0"]
    markdown = (tmp_path / "table_architectures.md").read_text()
    assert markdown.count("| AG News / CharCNN ") == 1 and markdown.count("| CIFAR-10 / VGG ") == 1  # once a block
    # the settings differ per dataset: one sentence each, in table order; the versions per family
    assert report.caption.startswith("CIFAR-10; Dir(α=0.1), join ratio 1. AG News; IID, join ratio 1. ")
    assert ("(VGG: V1..V2 = VGG-11/VGG-13; ResNet: V1..V2 = ResNet-20/ResNet-32; "
            "CharCNN: V1..V4 = charcnn_v1/charcnn_v2/charcnn_v3/charcnn_v4)") in report.caption
    assert report.caption.endswith("Single seed (n=1): values without std.")
    tex = (tmp_path / "table_architectures.tex").read_text()
    assert "\\begin{tabular}{llccccc}" in tex and "\nAG News / CharCNN & Standalone & 52.0 & 53.0 & 65.0 & " \
        "\\textbf{70.0} & 60.0 \\\\\n & Max-Common & \\textbf{86.0} & " in tex
    # the CSV rebuilds the table: one line per non-empty cell, ids, version and architecture, fractions
    frame = _csv(tmp_path)
    assert frame.columns.tolist() == ["dataset", "family", "scheme", "version", "architecture", "mean", "std", "n"]
    assert len(frame) == 2 * 3 + 3 + 2 * 5 + 1
    assert list(dict.fromkeys(zip(frame["dataset"], frame["family"]))) == [
        ("cifar10", "vgg"), ("cifar10", "resnet"), ("agnews", "charcnn"), ("agnews", "cnn")]
    line = frame.set_index(["dataset", "family", "scheme", "version"])
    assert line.loc[("agnews", "charcnn", "max_common", "V4"), ["architecture", "mean", "std", "n"]].tolist() == \
        ["charcnn_v4", pytest.approx(0.676), 0, 1]
    assert line.at[("cifar10", "resnet", "max_common", "V2"), "architecture"] == "resnet32"
    assert pd.isna(line.at[("agnews", "cnn", "fedavg", "mean"), "architecture"])
    assert line.at[("agnews", "cnn", "fedavg", "mean"), "mean"] == pytest.approx(0.4)


def test_several_datasets_refuse_several_settings_of_one(table1, tmp_path):
    exp = mlflow.get_experiment_by_name(table1).experiment_id
    with mlflow.start_run(experiment_id=exp, tags={"pfl.kind": "launch"}):
        _fl_run({**SETTING, "dataset": "agnews", "scheme": "standalone", "seed": 1, "model": ",".join(CHARCNN)},
                _metrics(TABLE1["agnews", "standalone", ""]))  # Dirichlet beside AG News' IID runs
    with pytest.raises(ValueError, match=r"the FL runs on agnews hold several partition values \['dirichlet', "
                                         r"'iid'\]; select one with --partition$"):
        build_report(Selection([table1], by="architecture"), tmp_path)
    report = build_report(Selection([table1], partition="iid", by="architecture"), tmp_path)
    assert report.caption.startswith("AG News; IID, join ratio 1. ")


def test_caption_names_the_versions_per_block_where_a_familys_blocks_differ():
    runs = [("cinic10", "vgg", ARCHS), ("cifar10", "vgg", ARCHS[:2]), ("speech_commands", "resnet", ("resnet20",))]
    long = pd.DataFrame([{**SETTING, "dataset": d, "family": f, "row": "max_common", "arch": a, "acc": 0.5,
                          "classes_per_client": None, "partition_name": None, "num_clients": 8, "global_rounds": 1}
                         for d, f, archs in runs for a in (*archs, "mean")])
    assert "(CIFAR-10 / VGG: V1..V2 = VGG-11/VGG-13; CINIC-10 / VGG: V1..V4 = VGG-11/VGG-13/VGG-16/VGG-19; " \
        "ResNet: V1 = ResNet-20)" in architecture_caption(long, "final")
