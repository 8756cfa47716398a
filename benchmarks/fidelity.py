"""Fidelity benchmark: test accuracy by round of one algorithm over several seeds on one partition.

Prints a table of the test-sample-weighted accuracy of every client's personalized
model on its own test split after each round, as mean ± std over seeds, plus the
best round (PFLlib's ``Best accuracy``), so it can be set beside PFLlib's own log on the
same partition. The partition is built once from ``seed`` (or imported from PFLlib with
``partition=pfllib partition_name=NAME``) and shared by every seed, as PFLlib's repeated
runs share their generated dataset. Usage::

    .venv/bin/python benchmarks/fidelity.py --algo fedfomo --seeds 3 --rounds 20 \\
        partition=dirichlet alpha=0.1 [key=value ...]

Defaults are the PFLlib CIFAR-10 setup (``configs/fedfomo_cifar10_pr0.2.yaml``: 20 clients,
join ratio 0.2, CNN, batch 10, lr 0.005, 1 local epoch). Nothing is tracked.
"""

from __future__ import annotations

import argparse
import statistics

from pfl.federated.engine import Callback, Evaluation


class _Accuracy(Callback):
    """Collects ``test/acc`` per evaluated round."""

    def __init__(self):
        self.by_round: dict[int, float] = {}

    def on_evaluate(self, evaluation: Evaluation) -> None:
        self.by_round[evaluation.round] = evaluation.metrics["test/acc"]


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", required=True, help="algorithm, e.g. fedfomo")
    parser.add_argument("--seeds", type=int, default=3, help="seeds seed .. seed+N-1 (default 3)")
    parser.add_argument("--rounds", type=int, default=20, help="global rounds (default 20)")
    parser.add_argument("--config", default="configs/fedfomo_cifar10_pr0.2.yaml", help="base run config")
    parser.add_argument("overrides", nargs="*", help="run config overrides, e.g. partition=dirichlet alpha=0.1")
    args = parser.parse_args()

    from pfl.config import load_config
    from pfl.train import prepare, run_federated

    cfg = load_config(args.config, [*args.overrides, f"algo={args.algo}", f"global_rounds={args.rounds}",
                                    "eval_gap=1"])
    prepared = prepare(cfg)
    curves = []
    for k in range(args.seeds):
        acc = _Accuracy()
        run_federated(prepared, cfg.seed + k, [acc])
        curves.append(acc.by_round)
        print(f"seed {cfg.seed + k}: final {acc.by_round[args.rounds]:.4f}, best {max(acc.by_round.values()):.4f} "
              f"(round {max(acc.by_round, key=acc.by_round.get)})", flush=True)
    source = cfg.partition_name if cfg.partition == "pfllib" else \
        f"{cfg.partition}" + (f" alpha={cfg.alpha}" if cfg.partition == "dirichlet" else "")
    print(f"\n{args.algo} on {cfg.dataset} ({source}), {cfg.num_clients} clients, join ratio {cfg.join_ratio}, "
          f"{cfg.model}, batch {cfg.batch_size}, lr {cfg.lr}, seeds {cfg.seed}..{cfg.seed + args.seeds - 1}")
    print("| round | test/acc (mean ± std over seeds) |\n|---|---|")
    for rnd in range(1, args.rounds + 1):
        print(f"| {rnd} | {_mean_std([c[rnd] for c in curves])} |")
    print(f"| best | {_mean_std([max(c.values()) for c in curves])} |")


if __name__ == "__main__":
    main()
