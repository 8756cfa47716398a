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
    """

    name: str
    num_classes: int
    in_channels: int = 3
    image_size: int = 32
    width: float = 1.0
    lora: LoraSpec | None = None

    def to_dict(self) -> dict:
        """The spec as JSON-ready values (``lora`` as a mapping, or absent when there is none)."""
        values = asdict(self)
        if self.lora is None:
            del values["lora"]  # as specs saved before adapters existed
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        """The spec :meth:`to_dict` wrote (also those saved before ``lora`` existed)."""
        lora = values.get("lora")
        if lora is not None:
            lora = LoraSpec(**{**lora, "target_modules": tuple(lora["target_modules"])})
        return cls(**{**values, "lora": lora})
