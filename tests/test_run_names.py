"""What a researcher sees: run names, params that apply, descriptions, launch-run summaries, the CLI's summary."""

from __future__ import annotations

import mlflow
import pytest

from pfl import tracking
from pfl.algorithms import REGISTRY
from pfl.config import METHOD_FIELDS, PARTITION_FIELDS, PARTITIONS, RunConfig, load_config, load_head_config
from pfl.summary import seed_summary

KNOBS = {name: set(cls.Params.model_fields) for name, cls in REGISTRY.items()}
PARTITION_ONLY = set(PARTITION_FIELDS)


def _config(algo: str, partition: str) -> RunConfig:
    extra = {"partition_name": "imported"} if partition == "pfllib" else {}
    if partition == "natural":  # one client per viewer: the head traces of David MMSys'18
        extra = {"dataset": "david", "model": "vp_lstm"}
    return RunConfig(algo=algo, partition=partition, num_clients=10, **extra)


@pytest.mark.parametrize("algo, partition", [(a, p) for a in REGISTRY for p in PARTITIONS
                                             if p != "natural" or "viewport" in REGISTRY[a].tasks])
def test_params_hold_only_the_algorithms_and_the_partitions_own_fields(algo, partition):
    params = _config(algo, partition).flat_params()
    others = set().union(*(k for a, k in KNOBS.items() if a != algo)) - KNOBS[algo] - set(RunConfig.model_fields)
    assert not others & set(params), f"{algo} logs another algorithm's knobs"
    assert KNOBS[algo] <= set(params)
    assert {f for f in PARTITION_ONLY if partition in PARTITION_FIELDS[f]} == PARTITION_ONLY & set(params)


def test_alpha_only_for_dirichlet_and_classes_only_for_pathological():
    assert "alpha" in _config("fedfomo", "dirichlet").flat_params()
    assert "classes_per_client" not in _config("fedfomo", "dirichlet").flat_params()
    assert "alpha" not in _config("fedala", "pathological").flat_params()
    assert _config("fedala", "pathological").flat_params()["classes_per_client"] == 2
    assert not {"alpha", "classes_per_client", "balance"} & set(_config("fedavg", "iid").flat_params())


@pytest.mark.parametrize("method", ["aph", "loraph"])
def test_head_params_hold_only_the_methods_fields(method):
    params = load_head_config(method=method).flat_params()
    assert {f for f in METHOD_FIELDS if method in METHOD_FIELDS[f]} == set(METHOD_FIELDS) & set(params)
    assert ({"rank", "lora_init"} & set(params)) == ({"rank", "lora_init"} if method == "loraph" else set())


def test_pfllib_partition_names_are_aliases():
    assert load_config(None, ["partition=dir", "alpha=0.1"]).partition == "dirichlet"
    assert load_config(None, ["partition=pat"]).partition == "pathological"


@pytest.mark.parametrize("overrides, name", [
    (["partition=dir", "alpha=0.1"], "fedfomo-cifar10-dir0.1-jr0.2-s3"),
    (["partition=pat", "algo=fedala", "join_ratio=0.5"], "fedala-cifar10-pat2-jr0.5-s3"),
    (["partition=iid", "algo=flexifed", "model=vgg11,vgg16", "scheme=standalone"],
     "flexifed-standalone-cifar10-iid-jr0.2-s3"),
])
def test_fl_run_names_spell_out_the_setting(overrides, name):
    assert load_config(None, overrides).run_name(3) == name


def test_names_differ_across_a_sweep_grid_and_launch_names_carry_the_setting():
    base = load_config(None, ["partition=dir", "repeats=2", "global_rounds=7"])
    cells = [RunConfig(**{**base.model_dump(), "alpha": a, "join_ratio": j}) for a in (0.1, 0.5) for j in (0.1, 0.2)]
    names = [c.run_name(c.seed + k) for c in cells for k in range(c.repeats)]
    assert len(set(names)) == len(names) == 8
    assert base.launch_name() == "fedfomo-cifar10-dir0.1-jr0.2-cnn-r7-s0-1"


def test_seed_summary_means_and_stds_of_final_and_best_quality_metrics():
    runs = [{"test/acc": 0.5, "test/acc_std": 0.1, "best/test_acc": 0.6, "time/round": 3.0, "test/f_ece": 0.1},
            {"test/acc": 0.7, "test/acc_std": 0.3, "best/test_acc": 0.8, "time/round": 5.0, "test/f_ece": 0.3}]
    out = seed_summary(runs)
    assert out["test/acc"] == pytest.approx(0.6) and out["test/acc_seed_std"] == pytest.approx(0.1)
    assert out["best/test_acc"] == pytest.approx(0.7) and out["test/f_ece"] == pytest.approx(0.2)
    assert out["seeds"] == 2 and "time/round" not in out and "test/acc_std" not in out
    cell = seed_summary(runs, cell="dir0.1-jr0.2")
    assert cell["dir0.1-jr0.2/test_acc"] == pytest.approx(0.6) and cell["dir0.1-jr0.2/seeds"] == 2


