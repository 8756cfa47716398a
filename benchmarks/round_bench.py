"""Round benchmark: seconds per round of FedAvg, FedFomo and FedALA, sequential vs vectorized clients.

Settings of issue 7 (PFLlib's FedFomo setup): full CIFAR-10, 4-layer CNN, 20 clients,
pathological 2 classes per client, join ratio 0.2, batch 10, lr 0.005, 1 local epoch,
every client evaluated every round. Each (algorithm, mode) runs in its own subprocess
(so peak memory is its own) for ``--rounds`` rounds; the first round is a warm-up and
is left out of the statistics. The figures come from the engine's timers around the
real code paths (``time/local``, ``time/aggregate``, ``time/eval``). Printed per run:
seconds per round (min / median / max), training samples per second, the time shares
of local work, aggregation and evaluation, peak host RSS and (on a GPU) peak allocated
device memory; then the sequential / vectorized ratio. Everything is logged to an MLflow
run tagged ``benchmark``. Usage::

    .venv/bin/python benchmarks/round_bench.py [--rounds 6] [--algos fedavg fedfomo fedala] [key=value ...]
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch

from pfl.federated.engine import Callback, Evaluation
from pfl.benchmarking import measure_in_subprocess, parse_args

MODES = ("sequential", "vectorized")


class _Timer(Callback):
    def __init__(self):
        self.rounds: list[dict[str, float]] = []

    def on_round_end(self, rnd: int, metrics: dict[str, float]) -> None:
        self.rounds.append(dict(metrics))

    def on_evaluate(self, evaluation: Evaluation) -> None:
        self.rounds[-1]["time/eval"] = evaluation.metrics["time/eval"]


def measure(overrides: list[str]) -> dict[str, float]:
    """Run one configuration in this process; returns its figures (after the warm-up round)."""
    from pfl.config import load_config
    from pfl.train import prepare, run_federated

    cfg = load_config("configs/fedfomo_cifar10_pr0.2.yaml", overrides)
    timer = _Timer()
    run_federated(prepare(cfg), cfg.seed, [timer])
    rounds = timer.rounds[1:]
    total = [r["time/round"] + r["time/eval"] for r in rounds]
    spent = {k: sum(r[f"time/{k}"] for r in rounds) for k in ("local", "aggregate", "eval")}
    out = {"s_per_round_min": min(total), "s_per_round_median": statistics.median(total),
           "s_per_round_max": max(total), "train_samples_per_s": sum(r["train/samples"] for r in rounds)
           / spent["local"], **{f"share_{k}": v / sum(total) for k, v in spent.items()},
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["peak_device_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run, the first one a warm-up")
    parser.add_argument("--algos", nargs="+", default=["fedavg", "fedfomo", "fedala"])
    args = parse_args(parser, measure)
    results = {}
    for algo in args.algos:
        for mode in MODES:
            overrides = [f"algo={algo}", f"client_parallelism={mode}", f"global_rounds={args.rounds}",
                         "experiment=benchmark", *args.overrides]
            r = results[(algo, mode)] = measure_in_subprocess(__file__, overrides)
            print(f"{algo:8} {mode:10} s/round {r['s_per_round_min']:.2f} / {r['s_per_round_median']:.2f} / "
                  f"{r['s_per_round_max']:.2f}  samples/s {r['train_samples_per_s']:.0f}  shares local "
                  f"{r['share_local']:.2f} agg {r['share_aggregate']:.2f} eval {r['share_eval']:.2f}  "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB" + _device_memory(r), flush=True)
        ratio = results[(algo, "sequential")]["s_per_round_median"] / results[(algo, "vectorized")]["s_per_round_median"]
        print(f"{algo:8} sequential / vectorized median s/round: {ratio:.2f}x", flush=True)
    _log(results, args)


def _device_memory(figures: dict[str, float]) -> str:
    return f"  peak device {figures['peak_device_mb']:.0f} MB" if "peak_device_mb" in figures else ""


def _log(results: dict, args: argparse.Namespace) -> None:
    import mlflow

    from pfl import tracking

    tracking.configure_tracking()
    mlflow.set_experiment("benchmark")
    with mlflow.start_run(run_name="round-benchmark", tags={"pfl.kind": "benchmark", "benchmark": "rounds"}):
        mlflow.log_params({"rounds": args.rounds, "overrides": " ".join(args.overrides)})
        mlflow.log_metrics({f"{algo}.{mode}.{k}": v for (algo, mode), r in results.items() for k, v in r.items()})


if __name__ == "__main__":
    main()
