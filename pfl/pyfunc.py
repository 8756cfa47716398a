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
  softmaxes, as :func:`pfl.heads.members.ensemble_probs`) or ``embeddings`` (self-supervised runs: the
  projection's output).

``predict`` takes images (N, C, H, W): uint8 pixels (the signature's type: what every pfl dataset
stores; any integer array with values 0..255), or, from Python, a float array in [0, 1]; they go through the
run's evaluation input path (:class:`pfl.data.transforms.ImageTransform`: normalization, resizing to the model's
input) and come out as float32 (N, K) probabilities or (N, D) embeddings, equal to running
:func:`pfl.tracking.load_client_model`'s model on the same transformed batch. An empty batch gives an empty
(0, K) array. Loading needs ``pfl`` installed (this file imports it): serve with ``mlflow models serve
--env-manager local``; a request is ``{"inputs": [...]}`` with the pixels as JSON integers 0..255.

Input checks: the client models' MLmodel marks the signature as checked by the model itself
(``is_signature_from_type_hint: true``, :func:`pfl.tracking.save_mlflow_model`), so MLflow hands ``predict`` the
input as given: a JSON payload as nested lists (MLflow would otherwise cast it to the signature's uint8, turning
floats in [0, 1] into black images), a numpy array as it is. :func:`as_images` then refuses what the model cannot
mean, one reason first, as :class:`ImagesError` (``INVALID_PARAMETER_VALUE``: HTTP 400 from the scoring server):
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

from pfl.data.transforms import ImageTransform
from pfl.heads.members import MemberHeads, ensemble_probs, members_from_state
from pfl.models import SplitModel, build_model, input_normalization
from pfl.tracking import read_client_file

PREDICT_BATCH = 256  # images per forward pass


class ImagesError(mlflow.exceptions.MlflowException, ValueError):
    """Images ``predict`` cannot take: ``INVALID_PARAMETER_VALUE``, which MLflow's scoring server answers with HTTP
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


def as_images(model_input: Any, channels: int) -> torch.Tensor:
    """``model_input`` as a batch of images (N, ``channels``, H, W): uint8 pixels, or float32 in [0, 1].

    Accepted: integers 0..255 (a uint8 array, any integer array, or a JSON payload's nested lists of integers), or
    a float array (numpy or torch) in [0, 1]. An empty batch (N = 0), of any shape and dtype, gives an empty uint8
    (0, ``channels``, 0, 0).

    Raises:
        ImagesError: ragged lists, another shape or channel count, non-finite values, floats outside [0, 1],
            floats in nested lists (a JSON payload: MLflow's signature says uint8), integers outside 0..255, or
            another dtype (booleans, text); the message gives the reason first, then what to send.
    """
    try:
        array = np.asarray(model_input)
    except ValueError:  # nested lists of unequal lengths
        raise ImagesError(f"images: nested lists of unequal lengths; send one (N, {channels}, H, W) array of "
                          "uint8 pixels") from None
    if len(array.shape) and array.shape[0] == 0:
        return torch.zeros(0, channels, 0, 0, dtype=torch.uint8)
    if array.ndim != 4 or array.shape[1] != channels:
        raise ImagesError(f"images: shape {array.shape}, expected (N, {channels}, H, W)")
    if array.dtype.kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImagesError(f"images: integer pixels {low}..{high} outside 0..255; send uint8 pixels 0..255")
        return torch.from_numpy(array.astype(np.uint8))
    if array.dtype.kind != "f":
        raise ImagesError(f"images: dtype {array.dtype}; expected uint8 pixels 0..255 (the signature's dtype), or "
                          "floats in [0, 1]")
    if isinstance(model_input, list):
        raise ImagesError("images: a JSON payload holds floats, expected the signature's dtype uint8: integer "
                          "pixels 0..255; send round(255 * x) for images x in [0, 1]")
    if not np.isfinite(array).all():
        raise ImagesError("images: NaN or infinite values; send uint8 pixels 0..255 (the signature's dtype), or "
                          "finite floats in [0, 1]")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        raise ImagesError(f"images: float values {low:g}..{high:g} outside [0, 1]; send uint8 pixels 0..255 (the "
                          "signature's dtype), or floats divided by 255")
    return torch.from_numpy(array.astype(np.float32))


def _download(uri: str) -> str:
    """A local path of the artifact at ``uri`` (``runs:/<run id>/<path>``), downloaded from the tracking store."""
    return mlflow.artifacts.download_artifacts(artifact_uri=uri)


class ClientModel(mlflow.pyfunc.PythonModel):
    """A client's personalized model (or a head run's ensemble on it): images (N, C, H, W) -> (N, K) float32."""

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
        self.transform = ImageTransform(spec.image_size, *(spec.normalization or input_normalization(spec.name)))
        self.channels = spec.in_channels
        self.output = config.get("output", "probabilities")
        black = torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size, dtype=torch.uint8)
        self.width = self._outputs(black).shape[1]  # K (or D): the columns of an empty batch's output

    @torch.no_grad()
    def _outputs(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K) probabilities or (B, D) embeddings of one batch of uint8 (or [0, 1] float) images."""
        if images.dtype != torch.uint8:
            images = images.float().mul(255.0)  # ImageTransform divides by 255
        x = self.transform(images.to(self.device))
        if self.members is not None:
            return ensemble_probs(self.members, self.model.base(x))
        out = self.model(x).float()
        return torch.softmax(out, dim=1) if self.output == "probabilities" else out

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        """Probabilities (N, K) (or embeddings (N, D)) float32 of images (N, C, H, W) (:func:`as_images`); (0, K)
        for an empty batch.

        Raises:
            ImagesError: images the model cannot take (:func:`as_images`), before any forward pass.
        """
        images = as_images(model_input, self.channels)
        if len(images) == 0:
            return np.zeros((0, self.width), dtype=np.float32)
        chunks = [self._outputs(images[i:i + PREDICT_BATCH]).cpu() for i in range(0, len(images), PREDICT_BATCH)]
        return torch.cat(chunks).numpy().astype(np.float32)


mlflow.models.set_model(ClientModel())
