"""``pfl report`` on regression FL runs (viewport prediction): the arms x model table and the per-horizon-step plot,
from a real MLflow SQLite store holding hand-made FL runs with known numbers."""

from __future__ import annotations

import logging

import mlflow
import pytest

from pfl import tracking
from reports.query import regression_results, results
from reports.regression import arm_name, regression_outputs, setting_stems
from reports.report import Selection, build_report

# arm -> (algo, downlink, downlink_blend); local logs no downlink params (its algorithm downloads nothing)
ARMS = {"local": ("local", None, None), "FedAvg": ("fedavg", "full", 1.0), "partial": ("fedavg", "head_layers:2", 1.0),
        "blend": ("fedavg", "full", 0.5), "partial+blend": ("fedavg", "head_layers:2", 0.5)}
# (arm, model) -> (test MSE, orthodromic error in degrees); the seeds log these -/+ SPREAD
BASE = {"vp_transformer": {"local": (0.0178, 30.0), "FedAvg": (0.0086, 15.0), "partial": (0.0097, 17.0),
                           "blend": (0.0088, 16.0), "partial+blend": (0.0113, 20.0)},
        "vp_lstm": {"local": (0.0200, 32.0), "FedAvg": (0.0100, 18.0), "partial": (0.0090, 19.0),
                    "blend": (0.0110, 17.5), "partial+blend": (0.0120, 21.0)}}
SPREAD = (0.0004, 0.5)  # seed 0: base - spread, seed 1: base + spread; population std = spread
HORIZON = 5
SETTING = {"dataset": "david", "partition": "natural", "split_by": "video", "num_test_keys": 4, "history": 10,
           "horizon": HORIZON, "predict": "sequence", "num_clients": 10, "global_rounds": 300, "join_ratio": 1.0}
CLASSIFICATION = {"algo": "fedfomo", "dataset": "cifar10", "partition": "dirichlet", "alpha": 0.5, "join_ratio": 0.5,
                  "seed": 0}


def _metrics(mse: float, deg: float, steps: bool = True) -> dict[str, float]:
    """Final and best-round metrics of a run: step k's error is deg * k / 3 (their mean over k = 1..5 is deg);
    the best round is 0.001 lower in MSE and 1 degree lower everywhere."""
    final = {"test/mse": mse, "test/orthodromic_deg": deg, "test/mse_std": 0.003, "test/orthodromic_deg_std": 4.0}
    if steps:
        final.update({f"test/orthodromic_deg_h{k}": deg * k / 3 for k in range(1, HORIZON + 1)})
    best = {f"best/{name.replace('/', '_')}": value - (0.001 if "mse" in name else 1.0)
            for name, value in final.items() if not name.endswith("_std")}
    return {**final, **best, "best/round": 250}


def _run(experiment_id: str, params: dict, metrics: dict) -> str:
    with mlflow.start_run(experiment_id=experiment_id, tags={"pfl.kind": "fl"}) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(metrics)
    return run.info.run_id


