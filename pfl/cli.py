"""Command line: ``pfl train [--config FILE] [key=value ...]``.

Errors in the configuration or the data are printed as one clear message and
exit with status 2 before any work starts.
"""

from __future__ import annotations

import argparse
import sys

from pfl.config import ConfigError, load_config
from pfl.data.datasets import DatasetFormatError, DatasetNotFoundError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfl", description="Personalized federated learning experiments.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run federated training (launch run + one FL run per repeat)")
    train.add_argument("--config", default="", help="YAML run config, e.g. configs/fedfomo_cifar10_pr0.2.yaml")
    train.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI "
                                                           "or sqlite:///mlflow.db)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. global_rounds=5 join_ratio=0.2")
    return parser


def _train(args: argparse.Namespace) -> int:
    from pfl import tracking
    from pfl.train import run_training

    cfg = load_config(args.config or None, args.overrides)
    uri = tracking.configure_tracking(args.tracking_uri)
    ids = run_training(cfg, progress=not args.no_progress)
    print(f"tracking store: {uri}")
    print(f"launch run: {ids['launch_run_id']}")
    for run_id in ids["fl_run_ids"]:
        print(f"FL run: {run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``pfl`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        return {"train": _train}[args.command](args)
    except (ConfigError, DatasetNotFoundError, DatasetFormatError) as err:
        print(f"pfl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
