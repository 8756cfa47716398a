"""The base + head model contract and the model factory.

Every pfl model is a :class:`SplitModel`: ``logits = head(base(x))``. Head methods
(APH, LoRAPH) replace or ensemble ``head`` on top of a frozen ``base`` without
surgery on the network.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from pfl.models.adapters import LoraSpec


class SplitModel(nn.Module):
    """A model written as ``head(base(x))``: a classifier, or a regressor.

    Args:
        base: maps inputs (images (B, C, H, W) float, sequences (B, T, F)) to features (B, D).
        head: maps features (B, D) to logits (B, num_classes), or to regression outputs (B, num_classes).
    """

    def __init__(self, base: nn.Module, head: nn.Module):
        super().__init__()
        self.base = base
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (or regression outputs) (B, num_classes) for model inputs (B, ...)."""
        return self.head(self.base(x))


@dataclass(frozen=True)
class ModelSpec:
    """One client's architecture: what is needed to rebuild its model, saved with every client's weights.

    Attributes:
        name: architecture: family and depth (``"cnn"``, ``"resnet18"``, ``"vgg11"`` .. ``"vgg19"``,
            ``"resnet20"`` .. ``"resnet56"``, the ViTs; :data:`pfl.models.ARCHITECTURES`).
        num_classes: output classes; a regression model's output values D (e.g. 3 for one 3-D position).
        in_channels: image channels.
        image_size: square side in pixels of the model's input (the images after on-device resizing).
        input_shape: one input sample's shape for a model of non-image inputs (a viewport predictor's
            ``(history, 3)``); ``None`` for images, whose input is ``(in_channels, image_size, image_size)``.
        options: an architecture's own settings as sorted ``(name, value)`` pairs (``vp_transformer``'s
            ``("embedding", True)``); empty for most.
        modality: the inputs the model was trained on as stored (:data:`pfl.data.loader.TRANSFORMS`): ``"image"``,
            ``"sequence"``, ``"text"`` (character ids) or ``"audio"`` (waveforms, turned into the model's input
            ``input_shape`` by the log-mel front end).
        frontend: the settings of that modality's on-device transform as sorted ``(name, value)`` pairs (audio:
            ``n_mels``, ``window_ms``, ``hop_ms``); empty for the others (images keep theirs in ``image_size`` and
            ``normalization``).
        width: channel multiplier of the VGG, CIFAR-ResNet, CharCNN and VDCNN families (1.0: the papers' widths).
        lora: LoRA adapters injected into the base (FedLoRA), or ``None``.
        normalization: per-channel ``(mean, std)`` in [0, 1] units the model's inputs are normalized with
            (:func:`pfl.models.input_normalization` of ``name`` when the run built it). ``None``: that function's
            value. Specs saved before the field existed read back the values their runs used (see :meth:`from_dict`).
    """

    name: str
    num_classes: int
    in_channels: int = 3
    image_size: int = 32
    width: float = 1.0
    lora: LoraSpec | None = None
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    input_shape: tuple[int, ...] | None = None
    options: tuple[tuple[str, Any], ...] = ()
    modality: str = "image"
    frontend: tuple[tuple[str, Any], ...] = ()

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One model input's shape: :attr:`input_shape`, else ``(in_channels, image_size, image_size)``."""
        return self.input_shape or (self.in_channels, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        """The spec as JSON-ready values (``lora`` as a mapping, or absent when there is none)."""
        values = asdict(self)
        if self.lora is None:
            del values["lora"]  # as specs saved before adapters existed
        for name in ("normalization", "input_shape", "options", "frontend"):  # absent as in specs saved before
            if not values[name]:
                del values[name]
        if self.modality == ("sequence" if self.input_shape else "image"):  # what from_dict infers
            del values["modality"]
        for name in ("options", "frontend"):
            if name in values:
                values[name] = dict(getattr(self, name))
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        """The spec :meth:`to_dict` wrote (also those saved before ``lora`` or ``normalization`` existed: such a
        VGG or CIFAR ResNet was trained with PFLlib's 0.5 / 0.5, its architecture's normalization until FlexiFed's
        CIFAR-10 statistics replaced it)."""
        lora = values.get("lora")
        if lora is not None:
            lora = LoraSpec(**{**lora, "target_modules": tuple(lora["target_modules"])})
        norm = values.get("normalization")
        if norm is not None:
            norm = (tuple(norm[0]), tuple(norm[1]))
        else:
            from pfl.models import FAMILIES  # the package imports this module

            if values["name"] in FAMILIES and not values.get("input_shape"):  # an image model
                norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        shape = values.get("input_shape")
        options = tuple(sorted((values.get("options") or {}).items()))
        frontend = tuple(sorted((values.get("frontend") or {}).items()))
        modality = values.get("modality") or ("sequence" if shape else "image")  # specs saved before the field
        return cls(**{**values, "lora": lora, "normalization": norm, "options": options, "frontend": frontend,
                      "modality": modality, "input_shape": tuple(shape) if shape else None})
