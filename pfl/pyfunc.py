"""A client's personalized model as an MLflow ``pyfunc`` model, logged from code (nothing pickled).

MLflow's models-from-code (https://mlflow.org/docs/latest/ml/model/models-from-code/): this file is
copied into every model directory as its ``python_model`` and executed at load time, where it builds
:class:`ClientModel` through :func:`mlflow.models.set_model`. The weights are the model directory's
``artifacts/model.safetensors`` (a client file, its :class:`~pfl.models.ModelSpec` in the metadata:
:func:`pfl.tracking.log_client_models`); the model config (``MLmodel``) names what lives elsewhere:

* ``backbone``: URI of entries every client shares (FedLoRA's frozen backbone, MocoSFL's trunk), the
  FL run's ``server/backbone.safetensors``, downloaded at load time (so it is stored once per run);
* ``base``: for a head run's ensemble (``heads/client_XXX/``), URI of the FL run's client file whose base
  computes the features; the directory's ``artifacts/members.safetensors`` holds the trained members;
* ``output``: ``probabilities`` (softmax of the logits; a head ensemble: the mean of the members'
  softmaxes, as :func:`pfl.heads.members.ensemble_probs`), ``values`` (a regression's outputs: a viewport
  predictor's positions, (N, 3) or (N, 3 * horizon) flattened) or ``embeddings`` (self-supervised runs: the
  projection's output).

``predict`` takes images (N, C, H, W): uint8 pixels (the signature's type: what every pfl dataset
stores; any integer array with values 0..255), or, from Python, a float array in [0, 1]; they go through the
run's evaluation input path (:class:`pfl.data.transforms.ImageTransform`: normalization, resizing to the model's
input) and come out as float32 (N, K) probabilities or (N, D) embeddings, equal to running
:func:`pfl.tracking.load_client_model`'s model on the same transformed batch. An empty batch gives an empty
(0, K) array. A model of sequences (a viewport predictor, whose spec has an ``input_shape``) takes float
histories (N, T, F) (:func:`as_sequences`) and returns its outputs (N, D) as they are; a text classifier takes
character ids (N, L) as :mod:`pfl.data.text` stores them, a keyword spotter int16 waveforms (N, S) (both
:func:`as_integers`), which go through the run's front end (:class:`pfl.data.audio.AudioTransform`). Loading needs
``pfl`` installed (this file imports it): serve with ``mlflow models serve
--env-manager local``; a request is ``{"inputs": [...]}`` with the pixels as JSON integers 0..255.

Input checks: the client models' MLmodel marks the signature as checked by the model itself
(``is_signature_from_type_hint: true``, :func:`pfl.tracking.save_mlflow_model`), so MLflow hands ``predict`` the
input as given: a JSON payload as nested lists (MLflow would otherwise cast it to the signature's uint8, turning
floats in [0, 1] into black images), a numpy array as it is. :func:`as_images` then refuses what the model cannot
mean, one reason first, as :class:`InputError` (``INVALID_PARAMETER_VALUE``: HTTP 400 from the scoring server):
non-finite values, floats outside [0, 1], integers outside 0..255, floats in a JSON payload, other dtypes, other
shapes. Consequences: a served model takes the ``inputs`` key only (MLflow's answer to ``instances`` or
``dataframe_split`` says so), and MLflow's own schema check no longer runs (its message put a dump of the data
before the reason).
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from safetensors.torch import load_file

from pfl.data.loader import TRANSFORMS, Transform
from pfl.data.text import NUM_IDS
from pfl.data.transforms import ImageTransform
from pfl.heads.members import MemberHeads, ensemble_probs, members_from_state
from pfl.models import ModelSpec, SplitModel, build_model, input_normalization
from pfl.tracking import read_client_file

PREDICT_BATCH = 256  # samples per forward pass


class InputError(mlflow.exceptions.MlflowException, ValueError):
    """Inputs ``predict`` cannot take: ``INVALID_PARAMETER_VALUE``, which MLflow's scoring server answers with HTTP
    400. The message is the reason alone: the scoring server rewrites the message of an error raised in
    ``predict`` to "Failed to predict data '<the whole request>'. Error: <reason>", which buries the reason after a
    dump of the data, so this class keeps its reason and ignores that rewrite. A loaded model raises the class of
    its own copy of this file (models from code): catch ``MlflowException`` or ``ValueError``."""

    def __init__(self, reason: str):
        self._reason = reason
        super().__init__(reason, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, _: str) -> None:
        pass  # the scoring server's rewrite (class docstring)


def _array(model_input: Any, what: str, shape: str) -> np.ndarray:
    """``model_input`` as a numpy array.

    Raises:
        InputError: nested lists of unequal lengths.
    """
    try:
        return np.asarray(model_input)
    except ValueError:  # nested lists of unequal lengths
        raise InputError(f"{what}: nested lists of unequal lengths; send one {shape} array") from None


def as_sequences(model_input: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """``model_input`` as a batch of sequences (N, *shape) float32, e.g. head-position histories (N, T, 3).

    Accepted: any real array or nested lists of numbers of that shape; an empty batch gives an empty (0, *shape).

    Raises:
        InputError: ragged lists, another shape, another dtype (booleans, text), or non-finite values; the message
            gives the reason first, then what to send.
    """
    expected = f"(N, {', '.join(map(str, shape))})"
    array = _array(model_input, "sequences", f"{expected} float")
    if len(array.shape) and array.shape[0] == 0:
        return torch.zeros(0, *shape)
    if tuple(array.shape[1:]) != tuple(shape):
        raise InputError(f"sequences: shape {array.shape}, expected {expected}")
    if array.dtype.kind not in "iuf":
        raise InputError(f"sequences: dtype {array.dtype}; expected float32 values")
    if not np.isfinite(array).all():
        raise InputError("sequences: NaN or infinite values; send finite floats")
    return torch.from_numpy(array.astype(np.float32))


def as_integers(model_input: Any, length: int | None, low: int, high: int, what: str) -> torch.Tensor:
    """``model_input`` as a batch (N, ``length``) of integers in ``low..high`` (int64), e.g. character ids (N, 1024) in
    0..72, or int16 waveform samples (N, L) (``length=None``: any L).

    Raises:
        InputError: ragged lists, another shape, a non-integer dtype, or values outside ``low..high``; the message
            names ``what``, gives the reason first, then what to send.
    """
    expected = f"(N, {length or 'L'}) integers {low}..{high}"
    array = _array(model_input, what, expected)
    if len(array.shape) and array.shape[0] == 0:
        return torch.zeros(0, length or 0, dtype=torch.int64)
    if array.ndim != 2 or (length is not None and array.shape[1] != length):
        raise InputError(f"{what}: shape {array.shape}, expected {expected}")
    if array.dtype.kind not in "iu":
        raise InputError(f"{what}: dtype {array.dtype}; expected {expected}")
    if array.size and (int(array.min()) < low or int(array.max()) > high):
        raise InputError(f"{what}: values {int(array.min())}..{int(array.max())} outside {low}..{high}; send "
                         f"{expected}")
    return torch.from_numpy(array.astype(np.int64))


def as_images(model_input: Any, channels: int) -> torch.Tensor:
    """``model_input`` as a batch of images (N, ``channels``, H, W): uint8 pixels, or float32 in [0, 1].

    Accepted: integers 0..255 (a uint8 array, any integer array, or a JSON payload's nested lists of integers), or
    a float array (numpy or torch) in [0, 1]. An empty batch (N = 0), of any shape and dtype, gives an empty uint8
    (0, ``channels``, 0, 0).

    Raises:
        InputError: ragged lists, another shape or channel count, non-finite values, floats outside [0, 1],
            floats in nested lists (a JSON payload: MLflow's signature says uint8), integers outside 0..255, or
            another dtype (booleans, text); the message gives the reason first, then what to send.
    """
    array = _array(model_input, "images", f"(N, {channels}, H, W) uint8")
    if len(array.shape) and array.shape[0] == 0:
        return torch.zeros(0, channels, 0, 0, dtype=torch.uint8)
    if array.ndim != 4 or array.shape[1] != channels:
        raise InputError(f"images: shape {array.shape}, expected (N, {channels}, H, W)")
    if array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InputError(f"images: integer pixels {low}..{high} outside 0..255; send uint8 pixels 0..255")
        return torch.from_numpy(array.astype(np.uint8))
    if array.dtype.kind != "f":
        raise InputError(f"images: dtype {array.dtype}; expected uint8 pixels 0..255 (the signature's dtype), or "
                          "floats in [0, 1]")
    if isinstance(model_input, list):
        raise InputError("images: a JSON payload holds floats, expected the signature's dtype uint8: integer "
                          "pixels 0..255; send round(255 * x) for images x in [0, 1]")
    if not np.isfinite(array).all():
        raise InputError("images: NaN or infinite values; send uint8 pixels 0..255 (the signature's dtype), or "
                          "finite floats in [0, 1]")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise InputError(f"images: float values {low:g}..{high:g} outside [0, 1]; send uint8 pixels 0..255 (the "
                          "signature's dtype), or floats divided by 255")
    return torch.from_numpy(array.astype(np.float32))


def _download(uri: str) -> str:
    """A local path of the artifact at ``uri`` (``runs:/<run id>/<path>``), downloaded from the tracking store."""
    return mlflow.artifacts.download_artifacts(artifact_uri=uri)


class ClientModel(mlflow.pyfunc.PythonModel):
    """A client's personalized model (or a head run's ensemble on it): images (N, C, H, W) -> (N, K) float32, or
    sequences (N, T, F) -> (N, D) float32."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = context.model_config or {}
        weights = context.artifacts.get("weights") or _download(config["base"])
        spec, state = read_client_file(weights)
        if config.get("backbone"):
            state = {**load_file(_download(config["backbone"])), **state}
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model: SplitModel = build_model(spec)
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        members = context.artifacts.get("members")
        self.members: MemberHeads | None = members_from_state(load_file(members)).to(self.device) if members else None
        self.spec = spec
        self.transform = _transform(spec)
        self.output = config.get("output", "probabilities")
        if self.output == "embeddings":  # D: the columns of an empty batch's output (image models only)
            self.width = self._outputs(torch.zeros(1, *spec.sample_shape, dtype=torch.uint8)).shape[1]
        else:
            self.width = spec.num_classes

    @torch.no_grad()
    def _outputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, K) probabilities, (B, D) values or (B, D) embeddings of one batch of uint8 (or [0, 1] float) images,
        or of float sequences."""
        if self.spec.modality == "image" and inputs.dtype != torch.uint8:
            inputs = inputs.float().mul(255.0)  # ImageTransform divides by 255
        x = self.transform(inputs.to(self.device))
        if self.members is not None:
            return ensemble_probs(self.members, self.model.base(x))
        out = self.model(x).float()
        return torch.softmax(out, dim=1) if self.output == "probabilities" else out

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """Probabilities (N, K) (or embeddings (N, D)) float32 of images (N, C, H, W) (:func:`as_images`), or the
        values (N, D) of sequences (N, T, F) (:func:`as_sequences`: a viewport predictor's positions); (0, K) for an
        empty batch.

        Raises:
            InputError: inputs the model cannot take (:func:`as_images`, :func:`as_sequences`), before any forward
                pass.
        """
        inputs = self._stored(model_input)
        if len(inputs) == 0:
            return np.zeros((0, self.width), dtype=np.float32)
        chunks = [self._outputs(inputs[i:i + PREDICT_BATCH]).cpu() for i in range(0, len(inputs), PREDICT_BATCH)]
        return torch.cat(chunks).numpy().astype(np.float32)


    def _stored(self, model_input: Any) -> torch.Tensor:
        """The batch as the dataset stores it: images (:func:`as_images`), sequences (:func:`as_sequences`), uint8
        character ids (N, L) or int16 waveforms (N, S) (:func:`as_integers`).

        Raises:
            InputError: see those functions; waveforms whose spectrogram is not the model's input shape.
        """
        spec = self.spec
        if spec.modality == "image":
            return as_images(model_input, spec.in_channels)
        if spec.modality == "sequence":
            return as_sequences(model_input, spec.input_shape)
        if spec.modality == "text":
            return as_integers(model_input, spec.input_shape[0], 0, NUM_IDS - 1, "character ids").to(torch.uint8)
        waveforms = as_integers(model_input, None, -(2**15), 2**15 - 1, "waveforms").to(torch.int16)
        try:
            shape = self.transform.output_shape(tuple(waveforms.shape[1:])) if len(waveforms) else spec.input_shape
        except ValueError as err:
            raise InputError(f"waveforms: {err}") from None
        if shape != spec.input_shape:
            raise InputError(f"waveforms: {waveforms.shape[1]} samples give spectrograms {shape}, the model takes "
                             f"{spec.input_shape}; send clips as long as the training clips")
        return waveforms


def _transform(spec: ModelSpec) -> Transform:
    """The evaluation input path of a model trained on ``spec.modality`` (:data:`pfl.data.loader.TRANSFORMS`): for
    images its normalization and input size, for audio its log-mel front end's settings (``spec.frontend``)."""
    if spec.modality == "image":
        return ImageTransform(spec.image_size, *(spec.normalization or input_normalization(spec.name)))
    return TRANSFORMS[spec.modality](**dict(spec.frontend))


mlflow.models.set_model(ClientModel())