def _vp_run(experiment_id: str, arm: str, model: str, seed: int, steps: bool = True, **setting) -> str:
    algo, downlink, blend = ARMS[arm]
    params = {**SETTING, **setting, "algo": algo, "model": model, "seed": seed}
    params.update({"downlink": downlink, "downlink_blend": blend} if downlink else {})
    sign = 2 * seed - 1
    mse, deg = BASE[model][arm]
    return _run(experiment_id, params, _metrics(mse + sign * SPREAD[0], deg + sign * SPREAD[1], steps))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``vp``: 5 arms x 2 models x seeds 0, 1 (logged in reverse arm order); ``mixed``: a classification run beside
    two viewport runs; ``point``: viewport runs without per-step errors (``predict=point``)."""
    tmp = tmp_path_factory.mktemp("regression_store")
    old = mlflow.get_tracking_uri()
    tracking.configure_tracking(f"sqlite:///{tmp / 'mlflow.db'}")
    vp = mlflow.create_experiment("vp", artifact_location=str(tmp / "artifacts_vp"))
    for arm in reversed(list(ARMS)):
        for model in BASE:
            for seed in (0, 1):
                _vp_run(vp, arm, model, seed)
    mixed = mlflow.create_experiment("mixed", artifact_location=str(tmp / "artifacts_mixed"))
    _run(mixed, CLASSIFICATION, {"test/acc": 0.5, "test/nll": 1.5, "test/f_ece": 0.2, "best/test_acc": 0.6,
                                 "best/test_nll": 1.2, "best/test_f_ece": 0.1, "best/round": 3})
    for arm in ("local", "FedAvg"):
        _vp_run(mixed, arm, "vp_transformer", 0)
    point = mlflow.create_experiment("point", artifact_location=str(tmp / "artifacts_point"))
    for arm in ("FedAvg", "local"):
        _vp_run(point, arm, "vp_lstm", 0, steps=False, predict="point")
    yield tmp
    mlflow.set_tracking_uri(old)


def _rows(markdown: str) -> dict[str, list[str]]:
    """Cells of the (first) Markdown pipe table by row label, the header row under its first cell (``arm``)."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in markdown.split("\n\n")[1].splitlines()
             if line.startswith("|") and not line.startswith(("|--", "|:"))]
    return {row[0]: row[1:] for row in cells}


def test_arm_names():
    assert [arm_name(*knobs) for knobs in ARMS.values()] == list(ARMS)
    assert arm_name("fedavg", "head_layers:1", 1.0) == "head_layers:1"
    assert arm_name("fedavg", "full", 0.3) == "blend 0.3"
    assert arm_name("fedavg", "none", 1.0) == "no downlink"
    assert arm_name("fedavg", "head_layers:2", 0.3) == "partial+blend 0.3"
    assert arm_name("fedgen", "none", 1.0) == "FedGen (no downlink)"
    # FedGen's arms of issue 29: warm-up and no diversity are arms of their own, not seeds of one
    assert arm_name("fedgen", "head_layers:2", 1.0, 200.0, 1.0) == "FedGen (partial+warm-up 200)"
    assert arm_name("fedgen", "full", 1.0, 0.0, 0.0) == "FedGen (no diversity)"
    assert arm_name("fedgen", "full", 1.0, float("nan"), float("nan")) == "FedGen"


def test_setting_stems_name_what_differs():
    base = {"dataset": "david", **{k: v for k, v in SETTING.items() if k != "dataset"}}
    assert setting_stems([base]) == ["david"]
    assert setting_stems([{**base, "global_rounds": 20}, base]) == ["david_r20", "david_r300"]


def test_table_cells_order_and_bold(store, tmp_path):
    report = build_report(Selection(["vp"]), tmp_path)
    assert {p.name for p in report.files} == {
        "table_regression_david.md", "table_regression_david.csv", "table_regression_david.tex",
        *(f"orthodromic_per_step_david_{m}.{e}" for m in ("vp_lstm", "vp_transformer") for e in ("png", "pdf"))}
    assert all(p.exists() for p in report.files)
    rows = _rows(report.table_markdown)
    assert rows["arm"] == ["LSTM / MSE", "LSTM / Orthodromic (deg)", "Transformer / MSE",
                           "Transformer / Orthodromic (deg)"]
    assert list(rows)[1:] == list(ARMS)  # the researchers' order, whatever the logging order
    # mean ± population std over the two seeds; the lowest of each column in bold
    assert rows["FedAvg"] == ["0.0100 ± 0.0004", "18.00 ± 0.50", "**0.0086 ± 0.0004**", "**15.00 ± 0.50**"]
    assert rows["partial"] == ["**0.0090 ± 0.0004**", "19.00 ± 0.50", "0.0097 ± 0.0004", "17.00 ± 0.50"]
    assert rows["blend"][1] == "**17.50 ± 0.50**" and rows["local"][2] == "0.0178 ± 0.0004"
    caption = report.caption
    for text in ("David MMSys'18; natural partition", "split by video (4 test videos)", "10 clients",
                 "join ratio 1", "300 global rounds", "history 10 (2 s)", "horizon 5 (1 s)", "predict sequence",
                 "final round (test/*)", "n=2 seeds", "partial: algo=fedavg, downlink=head_layers:2, downlink_blend=1"):
        assert text in caption, text
    csv = (tmp_path / "table_regression_david.csv").read_text().splitlines()
    assert csv[0].startswith("arm,vp_lstm/mse_mean,vp_lstm/mse_std,vp_lstm/mse_n,")
    assert csv[2].startswith("FedAvg,0.01") and "\\textbf{0.0086 $\\pm$ 0.0004}" in \
        (tmp_path / "table_regression_david.tex").read_text()


