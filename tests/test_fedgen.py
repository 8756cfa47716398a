"""FedGen: its losses against hand computations, the client regularizer's switches, and exact resumption."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from conftest import check_exact_resumption
from pfl.federated.engine import Engine, Schedule
from pfl.algorithms.fedgen import (FedGenParams, FedGenUpdate, Generator, diversity_loss, label_weights,
                                   layer_params, teacher_loss)
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import load_state, state_digest, weighted_average
from pfl.models.split import SplitModel


def _build(cifar10_dir, tmp_path, algo: str, *overrides: str):
    """A builder of ``algo`` on 5 CIFAR-10 clients, 2 per round (same config and seed at every call)."""
    from pfl.config import load_config
    from pfl.train import build_algorithm, prepare

    cfg = load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", f"algo={algo}", "num_clients=5",
                             "join_ratio=0.4", "global_rounds=3", "device=cpu", "num_threads=1", "batch_size=64",
                             *overrides])
    prepared = prepare(cfg)
    return lambda: build_algorithm(prepared, seed=0), Schedule(3, cfg.num_join_clients)


# Two clients, two generated samples: client 0 holds 3 of label 0 and 1 of label 1, client 1 one of each, so the
# label shares W (K, U) are [[3/4, 1/4], [1/2, 1/2]]. Client 0's logits give CE (ln 4/3, ln 2), client 1's (ln 2, ln 2).
TEACHER_COUNTS = torch.tensor([[3, 1], [1, 1]])
TEACHER_LABELS = torch.tensor([0, 1])
TEACHER_LOGITS = [torch.tensor([[math.log(3), 0.0], [0.0, 0.0]]), torch.zeros(2, 2)]


def test_label_weights_are_each_clients_share_of_the_label():
    assert label_weights(TEACHER_COUNTS).tolist() == [[0.75, 0.25], [0.5, 0.5]]  # (K, U)


def test_official_teacher_loss_is_mean_weight_times_mean_loss_per_client():
    """serverpFedGen.py multiplies the (B,) losses by a (B, 1) weight: a (B, B) product whose mean is
    mean(w_u) * mean(CE_u). Client 0: (3/4 + 1/2)/2 * (ln 4/3 + ln 2)/2 = 0.625 * 0.490415; client 1: 3/8 ln 2."""
    got = teacher_loss(TEACHER_LOGITS, TEACHER_LABELS, label_weights(TEACHER_COUNTS), form="official")
    ln2 = math.log(2)
    assert got.item() == pytest.approx(0.625 * (math.log(4 / 3) + ln2) / 2 + 0.375 * ln2, rel=1e-6)
    assert got.item() == pytest.approx(0.5664393, abs=1e-6)
    # the official expression itself, broadcast and all
    weights = label_weights(TEACHER_COUNTS)[TEACHER_LABELS].float()
    official = sum(torch.mean(F.cross_entropy(z, TEACHER_LABELS, reduction="none") * weights[:, u].reshape(-1, 1))
                   for u, z in enumerate(TEACHER_LOGITS))
    assert got.item() == pytest.approx(official.item(), rel=1e-6)


def test_per_sample_teacher_loss_weights_each_samples_loss_by_its_labels_share():
    """Client 0: (3/4 ln 4/3 + 1/2 ln 2)/2; client 1: (1/4 ln 2 + 1/2 ln 2)/2."""
    got = teacher_loss(TEACHER_LOGITS, TEACHER_LABELS, label_weights(TEACHER_COUNTS), form="per_sample")
    ln2 = math.log(2)
    assert got.item() == pytest.approx((0.75 * math.log(4 / 3) + 0.5 * ln2) / 2 + (0.25 * ln2 + 0.5 * ln2) / 2,
                                       rel=1e-6)
    assert got.item() == pytest.approx(0.5410978, abs=1e-6)


@pytest.mark.parametrize("form", ["official", "per_sample"])
def test_the_generator_trains_on_the_configured_teacher_loss(cifar10_dir, tmp_path, form):
    """The first generator step's teacher loss (server_epochs=1) is :func:`teacher_loss` of that form on the
    uploaded heads, the labels and noise drawn from the round's generator."""
    build, _ = _build(cifar10_dir, tmp_path, "fedgen", "server_epochs=1", f"teacher_loss={form}")
    fedgen = build()
    assert fedgen.hp.teacher_loss == form
    results = [FitRes(c, fedgen.global_state, 10, torch.zeros(())) for c in (0, 3)]
    gen = load_state(fedgen._new_generator(10), fedgen.generator_state).train()
    counts = fedgen.label_counts[[0, 3]]
    labels, eps = gen.draw(torch.nonzero(counts.max(dim=0).values).flatten(), 64, torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = functional_call(fedgen.distilled, layer_params(fedgen.global_state, "head", torch.device("cpu")),
                                 (gen(labels, eps),))
    expected = teacher_loss([logits, logits], labels, label_weights(counts), form=form)
    got = fedgen.train_generator(results, torch.Generator().manual_seed(7))["server/generator_teacher_loss"]
    assert got == pytest.approx(expected.item(), rel=1e-5)


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
    assert (official.teacher_loss, pfllib.teacher_loss) == ("official", None)  # the official code's broadcast
    with pytest.raises(ValueError, match="KL term"):
        FedGenParams(variant="pfllib", generative_beta=1.0)
    with pytest.raises(ValueError, match="teacher_loss: PFLlib's FedGen"):
        FedGenParams(variant="pfllib", teacher_loss="per_sample")
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


def _regularized_update(batch_size: int = 2) -> FedGenUpdate:
    """A FedGenUpdate on a hand-set generator: G ignores its noise, G(0) = (ln 3, 0) and G(1) = (0, 0)."""
    generator = Generator(num_classes=2, noise_dim=3, hidden=(), feature_dim=2)
    with torch.no_grad():
        generator.net[0].weight.copy_(torch.tensor([[0.0, 0.0, 0.0, math.log(3), 0.0], [0.0] * 5]))
        generator.net[0].bias.zero_()
    return FedGenUpdate(SGDUpdate(batch_size=batch_size, lr=0.1, local_epochs=1), generator.eval())


def _identity_classifier() -> SplitModel:
    """logits = features: an identity base and a 2x2 identity Linear head."""
    model = SplitModel(nn.Identity(), nn.Linear(2, 2))
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(2))
        model.head.bias.zero_()
    return model


