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
stores), or float32 in [0, 1]; they go through the run's evaluation input path
(:class:`pfl.data.transforms.ImageTransform`: normalization, resizing to the model's input) and come out
as float32 (N, K) probabilities or (N, D) embeddings, equal to running
:func:`pfl.tracking.load_client_model`'s model on the same transformed batch. MLflow enforces the
signature's dtype exactly, so float32 images go through ``model.unwrap_python_model().predict(None, x)``.
Loading needs ``pfl`` installed (this file imports it): serve with ``mlflow models serve --env-manager local``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import torch
from safetensors.torch import load_file

from pfl.data.transforms import ImageTransform
from pfl.heads.members import MemberHeads, ensemble_probs, members_from_state
from pfl.models import SplitModel, build_model, input_normalization
from pfl.tracking import read_client_file

PREDICT_BATCH = 256  # images per forward pass


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
        self.transform = ImageTransform(spec.image_size, *input_normalization(spec.name))
        self.channels = spec.in_channels
        self.output = config.get("output", "probabilities")

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
        """Probabilities (N, K) (or embeddings (N, D)) float32 of images (N, C, H, W), uint8 or float32 in [0, 1].

        Raises:
            ValueError: the input is not a 4-d array with the model's channel count.
        """
        images = torch.as_tensor(np.asarray(model_input))
        if images.dim() != 4 or images.shape[1] != self.channels:
            raise ValueError(f"images: expected (N, {self.channels}, H, W), got {tuple(images.shape)}")
        chunks = [self._outputs(images[i:i + PREDICT_BATCH]).cpu() for i in range(0, len(images), PREDICT_BATCH)]
        return torch.cat(chunks).numpy().astype(np.float32)


mlflow.models.set_model(ClientModel())
