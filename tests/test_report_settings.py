"""Reports on a hand-logged store mixing partitions, alphas, join ratios, datasets and metric vocabularies:
legacy names, one table per setting, selection, captions, display names, figures in percent, LaTeX."""

from __future__ import annotations

import math
import shutil
import subprocess

import mlflow
import pytest
import torch
from matplotlib.container import BarContainer

from pfl import tracking
from pfl.metrics import reliability_bins
from reports.names import algo_name, dataset_name, partition_name, partition_stem
from reports.query import aggregate, results
from reports.report import Selection, build_report, sweep_figures
from reports.settings import run_title
from reports.table import build_table

BASE = {"dataset": "cifar10", "join_ratio": 0.5, "num_clients": 4, "global_rounds": 3, "ece_bins": 20}
DIR = {"partition": "dirichlet", "alpha": 0.1}
PAT = {"partition": "pathological", "classes_per_client": 2}
# FL runs by name: (params, metrics); "new" runs use pfl.vocabulary's names, "old" ones the legacy names
FL = {
    "dir0.1_s0": ({**BASE, **DIR, "algo": "fedfomo", "seed": 0},
                  {"test/acc": 0.60, "test/nll": 1.0, "test/f_ece": 0.10, "best/test_acc": 0.61}),
    "dir0.1_s1": ({**BASE, **DIR, "algo": "fedfomo", "seed": 1},
                  {"test/acc": 0.64, "test/nll": 1.2, "test/f_ece": 0.12, "best/test_acc": 0.65}),
    "old_dir0.5": ({**BASE, **DIR, "alpha": 0.5, "classes_per_client": 2, "algo": "fedfomo", "seed": 0},
                   {"test_acc": 0.55, "test_nll": 1.3, "test_ece": 0.15, "best_test_acc": 0.56}),
    "old_pat": ({**BASE, **PAT, "alpha": 0.1, "algo": "fedfomo", "seed": 0},  # old stores logged alpha always
                {"test_acc": 0.80, "test_nll": 0.6, "test_ece": 0.05}),
    "pat_avg": ({**BASE, **PAT, "algo": "fedavg", "seed": 0}, {"test/acc": 0.70, "test/nll": 0.9, "test/f_ece": 0.07}),
    "c100": ({**BASE, **DIR, "dataset": "cifar100", "algo": "fedfomo", "seed": 0},
             {"test/acc": 0.30, "test/nll": 2.5, "test/f_ece": 0.20}),
    "jr1": ({**BASE, **DIR, "join_ratio": 1.0, "algo": "fedfomo", "seed": 0},
            {"test/acc": 0.66, "test/nll": 0.9, "test/f_ece": 0.09}),
}
# APH head runs under an FL run: new names, or legacy names under the "old_" runs
HEADS = {
    "dir0.1_s0": {"test/acc": 0.66, "test/nll": 0.9, "test/f_ece": 0.04, "ood/auroc_msp": 0.70,
                  "wo/ood_auroc_msp": 0.60},
    "dir0.1_s1": {"test/acc": 0.70, "test/nll": 0.8, "test/f_ece": 0.06, "ood/auroc_msp": 0.80,
                  "wo/ood_auroc_msp": 0.70},
    "old_dir0.5": {"acc": 0.58, "nll": 1.1, "f_ece": 0.05, "ood_auroc_msp": 0.75, "wo_ood_auroc_msp": 0.65},
}


