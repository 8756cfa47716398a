"""Viewport predictors for 360-degree video: from a viewer's recent head positions, the future ones.

Both models read a history of head positions as unit vectors, float32 (B, T, 3), and return positions as unit
vectors, float32 (B, D): the position ``horizon`` steps ahead (D = 3, ``predict=point``) or every position of the
horizon, flattened step-major (D = 3 * horizon, ``predict=sequence``). The builders read ``spec.num_classes`` as D,
``spec.input_shape`` as ``(T, 3)`` and the spec's options ``horizon`` (steps ahead, both models) and ``embedding``
(``vp_transformer`` only).

Each is a :class:`~pfl.models.split.SplitModel`, ``head(base(x))``, whose features carry, per predicted step, a
summary vector and the position the step moves from (its *anchor*); the head turns both into a position. The head
is thus the layer mapping the network's outputs to positions, as a generator targeting the head's input needs.

* ``vp_lstm``: TRACK's position-only baseline (:class:`VPLSTM`).
* ``vp_transformer``: a Transformer encoder over the history (:class:`VPTransformer`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pfl.models.split import ModelSpec, SplitModel

TRACK_HIDDEN = 1024  # TRACK's LSTM units (position_only_baseline.py:46)
TRANSFORMER_WIDTH = 128  # vp_transformer's d_model at width 1.0
TRANSFORMER_HEADS = 4
TRANSFORMER_LAYERS = 2


def to_normalized_eulerian(xyz: torch.Tensor) -> torch.Tensor:
    """TRACK's normalized Eulerian angles ``(yaw, pitch)`` of positions: yaw = atan2(y, x) mod 2 pi over 2 pi, in
    [0, 1); pitch = acos(z / |p|) over pi, in [0, 1] (0: the north pole (0, 0, 1)). TRACK's ``Utils.py:15-21``
    (``cartesian_to_eulerian``) divided by ``[2 pi, pi]`` (``training_procedure.py``,
    ``transform_batches_cartesian_to_normalized_eulerian``). ``z / |p|`` is clipped to [-1, 1] against rounding.

    Shapes: (..., 3) -> (..., 2).
    """
    x, y, z = xyz.unbind(-1)
    yaw = torch.remainder(torch.atan2(y, x), 2 * math.pi) / (2 * math.pi)
    pitch = torch.acos((z / xyz.norm(dim=-1)).clamp(-1.0, 1.0)) / math.pi
    return torch.stack([yaw, pitch], dim=-1)


def from_normalized_eulerian(angles: torch.Tensor) -> torch.Tensor:
    """Unit vectors of normalized Eulerian angles, the inverse of :func:`to_normalized_eulerian`: TRACK's
    ``Utils.py:34-38`` (``eulerian_to_cartesian``) of ``(2 pi yaw, pi pitch)``.

    Shapes: (..., 2) -> (..., 3).
    """
    theta = angles[..., 0] * (2 * math.pi)
    phi = angles[..., 1] * math.pi
    return torch.stack([torch.cos(theta) * torch.sin(phi), torch.sin(theta) * torch.sin(phi), torch.cos(phi)], -1)


def track_to_position(anchor: torch.Tensor, magnitude: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """TRACK's ``toPosition`` (``position_only_baseline.py:22-38``): the anchor moved by ``magnitude / 2 *
    direction`` (each coordinate in (-1/2, 1/2)), a pitch past a pole reflected back (``2 - pitch`` above 1,
    ``-pitch`` below 0) with the yaw turned by half a revolution, and the yaw wrapped into [0, 1).

    Args:
        anchor: normalized Eulerian ``(yaw, pitch)`` moved from, (..., 2).
        magnitude: sigmoid outputs in (0, 1), (..., 2).
        direction: tanh outputs in (-1, 1), (..., 2).

    Returns:
        The new normalized Eulerian position, (..., 2).
    """
    moved = anchor + magnitude / 2.0 * direction
    yaw, pitch = moved.unbind(-1)
    above, below = pitch > 1.0, pitch < 0.0
    pitch = torch.where(above, 2.0 - pitch, torch.where(below, -pitch, pitch))
    yaw = torch.remainder(torch.where(above | below, yaw - 0.5, yaw), 1.0)
    return torch.stack([yaw, pitch], dim=-1)


def _keras_dense_init(linear: nn.Linear) -> None:
    """Keras 2.3's ``Dense`` defaults: Glorot-uniform kernel, zero bias (from torch's global RNG)."""
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)


def _keras_lstm_init(lstm: nn.LSTM) -> None:
    """Keras 2.3's ``LSTM`` defaults on a one-layer ``nn.LSTM`` (same gate order i, f, g, o): Glorot-uniform input
    kernel, orthogonal recurrent kernel, zero bias but 1 on the forget gate (``unit_forget_bias``), put in
    ``bias_ih`` (``bias_hh``, which Keras has not, starts at 0)."""
    hidden = lstm.hidden_size
    nn.init.xavier_uniform_(lstm.weight_ih_l0)
    nn.init.orthogonal_(lstm.weight_hh_l0)
    nn.init.zeros_(lstm.bias_hh_l0)
    with torch.no_grad():
        lstm.bias_ih_l0.zero_()[hidden:2 * hidden] = 1.0


def _options(spec: ModelSpec, known: Mapping[str, Any]) -> dict[str, Any]:
    """``spec.options`` over the defaults ``known`` (``None``: required).

    Raises:
        ValueError: an option ``known`` lacks, or a required one missing; the message names it.
    """
    given = dict(spec.options)
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"{spec.name} has no option {', '.join(unknown)}; its options are {', '.join(known)}")
    values = {**known, **given}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValueError(f"{spec.name} needs the option {', '.join(missing)} (e.g. horizon=5: steps ahead)")
    return values


def _predicted_steps(spec: ModelSpec, horizon: int | None) -> int:
    """How many positions the model returns: 1 (D = 3) or ``horizon`` (D = 3 * horizon).

    Raises:
        ValueError: ``input_shape`` is not ``(T, 3)``, or D is neither 3 nor 3 * horizon.
    """
    if spec.input_shape is None or len(spec.input_shape) != 2 or spec.input_shape[1] != 3:
        raise ValueError(f"{spec.name} reads head positions (history, 3); got input_shape={spec.input_shape}")
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
        raise ValueError(f"{spec.name}'s option horizon must be a whole number of steps >= 1; got {horizon!r}")
    fits = spec.num_classes in (3, 3 * horizon) if horizon else spec.num_classes > 0 and spec.num_classes % 3 == 0
    if not fits:
        raise ValueError(f"{spec.name} predicts 3 values (the position `horizon` steps ahead) or 3 * horizon (every "
                         f"step); got num_classes={spec.num_classes} with horizon={horizon}")
    return spec.num_classes // 3


class TrackHead(nn.Module):
    """TRACK's output layers: from a decoder output and its anchor, the next position (``position_only_baseline.py``
    lines 47-48 and 61-63): ``magnitude = sigmoid(Dense(h))``, ``direction = tanh(Dense(h))``, then
    :func:`track_to_position`, returned as a unit vector.

    Args:
        hidden: decoder output width.
        steps: S, the steps whose features it reads.

    Shapes: features (B, S * (hidden + 2)) (:attr:`in_features`), per step the decoder output then the anchor's
    normalized Eulerian angles -> positions (B, 3 * S) as unit vectors.
    """

    def __init__(self, hidden: int, steps: int = 1):
        super().__init__()
        self.magnitude = nn.Linear(hidden, 2)
        self.direction = nn.Linear(hidden, 2)
        for layer in (self.magnitude, self.direction):
            _keras_dense_init(layer)
        self.in_features = steps * (hidden + 2)  # the features' width (what a generator targeting the head makes)

    def step(self, output: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """The next normalized Eulerian position (..., 2) of decoder outputs (..., hidden) and anchors (..., 2)."""
        return track_to_position(anchor, torch.sigmoid(self.magnitude(output)), torch.tanh(self.direction(output)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        steps = features.reshape(len(features), -1, self.magnitude.in_features + 2)
        angles = self.step(steps[..., :-2], steps[..., -2:])
        return from_normalized_eulerian(angles).flatten(1)


class TrackRollout(nn.Module):
    """TRACK's encoder-decoder up to the decoder's outputs: one LSTM, shared by the encoder and the decoder
    (``position_only_baseline.py:46,52,60``), encodes the history but its last position, then rolls out ``horizon``
    steps from that last position, each step's input being the previous step's prediction (lines 57-68), which
    the head's ``step`` computes: the head is held by reference, not registered, so its parameters are the head's
    only.

    Args:
        head: the model's :class:`TrackHead`.
        hidden: LSTM units.
        horizon: steps rolled out.
        steps: how many of the last steps' features are returned (1: the position ``horizon`` ahead; ``horizon``).

    Shapes: unit vectors (B, T, 3), T >= 2 -> features (B, steps * (hidden + 2)).
    """

    def __init__(self, head: TrackHead, hidden: int, horizon: int, steps: int):
        super().__init__()
        self.lstm = nn.LSTM(2, hidden, batch_first=True)
        _keras_lstm_init(self.lstm)
        object.__setattr__(self, "_head", head)  # a reference: registering it would duplicate the head's parameters
        self.horizon, self.steps = horizon, steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = to_normalized_eulerian(x)
        _, state = self.lstm(angles[:, :-1])  # TRACK's M_WINDOW positions
        anchor = angles[:, -1]  # TRACK's decoder input, the current position
        features = []
        for step in range(self.horizon):
            output, state = self.lstm(anchor.unsqueeze(1), state)
            if step >= self.horizon - self.steps:  # the steps the model returns (predict=point: the last only)
                features.append(torch.cat([output[:, 0], anchor], dim=1))
            if step + 1 < self.horizon:
                anchor = self._head.step(output[:, 0], anchor)
        return torch.cat(features, dim=1)


class VPLSTM(SplitModel):
    """``vp_lstm``: TRACK's position-only baseline (Romero Rondon et al., "TRACK: A New Method from a Novel
    Perspective for Viewport Prediction in 360 Videos", PAMI 2021; ``create_pos_only_model`` of
    ``position_only_baseline.py``, run as ``-model_name pos_only`` by ``training_procedure.py``, in TRACK's code,
    github.com/MiguelFRomeroR/Analysis-of-head-motion-prediction-in-VR at 6364a558).

    Positions become TRACK's normalized Eulerian angles; one LSTM of ``hidden`` units (TRACK: 1024) encodes the
    first T - 1 (TRACK's ``M_WINDOW``; the last one is TRACK's decoder input, ``training_procedure.py``,
    ``generate_arrays``: ``x_i - M_WINDOW : x_i`` then ``x_i``); the same LSTM, from the encoder's state, rolls out
    ``horizon`` steps, each fed the previous prediction; each prediction is :class:`TrackHead`'s move of its anchor.
    Base: :class:`TrackRollout`; head: :class:`TrackHead`. ``head(base(x))`` is the whole model: the base calls the
    head's layers inside the rollout (the head is not re-registered there), so replace the head only in place
    (``load_state_dict``), never by assigning another module to ``model.head``.

    State entries in order, the last two layers being the head's: ``base.lstm.{weight_ih_l0, weight_hh_l0,
    bias_ih_l0, bias_hh_l0}``, ``head.magnitude.{weight, bias}``, ``head.direction.{weight, bias}``.

    Deliberate differences from TRACK:

    * the model takes and returns unit vectors, converting to and from normalized Eulerian angles itself (TRACK
      converts in its data generator and its evaluation); the loss is the run's task's (TRACK trains this baseline
      on the orthodromic distance, ``position_only_baseline.py:77``);
    * ``predict=point`` rolls out all ``horizon`` steps and returns the last;
    * torch's LSTM has two bias vectors where Keras has one (4 * hidden more parameters; same function); the
      initialization is Keras 2.3.1's defaults (TRACK's README's version) drawn from torch's global RNG;
    * ``hidden`` = round(1024 * width), at least 1.

    Not to be confused with the later 3-D variant in forks of TRACK's code (separate encoder and decoder LSTMs,
    Dense-256 input and output stacks, a delta added to the unit vector; predict360user's ``pos_only_3d.py``).

    Args:
        hidden: LSTM units.
        horizon: steps rolled out.
        steps: positions returned: 1 (the last) or ``horizon`` (all).

    Shapes: unit vectors (B, T, 3), T >= 2 -> unit vectors (B, 3 * steps).
    """

    def __init__(self, hidden: int, horizon: int, steps: int = 1):
        if steps not in (1, horizon):
            raise ValueError(f"vp_lstm returns the last position or all {horizon}; got steps={steps}")
        head = TrackHead(hidden, steps)
        super().__init__(TrackRollout(head, hidden, horizon, steps), head)


class TransformerHistory(nn.Module):
    """``vp_transformer``'s base: positions embedded, plus a learned embedding of the step, through pre-norm
    Transformer encoder blocks, then a final LayerNorm; the last step's output is the summary.

    Args:
        history: T, the steps read (the learned positional embedding's length).
        width: d_model.
        embedding: ``True``: a 2-layer MLP 3 -> d -> d with a ReLU between; ``False``: one Linear 3 -> d.

    Shapes: unit vectors (B, T, 3) -> features (B, d + 3): the summary, then the last position (the anchor).
    """

    def __init__(self, history: int, width: int, embedding: bool):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(3, width), nn.ReLU(), nn.Linear(width, width)) if embedding else \
            nn.Linear(3, width)
        self.position = nn.Parameter(torch.empty(1, history, width))
        nn.init.normal_(self.position, std=0.02)
        self.blocks = nn.ModuleList(  # drawn one by one (nn.TransformerEncoder would clone one block's weights)
            nn.TransformerEncoderLayer(width, TRANSFORMER_HEADS, 4 * width, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(TRANSFORMER_LAYERS))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.position
        for block in self.blocks:
            h = block(h)
        return torch.cat([self.norm(h[:, -1]), x[:, -1]], dim=1)


class AnchoredHead(nn.Module):
    """``vp_transformer``'s head: a Linear from the summary to one 3-vector per step, added to the anchor (the last
    input position) and normalized: ``p_s = normalize(anchor + W z + b)``. The Linear starts at zero, so an untrained
    model predicts no motion (every step at the last position).

    Args:
        width: the summary's width d.
        outputs: D = 3 * steps.

    Shapes: features (B, d + 3) -> unit vectors (B, D).
    """

    def __init__(self, width: int, outputs: int):
        super().__init__()
        self.delta = nn.Linear(width, outputs)
        nn.init.zeros_(self.delta.weight)
        nn.init.zeros_(self.delta.bias)
        self.in_features = width + 3  # the features' width (what a generator targeting the head makes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        moves = self.delta(features[:, :-3]).view(len(features), -1, 3)
        return F.normalize(features[:, None, -3:] + moves, dim=-1).flatten(1)


class VPTransformer(SplitModel):
    """``vp_transformer``: a Transformer encoder over the history (the researchers' predictor; no reference code).

    Each position (a unit vector) is embedded (``embedding=True``, the researchers' ``--embedding``: a 2-layer MLP
    3 -> d -> d; ``False``: one Linear 3 -> d), a learned positional embedding of the T steps (N(0, 0.02)) added;
    2 pre-norm blocks of torch's ``nn.TransformerEncoderLayer`` (4 heads, feed-forward 4 d, ReLU, no dropout,
    full attention over the history), a final LayerNorm, and the last step's output as the summary. Base:
    :class:`TransformerHistory`; head: :class:`AnchoredHead` (a move of the last position, normalized).
    Initialization: torch's defaults from the global RNG; the head's Linear at zero.

    State entries end with ``base.blocks.1.norm2``, ``base.norm.{weight, bias}``, ``head.delta.{weight, bias}``:
    the last two layers are the final LayerNorm and the head's Linear.

    Args:
        history: T.
        outputs: D = 3 (one position) or 3 * horizon (every step).
        width: d_model (a multiple of the 4 heads).
        embedding: the MLP embedding, else a Linear projection.

    Shapes: unit vectors (B, T, 3) -> unit vectors (B, D).
    """

    def __init__(self, history: int, outputs: int, width: int = TRANSFORMER_WIDTH, embedding: bool = True):
        if width % TRANSFORMER_HEADS:
            raise ValueError(f"vp_transformer's d_model={width} must be a multiple of its {TRANSFORMER_HEADS} heads")
        super().__init__(TransformerHistory(history, width, embedding), AnchoredHead(width, outputs))


def build_vp_lstm(spec: ModelSpec) -> VPLSTM:
    """:class:`VPLSTM` of ``spec``: hidden = max(1, round(1024 * width)), ``horizon`` from its options (required).

    Raises:
        ValueError: no ``horizon`` option or another option, input_shape not (T, 3) with T >= 2, or num_classes
            neither 3 nor 3 * horizon.
    """
    horizon = _options(spec, {"horizon": None})["horizon"]
    steps = _predicted_steps(spec, horizon)
    if spec.input_shape[0] < 2:
        raise ValueError(f"vp_lstm encodes all but the last of the history's positions: history must be >= 2, got "
                         f"input_shape={spec.input_shape}")
    return VPLSTM(max(1, round(TRACK_HIDDEN * spec.width)), horizon, steps)


def build_vp_transformer(spec: ModelSpec) -> VPTransformer:
    """:class:`VPTransformer` of ``spec``: d_model = 128 * width rounded to a multiple of 4 (at least 4); options
    ``embedding`` (default ``True``) and ``horizon`` (optional: it only checks num_classes).

    Raises:
        ValueError: another option, input_shape not (T, 3), or num_classes not a multiple of 3 (with ``horizon``:
            neither 3 nor 3 * horizon).
    """
    options = _options(spec, {"embedding": True, "horizon": 0})
    _predicted_steps(spec, options["horizon"] or None)
    if not isinstance(options["embedding"], bool):
        raise ValueError(f"vp_transformer's option embedding must be true or false; got {options['embedding']!r}")
    width = TRANSFORMER_HEADS * max(1, round(TRANSFORMER_WIDTH * spec.width / TRANSFORMER_HEADS))
    return VPTransformer(spec.input_shape[0], spec.num_classes, width, options["embedding"])
