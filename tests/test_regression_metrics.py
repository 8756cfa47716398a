"""The great-circle error and the regression metrics (pfl.metrics) against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from pfl.metrics import orthodromic_distance, regression_metrics


def test_orthodromic_distance_hand_cases():
    pred = torch.tensor([[1.0, 0, 0], [0, 1, 0], [-1, 0, 0], [1, 1, 0], [2, 0, 0], [0, 0, 5]], dtype=torch.float64)
    target = torch.tensor([[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 3, 0]], dtype=torch.float64)
    # identical, orthogonal, antipodal, 45 degrees (unnormalized), same direction at another scale, orthogonal
    expected = torch.tensor([0, math.pi / 2, math.pi, math.pi / 4, 0, math.pi / 2], dtype=torch.float64)
    torch.testing.assert_close(orthodromic_distance(pred, target), expected, atol=1e-15, rtol=0)
    batch = orthodromic_distance(pred.view(2, 3, 3), target.view(2, 3, 3))  # any leading shape
    torch.testing.assert_close(batch, expected.view(2, 3), atol=1e-15, rtol=0)


def test_orthodromic_distance_resolves_small_angles_in_float32():
    """arccos(u . v) (TRACK's form) gives 0 for an angle of 1e-7 rad in float32; atan2(|u x v|, u . v) does not."""
    u, v = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 1e-7, 0.0]])
    assert torch.arccos((u * v).sum(dim=1).clamp(-1, 1)).item() == 0.0
    assert orthodromic_distance(u, v).item() == pytest.approx(1e-7, rel=1e-6)


def test_orthodromic_distance_of_zero_vector_is_nan():
    assert orthodromic_distance(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0]])).isnan().all()


def test_orthodromic_distance_bad_shapes():
    with pytest.raises(ValueError, match="two"):
        orthodromic_distance(torch.zeros(2, 3), torch.zeros(2, 4))


def test_regression_metrics_per_step_hand_case():
    # 2 samples x 2 steps: errors 0 and 90 degrees at step 1, 90 and 180 at step 2
    pred = torch.tensor([[1.0, 0, 0, 0, 1, 0], [0, 0, 1, -1, 0, 0]])
    target = torch.tensor([[1.0, 0, 0, 1, 0, 0], [1, 0, 0, 1, 0, 0]])
    out = regression_metrics(pred, target, positions=True)
    assert set(out) == {"mse", "orthodromic_deg", "orthodromic_deg_h1", "orthodromic_deg_h2"}
    assert out["mse"] == pytest.approx(8 / 12)  # squared errors 0 + 2 + 2 + 4 over 12 elements
    assert out["orthodromic_deg_h1"] == pytest.approx(45.0)
    assert out["orthodromic_deg_h2"] == pytest.approx(135.0)
    assert out["orthodromic_deg"] == pytest.approx(90.0)


def test_regression_metrics_single_step_and_plain():
    pred, target = torch.tensor([[0.0, 1, 0], [1, 0, 0]]), torch.tensor([[1.0, 0, 0], [1, 0, 0]])
    out = regression_metrics(pred, target, positions=True)
    assert set(out) == {"mse", "orthodromic_deg"} and out["orthodromic_deg"] == pytest.approx(45.0)
    plain = regression_metrics(pred, target, positions=False)
    assert plain == {"mse": pytest.approx(torch.nn.MSELoss()(pred, target).item())}


@pytest.mark.parametrize("pred, target, positions, match", [
    (torch.zeros(2, 4), torch.zeros(2, 4), True, "D = 4"),
    (torch.zeros(2, 3), torch.zeros(3, 3), False, "one shape"),
    (torch.zeros(0, 3), torch.zeros(0, 3), False, "N >= 1"),
])
def test_regression_metrics_bad_input(pred, target, positions, match):
    with pytest.raises(ValueError, match=match):
        regression_metrics(pred, target, positions)
