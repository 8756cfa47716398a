"""Command line: ``pfl train [--config FILE] [key=value ...]`` (or ``--resume FL_RUN_ID``), ``pfl runs --stale``,
``pfl heads --run-id ID --method aph|loraph``, ``pfl register --run-id ID (--client N | --all)``, ``pfl sweep``,
``pfl tune``, ``pfl report``, ``pfl data import-pfllib DIR`` and ``pfl data partition --config FILE --out DIR``.

SIGINT and SIGTERM stop a training run after its current round: it writes its checkpoint, ends
KILLED and the command exits with 130 / 143, printing how to resume.

Errors in the configuration or the data are printed as one clear message and
exit with status 2 before any work starts; ``pfl train`` and ``pfl pretrain`` open the tracking store only
once every check has passed, so bad input leaves no ``mlflow.db`` behind.
"""

from __future__ import annotations

import argparse
import signal
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from pfl.federated.engine import DivergenceError
from pfl.config import DATASETS, ConfigError, RunConfig, load_config, load_head_config
from pfl.data.datasets import DatasetFormatError, DatasetNotFoundError
from pfl.data.pfllib import PfllibImportError
from pfl.distributed import RayOptions, TaskError, require_ray, sqlite_warning, tune_workers
from pfl.pfllib_args import parse_pfllib_args


def _optional_float(text: str) -> float | None:
    """A float, or ``None`` for an empty string (launchers pass unset options as '')."""
    return float(text) if text.strip() else None


def _count(text: str) -> int:
    """An integer count, also from launchers that pass numbers as floats ('20.0')."""
    return int(float(text))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pfl {version('pfl')}"
    except PackageNotFoundError:  # a source tree that was not installed
        return "pfl (not installed)"


