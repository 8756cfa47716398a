"""A model's floating-point state as one flat vector, for storage and aggregation.

Client state (personalized models, FedFomo's copies) is kept as flat float32
vectors in host memory; aggregation is vector arithmetic. The order is that of
``model.state_dict()`` restricted to floating-point entries (parameters and float
buffers such as BatchNorm statistics); integer buffers are left untouched.
:func:`flat_layout` says where each entry lives in the vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FlatEntry:
    """One state entry's place in the flat vector: ``flat[offset:offset + numel].view(shape)``.

    Attributes:
        name: state_dict key, e.g. ``"head.2.weight"``.
        offset: first position in the flat vector.
        shape: the tensor's shape.
        is_param: a trainable parameter (``False`` for float buffers).
    """

    name: str
    offset: int
    shape: torch.Size
    is_param: bool

    @property
    def numel(self) -> int:
        """Number of entries of the tensor."""
        return self.shape.numel()

    @property
    def span(self) -> slice:
        """Its slice of the flat vector."""
        return slice(self.offset, self.offset + self.numel)


def _float_entries(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, t) for k, t in model.state_dict(keep_vars=True).items() if t.is_floating_point()]


def flat_layout(model: nn.Module) -> list[FlatEntry]:
    """Where every float state entry of ``model`` sits in its flat vector, in order."""
    params = {name for name, _ in model.named_parameters()}
    layout, offset = [], 0
    for name, t in _float_entries(model):
        layout.append(FlatEntry(name, offset, t.shape, name in params))
        offset += t.numel()
    return layout


def param_mask(model: nn.Module) -> torch.Tensor | None:
    """Bool mask (P,) of the flat positions holding trainable parameters; ``None`` when all do (no float buffers)."""
    layout = flat_layout(model)
    if all(e.is_param for e in layout):
        return None
    return torch.cat([torch.full((e.numel,), e.is_param) for e in layout])


def flat_size(model: nn.Module) -> int:
    """Number of float entries P in the model's state."""
    return sum(t.numel() for _, t in _float_entries(model))


def get_flat(model: nn.Module) -> torch.Tensor:
    """The model's float state as a detached float32 vector (P,) on the model's device."""
    return torch.cat([t.detach().reshape(-1).float() for _, t in _float_entries(model)])


def stack_flat(model: nn.Module, vectors: list[torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """C flat vectors (P,) of ``model`` as stacked named tensors for ``torch.func.functional_call`` under ``vmap``.

    Returns:
        state-dict name -> a fresh contiguous tensor (C, *shape) on ``device``, in :func:`flat_layout` order.
    """
    stacked = torch.stack([v.to(device) for v in vectors])
    return {e.name: stacked[:, e.span].reshape(len(vectors), *e.shape).contiguous() for e in flat_layout(model)}


@torch.no_grad()
def set_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector (P,) into the model's float state in place (any device).

    Raises:
        ValueError: the vector length differs from :func:`flat_size`.
    """
    entries = [t for _, t in _float_entries(model)]
    total = sum(t.numel() for t in entries)
    if flat.numel() != total:
        raise ValueError(f"flat vector has {flat.numel()} entries, the model has {total}")
    flat = flat.to(entries[0].device, non_blocking=True)
    offset = 0
    for t in entries:
        t.copy_(flat[offset: offset + t.numel()].view_as(t))
        offset += t.numel()
