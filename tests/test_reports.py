"""Reports from a real tracking store: query layer, results table, sweep run tree, report command."""

from __future__ import annotations

import statistics

import mlflow
import pandas as pd
import pytest
import torch
from matplotlib.container import BarContainer

from pfl import tracking
from pfl.config import ConfigError, load_config, load_head_config
from pfl.heads.run import run_heads
from pfl.metrics import reliability_bins
from pfl.sweep import run_sweep
from pfl.train import run_training
from reports.query import aggregate, results
from reports.report import Selection, build_report, sweep_figures
from reports.table import MISSING, build_table

HEADS = ["global_epoch=1", "sampling_num=2", "rank=2"]


def _cfg(data_dir, tmp_path, experiment, **overrides):
    values = {"data_dir": data_dir, "cache_dir": tmp_path / "cache", "num_clients": 4, "global_rounds": 1,
              "join_ratio": 0.5, "partition": "dirichlet", "alpha": 0.5, "experiment": experiment,
              "device": "cpu", **overrides}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def table_store(data_dir, tmp_path_factory):
    """FedFomo with 2 seeds and APH head runs (OOD set: CIFAR-100); FedAvg with 1 seed and no head runs."""
    tmp = tmp_path_factory.mktemp("table_store")
    old = mlflow.get_tracking_uri()
    tracking.configure_tracking(f"sqlite:///{tmp / 'mlflow.db'}")
    fomo = run_training(_cfg(data_dir, tmp, "tbl", algo="fedfomo", repeats=2), progress=False)["fl_run_ids"]
    avg = run_training(_cfg(data_dir, tmp, "tbl", algo="fedavg"), progress=False)["fl_run_ids"]
    aph = [run_heads(fl, load_head_config(HEADS, method="aph"), progress=False) for fl in fomo]
    yield {"fedfomo": fomo, "fedavg": avg, "aph": aph}
    mlflow.set_tracking_uri(old)


def _metric(run_id: str, name: str) -> float:
    """Metric ``name`` (pfl.vocabulary) as the run logged it (the runs here are new: no fallback to old names)."""
    return mlflow.MlflowClient().get_run(run_id).data.metrics[name]


def test_table_cells_equal_the_logged_metrics(table_store):
    agg = aggregate(results(["tbl"]))
    table = build_table(agg)
    for method, runs, key, metric in (("w/o", table_store["fedfomo"], "test/acc", "acc"),
                                      ("APH", table_store["aph"], "test/acc", "acc"),
                                      ("w/o", table_store["fedfomo"], "test/f_ece", "ece")):
        values = [_metric(r, key) for r in runs]
        assert table.mean.at["fedfomo", ("cifar10", method, metric)] == pytest.approx(statistics.mean(values))
        assert table.std.at["fedfomo", ("cifar10", method, metric)] == pytest.approx(statistics.pstdev(values))
    (avg,) = table_store["fedavg"]
    assert table.mean.at["fedavg", ("cifar10", "w/o", "nll")] == pytest.approx(_metric(avg, "test/nll"))
    assert table.std.at["fedavg", ("cifar10", "w/o", "nll")] == 0.0
    assert agg.loc[(agg.algo == "fedfomo") & (agg.method == "APH"), "seeds"].item() == 2
    assert table.count.at["fedfomo", ("cifar10", "APH", "acc")] == 2 and table.count.at[
        "fedavg", ("cifar10", "w/o", "acc")] == 1


def test_table_has_ood_auroc_of_msp_for_wo_and_the_method(table_store):
    table = build_table(aggregate(results(["tbl"])))
    for method, key in (("w/o", "wo/ood_auroc_msp"), ("APH", "ood/auroc_msp")):
        values = [_metric(r, key) for r in table_store["aph"]]
        assert table.mean.at["fedfomo", ("cifar10", method, "ood_auroc")] == pytest.approx(statistics.mean(values))
        assert table.std.at["fedfomo", ("cifar10", method, "ood_auroc")] == pytest.approx(statistics.pstdev(values))
    assert pd.isna(table.mean.at["fedavg", ("cifar10", "w/o", "ood_auroc")])  # no head run scored its models
    assert "CIFAR-10 / APH / OOD AUROC (%)" in table.to_markdown() and "OOD AUROC (\\%)" in table.to_latex()