def _config_keys() -> str:
    """``train --help``'s list of config keys with their defaults, and every algorithm's hyperparameters."""
    from pfl.algorithms import REGISTRY

    fields = {k: f for k, f in RunConfig.model_fields.items() if k != "hparams"}
    keys = " ".join(f"{k}={f.get_default(call_default_factory=True)}" for k, f in fields.items())
    lines = ["config keys (key=value or YAML) with their defaults:", textwrap.fill(keys, 100, initial_indent="  ",
                                                                                  subsequent_indent="  "),
             "  partition: pathological (PFLlib's pat), dirichlet (dir), iid, exdir, shards, pfllib",
             "algorithm hyperparameters (bare key=value, or a YAML section named after the algorithm):"]
    for name, cls in REGISTRY.items():
        knobs = " ".join(f"{k}={f.default}" for k, f in cls.Params.model_fields.items())
        lines.append(f"  {name}: {knobs or '(none)'}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfl", description="Personalized federated learning experiments.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run federated training (launch run + one FL run per repeat)",
                           epilog=_config_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", default="", help="YAML run config, e.g. configs/fedfomo_cifar10_pr0.2.yaml")
    train.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                                                           "or sqlite:///mlflow.db)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("--resume", default=None, metavar="FL_RUN_ID", help="continue this FL run from its last "
                       "checkpoint (same run id; no --config or overrides)")
    train.add_argument("--pfllib-args", default=None, metavar="FLAGS", help="PFLlib's main.py flags, translated "
                       "into the config, e.g. \"-algo FedFomo -data Cifar10 -jr 0.2 -nc 20 -lbs 10 -lr 0.005 -gr 100\" "
                       "(key=value overrides win)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. global_rounds=5 join_ratio=0.2")
    train.set_defaults(handler=_train)
    pretrain = sub.add_parser("pretrain", help="train a model centrally on one dataset (a tracked run whose model "
                              "init_from=runs:/<run id> starts from)", epilog="The config's algo, partition, "
                              "num_clients, join_ratio and local_epochs are replaced by one client holding the whole "
                              "dataset; global_rounds counts epochs.")
    pretrain.add_argument("--config", default="",
                          help="YAML run config, e.g. configs/pretrain_vit_tinyimagenet_cpu.yaml")
    pretrain.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    pretrain.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    pretrain.add_argument("overrides", nargs="*", help="key=value overrides, e.g. global_rounds=10 image_size=32")
    pretrain.set_defaults(handler=_pretrain)
    runs = sub.add_parser("runs", help="list RUNNING runs whose process is gone (--stale), mark or resume them")
    runs.add_argument("--stale", action="store_true", required=True, help="RUNNING launch / FL runs whose process "
                      "(pfl.host, pfl.pid tags) no longer exists on this host")
    runs.add_argument("--mark-failed", action="store_true", help="mark the stale runs FAILED")
    runs.add_argument("--resume", action="store_true", help="resume the stale FL runs from their checkpoints")
    runs.add_argument("--tracking-uri", default=None)
    runs.set_defaults(handler=_runs)
    heads = sub.add_parser("heads", help="APH / LoRAPH on every client of an FL run (nested head run)")
    heads.add_argument("--run-id", required=True, help="the FL run id (printed by `pfl train` as 'FL run: ...')")
    heads.add_argument("--method", choices=("aph", "loraph"), default="aph", help="head method (default aph)")
    heads.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of the FL run")
    heads.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    heads.add_argument("overrides", nargs="*", help="key=value, e.g. global_epoch=10 sampling_num=10 rank=8")
    heads.set_defaults(handler=_heads)
    register = sub.add_parser("register", help="register an FL run's client models in the MLflow Model Registry")
    register.add_argument("--run-id", required=True, help="the FL run id (printed by `pfl train` as 'FL run: ...')")
    which = register.add_mutually_exclusive_group(required=True)
    which.add_argument("--client", type=int, help="one client's model")
    which.add_argument("--all", action="store_true", help="every client's model")
    register.add_argument("--name", default=None, help="registered model name (one client: this name; --all: "
                          "NAME-client_XXX; default <FL run name>-client_XXX)")
    register.add_argument("--alias", default=None, help="alias set on the new versions, e.g. champion "
                          "(load with models:/NAME@champion)")
    register.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of the FL run")
    register.set_defaults(handler=_register)
    sweep = sub.add_parser("sweep", help="FL runs over algorithms x Dirichlet alpha x join ratio, head runs on each, "
                                         "one launch run")
    sweep.add_argument("--config", default="", help="YAML run config of every cell (alpha and join_ratio replaced)")
    sweep.add_argument("--algos", nargs="+", default=None, metavar="ALGO",
                       help="algorithms, each a row of the report, e.g. fedavg fedper ditto (default: the config's "
                            "algo); their hyperparameters go in sections of the config, e.g. `ditto: {mu: 0.1}`")
    sweep.add_argument("--alphas", type=float, nargs="+", required=True, help="Dirichlet alphas, e.g. 0.1 0.5")
    sweep.add_argument("--join-ratios", type=float, nargs="+", required=True, help="join ratios, e.g. 0.1 0.2")
    sweep.add_argument("--methods", nargs="*", choices=("aph", "loraph"), default=["aph", "loraph"],
                       help="head methods run on every FL run (default both; none: no head runs)")
    sweep.add_argument("--head", action="append", default=[], metavar="KEY=VALUE",
                       help="head setting for every head run, e.g. --head global_epoch=2 (repeatable)")
    sweep.add_argument("--tracking-uri", default=None)
    sweep.add_argument("--no-progress", action="store_true")
    _add_backend_options(sweep, "each grid cell (its FL runs and head runs)")
    sweep.add_argument("overrides", nargs="*", help="key=value run config overrides, e.g. global_rounds=3")
    sweep.set_defaults(handler=_sweep)
    tune = sub.add_parser("tune", help="Optuna search of an algorithm's hyperparameters (study run + trial runs)")
    tune.add_argument("--config", default="", help="YAML run config the trials start from")
    tune.add_argument("--algo", default=None, help="algorithm (overrides the config)")
    tune.add_argument("--dataset", default=None, help="dataset (overrides the config)")
    tune.add_argument("--n-trials", type=_count, default=20, help="trials this command runs (default 20; with "
                      "--workers, split over the workers)")
    tune.add_argument("--metric", default=None, help="validation metric: val/acc (maximized; the default for "
                      "classification); val/nll, val/f_ece, val/ece_mean, val/global_ece, val/brier (minimized); "
                      "val_acc, val_nll, val_ece accepted; regression: val/orthodromic_deg (the default), val/mse")
    tune.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///optuna.db; a shared "
                      "PostgreSQL URL lets several machines work on one study)")
    tune.add_argument("--study", default=None, help="study name (default <algo>-<dataset>-<partition>-jr<ratio>)")
    tune.add_argument("--space", default=None, help="YAML file overriding the search space")
    tune.add_argument("--tune-lr", action="store_true", help="also search lr (log scale, 1e-3..1e-1)")
    tune.add_argument("--pruner", choices=("median", "none"), default="median")
    tune.add_argument("--final-repeats", type=_count, default=0, help="retrain the best config with N seeds")
    tune.add_argument("--register", action="store_true", help="register the final repeats' client models in the "
                      "MLflow Model Registry as <study>-client_XXX, alias champion on the first seed's (needs "
                      "--final-repeats)")
    tune.add_argument("--out", default=".", help="folder of the best config YAML (default .)")
    tune.add_argument("--tracking-uri", default=None)
    tune.add_argument("--no-progress", action="store_true", help="hide the progress bar over trials")
    _add_backend_options(tune, "each Optuna worker")
    tune.add_argument("--workers", type=int, default=None, help="Optuna workers run as Ray tasks on the study "
                      "(with --backend ray; default 1)")
    tune.add_argument("overrides", nargs="*", help="key=value run config overrides, e.g. global_rounds=5")
    tune.set_defaults(handler=_tune)
    report = sub.add_parser("report", help="results tables and plots from the tracking store (ECE, OOD; regression "
                                           "arms and per-step error)")
    report.add_argument("--experiment", action="append", default=None, help="experiment name (repeatable; "
                        "default all)")
    report.add_argument("--filter", default="", help="MLflow filter on FL run params, e.g. \"params.dataset = "
                        "'cifar10'\"")
    report.add_argument("--alpha", type=_optional_float, default=None, help="only runs at this Dirichlet alpha "
                        "(default: all, one table per setting)")
    report.add_argument("--join-ratio", type=_optional_float, default=None, help="only runs at this join ratio "
                        "(default: all, one table per setting)")
    report.add_argument("--partition", default=None, help="only runs of this partition: dirichlet (dir), pathological "
                        "(pat), iid, exdir, shards, pfllib (default: all, one table per setting)")
    report.add_argument("--datasets", nargs="+", default=None, metavar="DATASET", help="only runs on these datasets, "
                        "e.g. cifar10 cifar100 (default: all)")
    report.add_argument("--reliability-run", default=None, help="FL run id whose reliability diagrams to draw")
    report.add_argument("--stat", choices=("final", "best"), default="final", help="FL-run numbers: final round "
                        "(test/*, default) or round of best test accuracy (best/test_*); head runs use the final "
                        "models either way")
    report.add_argument("--by", choices=("method", "architecture"), default="method", help="table rows x "
                        "columns: method (algorithms x dataset/method/metric, and the figures; default) or "
                        "architecture (FlexiFed's Table 1: a block per dataset / model family, schemes x V1..V4: "
                        "table_architectures.*)")
    report.add_argument("--out", default="report", help="output folder (default ./report)")
    report.add_argument("--tracking-uri", default=None)
    report.set_defaults(handler=_report)
    data = sub.add_parser("data", help="manage datasets and partitions")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    imp = data_sub.add_parser("import-pfllib", help="import a PFLlib dataset folder as a fixed partition",
                              description="Validate a folder written by PFLlib's generate_*.py (config.json, "
                                          "train/{i}.npz, test/{i}.npz) and store it as DATA_DIR/pfllib/NAME for "
                                          "`pfl train partition=pfllib partition_name=NAME`.")
    imp.add_argument("dir", metavar="DIR", help="the PFLlib dataset folder, e.g. PFLlib/dataset/Cifar10")
    imp.add_argument("--name", default=None, help="import name (default: the name of DIR)")
    imp.add_argument("--dataset", default=None, help="dataset name (default: inferred from the class count and "
                                                     "image size: cifar10, cifar100 or tinyimagenet)")
    imp.add_argument("--data-dir", default=None, help="pfl data folder (default: $PFL_DATA_DIR or data)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing import of the same name")
    imp.set_defaults(handler=_import_pfllib)
    part = data_sub.add_parser("partition", help="show the partition a run config would train on (label counts "
                               "per client, as JSON and a plot); nothing is trained or tracked",
                               description="Build (or read from the cache) exactly the partition `pfl train` would "
                                           "use with this config, print each client's train / test sizes and label "
                                           "counts, and write DIR/label_counts.json (what an FL run logs as "
                                           "partition/label_counts.json) and DIR/label_distribution.png / .pdf "
                                           "(stacked bars per client).")
    part.add_argument("--config", default="", help="YAML run config, e.g. configs/mocosfl_cifar10.yaml")
    part.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    part.add_argument("overrides", nargs="*", help="key=value overrides, e.g. partition=dirichlet alpha=0.1")
    part.set_defaults(handler=_data_partition)
    return parser