def test_stat_best_reads_the_best_round(store, tmp_path):
    report = build_report(Selection(["vp"], stat="best"), tmp_path)
    rows = _rows(report.table_markdown)
    assert rows["FedAvg"][2:] == ["**0.0076 ± 0.0004**", "**14.00 ± 0.50**"]
    assert "round of lowest test orthodromic error (best/test_*)" in report.caption


def test_per_step_plot_lines_are_seed_means_with_std_bands(store):
    _, figures = regression_outputs(regression_results(["vp"]), "final")
    ax = figures["orthodromic_per_step_david_vp_transformer"].axes[0]
    lines = {line.get_gid(): line for line in ax.get_lines()}
    assert list(lines) == list(ARMS)
    assert list(lines["FedAvg"].get_xdata()) == [1, 2, 3, 4, 5]
    assert lines["FedAvg"].get_ydata() == pytest.approx([15.0 * k / 3 for k in range(1, 6)])
    band = next(c for c in ax.collections if c.get_gid() == "FedAvg std")
    low_high = band.get_paths()[0].vertices[:, 1]
    assert min(low_high) == pytest.approx(5.0 - 0.5 / 3) and max(low_high) == pytest.approx(25.0 + 2.5 / 3)
    assert ax.get_xlabel() == "Horizon step" and ax.get_ylabel() == "Orthodromic error (deg)"


def test_point_predictions_get_the_table_and_no_plot(store, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="reports.regression"):
        report = build_report(Selection(["point"]), tmp_path)
    assert {p.name for p in report.files} == {f"table_regression_david.{e}" for e in ("md", "csv", "tex")}
    assert "orthodromic_per_step_david_vp_lstm not written" in caplog.text
    assert list(_rows(report.table_markdown))[1:] == ["local", "FedAvg"]


def test_mixed_store_gives_both_tables(store, tmp_path):
    assert list(results(["mixed"])["algo"]) == ["fedfomo"]  # the classification path never sees regressions
    for stat in ("final", "best"):
        report = build_report(Selection(["mixed"], stat=stat), tmp_path / stat)
        names = {p.name for p in report.files}
        assert {"table.md", "table_regression_david.md", "orthodromic_per_step_david_vp_transformer.png"} <= names
        assert "| FedFomo " in report.table_markdown and "| FedAvg " in report.table_markdown
    only = build_report(Selection(["mixed"], datasets=["cifar10"]), tmp_path / "cifar")
    assert not any(p.name.startswith("table_regression") for p in only.files)
    vp = build_report(Selection(["mixed"], partition="natural"), tmp_path / "natural")
    assert {p.name for p in vp.files if p.suffix == ".md"} == {"table_regression_david.md"}
    with pytest.raises(ValueError, match="no runs at alpha=0.7"):
        build_report(Selection(["mixed"], alpha=0.7), tmp_path / "bad")


def test_report_command_logs_the_regression_outputs(store, tmp_path, capsys):
    from pfl.cli import main

    assert main(["report", "--experiment", "vp", "--out", str(tmp_path / "rep")]) == 0
    assert "| partial+blend " in capsys.readouterr().out
    (run,) = mlflow.search_runs(experiment_names=["vp"], filter_string="tags.`pfl.kind` = 'report'",
                                output_format="list")
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"table_regression_david.tex", "orthodromic_per_step_david_vp_lstm.pdf"} <= arts
