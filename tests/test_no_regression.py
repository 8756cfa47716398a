"""No-regression pin of the core: FedAvg, FedFomo and FedALA metrics on a fixed small run, bit for bit.

Reduced CIFAR-100 (the session slice), 10 clients (pathological, 10 classes each), join ratio
0.4, 3 global rounds, the 4-layer CNN, seed 0, one thread. The pinned numbers were recorded
on the flat-vector core (commit 0717af3) before the named-state reshape of issue 13; the new
core must reproduce them exactly on CPU (every round's training loss, and the test accuracy,
NLL and F-ECE of every evaluation).
"""

from __future__ import annotations

import pytest

from pfl.federated.engine import Callback, Evaluation
from pfl.config import load_config
from pfl.train import prepare, run_federated

PINNED: dict[str, list[tuple[float, float, float, float]]] = {  # algo -> per round (train_loss, acc, nll, ece)
    "fedavg": [(4.582725611348815, 0.011928429419756173, 4.605979590482313, 0.021599469395358093),
               (4.558176960347619, 0.011928429419756173, 4.604561009416523, 0.02184238770484154),
               (4.557207023541545, 0.012922465551281662, 4.604272598300729, 0.02292738107234891)],
    "fedfomo": [(4.590208873275883, 0.050695826121741096, 4.583666458755554, 0.057430991405810025),
                (4.52686386020637, 0.055666004811185846, 4.549118903711824, 0.06241502223358625),
                (4.4949945350145475, 0.07654075676882659, 4.5089285122471345, 0.08219182904380157)],
    "fedala": [(4.582725611348815, 0.013916500979223497, 4.604783525997791, 0.02335096157024472),
               (4.555938223948935, 0.014910536744144873, 4.603155678830611, 0.02449573333251103),
               (4.554912147126667, 0.012922465551281662, 4.603029137814258, 0.022938749844589774)],
}


class _Record(Callback):
    def __init__(self):
        self.rounds: list[list[float]] = []

    def on_round_end(self, rnd: int, metrics: dict[str, float]) -> None:
        self.rounds.append([metrics["train/loss"]])

    def on_evaluate(self, evaluation: Evaluation) -> None:
        self.rounds[-1] += [evaluation.metrics[k] for k in ("test/acc", "test/nll", "test/f_ece")]


@pytest.mark.parametrize("algo", ["fedavg", "fedfomo", "fedala"])
def test_metrics_are_bit_identical_to_the_flat_core(algo, cifar100_dir, tmp_path):
    cfg = load_config(None, [f"algo={algo}", "dataset=cifar100", f"data_dir={cifar100_dir}",
                             f"cache_dir={tmp_path}", "num_clients=10", "join_ratio=0.4", "global_rounds=3",
                             "num_threads=1", "seed=0", "device=cpu"] + (["M=3"] if algo == "fedfomo" else []))
    record = _Record()
    run_federated(prepare(cfg), cfg.seed, [record])
    got = [tuple(r) for r in record.rounds]
    assert got == PINNED[algo]