def test_train_partition_dir_logs_names_params_descriptions_and_prints_a_summary(
        cifar10_dir, tmp_path, monkeypatch, capsys):
    from pfl.cli import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["train", "--no-progress", "--tracking-uri", uri, f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}",
            "partition=dir", "alpha=0.1", "num_clients=5", "global_rounds=2", "repeats=2", "experiment=names",
            "eval_batch_size=500"]
    assert main(args) == 0
    out = capsys.readouterr().out
    tracking.configure_tracking(uri)
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["names"], output_format="list")}
    assert set(runs) == {"fedfomo-cifar10-dir0.1-jr0.2-s0", "fedfomo-cifar10-dir0.1-jr0.2-s1",
                         "fedfomo-cifar10-dir0.1-jr0.2-cnn-r2-s0-1"}
    fl = runs["fedfomo-cifar10-dir0.1-jr0.2-s0"]
    assert fl.data.params["alpha"] == "0.1" and "classes_per_client" not in fl.data.params
    assert not {"eta", "rand_percent", "layer_idx", "threshold", "num_pre_loss"} & set(fl.data.params)
    assert {"test/acc", "test/f_ece", "test/ece_mean", "test/global_ece", "best/test_acc", "time/round"} <= \
        set(fl.data.metrics)
    note = fl.data.tags["mlflow.note.content"]
    assert "Dirichlet partition (alpha 0.1)" in note and f'load_client_model("{fl.info.run_id}"' in note
    launch = runs["fedfomo-cifar10-dir0.1-jr0.2-cnn-r2-s0-1"]
    fls = [runs[f"fedfomo-cifar10-dir0.1-jr0.2-s{k}"].data.metrics for k in (0, 1)]
    assert launch.data.metrics["test/f_ece"] == pytest.approx((fls[0]["test/f_ece"] + fls[1]["test/f_ece"]) / 2)
    assert launch.data.metrics["seeds"] == 2 and "mean ± std over 2 seeds" in launch.data.tags["mlflow.note.content"]
    table = out.split("tracking store:")[0]
    assert "F-ECE (%)" in table and "fedfomo-cifar10-dir0.1-jr0.2-s1" in table
    assert f"{100 * fls[0]['test/acc']:.2f}" in table
    assert f"pfl heads --run-id {fl.info.run_id}" in out and f"mlflow ui --backend-store-uri {uri}" in out
    assert f"pfl register --run-id {fl.info.run_id} --client 0 --alias champion" in out


def test_reading_commands_refuse_a_store_that_does_not_exist(tmp_path, capsys):
    from pfl.cli import main

    missing = tmp_path / "nowhere.db"
    assert main(["heads", "--run-id", "abc", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "no such store" in capsys.readouterr().err and not missing.exists()


def test_dataset_model_and_downlink_fields_are_logged_only_where_they_apply():
    vp = RunConfig(algo="fedavg", dataset="david", model="vp_transformer", partition="natural",
                   downlink="head_layers:2", downlink_blend=0.5).flat_params()
    assert {"history", "horizon", "predict", "embedding", "downlink", "downlink_blend", "split_by"} <= set(vp)
    assert not {"image_size", "random_crop", "hflip", "alpha"} & set(vp)
    lstm = RunConfig(algo="local", dataset="david", model="vp_lstm", partition="natural").flat_params()
    assert not {"embedding", "downlink", "downlink_blend"} & set(lstm)
    cifar = RunConfig(algo="fedfomo").flat_params()
    assert not {"history", "embedding", "downlink", "split_by"} & set(cifar) and "random_crop" in cifar


@pytest.mark.parametrize("overrides, name", [
    (["downlink=head_layers:2"], "fedavg-head2-david-natural_video4-jr1-s0"),
    (["downlink_blend=0.5"], "fedavg-blend0.5-david-natural_video4-jr1-s0"),
    (["downlink=head_layers:2", "downlink_blend=0.5"], "fedavg-head2-blend0.5-david-natural_video4-jr1-s0"),
    (["algo=local"], "local-david-natural_video4-jr1-s0"),
    (["split_by=time"], "fedavg-david-natural-jr1-s0"),
])
def test_vp_run_names_name_the_arm(overrides, name):
    base = ["algo=fedavg", "dataset=david", "model=vp_lstm", "partition=natural", "split_by=video", "join_ratio=1"]
    assert load_config(None, [*base, *overrides]).run_name(0) == name


def test_a_sweep_over_algorithms_names_each_algorithms_cells_and_the_report_puts_fedavg_first(
        cifar10_dir, tmp_path, monkeypatch):
    from pfl.cli import main
    from pfl.sweep import cell_name, grid, sweep_name
    from reports.query import aggregate, results
    from reports.table import build_table

    cfgs = [load_config(None, ["partition=dir", f"algo={a}"]) for a in ("fedper", "fedavg")]
    cells = grid(cfgs, [0.1, 0.5], [0.2])
    assert [(c.algo, c.alpha) for c in cells] == [("fedper", 0.1), ("fedper", 0.5), ("fedavg", 0.1), ("fedavg", 0.5)]
    assert [cell_name(c, True) for c in cells[:2]] == ["fedper-dir0.1-jr0.2", "fedper-dir0.5-jr0.2"]
    assert sweep_name(cells[0], [0.1, 0.5], [0.2], ["fedper", "fedavg"]).startswith("sweep-fedper,fedavg-cifar10-")

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", "--no-progress", "--tracking-uri", uri, "--algos", "fedper", "fedavg", "--alphas", "0.5",
                 "--join-ratios", "0.5", "--methods", "--", f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}",
                 "partition=dir", "num_clients=3", "global_rounds=1", "experiment=algos", "eval_batch_size=500"]) == 0
    tracking.configure_tracking(uri)
    runs = mlflow.search_runs(experiment_names=["algos"], output_format="list")
    launch = next(r for r in runs if r.data.tags.get("pfl.kind") == "launch")
    assert {"fedper-dir0.5-jr0.5/test_acc", "fedavg-dir0.5-jr0.5/test_acc"} <= set(launch.data.metrics)
    table = build_table(aggregate(results(["algos"])))
    assert list(table.mean.index) == ["fedavg", "fedper"]  # FedAvg first, then the personalized algorithms