def _add_backend_options(parser: argparse.ArgumentParser, task: str) -> None:
    """``--backend``, ``--address`` and ``--cpus-per-task`` of ``pfl sweep`` and ``pfl tune`` (:mod:`pfl.distributed`)."""
    parser.add_argument("--backend", choices=("local", "ray"), default="local", help=f"local: in this process "
                        f"(default); ray: {task} as a Ray task, on one GPU when the Ray cluster has GPUs")
    parser.add_argument("--address", default=None, help="Ray cluster to use (with --backend ray), e.g. auto, "
                        "HOST:6379 or ray://HOST:10001 (default: a local Ray instance)")
    parser.add_argument("--cpus-per-task", type=int, default=None, help="CPUs a Ray task reserves on a cluster "
                        "without GPUs (with --backend ray; default 1)")


def _ray_options(args: argparse.Namespace, counts: dict[str, int | None]) -> RayOptions | None:
    """The Ray options of ``pfl sweep`` / ``pfl tune``, ``None`` with ``--backend local``.

    Args:
        counts: the command's Ray-only counts by option name (``--cpus-per-task``, ``--workers``), ``None`` when
            not given.

    Raises:
        ConfigError: a Ray-only option with ``--backend local``, a count below 1, or ray not installed.
    """
    given = [opt for opt, value in {"--address": args.address, **counts}.items() if value is not None]
    if args.backend == "local":
        if given:
            raise ConfigError(f"{given[0]}: only with --backend ray; add --backend ray or drop {given[0]}")
        return None
    low = [(opt, value) for opt, value in counts.items() if value is not None and value < 1]
    if low:
        raise ConfigError(f"{low[0][0]}: {low[0][1]} is below 1; pass {low[0][0]} 1 or more")
    require_ray()
    return RayOptions(args.address, args.cpus_per_task or 1)


