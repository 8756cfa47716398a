"""Import torchvision on both CPU-only and CUDA builds of torch.

The only torchvision wheel matching torch 2.13.0 is a CUDA build (0.28.0). On the
CPU build of torch its compiled extension cannot load, so the custom operators
``torchvision::nms`` and ``torchvision::qnms`` are never defined, and
``torchvision/_meta_registrations.py`` fails at import time with
``RuntimeError: operator torchvision::nms does not exist``.

:func:`import_torchvision` first tries a plain import (a no-op fix on machines
where the extension loads, e.g. CUDA machines). Only if that import fails with
exactly this error does it define the two missing operator *schemas* (no
kernels: calling ``torchvision.ops.nms`` still raises, which pfl never does) and
import again. Models, datasets and transforms work normally afterwards.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

# Schemas of the operators that torchvision registers fake kernels for at import
# time regardless of whether its extension loaded (torchvision 0.28.0).
_MISSING_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library: torch.library.Library | None = None  # kept alive: dropping it unregisters the schemas


def _op_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _define_missing_schemas() -> list[str]:
    """Define the torchvision operator schemas that are not registered yet; returns their names."""
    global _library
    missing = [name for name in _MISSING_OP_SCHEMAS if not _op_exists(name)]
    if missing:
        _library = _library or torch.library.Library("torchvision", "FRAGMENT")
        for name in missing:
            _library.define(_MISSING_OP_SCHEMAS[name])
    return missing


def _forget_partial_import() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, working around the CPU-torch / CUDA-torchvision mismatch.

    Raises:
        ImportError: torchvision is not installed (install it with ``-c constraints.txt``).
        RuntimeError: torchvision failed to import for a reason other than the missing
            operator schemas described in the module docstring.
    """
    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err) or "does not exist" not in str(err):
            raise
        _forget_partial_import()
        _define_missing_schemas()
        import torchvision
    return torchvision
