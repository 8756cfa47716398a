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

With ``--pfllib-log FILE`` (PFLlib's ``system/main.py`` stdout, one file per run or one of ``-t N`` runs; repeat
the flag for several files) it also prints the side-by-side table at ``--at`` rounds: pfl's mean ± std over seeds beside PFLlib's runs
(their mean ± std; PFLlib's evaluation at ``Round number: k`` follows k trained rounds, as pfl's round k), and
the seconds per round of both: pfl's ``time/round`` and ``time/round + time/eval`` (mean over rounds and seeds),
PFLlib's ``Average time cost per round`` (training, aggregation and its evaluation of every client, which also
scores each client's train split).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from pfl.federated.engine import Callback, Evaluation


class _Accuracy(Callback):
    """Collects ``test/acc`` per evaluated round and each round's ``time/round`` and ``time/eval`` (seconds)."""

    def __init__(self):
        self.by_round: dict[int, float] = {}
        self.seconds: list[float] = []
        self.eval_seconds: list[float] = []

    def on_round_end(self, rnd: int, metrics: dict[str, float]) -> None:
        self.seconds.append(metrics["time/round"])

    def on_evaluate(self, evaluation: Evaluation) -> None:
        self.by_round[evaluation.round] = evaluation.metrics["test/acc"]
        self.eval_seconds.append(evaluation.metrics["time/eval"])
        print(f"round {evaluation.round}: test/acc {evaluation.metrics['test/acc']:.4f}", file=sys.stderr, flush=True)


def pfllib_runs(paths: list[str]) -> tuple[list[dict[int, float]], list[float]]:
    """PFLlib runs from ``main.py`` stdout files: per run, ``Averaged Test Accuracy`` by ``Round number``, and its
    ``Average time cost per round`` (seconds). A file of ``-t N`` holds N runs (each restarts at round 0). FedBABU's
    evaluation of its fine-tuned models, after its last round, counts as the round after it (run it with ``-gr R-1``
    beside pfl's R rounds: PFLlib's loop trains ``-gr`` + 1 rounds)."""
    runs: list[dict[int, float]] = []
    seconds: list[float] = []
    for path in paths:
        lines = Path(path).read_text().splitlines()
        rnd = None
        for k, line in enumerate(lines):
            if m := re.match(r"-+Round number: (\d+)-+", line.strip()):
                rnd = int(m.group(1))
                if rnd == 0:
                    runs.append({})
            elif "Evaluate fine-tuned" in line and runs:  # FedBABU: fine-tuned after the last round (-gr R-1: R)
                rnd = max(runs[-1]) + 1
            elif (m := re.match(r"Averaged Test Accuracy: ([\d.]+)", line)) and rnd is not None:
                runs[-1][rnd] = float(m.group(1))
            elif line.startswith("Average time cost per round") and k + 1 < len(lines):
                seconds.append(float(lines[k + 1]))
    return runs, seconds


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", required=True, help="algorithm, e.g. fedfomo")
    parser.add_argument("--seeds", type=int, default=3, help="seeds seed .. seed+N-1 (default 3)")
    parser.add_argument("--rounds", type=int, default=20, help="global rounds (default 20)")
    parser.add_argument("--config", default="configs/fedfomo_cifar10_pr0.2.yaml", help="base run config")
    parser.add_argument("--pfllib-log", action="append", default=[], metavar="FILE",
                        help="PFLlib main.py stdout of the same setting, for the side-by-side table (repeat the flag "
                             "for several runs)")
    parser.add_argument("--at", type=int, nargs="+", default=[1, 5, 10, 20], help="rounds of the side-by-side table")
    parser.add_argument("overrides", nargs="*", help="run config overrides, e.g. partition=dirichlet alpha=0.1")
    args = parser.parse_args()

    from pfl.config import load_config
    from pfl.train import prepare, run_federated

    cfg = load_config(args.config, [*args.overrides, f"algo={args.algo}", f"global_rounds={args.rounds}",
                                    "eval_gap=1"])
    prepared = prepare(cfg)
    curves, seconds, eval_seconds = [], [], []
    for k in range(args.seeds):
        acc = _Accuracy()
        run_federated(prepared, cfg.seed + k, [acc])
        curves.append(acc.by_round)
        seconds += acc.seconds
        eval_seconds += acc.eval_seconds
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
    if args.pfllib_log:
        runs, pfllib_seconds = pfllib_runs(args.pfllib_log)
        print(f"\n{args.algo}: pfl (seeds {cfg.seed}..{cfg.seed + args.seeds - 1}) beside PFLlib ({len(runs)} runs)")
        print("| round | pfl test/acc | PFLlib test acc | gap (pfl - PFLlib) |\n|---|---|---|---|")
        for rnd in args.at:
            ours, theirs = [c[rnd] for c in curves], [r[rnd] for r in runs if rnd in r]
            gap = statistics.mean(ours) - statistics.mean(theirs) if theirs else float("nan")
            print(f"| {rnd} | {_mean_std(ours)} | {_mean_std(theirs) if theirs else '—'} | {gap:+.4f} |")
        per_round = statistics.mean(seconds)
        with_eval = per_round + statistics.mean(eval_seconds) * len(eval_seconds) / len(seconds)
        print(f"s/round: pfl {per_round:.2f} (training and aggregation), {with_eval:.2f} with evaluation; PFLlib "
              f"{statistics.mean(pfllib_seconds):.2f} with evaluation" if pfllib_seconds else "")


if __name__ == "__main__":
    main()
