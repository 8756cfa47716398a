"""Run configuration: YAML + overrides, validation messages, shipped templates, and CLI errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pfl.config import ConfigError, RunConfig, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- loading


def test_yaml_values_and_override_wins(tmp_path):
    path = _write(tmp_path, "algo: fedavg\nnum_clients: 10\nlr: 0.01\nglobal_rounds: 7\n")
    cfg = load_config(path, ["lr=0.5", "global_rounds=3", "balance=true"])
    assert cfg.algo == "fedavg"          # from the file
    assert cfg.num_clients == 10         # from the file
    assert cfg.lr == 0.5                 # override beats the file's 0.01
    assert cfg.global_rounds == 3        # override beats the file's 7
    assert cfg.balance is True           # YAML scalar parsing of "true"
    assert cfg.batch_size == RunConfig().batch_size  # untouched default


def test_no_file_gives_defaults_and_empty_override_is_skipped():
    cfg = load_config(None, ["seed=", "seed=4", "M="])
    assert cfg.seed == 4
    assert cfg.hparams["M"] == 5


def test_parse_overrides_yaml_scalars():
    assert parse_overrides(["a=0.2", "b=3", "c=true", "d=text", "e="]) == {"a": 0.2, "b": 3, "c": True, "d": "text"}


# ---------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    ("overrides", "field", "fix"),
    [
        (["algo=fedfoo"], "algo", "choose one of fedavg, fedfomo"),
        (["dataset=mnist"], "dataset", "choose one of cifar10"),
        (["alpha=0"], "alpha", "alpha=0.1"),
        (["alpha=-1"], "alpha", "alpha=0.1"),
        (["join_ratio=0"], "join_ratio", "join_ratio=0.2"),
        (["join_ratio=1.5"], "join_ratio", "join_ratio=0.2"),
        (["lr=-0.1"], "lr", "lr=0.005"),
        (["foo=1"], "foo", "valid fields are"),
    ],
)
def test_invalid_values_raise_config_error_naming_field_and_fix(overrides, field, fix):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    msg = str(info.value)
    assert f"{field}:" in msg
    assert fix in msg


def test_classes_per_client_below_one_raises():
    with pytest.raises(ConfigError, match=r"classes_per_client: must be >= 1 .*2 for cifar10"):
        load_config(None, ["classes_per_client=0"])


def test_every_bad_field_is_listed():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["alpha=0", "lr=-1"])
    assert "alpha:" in str(info.value) and "lr:" in str(info.value)


def test_malformed_override_raises():
    with pytest.raises(ConfigError, match=r"'foo' is not key=value.*global_rounds=5"):
        load_config(None, ["foo"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(None, ["=3"])


def test_missing_config_file_raises(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    msg = str(info.value)
    assert str(missing) in msg and "does not exist" in msg
    assert "configs/fedfomo_cifar10_pr0.2.yaml" in msg


def test_config_file_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))


# ---------------------------------------------------------------- derived values


@pytest.mark.parametrize(
    ("join_ratio", "num_clients", "expected"),
    [(0.2, 20, 4), (0.01, 20, 1), (1.0, 20, 20), (0.15, 20, 3), (0.5, 10, 5)],
)
def test_num_join_clients(join_ratio, num_clients, expected):
    cfg = load_config(None, [f"join_ratio={join_ratio}", f"num_clients={num_clients}"])
    assert cfg.num_join_clients == expected


def test_classes_per_client_default_fill():
    assert load_config().classes_per_client == 2
    assert load_config(None, ["dataset=cifar10"]).classes_per_client == 2
    assert load_config(None, ["dataset=cifar100"]).classes_per_client == 10  # PFLlib's defaults
    assert load_config(None, ["dataset=tinyimagenet"]).classes_per_client == 20
    assert load_config(None, ["classes_per_client=3"]).classes_per_client == 3


def test_pfllib_partition_needs_a_name_and_only_then():
    assert load_config(None, ["partition=pfllib", "partition_name=Cifar10"]).partition_name == "Cifar10"
    for overrides in (["partition=pfllib"], ["partition_name=Cifar10"]):
        with pytest.raises(ConfigError, match="partition_name"):
            load_config(None, overrides)


@pytest.mark.parametrize(("field", "value"), [("eta", 0), ("rand_percent", 0), ("rand_percent", 101),
                                              ("layer_idx", 0), ("threshold", 0), ("num_pre_loss", 0)])
def test_fedala_fields_are_range_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        load_config(None, ["algo=fedala", f"{field}={value}"])


def test_hyperparameters_by_bare_name_or_section_of_the_selected_algorithm(tmp_path):
    path = _write(tmp_path, "algo: fedfomo\nfedfomo: {M: 3, epsilon: 0.2}\nfedala: {eta: 7.0}\n")
    cfg = load_config(path, ["val_ratio=0.3"])
    # the selected algorithm's section and bare names; another algorithm's section is ignored
    assert cfg.hparams == {"M": 3, "val_ratio": 0.3, "epsilon": 0.2, "epsilon_decay": 0.05}
    assert cfg.flat_params()["M"] == 3 and "eta" not in cfg.flat_params()
    assert load_config(path, ["algo=fedala"]).hparams["eta"] == 7.0
    assert load_config(None, ["algo=fedavg"]).hparams == {}


def test_hyperparameter_errors_name_the_field_and_the_owner():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["algo=fedala", "eta=0"])
    assert "eta: Input should be greater than 0 (got 0)" in str(info.value)
    with pytest.raises(ConfigError) as info:  # a bare hyperparameter of another algorithm
        load_config(None, ["algo=fedavg", "M=3"])
    assert "M: a hyperparameter of fedfomo" in str(info.value) and "algo=fedfomo" in str(info.value)
    with pytest.raises(ConfigError) as info:  # run fields and hyperparameters are all listed
        load_config(None, ["M=0", "lr=-1"])
    assert "M: Input should be greater than or equal to 1 (got 0)" in str(info.value) and "lr:" in str(info.value)


def test_model_lists_architectures_round_robin():
    cfg = load_config(None, ["model=vgg11, resnet20", "model_width=0.5"])
    assert cfg.models == ["vgg11", "resnet20"] and cfg.model_width == 0.5
    for bad in (["model=vgg12"], ["model_width=0"]):
        with pytest.raises(ConfigError, match=bad[0].split("=")[0]):
            load_config(None, bad)


def test_fedavg_template():
    cfg = load_config(CONFIGS / "fedavg_cifar10_pr0.2.yaml")
    assert (cfg.algo, cfg.dataset, cfg.num_join_clients) == ("fedavg", "cifar10", 4)


@pytest.mark.parametrize("algo", ["fedfomo", "fedala"])
@pytest.mark.parametrize(("dataset", "partition", "rounds"), [("cifar10", "pathological", 100),
                                                              ("cifar100", "dirichlet", 100),
                                                              ("tinyimagenet", "dirichlet", 20)])
def test_six_user_templates(algo, dataset, partition, rounds):
    cfg = load_config(CONFIGS / f"{algo}_{dataset}_pr0.2.yaml")
    assert (cfg.algo, cfg.dataset, cfg.partition, cfg.global_rounds) == (algo, dataset, partition, rounds)
    assert (cfg.num_clients, cfg.join_ratio, cfg.num_join_clients) == (20, 0.2, 4)
    assert (cfg.batch_size, cfg.lr, cfg.local_epochs, cfg.model) == (10, 0.005, 1, "cnn")
    if partition == "pathological":
        assert cfg.classes_per_client == 2
    else:
        assert cfg.alpha == 0.05


# ---------------------------------------------------------------- CLI


@pytest.fixture
def restore_mlflow_uri():
    """The CLI may point MLflow at a store; put the process-wide tracking URI back afterwards."""
    import mlflow

    old = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(old)


def test_cli_bad_alpha_exits_2_without_tracking_store(tmp_path, monkeypatch, capsys, restore_mlflow_uri):
    from pfl.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["train", "alpha=0"]) == 2
    err = capsys.readouterr().err
    assert "alpha" in err
    assert "pfl: error:" in err
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "mlruns").exists()


def test_cli_missing_data_exits_2_naming_path(tmp_path, monkeypatch, capsys, restore_mlflow_uri):
    from pfl.cli import main

    empty = tmp_path / "empty_data"
    empty.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(["train", "--no-progress", f"data_dir={empty}", f"cache_dir={tmp_path / 'cache'}",
                 "global_rounds=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(empty / "cifar-10-batches-py") in err
    assert "data_dir=" in err or "PFL_DATA_DIR" in err  # says how to point pfl at the data
    # the data check happens before any MLflow run is opened (the store itself is checked first, so it exists)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_cli_fedala_layer_idx_beyond_the_model_exits_2_before_any_run(cifar10_dir, tmp_path, monkeypatch, capsys,
                                                                      restore_mlflow_uri):
    from pfl.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(["train", "--no-progress", f"data_dir={cifar10_dir}", f"cache_dir={tmp_path / 'cache'}",
                 "algo=fedala", "layer_idx=9", "num_clients=5", "device=cpu"])
    assert code == 2
    err = capsys.readouterr().err
    assert "layer_idx=9" in err and "1..8" in err  # the CNN has 8 parameter tensors
    assert not (tmp_path / "mlflow.db").exists()


# ---------------------------------------------------------------- the local optimizer's fields


@pytest.mark.parametrize(("overrides", "message"), [
    (["lr_schedule=cosine"], "lr_schedule: Input should be 'constant' or 'linear'"),
    (["weight_decay=-1"], "weight_decay: the local optimizer's weight decay: >= 0"),
    (["max_grad_norm=0"], "max_grad_norm: the gradient norm local steps clip to: > 0"),
    (["algo=mocosfl", "lr_schedule=linear"], "lr_schedule=linear: mocosfl decays lr on its own cosine schedule"),
    (["algo=mocosfl", "optimizer=adamw"], "optimizer=adamw: mocosfl trains with its own SGD"),
    (["algo=flexifed", "optimizer=adamw"], "optimizer=adamw: flexifed trains with FlexiFed-IMP's SGD"),
])
def test_optimizer_fields_are_refused_in_one_line_where_they_cannot_apply(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_weight_decay_is_one_knob_the_run_fields_or_the_algorithms_own():
    """Unset by default (the optimizer's own default); FlexiFed's and MocoSFL's own SGD read it as their
    hyperparameter, also through a config's dump (as sweeps and studies rebuild configs)."""
    assert RunConfig().weight_decay is None and RunConfig().lr_schedule == "constant"
    fedavg = load_config(None, ["algo=fedavg", "weight_decay=0.01", "lr_schedule=linear", "max_grad_norm=1"])
    assert (fedavg.weight_decay, fedavg.hparams, fedavg.flat_params()["weight_decay"]) == (0.01, {}, 0.01)
    assert "sgd lr 0.005, weight decay 0.01, linear decay per round, grad norm clipped to 1)" in fedavg.describe()
    for algo, extra in (("flexifed", []), ("mocosfl", ["model=resnet18_sfl"])):
        cfg = load_config(None, [f"algo={algo}", "weight_decay=0.002", *extra])
        assert (cfg.weight_decay, cfg.hparams["weight_decay"], cfg.flat_params()["weight_decay"]) == \
            (None, 0.002, 0.002)
        assert RunConfig(**cfg.model_dump()).hparams["weight_decay"] == 0.002
    assert load_config(None, ["algo=flexifed"]).hparams["weight_decay"] == 5e-4  # FlexiFed-IMP's default
