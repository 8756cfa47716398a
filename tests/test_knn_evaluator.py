"""The kNN evaluator on real CIFAR-10 clients: one bank per distinct model, the accuracy as computed directly."""

from __future__ import annotations

import torch

from pfl.federated.evaluation import KNNEvaluator, base_features
from pfl.config import load_config
from pfl.metrics import knn_accuracy
from pfl.train import build_algorithm, prepare


def test_knn_evaluator_scores_each_model_on_its_own_split_against_the_shared_bank(cifar10_dir, tmp_path):
    cfg = load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", "algo=fedavg", "model=resnet18_sfl",
                             "model_width=0.125",
                             "num_clients=3", "partition=iid", "device=cpu", "num_threads=1"])
    ctx = build_algorithm(prepare(cfg), seed=0).ctx
    spec = ctx.specs[0]
    state = ctx.init_state(0)
    tests = [c.test[:50] for c in ctx.clients]
    scores = KNNEvaluator(k=20).score(ctx, spec, [state] * 3, tests, ece_bins=15)
    bank_idx = torch.cat([c.fit for c in ctx.clients])
    labels = ctx.runner.data.targets
    bank = base_features(ctx, spec, state, bank_idx)
    assert bank.shape == (len(bank_idx), 64)
    for score, idx in zip(scores, tests):
        direct = knn_accuracy(bank, labels[bank_idx], base_features(ctx, spec, state, idx), labels[idx], 10, k=20)
        assert score == {"knn_acc": direct} and 0 <= direct <= 1


def test_linear_probe_separates_linearly_separable_features():
    from pfl.federated.evaluation import linear_probe

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=gen)
    features = torch.nn.functional.one_hot(labels, 3).float() * 4 + 0.3 * torch.randn(300, 3, generator=gen)
    classifier = linear_probe(features, labels, 3, epochs=30, lr=0.05, seed=0)
    assert (classifier(features).argmax(1) == labels).float().mean() == 1.0
    again = linear_probe(features, labels, 3, epochs=30, lr=0.05, seed=0)
    assert torch.equal(again.weight, classifier.weight)  # the seed fixes initialization and batch order
