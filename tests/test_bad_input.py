"""Bad input, one table: every case runs the real CLI (``pfl.cli.main``) in-process and must end in exit status 2,
ONE line on stderr (no traceback) naming the field, file or run id, no MLflow run created, and (but for ``pfl
sweep``) no tracking store file where there was none: every check comes before the store is opened.

Cases: every numeric run field at 0 / negative / NaN / inf / text where invalid, booleans for numbers,
unknown and misspelt keys ("did you mean"), infeasible partitions, broken YAML files, bad devices and
experiment names, missing / empty / corrupt data folders (a batch file that is a folder or a dangling link),
garbage or truncated weights files, an init_from client the run does not have, an image size the model cannot
take, a crops value YAML would read as hex, unusable run ids (a launch run's id to resume), an empty store for
``pfl report`` and an unwritable tracking URI. Anything that gets past validation would train on
the small real CIFAR-10 slice for one round, so a wrongly accepted input fails fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import save_file

from pfl import tracking
from pfl.cli import main
from pfl.data.datasets import CIFAR10_FOLDER

# ---------------------------------------------------------------- the table
#
# A case: (id, argv, substring stderr must hold, extra). ``{tmp}``, ``{data}`` (the CIFAR-10 slice's data dir),
# ``{cfg}`` (the YAML file of ``extra["yaml"]``) and ``{launch}`` (a launch run's id) are filled in.
# ``extra``: yaml (bytes of {cfg}), setup (see _setup).

TRAIN = ["train", "--no-progress", "data_dir={data}", "cache_dir={tmp}/cache", "global_rounds=1", "num_clients=10",
         "device=cpu"]
FL_ID = "0123456789abcdef0123456789abcdef"

# numeric run fields: (field, invalid at 0, text that is not a number)
NUMERIC = [("model_width", True), ("alpha", True), ("classes_per_client", True), ("num_clients", True),
           ("train_ratio", True), ("join_ratio", True), ("global_rounds", True), ("local_epochs", True),
           ("batch_size", True), ("lr", True), ("eval_gap", True), ("seed", False), ("repeats", True),
           ("tuning_val_ratio", True), ("ece_bins", True), ("eval_batch_size", True), ("num_threads", False),
           ("client_state_budget_mb", False), ("checkpoint_every", False)]


def _numeric_cases() -> list[tuple]:
    cases = []
    for name, zero_bad in NUMERIC:
        values = ([("0", "0")] if zero_bad else []) + [("neg", "-1"), ("nan", ".nan"), ("inf", "inf"),
                                                       ("text", "abc")]
        cases += [(f"{name}-{tag}", [*TRAIN, f"{name}={value}"], f" {name}: ", {}) for tag, value in values]
    cases += [("lr-neg-inf", [*TRAIN, "lr=-inf"], " lr: must be a finite number", {}),
              ("alpha-neg-inf", [*TRAIN, "alpha=-.inf"], " alpha: must be a finite number", {})]
    return cases


CASES = [
    *_numeric_cases(),
    # booleans are no numbers (YAML reads yes/on/true as true)
    ("bool-num_clients-yes", [*TRAIN, "num_clients=yes"], " num_clients: must be a number, not a boolean", {}),
    ("bool-lr-true", [*TRAIN, "lr=true"], " lr: must be a number, not a boolean", {}),
    ("bool-global_rounds-on", [*TRAIN, "global_rounds=on"], " global_rounds: must be a number", {}),
    ("bool-seed-no", [*TRAIN, "seed=no"], " seed: must be a number", {}),
    ("bool-eval_batch_size", [*TRAIN, "eval_batch_size=true"], " eval_batch_size: must be a number", {}),
    ("bool-in-yaml", [*TRAIN[:2], "--config", "{cfg}", *TRAIN[2:]], " batch_size: must be a number",
     {"yaml": b"batch_size: yes\n"}),
    # hyperparameters of the algorithms' Params
    ("hparam-M-yes", [*TRAIN, "M=yes"], " M: must be a number, not a boolean", {}),
    ("hparam-M-0", [*TRAIN, "M=0"], " M: Input should be greater than or equal to 1", {}),
    ("hparam-epsilon-nan", [*TRAIN, "epsilon=.nan"], " epsilon: ", {}),
    ("hparam-eta-inf", [*TRAIN, "algo=fedala", "eta=inf"], " eta: must be a finite number", {}),
    ("hparam-threshold-inf", [*TRAIN, "algo=fedala", "threshold=.inf"], " threshold: must be a finite number", {}),
    ("hparam-weight_decay-inf", [*TRAIN, "algo=flexifed", "model=vgg11", "weight_decay=inf"],
     " weight_decay: must be a finite number", {}),
    ("hparam-scheme-bool", [*TRAIN, "algo=flexifed", "model=vgg11", "scheme=true"], " scheme: Input should be", {}),
    ("hparam-of-another-algo", [*TRAIN, "algo=fedavg", "M=3"], " M: a hyperparameter of fedfomo", {}),
    ("hparam-section-not-mapping", [*TRAIN, "fedfomo=3"], "fedfomo: a section", {}),
    # unknown keys, typos with a suggestion
    ("unknown-key", [*TRAIN, "foo=1"], " foo: unknown field; valid fields are", {}),
    ("typo-num_clients", [*TRAIN, "num_cliens=5"], "num_cliens: unknown field; did you mean num_clients?", {}),
    ("typo-global_rounds", [*TRAIN, "glob_rounds=5"], "did you mean global_rounds?", {}),
    ("typo-case", [*TRAIN, "Join_Ratio=0.5"], "did you mean join_ratio?", {}),
    ("typo-hparam-bare", [*TRAIN, "epsilom=0.1"], "epsilom: unknown field; did you mean epsilon?", {}),
    ("typo-hparam-fedala", [*TRAIN, "algo=fedala", "et=2"], "did you mean eta?", {}),
    ("typo-hparam-in-section", [*TRAIN, "fedfomo={epsilom: 0.1}"], "epsilom: unknown hyperparameter; did you mean "
     "epsilon?", {}),
    ("typo-section", [*TRAIN[:2], "--config", "{cfg}", *TRAIN[2:]], "fedfom: unknown field; did you mean fedfomo?",
     {"yaml": b"fedfom:\n  M: 3\n"}),
    ("typo-algo", [*TRAIN, "algo=fedfom"], " algo: unknown algorithm 'fedfom'", {}),
    ("typo-dataset", [*TRAIN, "dataset=cifar"], " dataset: unknown dataset 'cifar'", {}),
    ("typo-model", [*TRAIN, "model=cnnn"], " model: unknown model 'cnnn'", {}),
    ("typo-head-field", ["heads", "--run-id", FL_ID, "--no-progress", "sampling_nm=3"],
     "sampling_nm: unknown field; did you mean sampling_num?", {}),
    ("override-not-key-value", [*TRAIN, "lr"], "'lr' is not key=value", {}),
    ("override-bad-yaml", [*TRAIN, "lr=[0.1"], "override 'lr=[0.1'", {}),
    # infeasible partitions
    ("classes_per_client-above-classes", [*TRAIN, "classes_per_client=11"], "classes_per_client=11 exceeds the 10 "
     "classes", {}),
    ("classes_per_client-above-cifar100", [*TRAIN, "dataset=cifar100", "classes_per_client=101"],
     "classes_per_client=101 exceeds the 100 classes", {}),
    ("too-few-client-slots", [*TRAIN, "num_clients=3"], "num_clients * classes_per_client", {}),
    ("slots-run-out", [*TRAIN, "num_clients=3", "classes_per_client=4"], "classes_per_client", {}),
    ("more-clients-than-samples", [*TRAIN, "num_clients=5000", "join_ratio=0.001"], "num_clients: 5000 clients "
     "but only 3600 samples", {}),
    ("pfllib-without-name", [*TRAIN, "partition=pfllib"], "partition_name", {}),
    ("pfllib-import-missing", [*TRAIN, "partition=pfllib", "partition_name=nope"], "nope", {}),
    # YAML files
    ("yaml-missing", ["train", "--config", "{tmp}/nope.yaml"], "{tmp}/nope.yaml does not exist", {}),
    ("yaml-empty", ["train", "--config", "{cfg}"], "{cfg} is empty", {"yaml": b""}),
    ("yaml-only-comments", ["train", "--config", "{cfg}"], "{cfg} is empty", {"yaml": b"# nothing here\n"}),
    ("yaml-malformed", ["train", "--config", "{cfg}"], "{cfg} line 2 column 11: malformed YAML",
     {"yaml": b"lr: 0.1\nalpha: 0.1: 2\n"}),
    ("yaml-unclosed-list", ["train", "--config", "{cfg}"], "{cfg} line 3",
     {"yaml": b"lr: 0.1\nalpha: [0.1\nseed: 1\n"}),
    ("yaml-bad-indent", ["train", "--config", "{cfg}"], "{cfg} line 2", {"yaml": b"lr: 0.1\n  alpha: 0.2\n"}),
    ("yaml-tab", ["train", "--config", "{cfg}"], "{cfg} line 2", {"yaml": b"lr: 0.1\n\talpha: 0.2\n"}),
    ("yaml-duplicate-key", ["train", "--config", "{cfg}"], "{cfg} line 3 column 1: duplicate key 'global_rounds'",
     {"yaml": b"global_rounds: 1\nlr: 0.1\nglobal_rounds: 50\n"}),
    ("yaml-duplicate-in-section", ["train", "--config", "{cfg}"], "{cfg} line 2 column 17: duplicate key 'M'",
     {"yaml": b"lr: 0.1\nfedfomo: {M: 3, M: 4}\n"}),
    ("yaml-not-utf8", ["train", "--config", "{cfg}"], "{cfg} line 2: not UTF-8",
     {"yaml": b"lr: 0.1\nexperiment: caf\xe9\n"}),
    ("yaml-list", ["train", "--config", "{cfg}"], "{cfg} must hold a mapping", {"yaml": b"- lr\n- 0.1\n"}),
    ("yaml-scalar", ["train", "--config", "{cfg}"], "{cfg} must hold a mapping", {"yaml": b"just text\n"}),
    ("yaml-number-key", ["train", "--config", "{cfg}"], "{cfg}: key 1 is not a field name", {"yaml": b"1: 2\n"}),
    ("yaml-is-a-folder", ["train", "--config", "{tmp}"], "{tmp} is a folder", {}),
    # device and experiment
    ("device-tpu9", [*TRAIN, "device=tpu9"], " device: unknown device 'tpu9'; choose one of auto, cpu, cuda", {}),
    ("device-cuda-x", [*TRAIN, "device=cuda:x"], " device: unknown device 'cuda:x'", {}),
    ("head-device-tpu9", ["heads", "--run-id", FL_ID, "--no-progress", "device=tpu9"], " device: unknown device", {}),
    ("experiment-empty", [*TRAIN, 'experiment=""'], " experiment: the MLflow experiment name must not be empty", {}),
    ("experiment-blank-yaml", ["train", "--config", "{cfg}"], " experiment: ", {"yaml": b"experiment: '  '\n"}),
    # head settings
    ("head-upper_lr-inf", ["heads", "--run-id", FL_ID, "upper_lr=inf"], " upper_lr: must be a finite number", {}),
    ("head-p_lambda-nan", ["heads", "--run-id", FL_ID, "p_lambda=.nan"], " p_lambda: must be a finite number", {}),
    ("head-rank-yes", ["heads", "--run-id", FL_ID, "rank=yes"], " rank: must be a number, not a boolean", {}),
    ("head-global_epoch-0", ["heads", "--run-id", FL_ID, "global_epoch=0"], " global_epoch: ", {}),
    ("sweep-alpha-inf", ["sweep", *TRAIN[2:], "partition=dirichlet", "--no-progress", "--alphas", "inf",
                         "--join-ratios", "0.2", "--methods"], " alpha: must be a finite number", {}),
    # data folders
    ("data-missing", [*TRAIN, "data_dir={tmp}/nowhere"], "{tmp}/nowhere/" + CIFAR10_FOLDER, {}),
    ("data-empty-folder", [*TRAIN, "data_dir={tmp}/empty"], "{tmp}/empty/" + CIFAR10_FOLDER, {"setup": "empty"}),
    ("data-empty-cifar-folder", [*TRAIN, "data_dir={tmp}/empty"], "{tmp}/empty/" + CIFAR10_FOLDER,
     {"setup": "empty-cifar"}),
    ("data-cifar100-missing", [*TRAIN, "dataset=cifar100"], "cifar-100-python", {}),
    ("data-partition-data-missing", ["data", "partition", "data_dir={tmp}/nowhere", "--out", "{tmp}/out"],
     "{tmp}/nowhere/" + CIFAR10_FOLDER, {}),
    ("data-partition-infeasible", ["data", "partition", "data_dir={data}", "num_clients=3", "--out", "{tmp}/out"],
     "num_clients * classes_per_client", {}),
    ("data-truncated-pickle", [*TRAIN, "data_dir={tmp}/bad"], "data_batch_1", {"setup": "truncated"}),
    ("data-random-bytes-pickle", [*TRAIN, "data_dir={tmp}/bad"], "test_batch", {"setup": "random"}),
    ("data-batch-is-a-folder", [*TRAIN, "data_dir={tmp}/bad"], "{tmp}/bad/" + CIFAR10_FOLDER + "/data_batch_1: a "
     "folder, not a CIFAR-10 data file", {"setup": "batch-folder"}),
    ("data-batch-dangling-link", [*TRAIN, "data_dir={tmp}/bad"], "{tmp}/bad/" + CIFAR10_FOLDER + "/data_batch_1: a "
     "link to {tmp}/nowhere, which does not exist", {"setup": "batch-link"}),
    # initial weights and the model's input
    ("pretrained-garbage-safetensors", [*TRAIN, "pretrained={tmp}/weights.safetensors"], "{tmp}/weights.safetensors "
     "is not a readable .safetensors file (Error while deserializing header: invalid UTF-8", {"setup": "garbage"}),
    ("pretrained-truncated-safetensors", [*TRAIN, "pretrained={tmp}/weights.safetensors"], "{tmp}/weights."
     "safetensors is not a readable .safetensors file (Error while deserializing header: incomplete metadata",
     {"setup": "truncated-weights"}),
    ("init_from-unknown-client", [*TRAIN, "init_from=runs:/{run}/clients/client_999"], "run {run} has no model for "
     "client 999; saved clients: [0]", {"setup": "client-models"}),
    ("init_from-store-missing", [*TRAIN, f"init_from=runs:/{FL_ID}"], "no such store", {}),
    ("image_size-too-small-for-cnn", [*TRAIN, "image_size=7"], " image_size=7: model cnn cannot take 7x7 inputs", {}),
    ("crops-read-as-hex", [*TRAIN, "algo=mocosfl", "model=resnet18_sfl", "crops=0x32"], "crops='0x32'", {}),
    # run ids
    ("run-id-nonexistent", ["heads", "--run-id", FL_ID, "--no-progress"], FL_ID, {"setup": "store"}),
    ("heads-store-missing", ["heads", "--run-id", FL_ID, "--no-progress"], "no such store", {}),
    ("run-id-of-a-launch-run", ["heads", "--run-id", "{launch}", "--no-progress"], "{launch}", {"setup": "launch"}),
    ("resume-a-launch-run", ["train", "--resume", "{launch}"], "{launch} is not an FL run (pfl.kind='launch'); pass "
     "one of the nested FL runs of a launch run (named <algo>-<dataset>-<partition>-jr<join ratio>-s<seed>",
     {"setup": "launch"}),
    ("register-unknown-run", ["register", "--run-id", FL_ID, "--all"], FL_ID, {"setup": "store"}),
    ("register-a-launch-run", ["register", "--run-id", "{launch}", "--client", "0"], "{launch}", {"setup": "launch"}),
    ("tune-register-without-final-repeats", ["tune", "--register", "--n-trials", "1"], "--register", {}),
    # stores
    ("report-empty-store", ["report", "--out", "{tmp}/report"], "report: ", {"setup": "store"}),
    ("report-store-missing", ["report", "--out", "{tmp}/report"], "no such store", {}),
    ("tracking-uri-unwritable", [*TRAIN[:2], "--tracking-uri", "sqlite:////proc/x/mlflow.db", *TRAIN[2:]],
     "/proc/x/mlflow.db", {}),
]


DATA_SETUPS = ("truncated", "random", "batch-folder", "batch-link")  # setups that copy the CIFAR-10 slice

# ---------------------------------------------------------------- helpers


def _setup(kind: str, tmp: Path, data: Path | None, uri: str) -> dict[str, str]:
    """Prepare a case's files or runs; returns extra placeholders."""
    if kind == "empty":
        (tmp / "empty").mkdir()
    elif kind == "empty-cifar":
        (tmp / "empty" / CIFAR10_FOLDER).mkdir(parents=True)
    elif kind in DATA_SETUPS:
        bad = tmp / "bad" / CIFAR10_FOLDER
        shutil.copytree(data / CIFAR10_FOLDER, bad)
        batch = bad / "data_batch_1"
        if kind == "truncated":
            batch.write_bytes(batch.read_bytes()[:1000])
        elif kind == "random":
            (bad / "test_batch").write_bytes(bytes(range(256)) * 40)
        elif kind == "batch-folder":
            batch.unlink()
            batch.mkdir()
        else:
            batch.unlink()
            batch.symlink_to(tmp / "nowhere")
    elif kind == "garbage":  # a header length, then 8 bytes that are not UTF-8
        (tmp / "weights.safetensors").write_bytes((8).to_bytes(8, "little") + b"\xff" * 8)
    elif kind == "truncated-weights":
        save_file({"head.weight": torch.zeros(10, 512)}, tmp / "whole.safetensors")
        (tmp / "weights.safetensors").write_bytes((tmp / "whole.safetensors").read_bytes()[:5000])
    elif kind == "client-models":  # an FL run holding client 0's model folder
        client = mlflow.MlflowClient(uri)
        run = client.create_run(client.create_experiment("pfl", (tmp / "artifacts").as_uri()),
                                tags={"pfl.kind": "fl"})
        (tmp / "models" / "client_000").mkdir(parents=True)
        (tmp / "models" / "client_000" / "MLmodel").write_text("")
        client.log_artifacts(run.info.run_id, str(tmp / "models"), "clients")
        client.set_terminated(run.info.run_id)
        return {"run": run.info.run_id}
    elif kind == "store":  # an existing, empty tracking store
        tracking.configure_tracking(uri)
    elif kind == "launch":
        client = mlflow.MlflowClient(uri)
        run = client.create_run(client.create_experiment("pfl"), tags={"pfl.kind": "launch"})
        client.set_terminated(run.info.run_id)
        return {"launch": run.info.run_id}
    return {}