@pytest.mark.parametrize(("alpha", "beta"), [(9.604, 0.0), (0.0, 9.604), (9.604, 9.604)])
def test_client_kl_and_alpha_terms_match_a_hand_computation(alpha, beta):
    """userpFedGen.py's loss on a real batch x = [(0, 0), (ln 3, 0)], y = [0, 1] with logits = x:
    CE = (ln 2 + ln 4) / 2 = 1.5 ln 2. KL term: p = softmax(G(y)) = [(3/4, 1/4), (1/2, 1/2)] against
    q = softmax(x) = [(1/2, 1/2), (3/4, 1/4)], summed over classes, averaged over the batch (KLDivLoss
    "batchmean"): (3/4 ln 3/2 + 1/4 ln 1/2 + 1/2 ln 2/3 + 1/2 ln 2) / 2 = ln(3) / 8. Alpha term: 4 generated
    samples, all of label 1 (the pool), CE(softmax(G(1)) = (1/2, 1/2), 1) = ln 2, times gen_ratio = 4 / 2.
    9.604 = 10 * 0.98 ** 2, round 3's decayed coefficient."""
    update, model = _regularized_update(), _identity_classifier()
    x, y = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]]), torch.tensor([0, 1])
    extras = {"generator": {}, "alpha": alpha, "beta": beta, "labels": torch.tensor([1]),
              "rng": torch.Generator().manual_seed(0), "gen_batch": 4, "gen_ratio": 4 / 2, "gen_train": False}
    got = update.loss(model, x, y, FitIns({}, extras=extras))
    ln2 = math.log(2)
    assert got.item() == pytest.approx(1.5 * ln2 + beta * math.log(3) / 8 + 2 * alpha * ln2, rel=1e-6)
    # the official terms, written as userpFedGen.py writes them (log-probabilities, NLLLoss, KLDivLoss)
    logp = F.log_softmax(model(x), dim=1)
    target = F.softmax(model.head(update.generator(y, torch.zeros(2, 3))), dim=1)
    sampled = torch.ones(4, dtype=torch.long)
    gen_logp = F.log_softmax(model.head(update.generator(sampled, torch.zeros(4, 3))), dim=1)
    official = (nn.NLLLoss()(logp, y) + beta * nn.KLDivLoss(reduction="batchmean")(logp, target)
                + 4 / 2 * alpha * torch.mean(nn.NLLLoss(reduction="none")(gen_logp, sampled)))
    assert got.item() == pytest.approx(official.item(), rel=1e-6)


