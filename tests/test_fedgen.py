"""FedGen: its losses against hand computations, the client regularizer's switches, and exact resumption."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import check_exact_resumption
from pfl.algorithms.engine import Engine, Schedule
from pfl.algorithms.fedgen import FedGenParams, diversity_loss, label_weights, teacher_loss
from pfl.algorithms.state import state_digest


def _build(cifar10_dir, tmp_path, algo: str, *overrides: str):
    """A builder of ``algo`` on 5 CIFAR-10 clients, 2 per round (same config and seed at every call)."""
    from pfl.config import load_config
    from pfl.train import build_algorithm, prepare

    cfg = load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", f"algo={algo}", "num_clients=5",
                             "join_ratio=0.4", "global_rounds=3", "device=cpu", "num_threads=1", "batch_size=64",
                             *overrides])
    prepared = prepare(cfg)
    return lambda: build_algorithm(prepared, seed=0), Schedule(3, cfg.num_join_clients)


def test_teacher_loss_weights_each_clients_cross_entropy_by_its_label_share():
    counts = torch.tensor([[3, 1], [1, 1]])  # client 0 holds 3 of label 0, client 1 one of each
    weights = label_weights(counts)
    assert weights.tolist() == [[0.75, 0.25], [0.5, 0.5]]  # (K, U)
    labels = torch.tensor([0, 1])
    logits = [torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]), torch.zeros(2, 2)]
    got = teacher_loss(logits, labels, weights)
    ln2 = math.log(2)
    expected = (0.75 * math.log(4 / 3) + 0.5 * ln2) / 2 + (0.25 * ln2 + 0.5 * ln2) / 2
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_label_weights_of_a_label_no_client_holds_are_zero():
    assert label_weights(torch.tensor([[2, 0], [2, 0]])).tolist() == [[0.5, 0.5], [0.0, 0.0]]


def test_diversity_loss_matches_the_direct_formula_on_4_samples():
    gen = torch.Generator().manual_seed(0)
    eps, z = torch.rand(4, 3, generator=gen), torch.randn(4, 5, generator=gen)
    total = 0.0
    for i in range(4):
        for j in range(4):
            noise = sum((eps[i, d] - eps[j, d]).item() ** 2 for d in range(3)) / 3
            feature = sum(abs((z[i, d] - z[j, d]).item()) for d in range(5)) / 5
            total += noise * feature
    assert diversity_loss(eps, z).item() == pytest.approx(math.exp(-total / 16), rel=1e-6)


def test_variant_defaults_and_checks():
    official, pfllib = FedGenParams(), FedGenParams(variant="pfllib")
    assert (official.noise_dim, official.server_epochs, official.generative_alpha, official.diversity_weight) == \
        (64, 50, 10.0, 1.0)
    assert (pfllib.noise_dim, pfllib.server_epochs, pfllib.generative_alpha, pfllib.generative_beta) == \
        (512, 1000, 1.0, 0.0)
    assert FedGenParams(diversity_weight=0).diversity_weight == 0
    with pytest.raises(ValueError, match="KL term"):
        FedGenParams(variant="pfllib", generative_beta=1.0)
    with pytest.raises(ValueError, match="PFLlib's switch"):
        FedGenParams(localize_feature_extractor=True)
    with pytest.raises(ValueError):
        FedGenParams(decay=1.5)


@pytest.mark.parametrize("overrides", [("generative_alpha=0", "generative_beta=0"), ("generator_warmup_rounds=2",)])
def test_unregularized_clients_train_exactly_as_fedavg(cifar10_dir, tmp_path, overrides):
    """Zero coefficients, or the warm-up rounds: two rounds leave the global model bit-identical to FedAvg's,
    while the generator still trains."""
    fedgen_build, schedule = _build(cifar10_dir, tmp_path, "fedgen", "server_epochs=2", *overrides)
    fedavg_build, _ = _build(cifar10_dir, tmp_path, "fedavg")
    fedgen, fedavg = fedgen_build(), fedavg_build()
    initial_generator = state_digest(fedgen.generator_state)
    engines = Engine(fedgen, schedule), Engine(fedavg, schedule)
    for rnd in (1, 2):
        assert not fedgen.configure_fit(0, rnd).extras
        a, b = (e.run_round(rnd) for e in engines)
        assert a["train/loss"] == b["train/loss"]
        assert {"server/generator_teacher_loss", "server/generated_acc", "server/generated_acc_c3"} <= set(a)
    assert state_digest(fedgen.global_state) == state_digest(fedavg.global_state)
    assert state_digest(fedgen.generator_state) != initial_generator
    if overrides == ("generator_warmup_rounds=2",):
        extras = fedgen.configure_fit(0, 3).extras
        assert extras["alpha"] == pytest.approx(10 * 0.98 ** 2) and extras["beta"] == pytest.approx(10 * 0.98 ** 2)


def test_official_round_one_is_unregularized_and_pfllib_regularizes_from_round_one(cifar10_dir, tmp_path):
    build, _ = _build(cifar10_dir, tmp_path, "fedgen", "server_epochs=2")
    official = build()
    assert official.coefficients(1) == (0.0, 0.0) and official.coefficients(2) == (10.0 * 0.98, 10.0 * 0.98)
    build, _ = _build(cifar10_dir, tmp_path, "fedgen", "variant=pfllib", "server_epochs=2", "noise_dim=8")
    assert build().coefficients(1) == (1.0, 0.0)


def test_eval_personalized_scores_each_clients_upload_beside_the_global_model(cifar10_dir, tmp_path):
    build, _ = _build(cifar10_dir, tmp_path, "fedgen", "server_epochs=2", "eval_personalized=true")
    fedgen = build()
    engine = Engine(fedgen, Schedule(1, 2))
    selected = engine.sample_clients(1)
    engine.run_round(1)
    evaluation = engine.evaluate(1)
    assert {"finetuned/acc", "finetuned/f_ece", "test/acc"} <= set(evaluation.metrics)
    for row in evaluation.per_client:
        if row["client"] in selected:  # its last upload, not the global model
            assert state_digest(fedgen.extra_models()["finetuned"](row["client"])) != \
                state_digest(fedgen.global_state)
        else:  # has not taken part: the global model, scored alike
            assert row["finetuned_acc"] == row["acc"] and row["finetuned_nll"] == row["nll"]
    assert not build().extra_models()["finetuned"].__self__.written()


@pytest.mark.parametrize("overrides", [("eval_personalized=true",),
                                       ("variant=pfllib", "localize_feature_extractor=true", "noise_dim=8")])
def test_fedgen_resumes_exactly(cifar10_dir, tmp_path, overrides):
    """Round 3 after a restore is bit-identical (conftest.check_exact_resumption), the generator, Adam's moments
    and learning rate and the localized bases included."""
    original, resumed = check_exact_resumption(cifar10_dir, tmp_path, "fedgen", "server_epochs=3", "batch_size=64",
                                               *overrides)
    assert original.generator_opt and original.generator_lr == resumed.generator_lr
    assert state_digest(original.server_models()["generator"]) == state_digest(resumed.generator_state)