def _fill(text: str, values: dict[str, str]) -> str:
    """``text`` with each ``{name}`` of ``values`` replaced (other braces, as in YAML flow mappings, stay)."""
    for name, value in values.items():
        text = text.replace("{" + name + "}", value)
    return text


def _run_count(db: Path, uri: str) -> int:
    """Runs in the store (any experiment, any state); 0 when the store was never created."""
    if not db.exists():
        return 0
    client = mlflow.MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=mlflow.entities.ViewType.ALL)]
    return len(client.search_runs(ids, run_view_type=mlflow.entities.ViewType.ALL)) if ids else 0


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """A fresh working folder and SQLite store; MLflow's process-wide tracking URI put back afterwards."""
    old = mlflow.get_tracking_uri()
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "PFL_DATA_DIR", "PFL_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    yield tmp_path, db, uri
    mlflow.set_tracking_uri(old)


# ---------------------------------------------------------------- the test


@pytest.mark.parametrize(("argv", "expected", "extra"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_no_run(argv, expected, extra, isolated, request, capsys):
    tmp, db, uri = isolated
    needs_data = any("{data}" in a for a in argv) or extra.get("setup") in DATA_SETUPS
    data = request.getfixturevalue("cifar10_dir") if needs_data else None
    fill = {"tmp": str(tmp), "data": str(data), "cfg": str(tmp / "run.yaml")}
    if "yaml" in extra:
        (tmp / "run.yaml").write_bytes(extra["yaml"])
    fill |= _setup(extra.get("setup", ""), tmp, data, uri)
    before, store_existed = _run_count(db, uri), db.exists()
    capsys.readouterr()

    code = main([_fill(a, fill) for a in argv])

    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit status {code}; stderr: {err!r}"
    assert len(lines) == 1 and lines[0].startswith("pfl: error: "), f"not one error line: {err!r}"
    assert "Traceback" not in err
    assert _fill(expected, fill) in lines[0], f"{_fill(expected, fill)!r} not in {lines[0]!r}"
    assert _run_count(db, uri) == before, "a run was created"
    if argv[0] != "sweep":  # pfl sweep opens the store before pfl.sweep.run_sweep validates its grid and data
        assert db.exists() == store_existed, "the tracking store was created before the check"


def test_the_dry_forward_of_the_input_check_changes_no_mode_and_draws_no_random_number():
    from pfl.models import ModelSpec, build_model
    from pfl.train import check_input_fits

    spec = ModelSpec("cnn", 10, in_channels=3, image_size=32)
    model = build_model(spec)
    model.head.eval()  # a mixed state, as a frozen part would leave it
    modes = [m.training for m in model.modules()]
    state = torch.random.get_rng_state()

    check_input_fits(model, spec, torch.device("cpu"))

    assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.random.get_rng_state(), state)