def test_client_terms_need_their_coefficients():
    """No generator extra (round 1, warm-up): plain cross-entropy, 1.5 ln 2 on the hand-computed batch."""
    update, model = _regularized_update(), _identity_classifier()
    x, y = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]]), torch.tensor([0, 1])
    assert update.loss(model, x, y, FitIns({})).item() == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_official_round_one_is_unregularized_and_pfllib_regularizes_from_round_one(cifar10_dir, tmp_path):
    build, _ = _build(cifar10_dir, tmp_path, "fedgen", "server_epochs=2")
    official = build()
    assert official.coefficients(1) == (0.0, 0.0) and official.coefficients(2) == (10.0 * 0.98, 10.0 * 0.98)
    # exp_lr_scheduler(glob_iter = r - 1, decay=0.98): round 3 is 10 * 0.98^2; from round 571 the 1e-4 floor
    assert official.coefficients(3) == pytest.approx((9.604, 9.604))
    assert official.coefficients(570)[0] == pytest.approx(10 * 0.98 ** 569) and 10 * 0.98 ** 569 > 1e-4
    assert official.coefficients(571) == (1e-4, 1e-4) and 10 * 0.98 ** 570 < 1e-4
    extras = official.configure_fit(0, 3).extras  # gen_batch_size 32 against the run's batch of 64
    assert (extras["alpha"], extras["gen_batch"], extras["gen_ratio"], extras["gen_train"]) == \
        (pytest.approx(9.604), 32, 0.5, False)
    build, _ = _build(cifar10_dir, tmp_path, "fedgen", "variant=pfllib", "server_epochs=2", "noise_dim=8")
    assert build().coefficients(1) == (1.0, 0.0)


def test_pfllib_variant_distills_into_the_last_linear_and_localized_clients_share_only_it(cifar10_dir, tmp_path):
    """PFLlib's head is model.fc (main.py), the CNN's last Linear: G outputs its 512 inputs, and with
    localize_feature_extractor only head.2 (fc) is averaged and sent (serverGen.receive_models uploads
    client.model.head; clientGen.set_parameters loads model.head only); conv layers and fc1 stay per client."""
    build, schedule = _build(cifar10_dir, tmp_path, "fedgen", "variant=pfllib", "localize_feature_extractor=true",
                             "server_epochs=2", "noise_dim=8")
    fedgen = build()
    assert fedgen.layer == "head.2" and fedgen.generator.net[-1].out_features == 512
    assert fedgen._shared_keys() == ["head.2.weight", "head.2.bias"]
    initial = dict(fedgen.global_state)
    engine = Engine(fedgen, schedule)
    selected = engine.sample_clients(1)
    results = engine.fit_clients(selected, 1)
    fedgen.aggregate_fit(1, results)
    shared = weighted_average([r.state for r in results], [r.num_samples for r in results], fedgen._shared_keys())
    assert all(torch.equal(fedgen.global_state[k], shared[k]) for k in shared)
    for r in results:  # each client starts its next round from its own base and fc1 and the averaged fc
        start = fedgen.configure_fit(r.client_id, 2).state
        for key, value in start.items():
            expected = shared[key] if key in shared else r.state[key]
            assert torch.equal(value, expected), key
        assert not torch.equal(start["head.0.weight"], initial["head.0.weight"])
    idle = next(c for c in range(5) if c not in selected)  # never trained: initial base and fc1, averaged fc
    assert torch.equal(fedgen.personalized_state(idle)["head.0.weight"], initial["head.0.weight"])
    assert torch.equal(fedgen.personalized_state(idle)["head.2.weight"], shared["head.2.weight"])


