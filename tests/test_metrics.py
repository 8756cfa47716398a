"""Metrics on small inputs whose expected values are computed by hand in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from pfl.metrics import accuracy, aggregate_clients, brier, classification_metrics, ece, nll, weighted_mean

# Four samples, two classes.
#   sample  probs        label  conf  pred  correct
#   s0      [0.9, 0.1]   0      0.9   0     1
#   s1      [0.6, 0.4]   1      0.6   0     0
#   s2      [0.2, 0.8]   1      0.8   1     1
#   s3      [0.3, 0.7]   0      0.7   1     0
PROBS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 0])


def test_accuracy_hand_computed():
    # s0 and s2 are correct: 2 / 4 = 0.5
    assert accuracy(PROBS, LABELS) == pytest.approx(0.5)


def test_nll_hand_computed():
    # p(true class) = 0.9, 0.4, 0.8, 0.3
    # NLL = -(ln 0.9 + ln 0.4 + ln 0.8 + ln 0.3) / 4
    #     = -(-0.1053605 - 0.9162907 - 0.2231436 - 1.2039728) / 4 = 2.4487676 / 4 = 0.6121919
    expected = -(math.log(0.9) + math.log(0.4) + math.log(0.8) + math.log(0.3)) / 4
    assert expected == pytest.approx(0.6121919, abs=1e-6)
    assert nll(PROBS, LABELS) == pytest.approx(expected, rel=1e-9)


def test_nll_clamps_zero_probability():
    # p(true) = 0 is clamped to 1e-12: NLL = -ln(1e-12) = 27.631...
    probs = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    value = nll(probs, torch.tensor([1]))
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(1e-12), rel=1e-9)


def test_brier_hand_computed():
    # s0: (0.9-1)^2 + 0.1^2       = 0.01 + 0.01 = 0.02
    # s1: 0.6^2 + (0.4-1)^2       = 0.36 + 0.36 = 0.72
    # s2: 0.2^2 + (0.8-1)^2       = 0.04 + 0.04 = 0.08
    # s3: (0.3-1)^2 + 0.7^2       = 0.49 + 0.49 = 0.98
    # mean = (0.02 + 0.72 + 0.08 + 0.98) / 4 = 1.8 / 4 = 0.45
    assert brier(PROBS, LABELS) == pytest.approx(0.45)


def test_brier_bounds():
    # perfect one-hot prediction -> 0; confident wrong prediction -> 1^2 + 1^2 = 2
    assert brier(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == pytest.approx(0.0)
    assert brier(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == pytest.approx(2.0)


def test_ece_adaptive_two_bins_hand_computed():
    # Equal-mass bins of 2 samples each, by sorted confidence 0.6 (s1), 0.7 (s3), 0.8 (s2), 0.9 (s0):
    #   bin 0 = {s1, s3}: sum(correct - conf) = (0 - 0.6) + (0 - 0.7) = -1.3 -> |.| = 1.3
    #   bin 1 = {s2, s0}: sum(correct - conf) = (1 - 0.8) + (1 - 0.9) =  0.3 -> |.| = 0.3
    # ECE = sum_b |B_b|/N * |acc_b - conf_b| = (1.3 + 0.3) / 4 = 0.4
    assert ece(PROBS, LABELS, n_bins=2, binning="adaptive") == pytest.approx(0.4)


def test_ece_uniform_two_bins_hand_computed():
    # Uniform bins (0, 0.5] and (0.5, 1]: all four confidences (0.6..0.9) fall in bin 1:
    #   sum(correct - conf) = -0.6 - 0.7 + 0.2 + 0.1 = -1.0 -> ECE = 1.0 / 4 = 0.25
    assert ece(PROBS, LABELS, n_bins=2, binning="uniform") == pytest.approx(0.25)


def test_ece_uniform_four_bins_hand_computed():
    # Uniform bins (0,.25], (.25,.5], (.5,.75], (.75,1]:
    #   bin 2 = {0.6, 0.7}: |-0.6 - 0.7| = 1.3 ; bin 3 = {0.8, 0.9}: |0.2 + 0.1| = 0.3
    # ECE = (1.3 + 0.3) / 4 = 0.4
    assert ece(PROBS, LABELS, n_bins=4, binning="uniform") == pytest.approx(0.4)


def test_ece_default_is_adaptive():
    # With 4 samples and the default 20 equal-mass bins, rank r goes to bin r*20//4 = 5r:
    # every sample in its own bin, so ECE = mean |correct - conf|
    #   = (|1-0.9| + |0-0.6| + |1-0.8| + |0-0.7|) / 4 = (0.1 + 0.6 + 0.2 + 0.7) / 4 = 0.4
    assert ece(PROBS, LABELS) == pytest.approx(0.4)
    assert ece(PROBS, LABELS) == pytest.approx(ece(PROBS, LABELS, n_bins=20, binning="adaptive"))


def test_ece_zero_when_confident_and_correct():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert ece(probs, torch.tensor([0, 1]), n_bins=2) == pytest.approx(0.0)
    assert ece(probs, torch.tensor([0, 1]), n_bins=2, binning="uniform") == pytest.approx(0.0)


def test_ece_accepts_float32_and_matches_float64():
    assert ece(PROBS.float(), LABELS, n_bins=2) == pytest.approx(0.4, abs=1e-6)


def test_ece_empty_input_raises():
    with pytest.raises(ValueError, match="empty"):
        ece(torch.empty(0, 2), torch.empty(0, dtype=torch.long))


def test_ece_unknown_binning_raises():
    with pytest.raises(ValueError, match="binning"):
        ece(PROBS, LABELS, binning="quantile")


def test_classification_metrics_bundle():
    m = classification_metrics(PROBS, LABELS, n_bins=2)
    assert set(m) == {"acc", "nll", "ece", "brier"}
    assert m["acc"] == pytest.approx(0.5)
    assert m["ece"] == pytest.approx(0.4)
    assert m["brier"] == pytest.approx(0.45)


def test_weighted_mean_is_f_ece():
    # client ECEs 0.1 (10 test samples) and 0.3 (30 test samples):
    # F-ECE = (0.1*10 + 0.3*30) / 40 = (1 + 9) / 40 = 0.25  (the unweighted mean would be 0.2)
    assert weighted_mean([0.1, 0.3], [10, 30]) == pytest.approx(0.25)


def test_weighted_mean_errors():
    with pytest.raises(ValueError, match="2 values but 3 weights"):
        weighted_mean([0.1, 0.3], [1, 2, 3])
    with pytest.raises(ValueError, match="positive"):
        weighted_mean([0.1, 0.3], [0, 0])


def test_aggregate_clients_weighted_mean_and_population_std():
    # acc values 1, 2, 3 with weights 1, 1, 2:
    #   weighted mean = (1 + 2 + 6) / 4 = 2.25
    #   unweighted population std: mean 2, sqrt(((1-2)^2 + 0 + (3-2)^2) / 3) = sqrt(2/3) = 0.8164966
    # ece values 0.1, 0.1, 0.4 with the same weights:
    #   weighted mean = (0.1 + 0.1 + 0.8) / 4 = 0.25
    #   population std: mean 0.2, sqrt((0.01 + 0.01 + 0.04) / 3) = sqrt(0.02) = 0.1414214
    per_client = [{"acc": 1.0, "ece": 0.1}, {"acc": 2.0, "ece": 0.1}, {"acc": 3.0, "ece": 0.4}]
    out = aggregate_clients(per_client, [1, 1, 2])
    assert set(out) == {"acc", "acc_std", "ece", "ece_std"}
    assert out["acc"] == pytest.approx(2.25)
    assert out["acc_std"] == pytest.approx(math.sqrt(2 / 3))
    assert out["ece"] == pytest.approx(0.25)
    assert out["ece_std"] == pytest.approx(math.sqrt(0.02))


def test_aggregate_clients_single_client_has_zero_std():
    out = aggregate_clients([{"acc": 0.7}], [5])
    assert out == {"acc": pytest.approx(0.7), "acc_std": 0.0}


def test_aggregate_clients_mismatched_weights_raise():
    with pytest.raises(ValueError, match="weights"):
        aggregate_clients([{"acc": 0.5}, {"acc": 0.6}], [1])


@pytest.mark.parametrize("n_bins", [15, 10])
def test_uniform_ece_matches_torchmetrics_on_random_inputs(n_bins):
    from pfl._torchvision import import_torchvision

    import_torchvision()  # torchmetrics imports torchvision, whose CPU import needs the shim
    from torchmetrics.functional.classification import multiclass_calibration_error

    gen = torch.Generator().manual_seed(n_bins)
    probs = torch.softmax(3 * torch.randn(2000, 7, generator=gen), dim=1)
    labels = torch.randint(0, 7, (2000,), generator=gen)
    reference = multiclass_calibration_error(probs, labels, num_classes=7, n_bins=n_bins, norm="l1").item()
    assert ece(probs, labels, n_bins, "uniform") == pytest.approx(reference, abs=1e-5)


def test_reliability_summary_definitions():
    from pfl.metrics import reliability_summary

    clients = [{"acc": 1.0, "nll": 0.5, "ece": 0.1, "brier": 0.2}, {"acc": 0.0, "nll": 1.5, "ece": 0.4, "brier": 0.6}]
    # weights 3 and 1: acc (3*1 + 0) / 4 = 0.75; nll (1.5 + 1.5) / 4 = 0.75; ece unweighted 0.25; F-ECE 0.7/4
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 0, 1, 1])
    out = reliability_summary(clients, [3, 1], probs, labels, global_bins=15)
    assert out["acc"] == pytest.approx(0.75) and out["nll"] == pytest.approx(0.75)
    assert out["brier"] == pytest.approx((3 * 0.2 + 0.6) / 4)
    assert out["ece_mean"] == pytest.approx(0.25) and out["f_ece"] == pytest.approx((3 * 0.1 + 0.4) / 4)
    assert out["global_ece"] == pytest.approx(ece(probs, labels, 15, "uniform"))


def test_calibration_gaps_sum_over_clients_to_the_pooled_global_ece():
    from pfl.metrics import calibration_gaps, ece_from_gaps

    # 2 uniform bins. Client A: conf 0.9 correct, conf 0.8 wrong -> bin 1 gap (1 - 0.9) + (0 - 0.8) = -0.7.
    # Client B: conf 0.6 correct -> bin 1 gap +0.4; conf 0.3 -> 0.7 for class 1, correct -> +0.3. Pooled: |-0.7 + 0.4 +
    # 0.3| / 4 = 0 in bin 1, bin 0 empty: global ECE 0, although each client alone is miscalibrated.
    a = torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([0, 1])
    b = torch.tensor([[0.6, 0.4], [0.3, 0.7]]), torch.tensor([0, 1])
    assert calibration_gaps(*a, n_bins=2) == pytest.approx([0.0, -0.7])
    summed = [x + y for x, y in zip(calibration_gaps(*a, n_bins=2), calibration_gaps(*b, n_bins=2))]
    assert ece_from_gaps(summed, 4) == pytest.approx(0.0, abs=1e-12)
    assert ece_from_gaps(calibration_gaps(*a, n_bins=2), 2) == pytest.approx(0.35)
    probs, labels = torch.rand(50, 5).softmax(1), torch.randint(0, 5, (50,))
    parts = [calibration_gaps(probs[i:i + 10], labels[i:i + 10]) for i in range(0, 50, 10)]
    assert ece_from_gaps([sum(g) for g in zip(*parts)], 50) == pytest.approx(ece(probs, labels, 15, "uniform"))


def test_classification_evaluator_summary_names_each_ece():
    from pfl.federated.evaluation import POOLED, ClassificationEvaluator

    scores = [{"acc": 1.0, "nll": 0.5, "ece": 0.1, "brier": 0.2, POOLED: {"gaps": [0.0, -0.7]}},
              {"acc": 0.5, "nll": 1.5, "ece": 0.4, "brier": 0.6, POOLED: {"gaps": [0.0, 0.7]}}]
    out = ClassificationEvaluator().summarize(scores, [2, 2])
    assert out["f_ece"] == pytest.approx(0.25) and out["ece_mean"] == pytest.approx(0.25)
    assert out["f_ece_std"] == pytest.approx(0.15) and out["global_ece"] == pytest.approx(0.0)
    assert out["acc"] == pytest.approx(0.75) and "ece" not in out and POOLED not in out
    weighted = ClassificationEvaluator().summarize(scores, [3, 1])
    assert weighted["f_ece"] == pytest.approx(0.175) and weighted["ece_mean"] == pytest.approx(0.25)


def test_knn_accuracy_on_a_toy_embedding_with_known_neighbours():
    from pfl.metrics import knn_accuracy

    # class 0 along +x, class 1 along +y (cosine similarity: lengths do not matter)
    bank = torch.tensor([[1.0, 0.0], [2.0, 0.1], [0.0, 1.0], [0.1, 3.0]])
    bank_labels = torch.tensor([0, 0, 1, 1])
    near = torch.tensor([[0.87, 0.5], [0.2, 1.0]])  # their 2 nearest neighbours are of their own class
    assert knn_accuracy(bank, bank_labels, near, torch.tensor([0, 1]), 2, k=2) == 1.0
    # pointing at -x, the nearest in cosine are the class-1 points (similarity 0.05 and 0.02 against -1 and -0.995)
    away = torch.tensor([[-1.0, 0.05]])
    assert knn_accuracy(bank, bank_labels, torch.cat([near, away]), torch.tensor([0, 1, 0]), 2, k=2) == \
        pytest.approx(2 / 3)
    # at 45 degrees all 4 vote, 2 per class: the similarity weights exp(s / 0.1) break the tie for class 0, whose
    # second point (0.741) is closer than class 1's (0.730)
    assert knn_accuracy(bank, bank_labels, torch.tensor([[1.0, 1.0]]), torch.tensor([0]), 2, k=4) == 1.0