def test_stat_best_on_real_fl_runs_reads_their_best_round(table_store):
    final = build_table(aggregate(results(["tbl"])))
    best = build_table(aggregate(results(["tbl"], stat="best")))
    for key, metric in (("best/test_acc", "acc"), ("best/test_nll", "nll"), ("best/test_f_ece", "ece")):
        values = [_metric(r, key) for r in table_store["fedfomo"]]
        assert best.mean.at["fedfomo", ("cifar10", "w/o", metric)] == pytest.approx(statistics.mean(values))
    head_columns = [c for c in final.mean.columns if c[1] != "w/o" or c[2] == "ood_auroc"]
    pd.testing.assert_frame_equal(best.mean[head_columns], final.mean[head_columns])


def test_missing_methods_are_missing_cells_not_zero(table_store):
    table = build_table(aggregate(results(["tbl"])))
    assert pd.isna(table.mean.at["fedavg", ("cifar10", "APH", "acc")])
    assert table.mean[("cifar10", "LoRAPH", "acc")].isna().all()
    cells = table.cells(" ± ", "**%s**")
    assert cells.at["FedAvg", ("CIFAR-10", "LoRAPH", "Acc (%)")] == MISSING
    assert "± 0.00" not in table.to_markdown()  # FedAvg's single seed shows its values alone


def test_best_value_per_column_is_marked(table_store):
    table = build_table(aggregate(results(["tbl"])))
    col = ("cifar10", "w/o", "nll")
    best_algo = table.mean[col].idxmin()
    assert table.best.at[best_algo, col] and table.best[col].sum() == 1
    md = table.to_markdown()
    best_text = f"{table.mean.at[best_algo, col]:.3f}"
    best_text += f" ± {table.std.at[best_algo, col]:.3f}" if table.count.at[best_algo, col] > 1 else ""
    assert f"**{best_text}**" in md
    tex = table.to_latex()
    latex_cell = "\\textbf{" + best_text.replace(" ± ", " $\\pm$ ") + "}"
    assert "\\toprule" in tex and "\\bottomrule" in tex and latex_cell in tex


def test_filter_selects_runs_and_head_runs_follow(table_store):
    long = results(["tbl"], "params.algo = 'fedavg'")
    assert set(long["algo"]) == {"fedavg"} and set(long["method"]) == {"w/o"}