def test_pfllib_variant_without_localizing_shares_the_whole_model(cifar10_dir, tmp_path):
    build, _ = _build(cifar10_dir, tmp_path, "fedgen", "variant=pfllib", "server_epochs=2", "noise_dim=8")
    fedgen = build()
    assert fedgen.layer == "head.2" and fedgen._shared_keys() == list(fedgen.global_state)
    official, _ = _build(cifar10_dir, tmp_path, "fedgen", "server_epochs=2")
    assert official().layer == "head"  # pfl's deliberate difference: the official variant distills the whole head


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


# The official command lines (zhuangdizhu/FedGen README.md lines 34 and 44, batch_run_jobs.sh): --num_users 10
# of the 20 users (data/*/generate_niid_dirichlet.py --n_user 20 --alpha 0.1), --batch_size 32, --learning_rate
# 0.01, --num_glob_iters 200, --times 3; each dataset's own train and test sets split apart. The generator:
# utils/model_config.py RUNCONFIGS['mnist'] and GENERATORCONFIGS['cifar'], main.py --gen_batch_size 32.
OFFICIAL_RUN = {"num_clients": 20, "num_join_clients": 10, "partition": "dirichlet", "alpha": 0.1,
                "official_split": True, "batch_size": 32, "drop_last": True, "lr": 0.01, "optimizer": "sgd",
                "global_rounds": 200, "repeats": 3, "random_crop": 0, "hflip": False}
OFFICIAL_GENERATOR = {"variant": "official", "gen_hidden": (512,), "noise_dim": 64, "server_epochs": 50,
                      "gen_lr": 3e-4, "gen_weight_decay": 1e-2, "gen_lr_decay": 0.98, "gen_batch_size": 32,
                      "generative_alpha": 10.0, "generative_beta": 10.0, "decay": 0.98, "diversity_weight": 1.0,
                      "teacher_loss": "official", "generator_warmup_rounds": 0}


@pytest.mark.parametrize("template", ["fedgen_cifar10.yaml", "fedgen_cifar10_cpu.yaml"])
def test_fedgen_templates_hold_the_official_settings(template):
    """The GPU template is the official setting; its CPU twin differs only in rounds, generator steps and seeds."""
    from pfl.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / template)
    run = {k: getattr(cfg, k) for k in OFFICIAL_RUN}
    generator = {k: cfg.hparams[k] for k in OFFICIAL_GENERATOR}
    if template.endswith("_cpu.yaml"):
        assert (run.pop("global_rounds"), run.pop("repeats"), generator.pop("server_epochs")) == (3, 1, 10)
    assert run == {k: v for k, v in OFFICIAL_RUN.items() if k in run}
    assert generator == {k: v for k, v in OFFICIAL_GENERATOR.items() if k in generator}
    assert FedGenParams(**{k: v for k, v in OFFICIAL_GENERATOR.items() if k != "generator_warmup_rounds"}) == \
        FedGenParams()  # the official variant's defaults are these values