def _warn_sqlite(ray: RayOptions | None, tracking_uri: str, storage: str | None = None) -> None:
    """Print :func:`pfl.distributed.sqlite_warning` when it applies (``--address`` with SQLite stores)."""
    warning = sqlite_warning(ray, tracking_uri, storage) if ray else None
    if warning:
        print(warning, file=sys.stderr)


@contextmanager
def _stop_on_signals() -> Iterator[Callable[[], int | None]]:
    """Within the block, SIGINT and SIGTERM only record themselves (a second one acts as usual); yields the
    function that returns the recorded signal's number, which the round loop polls after every round."""
    arrived: list[int] = []

    def handler(signum: int, frame: object) -> None:
        arrived.append(signum)
        signal.signal(signum, previous[signum])  # a second signal of the same kind stops at once
        print(f"\npfl: {signal.Signals(signum).name} received: finishing the round and writing the checkpoint "
              "(send it again to stop at once)", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: arrived[0] if arrived else None
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _train(args: argparse.Namespace) -> int:
    from pfl import tracking
    from pfl.federated.engine import RunInterrupted
    from pfl.train import resume_training, run_training

    if args.resume and (args.config or args.overrides or args.pfllib_args):
        raise ConfigError("--resume continues a run with its own config; drop --config, --pfllib-args and the "
                          "overrides")
    tags = {}
    if args.pfllib_args:
        translation = parse_pfllib_args(args.pfllib_args)
        print("PFLlib flags -> pfl config:\n  " + "\n  ".join(translation.describe()), file=sys.stderr)
        tags = {"pfl.pfllib_args": args.pfllib_args, "pfl.pfllib_translation": "\n".join(translation.describe())}
    cfg = None if args.resume else load_config(args.config or None, args.overrides,
                                               translation.values if args.pfllib_args else None)
    with _stop_on_signals() as stop:
        try:
            if args.resume:
                tracking.configure_tracking(args.tracking_uri, must_exist=True)  # the run to resume lives there
                ids = resume_training(args.resume, progress=not args.no_progress, stop=stop)
            else:
                ids = run_training(cfg, progress=not args.no_progress, stop=stop, launch_tags=tags,
                                   open_store=_store_opener(args.tracking_uri, cfg))
        except RunInterrupted as err:
            print(f"pfl: stopped by {signal.Signals(err.signum).name} after round {err.round}; the run is KILLED "
                  f"with its checkpoint. Resume with: pfl train --resume {err.run_id}", file=sys.stderr)
            return 128 + err.signum
    _print_summary(tracking.tracking_uri(), ids["launch_run_id"], ids["fl_run_ids"])
    return 0


def _store_opener(uri: str | None, cfg: RunConfig) -> Callable[[], str]:
    """What opens the tracking store once a run's input is validated (:func:`pfl.train.run_training`); with
    ``init_from`` the store must exist already, as the run it names lives there."""
    from pfl import tracking

    return lambda: tracking.configure_tracking(uri, must_exist=cfg.init_from is not None)


def _pretrain(args: argparse.Namespace) -> int:
    from pfl import tracking
    from pfl.train import pretrain_config, run_training

    cfg = pretrain_config(load_config(args.config or None, args.overrides))
    ids = run_training(cfg, progress=not args.no_progress, launch_tags={"pfl.pretrain": "true"},
                       open_store=_store_opener(args.tracking_uri, cfg))
    _print_summary(tracking.tracking_uri(), ids["launch_run_id"], ids["fl_run_ids"])
    print(f"start a run from this model with: init_from=runs:/{ids['fl_run_ids'][0]}")
    return 0


def _print_summary(uri: str, launch_id: str | None, fl_ids: list[str], head_ids: tuple[str, ...] = ()) -> None:
    """The end-of-command summary: a table of the runs, where they are, and the next commands."""
    from pfl import tracking
    from pfl.summary import summary_table, ui_hint

    rows = [tracking.run_summary(i) for i in [*fl_ids, *head_ids]]
    print("\n" + summary_table(rows) + "\n")
    print(f"tracking store: {uri}")
    if launch_id:
        print(f"launch run: {launch_id}")
    for run_id, row in zip(fl_ids, rows):
        print(f"FL run: {run_id}  ({row['name']}; artifacts {row['artifact_uri']})")
    for run_id, row in zip(head_ids, rows[len(fl_ids):]):
        print(f"head run: {run_id}  ({row['name']})")
    first = fl_ids[0]
    print("next:")
    where = f" --tracking-uri {uri}" if uri != tracking.DEFAULT_TRACKING_URI else ""
    if not head_ids and "test/acc" in rows[0]["metrics"]:  # head methods need a classifier
        print(f"  pfl heads --run-id {first} --method aph{where}")
    print(f"  {ui_hint(uri)}")
    print(f"  pfl register --run-id {first} --client 0 --alias champion{where}")
    print(f'  python -c "from pfl.tracking import configure_tracking, load_client_model; '
          f"configure_tracking('{uri}'); print(load_client_model('{first}', client_id=0))\"")


def _runs(args: argparse.Namespace) -> int:
    from pfl import tracking
    from pfl.train import resume_training

    tracking.configure_tracking(args.tracking_uri, must_exist=True)
    stale = [(r, alive) for r, alive in tracking.stale_runs() if alive is False]
    for run, _ in stale:
        print(f"{run.info.run_id}  {run.data.tags['pfl.kind']:6}  {run.info.run_name}  pid {run.data.tags['pfl.pid']} "
              "(gone)")
    if not stale:
        print("no stale runs")
    fl = [r.info.run_id for r, _ in stale if r.data.tags["pfl.kind"] == "fl"]
    if args.resume:
        for run_id in fl:
            resume_training(run_id)
            print(f"resumed and finished FL run {run_id}")
    elif args.mark_failed:
        for run, _ in stale:
            tracking.mark_failed(run.info.run_id)
        print(f"marked {len(stale)} run(s) FAILED")
    return 0


def _heads(args: argparse.Namespace) -> int:
    from pfl import tracking
    from pfl.heads import METHOD_LABELS
    from pfl.heads.run import run_heads
    from pfl.summary import summary_table, ui_hint

    hc = load_head_config(args.overrides, method=args.method)
    uri = tracking.configure_tracking(args.tracking_uri, must_exist=True)
    run_id = run_heads(args.run_id, hc, progress=not args.no_progress)
    run = tracking.run_summary(run_id)
    wo = {"test/" + k[3:]: v for k, v in run["metrics"].items() if k.startswith("wo/")}
    print("\n" + summary_table([{"name": "w/o", "metrics": wo}, {**run, "name": METHOD_LABELS[hc.method]}]) + "\n")
    print(f"tracking store: {uri}")
    print(f"head run: {run_id} ({run['name']}, nested under FL run {args.run_id})")
    print(f"next: {ui_hint(uri)}")
    return 0


def _register(args: argparse.Namespace) -> int:
    from pfl import tracking

    tracking.configure_tracking(args.tracking_uri, must_exist=True)
    try:
        versions = tracking.register_client_models(args.run_id, None if args.all else [args.client], args.name,
                                                   args.alias)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    _print_registered(versions, args.alias)
    return 0


def _print_registered(versions: list[tuple[str, str]], alias: str | None) -> None:
    """The registered versions, one line each, with the URI that loads them."""
    for name, version in versions:
        uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
        print(f"registered {name} version {version}: mlflow.pyfunc.load_model({uri!r})")


def _sweep(args: argparse.Namespace) -> int:
    from pfl import tracking
    from pfl.sweep import run_sweep

    ray = _ray_options(args, {"--cpus-per-task": args.cpus_per_task})
    cfg = [load_config(args.config or None, [*args.overrides, f"algo={a}"]) for a in dict.fromkeys(args.algos)] \
        if args.algos else load_config(args.config or None, args.overrides)
    heads = [load_head_config(args.head, method=m) for m in args.methods]
    uri = tracking.configure_tracking(args.tracking_uri)
    _warn_sqlite(ray, uri)
    result = run_sweep(cfg, args.alphas, args.join_ratios, heads, progress=not args.no_progress, ray=ray)
    _print_summary(uri, result.launch_run_id, result.fl_run_ids, tuple(result.head_run_ids))
    print(f"report: pfl report --experiment {(cfg[0] if isinstance(cfg, list) else cfg).experiment} --out report")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from pathlib import Path

    from pfl import tracking
    from tuning.spaces import load_space, search_space
    from tuning.objective import task_metric
    from tuning.study import DEFAULT_STORAGE, StudySettings, dataset_fallback_note, run_study, summary_lines

    ray = _ray_options(args, {"--cpus-per-task": args.cpus_per_task, "--workers": args.workers})
    if args.register and args.final_repeats < 1:
        raise ConfigError("--register registers the final repeats' client models; add --final-repeats N (N >= 1)")
    picked = [f"{k}={v}" for k, v in (("algo", args.algo), ("dataset", args.dataset)) if v]
    cfg = load_config(args.config or None, [*picked, *args.overrides])
    note = dataset_fallback_note(args.config, args.dataset, cfg)
    if note:
        print(note, file=sys.stderr)
    space = search_space(cfg.algo, args.tune_lr, load_space(args.space, cfg.algo) if args.space else None)
    settings = StudySettings(n_trials=args.n_trials, metric=task_metric(cfg, args.metric),
                             storage=args.storage or DEFAULT_STORAGE,
                             study_name=args.study or None, pruner=args.pruner, final_repeats=args.final_repeats,
                             out_dir=Path(args.out), progress=not args.no_progress, register=args.register)
    uri = tracking.configure_tracking(args.tracking_uri)
    _warn_sqlite(ray, uri, settings.storage)
    try:
        if ray:  # the workers run the trials; this process then writes the best config and runs the final repeats
            tune_workers(cfg, space, settings, args.workers or 1, ray)
            settings = replace(settings, n_trials=0)
        result = run_study(cfg, space, settings)
    except ConfigError:
        raise
    except (ValueError, TaskError) as err:
        print(f"pfl: error: {err}", file=sys.stderr)
        return 1
    print(f"tracking store: {uri}")
    print("\n".join(summary_lines(result)))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pfl import tracking
    from reports.report import Selection, build_report

    sel = Selection(args.experiment, args.filter, args.alpha, args.join_ratio, args.reliability_run, args.stat,
                    args.by, partition=args.partition, datasets=args.datasets)
    uri = tracking.configure_tracking(args.tracking_uri, must_exist=True)
    out = Path(args.out)
    params = {"experiments": ",".join(args.experiment or []), "filter": args.filter, "alpha": args.alpha,
              "join_ratio": args.join_ratio, "reliability_run": args.reliability_run, "stat": args.stat,
              "by": args.by, "partition": args.partition, "datasets": ",".join(args.datasets or [])}
    experiment = (args.experiment or ["pfl"])[0]
    try:
        report = build_report(sel, out)  # reads the store only: a bad selection leaves no run behind
    except ValueError as err:
        raise ConfigError(f"report: {err}") from None
    with tracking.launch_run(experiment, "report", params, kind="report") as run_id:
        tracking.log_folder(out)
        files = "\n".join(f"- `{p.name}`" for p in report.files)
        tracking.set_description(run_id, f"**report** ({args.stat} statistic)\n\n{report.caption}\n\nFiles:\n\n{files}")
    print(report.table_markdown)
    print(f"tracking store: {uri}")
    print(f"report run: {run_id}; files in {out}: {', '.join(p.name for p in report.files)}")
    return 0


def _import_pfllib(args: argparse.Namespace) -> int:
    from pfl.data.pfllib import import_pfllib, read_meta

    # Same default as RunConfig.data_dir, so `pfl train` finds the import without data_dir=...
    data_dir = args.data_dir or RunConfig.model_fields["data_dir"].get_default(call_default_factory=True)
    path = import_pfllib(args.dir, data_dir, name=args.name, dataset=args.dataset, overwrite=args.overwrite)
    meta = read_meta(data_dir, path.name)
    print(f"imported {meta['num_clients']} clients, {meta['num_samples']} images ({meta['dataset']}) to {path}")
    extra = "" if args.data_dir is None else f" data_dir={data_dir}"
    print(f"use it with: pfl train partition=pfllib partition_name={path.name} dataset={meta['dataset']} "
          f"num_clients={meta['num_clients']}{extra}")
    if meta["dataset"] not in DATASETS:
        print(f"note: pfl train accepts dataset={' | '.join(DATASETS)}, not {meta['dataset']!r}; if this folder "
              "holds one of those, re-import it with --dataset NAME --overwrite")
    return 0


def _data_partition(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pfl.train import LABEL_COUNTS_FILE, prepare
    from reports.partitions import label_distribution_figure
    from reports.plots import save_figure

    cfg = load_config(args.config or None, args.overrides)
    prepared = prepare(cfg.model_copy(update={"device": "cpu"}))  # the partition does not depend on the device
    counts = prepared.label_counts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_file = out / Path(LABEL_COUNTS_FILE).name
    json_file.write_text(json.dumps(counts, indent=2, default=str))  # as mlflow.log_dict writes the run's copy
    print("\n".join(_partition_lines(cfg, counts)))
    files = [json_file]
    if prepared.dataset.num_classes is not None:  # a regression has sizes, no labels to plot
        figure = label_distribution_figure(counts, prepared.dataset.class_names)
        files += save_figure(figure, out / "label_distribution")
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def _partition_lines(cfg: RunConfig, counts: dict) -> list[str]:
    """Each client's train / test sizes and its labels with their counts in each split (of ``counts``: a
    partition's label counts, :attr:`pfl.train.Prepared.label_counts`), as PFLlib's ``separate_data`` prints them
    when it generates a dataset (a regression: sizes only); then the totals."""
    clients = counts["clients"]
    lines = [f"{cfg.dataset}, partition {cfg.partition_label}: {len(clients)} clients",
             "client  train   test  train labels (label:count) | test labels"]
    for c in clients:
        train, test = (" ".join(f"{label}:{n}" for label, n in c.get(split, {}).items()) for split in ("train", "test"))
        lines.append(f"{c['client']:6d} {c['num_train']:6d} {c['num_test']:6d}  {train} | {test}")
    train, test = sum(c["num_train"] for c in clients), sum(c["num_test"] for c in clients)
    lines.append(f" total {train:6d} {test:6d}  ({train + test} samples)")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pfl`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DatasetNotFoundError, DatasetFormatError, PfllibImportError, DivergenceError) as err:
        print(f"pfl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