def test_sweep_without_the_ood_folder_stops_before_any_run(cifar10_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = mlflow.get_tracking_uri()
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        cfg = _cfg(cifar10_dir, tmp_path, "sweep-ood", algo="fedavg")  # CIFAR-10 only: no CIFAR-100 beside it
        with pytest.raises(ConfigError, match="ood_dataset=none"):
            run_sweep(cfg, [0.5], [0.5], [load_head_config(HEADS, method="aph")], progress=False)
        assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []
    finally:
        mlflow.set_tracking_uri(old)


def test_sweep_run_tree_and_report_files(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = mlflow.get_tracking_uri()
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        cfg = _cfg(data_dir, tmp_path, "sweep", algo="fedavg", num_partitions=12)  # 4 clients of about 300 images
        result = run_sweep(cfg, [0.3, 1.0], [0.5, 1.0], [load_head_config(HEADS, method="aph")], progress=False)
        client = mlflow.MlflowClient()
        assert len(result.fl_run_ids) == 4 and len(result.head_run_ids) == 4
        for fl in result.fl_run_ids:
            assert client.get_run(fl).data.tags["mlflow.parentRunId"] == result.launch_run_id
        parents = {client.get_run(h).data.tags["mlflow.parentRunId"] for h in result.head_run_ids}
        assert parents == set(result.fl_run_ids)
        grid = {(float(client.get_run(f).data.params["alpha"]), float(client.get_run(f).data.params["join_ratio"]))
                for f in result.fl_run_ids}
        assert grid == {(0.3, 0.5), (1.0, 0.5), (0.3, 1.0), (1.0, 1.0)}
        fl_names = {client.get_run(f).info.run_name for f in result.fl_run_ids}
        assert fl_names == {f"fedavg-cifar10-dir{a}-jr{j}-s0" for a in (0.3, 1) for j in (0.5, 1)}
        head_names = {client.get_run(h).info.run_name for h in result.head_run_ids}
        assert head_names == {f"aph-{n}" for n in fl_names}  # every FL run and head run named uniquely
        launch = client.get_run(result.launch_run_id)
        assert launch.info.run_name == "sweep-fedavg-cifar10-dir0.3,1-jr0.5,1-cnn-r1-s0"
        assert {"dir0.3-jr0.5/test_f_ece", "dir1-jr1/aph/test_f_ece", "dir1-jr0.5/seeds"} <= set(launch.data.metrics)

        report = build_report(Selection(["sweep"], alpha=0.3, join_ratio=0.5), tmp_path / "out")
        names = {p.name for p in report.files}
        assert {"table.md", "table.csv", "table.tex", "ece_vs_alpha_fedavg_cifar10_jr0.5.png",
                "ece_vs_alpha_fedavg_cifar10_jr0.5.pdf", "ece_vs_join_ratio_fedavg_cifar10_dir0.3.pdf",
                "ood_vs_alpha_fedavg_cifar10_jr0.5.png", "ood_vs_join_ratio_fedavg_cifar10_dir0.3.pdf"} <= names
        assert any(n.startswith("reliability_") and n.endswith(".png") for n in names)
        assert all(p.stat().st_size > 0 for p in report.files)
        md = (tmp_path / "out" / "table.md").read_text()
        assert md.startswith("Table: CIFAR-10; Dir(α=0.3), join ratio 0.5, 4 clients, 1 global round. ECE: F-ECE")
        assert "CIFAR-10 vs CIFAR-100" in md and "\\caption{" in (tmp_path / "out" / "table.tex").read_text()

        figures = sweep_figures(aggregate(results(["sweep"])), Selection(["sweep"], alpha=0.3, join_ratio=0.5))
        bars = {c.get_label(): c for c in figures["ood_vs_alpha_fedavg_cifar10_jr0.5"].axes[0].containers
                if isinstance(c, BarContainer)}
        heads = {(float(client.get_run(h).data.params["alpha"]), float(client.get_run(h).data.params["join_ratio"])):
                 h for h in result.head_run_ids}
        for label, key in (("w/o", "wo/ood_auroc_msp"), ("APH", "ood/auroc_msp")):  # one seed: mean = the value
            heights = [p.get_height() for p in bars[label].patches]
            assert heights == pytest.approx([100 * _metric(heads[a, 0.5], key) for a in (0.3, 1.0)])
    finally:
        mlflow.set_tracking_uri(old)


def test_report_command_logs_a_report_run_and_rejects_bad_selections(table_store, tmp_path, capsys):
    from pfl.cli import main

    out = tmp_path / "rep"
    assert main(["report", "--experiment", "tbl", "--out", str(out), "--alpha", "", "--join-ratio", ""]) == 0
    assert "| FedFomo " in capsys.readouterr().out
    runs = mlflow.search_runs(experiment_names=["tbl"], filter_string="tags.`pfl.kind` = 'report'",
                              output_format="list")
    assert len(runs) == 1
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert {"table.md", "table.csv", "table.tex"} <= arts
    note = runs[0].data.tags["mlflow.note.content"]
    assert "F-ECE" in note and "`table.tex`" in note
    assert main(["report", "--experiment", "tbl", "--alpha", "0.7", "--out", str(out)]) == 2
    assert "alpha=0.7" in capsys.readouterr().err
    assert len(mlflow.search_runs(experiment_names=["tbl"], filter_string="tags.`pfl.kind` = 'report'",
                                  output_format="list")) == 1


SETTING = {"algo": "fedfomo", "dataset": "cifar10", "partition": "dirichlet", "alpha": 0.5, "join_ratio": 0.5}
FINAL = {"test_acc": 0.50, "test_nll": 1.50, "test_ece": 0.20}  # legacy names: results() reads them too
BEST = {"best_test_acc": 0.60, "best_round": 3, "best_test_nll": 1.20, "best_test_ece": 0.10}
APH = {"acc": 0.55, "nll": 1.30, "f_ece": 0.05, "ood_auroc_msp": 0.70, "wo_ood_auroc_msp": 0.65}


def _logged_run(experiment_id: str, kind: str, params: dict, metrics: dict) -> str:
    with mlflow.start_run(experiment_id=experiment_id, tags={"pfl.kind": kind}) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        if kind == "heads":
            probs, labels = torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4]]), torch.tensor([0, 1, 1])
            mlflow.log_dict({"w/o": reliability_bins(probs, labels), "APH": reliability_bins(probs, labels)},
                            "reliability.json")
    return run.info.run_id


