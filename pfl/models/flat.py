"""A model's floating-point state as one flat vector, for storage and aggregation.

Client state (personalized models, FedFomo's copies) is kept as flat float32
vectors in host memory; aggregation is vector arithmetic. The order is that of
``model.state_dict()`` restricted to floating-point entries (parameters and float
buffers such as BatchNorm statistics); integer buffers are left untouched.
"""

from __future__ import annotations

import torch
from torch import nn


def _float_entries(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in model.state_dict(keep_vars=True).values() if t.is_floating_point()]


def flat_size(model: nn.Module) -> int:
    """Number of float entries P in the model's state."""
    return sum(t.numel() for t in _float_entries(model))


def get_flat(model: nn.Module) -> torch.Tensor:
    """The model's float state as a detached float32 vector (P,) on the model's device."""
    return torch.cat([t.detach().reshape(-1).float() for t in _float_entries(model)])


@torch.no_grad()
def set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector (P,) into the model's float state in place (any device).

    Raises:
        ValueError: the vector length differs from :func:`flat_size`.
    """
    entries = _float_entries(model)
    total = sum(t.numel() for t in entries)
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} entries, the model has {total}")
    flat = flat.to(entries[0].device, non_blocking=True)
    offset = 0
    for t in entries:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
