"""The on-device transform of sequence inputs (the ``sequence`` modality): float time series (B, T, F), such as a
viewer's head positions.

Sequences are stored as float32 on the training device; a batch is an index gather, then :class:`SequenceTransform`:
conversion to float32 and, when the run sets one, a per-feature normalization ``(x - mean) / std``. There is no
augmentation (``random_crop``, ``hflip`` and ``image_size`` are image knobs and are refused for sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceTransform:
    """What turns a gathered batch of sequences into the model's input.

    Attributes:
        mean: per-feature mean subtracted (``None``: no normalization; viewport positions are unit vectors already).
        std: per-feature std divided by.
    """

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    augments = False  # no training augmentation for sequences

    def output_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a transformed sample: the stored one."""
        return stored

    def __call__(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model input (B, T, F) float32 from gathered sequences (B, T, F) of any real dtype; ``generator`` is unused
        (no augmentation)."""
        x = inputs.float()
        if self.mean is None:
            return x
        mean = torch.tensor(self.mean, device=x.device)
        std = torch.tensor(self.std, device=x.device)
        return (x - mean) / std