@pytest.fixture
def stat_store(tmp_path, monkeypatch):
    """An FL run that logged final and best-round test metrics, and an APH head run under it (logged directly)."""
    monkeypatch.chdir(tmp_path)
    old = mlflow.get_tracking_uri()
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = mlflow.create_experiment("stat")
    fl = _logged_run(exp, "fl", {**SETTING, "seed": 0}, {**FINAL, **BEST})
    _logged_run(exp, "heads", {"fl_run_id": fl, "method": "aph", "ood_dataset": "cifar100"}, APH)
    yield exp
    mlflow.set_tracking_uri(old)


def test_stat_best_reads_the_best_round_for_fl_runs_only(stat_store):
    for stat, expected in (("final", (0.50, 1.50, 0.20)), ("best", (0.60, 1.20, 0.10))):
        long = results(["stat"], stat=stat).set_index("method")
        assert tuple(long.loc["w/o", ["acc", "nll", "ece"]]) == pytest.approx(expected)
        assert long.at["w/o", "ood_auroc"] == pytest.approx(0.65)  # from the head run: the final models
        assert tuple(long.loc["APH", ["acc", "nll", "ece", "ood_auroc"]]) == pytest.approx((0.55, 1.30, 0.05, 0.70))
    with pytest.raises(ValueError, match="unknown stat 'last'"):
        results(["stat"], stat="last")


def test_report_says_which_stat_it_shows(stat_store, tmp_path, capsys):
    from pfl.cli import main

    assert main(["report", "--experiment", "stat", "--stat", "best", "--out", str(tmp_path / "best")]) == 0
    out = capsys.readouterr().out
    assert "round of best test accuracy (best/test_*)" in out and "post-hoc on the final client models" in out
    assert "| 60.00 " in out and "± 0.00" not in out and "OOD sets: CIFAR-10 vs CIFAR-100" in out
    assert "Single seed (n=1)" in out
    (run,) = mlflow.search_runs(experiment_names=["stat"], filter_string="tags.`pfl.kind` = 'report'",
                                output_format="list")
    assert run.data.params["stat"] == "best"
    tex = (tmp_path / "best" / "table.tex").read_text()
    assert "best/test\\_*" in tex
    report = build_report(Selection(["stat"]), tmp_path / "final")
    assert "final round (test/*)" in report.caption and "| 50.00 " in report.table_markdown


def test_stat_best_on_runs_without_best_metrics_is_refused(stat_store, tmp_path, capsys):
    from pfl.cli import main

    old = _logged_run(stat_store, "fl", {**SETTING, "seed": 1}, FINAL)
    with pytest.raises(ValueError, match=f"FL run\\(s\\) {old} did not log best/test_acc.*use --stat final"):
        results(["stat"], stat="best")
    assert main(["report", "--experiment", "stat", "--stat", "best", "--out", str(tmp_path / "r")]) == 2
    assert "--stat final" in capsys.readouterr().err
