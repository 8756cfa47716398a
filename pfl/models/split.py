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
    """A classifier written as ``head(base(x))``.

    Args:
        base: maps images (B, C, H, W) float to features (B, D).
        head: maps features (B, D) to logits (B, num_classes).
    """

    def __init__(self, base: nn.Module, head: nn.Module):
        super().__init__()
        self.base = base
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for normalized images (B, C, H, W)."""
        return self.head(self.base(x))


@dataclass(frozen=True)
class ModelSpec:
    """One client's architecture: what is needed to rebuild its model, saved with every client's weights.

    Attributes:
        name: architecture: family and depth (``"cnn"``, ``"resnet18"``, ``"vgg11"`` .. ``"vgg19"``,
            ``"resnet20"`` .. ``"resnet56"``, the ViTs; :data:`pfl.models.ARCHITECTURES`).
        num_classes: output classes.
        in_channels: image channels.
        image_size: square side in pixels of the model's input (the images after on-device resizing).
        width: channel multiplier of the VGG and CIFAR-ResNet families (1.0: the paper's widths).
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

    def to_dict(self) -> dict:
        """The spec as JSON-ready values (``lora`` as a mapping, or absent when there is none)."""
        values = asdict(self)
        if self.lora is None:
            del values["lora"]  # as specs saved before adapters existed
        if self.normalization is None:
            del values["normalization"]
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

            if values["name"] in FAMILIES:
                norm = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        return cls(**{**values, "lora": lora, "normalization": norm})
