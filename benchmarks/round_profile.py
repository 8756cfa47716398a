"""Where a round's time goes: cProfile of FedFomo (or any algorithm) at the round benchmark's settings.

Runs ``--rounds`` rounds of ``configs/fedfomo_cifar10_pr0.2.yaml`` (full CIFAR-10, 20 clients,
join ratio 0.2, batch 10, every client evaluated every round) in this process under
:mod:`cProfile` and prints the cumulative seconds of the round's parts (local SGD,
FedFomo's scoring, evaluation, aggregation) per round, then the heaviest torch calls.
The first round is included (it has no FedFomo scoring). Usage::

    .venv/bin/python benchmarks/round_profile.py [--rounds 6] [key=value ...]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

PARTS = {  # (file suffix, function) -> label
    ("federated/local.py", "fit"): "local SGD (SGDUpdate.fit)",
    ("algorithms/fedfomo.py", "score"): "FedFomo scoring of received models",
    ("federated/engine.py", "evaluate"): "evaluation of all clients",
    ("federated/engine.py", "_score"): "  of which running changed models",
    ("federated/engine.py", "run_round"): "round without evaluation",
    ("algorithms/fedfomo.py", "aggregate_fit"): "aggregation",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("overrides", nargs="*", help="run config overrides, e.g. algo=fedavg")
    args = parser.parse_args()
    from pfl.config import load_config
    from pfl.train import prepare, run_federated

    cfg = load_config("configs/fedfomo_cifar10_pr0.2.yaml", [f"global_rounds={args.rounds}", *args.overrides])
    prepared = prepare(cfg)
    profiler = cProfile.Profile()
    profiler.runcall(run_federated, prepared, cfg.seed, [])
    stats = pstats.Stats(profiler)
    print(f"{cfg.algo}, {args.rounds} rounds, seconds per round (cumulative, cProfile):")
    for (path, _, func), (_, calls, _, cumulative, _) in sorted(stats.stats.items(), key=lambda kv: -kv[1][3]):
        label = PARTS.get((path.split("pfl/")[-1], func))
        if label:
            print(f"  {label:42} {cumulative / args.rounds:6.2f} s  ({calls} calls)")
    print("heaviest calls (total seconds over the run):")
    stats.sort_stats("tottime").print_stats(r"torch|built-in", 12)


if __name__ == "__main__":
    main()
