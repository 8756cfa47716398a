"""The on-device transform of sequence inputs (the ``sequence`` modality): float time series (B, T, F), such as a
viewer's head positions.

Sequences are stored as float32 on the training device; a batch is an index gather, then :class:`SequenceTransform`:
conversion to float32. There is no normalization (viewport positions are unit vectors already) and no augmentation
(``random_crop``, ``hflip`` and ``image_size`` are image knobs and are refused for sequences).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceTransform:
    """What turns a gathered batch of sequences into the model's input: float32, nothing else."""

    augments = False  # no training augmentation for sequences

    def output_shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of a transformed sample: the stored one."""
        return stored

    def __call__(self, inputs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model input (B, T, F) float32 from gathered sequences (B, T, F) of any real dtype; ``generator`` is unused
        (no augmentation)."""
        return inputs.float()