def _run(experiment_id: str, kind: str, params: dict, metrics: dict) -> str:
    with mlflow.start_run(experiment_id=experiment_id, tags={"pfl.kind": kind}) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
        if kind == "heads":
            probs = torch.tensor([[0.9, 0.1]] * 12 + [[0.3, 0.7], [0.6, 0.4]])
            labels = torch.tensor([0] * 10 + [1] * 4)
            mlflow.log_dict({"w/o": reliability_bins(probs, labels), "APH": reliability_bins(probs, labels)},
                            "reliability.json")
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment ``mixed``: the runs of :data:`FL` and :data:`HEADS`; yields FL run ids by name."""
    tmp = tmp_path_factory.mktemp("mixed_store")
    old = mlflow.get_tracking_uri()
    tracking.configure_tracking(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = mlflow.create_experiment("mixed", artifact_location=str(tmp / "artifacts"))
    ids = {name: _run(exp, "fl", *FL[name]) for name in FL}
    for name, metrics in HEADS.items():
        _run(exp, "heads", {"fl_run_id": ids[name], "method": "aph", "ood_dataset": "cifar100"}, metrics)
    yield ids
    mlflow.set_tracking_uri(old)


def _row(long, fl_run_id: str, method: str = "w/o"):
    (index,) = long.index[(long["fl_run_id"] == fl_run_id) & (long["method"] == method)]
    return long.loc[index]


def test_results_read_new_names_and_fall_back_to_legacy_ones_per_run(store):
    long = results(["mixed"])
    new, old = _row(long, store["dir0.1_s0"]), _row(long, store["old_dir0.5"])
    assert (new["acc"], new["nll"], new["ece"], new["ood_auroc"]) == pytest.approx((0.60, 1.0, 0.10, 0.60))
    assert (old["acc"], old["nll"], old["ece"], old["ood_auroc"]) == pytest.approx((0.55, 1.3, 0.15, 0.65))
    aph_new, aph_old = _row(long, store["dir0.1_s0"], "APH"), _row(long, store["old_dir0.5"], "APH")
    assert (aph_new["acc"], aph_new["ece"], aph_new["ood_auroc"]) == pytest.approx((0.66, 0.04, 0.70))
    assert (aph_old["acc"], aph_old["ece"], aph_old["ood_auroc"]) == pytest.approx((0.58, 0.05, 0.75))
    best = results(["mixed"], "params.partition = 'dirichlet' and params.join_ratio = '0.5' and "
                              "params.dataset = 'cifar10'", stat="best")
    assert sorted(best.loc[best["method"] == "w/o", "acc"]) == pytest.approx([0.56, 0.61, 0.65])
    # partition params only where the partition uses them, whatever the store logged
    pat = _row(long, store["old_pat"])
    assert math.isnan(pat["alpha"]) and pat["classes_per_client"] == 2
    assert math.isnan(_row(long, store["old_dir0.5"])["classes_per_client"])


def test_report_without_selection_writes_one_table_per_setting(store, tmp_path):
    report = build_report(Selection(["mixed"]), tmp_path)
    names = {p.name for p in report.files}
    stems = {"table_dir0.1_jr0.5", "table_dir0.5_jr0.5", "table_pat2_jr0.5", "table_dir0.1_jr1"}
    assert {f"{s}.{e}" for s in stems for e in ("md", "csv", "tex")} <= names
    assert not any(n.startswith("table.") for n in names)
    assert {"ece_vs_alpha_fedfomo_cifar10_jr0.5.png", "ood_vs_alpha_fedfomo_cifar10_jr0.5.pdf",
            "ece_vs_join_ratio_fedfomo_cifar10_dir0.1.png"} <= names
    assert not any("pat2" in n for n in names if n.startswith("ece_vs_alpha"))  # alpha sweeps: Dirichlet only
    assert any(n.startswith("reliability_") for n in names)
    pat = (tmp_path / "table_pat2_jr0.5.md").read_text()
    assert pat.startswith("Table: CIFAR-10; Pat(2 classes/client), join ratio 0.5, 4 clients, 3 global rounds. "
                          "ECE: F-ECE (test-sample-weighted mean of per-client ECE, 20 equal-mass bins), in %.")
    assert "Single seed (n=1): values without std." in pat and "±" not in pat
    assert "| FedAvg " in pat and "| FedFomo " in pat and "| 70.00 " in pat
    assert report.table_markdown.count("Table: ") == 4


@pytest.fixture(scope="module")
def dir_report(store, tmp_path_factory):
    """The report of the Dir(α=0.1), join ratio 0.5 runs: CIFAR-10 (2 seeds) and CIFAR-100 (1 seed)."""
    out = tmp_path_factory.mktemp("dir_report")
    build_report(Selection(["mixed"], alpha=0.1, join_ratio=0.5), out)
    return out


def test_cells_show_seeds_and_bold_only_what_can_be_compared(dir_report):
    md = (dir_report / "table.md").read_text()
    # one algorithm: nothing to compare, no bold; CIFAR-10 has 2 seeds, CIFAR-100 one: a column n per row
    assert "**" not in md and "| FedFomo " in md
    assert "62.00 ± 2.00" in md and "| 30.00 " in md and "| 1–2 " in md
    assert "over the n seeds of each row (column n)" in md
    assert "CIFAR-10 / APH / F-ECE (%)" in md and "OOD sets: CIFAR-10 vs CIFAR-100" in md
    csv = (dir_report / "table.csv").read_text().splitlines()
    assert "cifar10/w/o/acc_n" in csv[0] and csv[1].startswith("fedfomo,")


def test_selection_narrows_and_names_what_the_runs_hold(store, tmp_path):
    report = build_report(Selection(["mixed"], partition="pat"), tmp_path / "pat")  # PFLlib's alias
    assert sorted(p.name for p in report.files) == ["table.csv", "table.md", "table.tex"]
    md_pat = report.table_markdown
    assert md_pat.count("**") == 2 * 3  # acc, nll, ece of w/o: two algorithms to compare
    assert "Mean ± std" not in md_pat
    report = build_report(Selection(["mixed"], partition="dirichlet", datasets=["cifar10"], join_ratio=0.5),
                          tmp_path / "d")
    assert {p.name for p in report.files if p.suffix == ".md"} == {"table_dir0.1_jr0.5.md", "table_dir0.5_jr0.5.md"}
    assert "CIFAR-100 /" not in report.table_markdown
    for sel, message in ((Selection(["mixed"], partition="iid"), r"partition 'iid'; the runs hold \['dirichlet', "
                          "'pathological'\\]"),
                         (Selection(["mixed"], datasets=["tinyimagenet"]), r"dataset\(s\) \['tinyimagenet'\]"),
                         (Selection(["mixed"], partition="pathological", alpha=0.1), "no runs at alpha=0.1")):
        with pytest.raises(ValueError, match=message):
            build_report(sel, tmp_path / "bad")
    with pytest.raises(ValueError, match="several settings.*--partition"):
        build_table(aggregate(results(["mixed"])))


def test_latex_has_one_captioned_table_per_dataset(dir_report, tmp_path):
    tex = (dir_report / "table.tex").read_text()
    assert tex.count("\\begin{table}") == 2 and tex.count("\\caption{") == 2
    assert "\\caption{CIFAR-10; Dir($\\alpha$=0.1), join ratio 0.5" in tex
    assert "\\caption{CIFAR-100; Dir($\\alpha$=0.1)" in tex and "\\label{tab:table-cifar100}" in tex
    assert "\\resizebox{\\linewidth}{!}{%" in tex and "n=2 seeds" in tex and "Single seed (n=1)" in tex
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex not installed")
    doc = tmp_path / "doc.tex"
    doc.write_text("\\documentclass{article}\\usepackage{booktabs,graphicx}\\begin{document}\n"
                   f"{tex}\\end{{document}}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]


def test_sweep_figures_plot_f_ece_and_ood_auroc_in_percent(store):
    agg = aggregate(results(["mixed"]))
    figures = sweep_figures(agg, Selection(["mixed"], join_ratio=0.5))
    assert set(figures) == {"ece_vs_alpha_fedfomo_cifar10_jr0.5", "ood_vs_alpha_fedfomo_cifar10_jr0.5",
                            "ece_vs_join_ratio_fedfomo_cifar10_dir0.1", "ood_vs_join_ratio_fedfomo_cifar10_dir0.1"}
    fig = figures["ece_vs_alpha_fedfomo_cifar10_jr0.5"]
    ax = fig.axes[0]
    assert ax.get_ylabel() == "F-ECE (%)" and fig.get_suptitle() == "FedFomo, CIFAR-10, jr 0.5"
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}
    assert [p.get_height() for p in bars["w/o"].patches] == pytest.approx([11.0, 15.0])  # alpha 0.1, 0.5
    assert [p.get_height() for p in bars["APH"].patches] == pytest.approx([5.0, 5.0])
    by_jr = figures["ece_vs_join_ratio_fedfomo_cifar10_dir0.1"].axes[0]
    errorbars = [c for c in by_jr.containers if c.__class__.__name__ == "ErrorbarContainer"]
    assert sum(len(c.lines[2][0].get_segments()) for c in errorbars) == 2  # jr 0.5: 2 seeds; jr 1: one, no bar
    ood = figures["ood_vs_join_ratio_fedfomo_cifar10_dir0.1"]
    assert ood.axes[0].get_ylabel() == "OOD AUROC (MSP, %)" and ood.get_suptitle() == "FedFomo, CIFAR-10, Dir(α=0.1)"


def test_display_names_and_run_titles(store):
    assert [algo_name(a) for a in ("fedavg", "fedfomo", "fedala", "flexifed", "fedproto", "lgfedavg", "fedxyz")] == \
        ["FedAvg", "FedFomo", "FedALA", "FlexiFed", "FedProto", "LG-FedAvg", "fedxyz"]  # an unknown id as it is
    assert [dataset_name(d) for d in ("cifar10", "cifar100", "tinyimagenet")] == ["CIFAR-10", "CIFAR-100",
                                                                                 "Tiny-ImageNet"]
    assert partition_name("dirichlet", 0.1) == "Dir(α=0.1)" and partition_name("iid") == "IID"
    assert partition_name("pathological", classes_per_client=1.0) == "Pat(1 class/client)"
    assert partition_name("exdir", 0.5, 2) == "ExDir(α=0.5, 2 classes/client)"
    assert partition_name("pfllib", name="cifar10 pat") == "PFLlib(cifar10 pat)"
    assert [partition_stem("dirichlet", 0.1), partition_stem("pathological", classes_per_client=2.0),
            partition_stem("exdir", 0.1, 2), partition_stem("iid"), partition_stem("pfllib", name="my set")] == \
        ["dir0.1", "pat2", "exdir0.1c2", "iid", "my_set"]
    long = results(["mixed"])
    assert run_title(_row(long, store["dir0.1_s1"])) == "FedFomo, CIFAR-10, Dir(α=0.1), jr 0.5, seed 1"
    assert run_title(_row(long, store["pat_avg"])) == "FedAvg, CIFAR-10, Pat(2 classes/client), jr 0.5, seed 0"
