"""Viewport predictors: vp_lstm (TRACK's position-only baseline) and vp_transformer, against hand-computed cases."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pfl.federated.downlink import Downlink
from pfl.models import ModelSpec, build_model
from pfl.models.viewport import from_normalized_eulerian, to_normalized_eulerian, track_to_position

HISTORY, HORIZON = 10, 5


def _spec(name: str, outputs: int, width: float = 0.0625, **options) -> ModelSpec:
    options = {"horizon": HORIZON, **options}
    return ModelSpec(name, outputs, input_shape=(HISTORY, 3), options=tuple(sorted(options.items())), width=width)


def _positions(batch: int = 4, steps: int = HISTORY) -> torch.Tensor:
    return F.normalize(torch.randn(batch, steps, 3, generator=torch.Generator().manual_seed(1)), dim=-1)


def _on_equator(yaw: float) -> list[float]:
    """The unit vector of normalized yaw ``yaw`` (turns) on the equator."""
    return [math.cos(2 * math.pi * yaw), math.sin(2 * math.pi * yaw), 0.0]


MODELS = [("vp_lstm", {}), ("vp_transformer", {"embedding": True}), ("vp_transformer", {"embedding": False})]


@pytest.mark.parametrize(("name", "options"), MODELS)
@pytest.mark.parametrize("outputs", [3, 3 * HORIZON])
def test_outputs_are_unit_vectors_and_head_of_base(name, options, outputs):
    torch.manual_seed(0)
    model = build_model(_spec(name, outputs, **options))
    x = _positions()
    y = model(x)
    assert y.shape == (4, outputs) and y.dtype == torch.float32
    assert torch.equal(y, model.head(model.base(x)))
    torch.testing.assert_close(y.view(4, -1, 3).norm(dim=-1), torch.ones(4, outputs // 3))
    y.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_feature_widths():
    x = _positions()
    lstm = build_model(_spec("vp_lstm", 3 * HORIZON))  # 64 units: per step the decoder output and its anchor
    assert lstm.base(x).shape == (4, HORIZON * 66) and lstm.head.in_features == HORIZON * 66
    point = build_model(_spec("vp_lstm", 3))
    assert point.base(x).shape == (4, 66) and point.head.in_features == 66  # only the last step's
    transformer = build_model(_spec("vp_transformer", 3 * HORIZON, width=0.25))  # d_model 32, then the anchor
    assert transformer.base(x).shape == (4, 35) and transformer.head.in_features == 35


@pytest.mark.parametrize(("width", "hidden", "d_model"), [(1.0, 1024, 128), (0.0625, 64, 8), (0.07, 72, 8),
                                                          (1e-4, 1, 4)])
def test_width_scales_lstm_units_and_d_model_in_multiples_of_the_heads(width, hidden, d_model):
    assert build_model(_spec("vp_lstm", 3, width)).base.lstm.hidden_size == hidden
    assert build_model(_spec("vp_transformer", 3, width)).base.norm.normalized_shape == (d_model,)


def test_normalized_eulerian_of_tracks_utils():
    xyz = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1], [0, 0, 2]])
    expected = torch.tensor([[0.0, 0.5], [0.25, 0.5], [0.75, 0.5], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(to_normalized_eulerian(xyz), expected)
    torch.testing.assert_close(from_normalized_eulerian(expected[:5]), xyz[:5], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("anchor", "magnitude", "direction", "expected"), [
    ((0.25, 0.5), (0.5, 0.2), (1.0, -0.5), (0.5, 0.45)),  # moved by magnitude / 2 * direction
    ((0.9, 0.5), (0.8, 0.0), (0.5, 0.0), (0.1, 0.5)),  # yaw 1.1 wraps to 0.1
    ((0.1, 0.95), (0.6, 0.6), (0.0, 0.5), (0.6, 0.9)),  # pitch 1.1 past the south pole: 0.9, yaw half a turn on
    ((0.8, 0.05), (0.4, 0.4), (1.0, -1.0), (0.5, 0.15)),  # pitch -0.15 past the north pole: 0.15, yaw 1.0 - 0.5
])
def test_track_to_position(anchor, magnitude, direction, expected):
    got = track_to_position(*(torch.tensor([v]) for v in (anchor, magnitude, direction)))
    torch.testing.assert_close(got, torch.tensor([expected]))


def test_lstm_encodes_all_but_the_last_position_which_seeds_the_decoder():
    model = build_model(_spec("vp_lstm", 3))
    inputs = []
    model.base.lstm.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
    x = _positions()
    model(x)
    assert [tuple(i.shape) for i in inputs] == [(4, HISTORY - 1, 2)] + [(4, 1, 2)] * HORIZON
    torch.testing.assert_close(inputs[0], to_normalized_eulerian(x[:, :-1]))
    torch.testing.assert_close(inputs[1][:, 0], to_normalized_eulerian(x[:, -1]))


@pytest.mark.parametrize("outputs", [3, 3 * HORIZON])
def test_lstm_rolls_out_its_own_predictions(outputs):
    """With a zero LSTM its outputs are 0 (gates 1/2, cell 0), so each step moves by sigmoid(b_m) / 2 * tanh(b_d):
    here 1/2 / 2 * 0.2 = 0.05 turn of yaw per step, from the last input position (yaw 0.1 on the equator)."""
    model = build_model(_spec("vp_lstm", outputs))
    with torch.no_grad():
        for p in (*model.base.parameters(), *model.head.parameters()):
            p.zero_()
        model.head.direction.bias[0] = math.atanh(0.2)
    x = torch.tensor([_on_equator(0.3)] * (HISTORY - 1) + [_on_equator(0.1)]).unsqueeze(0)
    steps = [0.1 + 0.05 * k for k in range(1, HORIZON + 1)][-(outputs // 3):]
    torch.testing.assert_close(model(x), torch.tensor([sum(map(_on_equator, steps), [])]), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("name", "options"), MODELS)
def test_zero_output_layers_predict_no_motion(name, options):
    """TRACK's zero move (tanh(0) = 0) and the Transformer's zero-initialized head: the last position, repeated."""
    torch.manual_seed(0)
    model = build_model(_spec(name, 3 * HORIZON, **options))
    with torch.no_grad():
        for p in model.head.parameters():
            p.zero_()
    x = _positions()
    torch.testing.assert_close(model(x), x[:, -1].repeat(1, HORIZON))


def test_lstm_starts_from_keras_defaults():
    model = build_model(_spec("vp_lstm", 3))
    lstm, hidden = model.base.lstm, 64
    forget = torch.zeros(4 * hidden)
    forget[hidden:2 * hidden] = 1.0
    assert torch.equal(lstm.bias_ih_l0, forget) and not lstm.bias_hh_l0.any()
    torch.testing.assert_close(lstm.weight_hh_l0.T @ lstm.weight_hh_l0, torch.eye(hidden))  # orthogonal
    limit = math.sqrt(6 / (2 + 4 * hidden))  # Glorot-uniform
    assert lstm.weight_ih_l0.abs().max() <= limit and not model.head.magnitude.bias.any()


@pytest.mark.parametrize(("name", "options", "top"), [
    ("vp_lstm", {}, ["head.magnitude.weight", "head.magnitude.bias", "head.direction.weight", "head.direction.bias"]),
    ("vp_transformer", {}, ["base.norm.weight", "base.norm.bias", "head.delta.weight", "head.delta.bias"]),
])
def test_last_two_layers(name, options, top):
    state = build_model(_spec(name, 3, **options)).state_dict()
    assert Downlink(layers=2).shared(state) == top


def test_deepcopy_rolls_out_with_its_own_head():
    model = build_model(_spec("vp_lstm", 3 * HORIZON))
    twin = copy.deepcopy(model)
    assert twin.base._head is twin.head
    x = _positions()
    before = model(x)
    with torch.no_grad():
        twin.head.direction.bias.add_(1.0)
    assert torch.equal(model(x), before) and not torch.equal(twin(x), before)
    assert len(twin.state_dict()) == len(model.state_dict()) == 8  # the head's entries once


@pytest.mark.parametrize(("name", "options"), MODELS)
def test_spec_round_trip_rebuilds_the_same_model(name, options):
    spec = _spec(name, 3 * HORIZON, width=0.125, **options)
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    torch.manual_seed(3)
    first = build_model(spec).state_dict()
    torch.manual_seed(3)
    second = build_model(again).state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(("spec", "message"), [
    (ModelSpec("vp_lstm", 3, input_shape=(HISTORY, 3)), "needs the option horizon"),
    (_spec("vp_lstm", 3, dropout=0.1), "has no option dropout"),
    (_spec("vp_lstm", 7), "num_classes=7"),
    (_spec("vp_transformer", 6), "num_classes=6"),
    (_spec("vp_lstm", 3, horizon=0), "horizon must be a whole number"),
    (ModelSpec("vp_lstm", 3, input_shape=(HISTORY, 2), options=(("horizon", 1),)), "input_shape=(10, 2)"),
    (ModelSpec("vp_lstm", 3, input_shape=(1, 3), options=(("horizon", 1),)), "history must be >= 2"),
    (ModelSpec("vp_transformer", 3), "input_shape=None"),
    (_spec("vp_transformer", 3, embedding="yes"), "embedding must be true or false"),
])
def test_bad_specs_are_refused_in_one_line(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        build_model(spec)
    assert "\n" not in str(error.value)
