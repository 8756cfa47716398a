"""Pretrained weights for a model's initialization: timm's published weights, a local file, or a pfl run's model.

Whatever the source, the weights become a :data:`~pfl.federated.state.State` in pfl's layout
(``base.*`` + ``head.*``), adapted to the model by :func:`adapt_weights`:

* a checkpoint in timm's or torchvision's own layout is mapped by a prefix: its classifier
  (``head.*``, ``fc.*``, ``classifier.*``) becomes ``head.*`` and everything else ``base.*``, with
  torchvision ResNet's named stages renamed to their positions in pfl's ``nn.Sequential`` base
  (``conv1`` -> ``base.0``, ``bn1`` -> ``base.1``, ``layer1`` .. ``layer4`` -> ``base.4`` .. ``base.7``);
* a ViT's position embeddings are resampled to the model's grid when the image size differs
  (timm's ``resample_abs_pos_embed``: bicubic, the class token kept);
* a head whose shape differs (another number of classes) is dropped, so the model keeps its own
  freshly initialized head: the head is *resized* to the dataset's classes.

Files are read without unpickling: ``.safetensors`` through safetensors, ``.pt`` / ``.pth`` / ``.bin``
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # at run time pfl.algorithms imports pfl.models
    from pfl.federated.state import State
CLASSIFIER_PREFIXES = ("head.", "fc.", "classifier.")  # timm ViTs, torchvision ResNets, VGG-style classifiers
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# torchvision ResNet's modules -> their index in pfl's ResNet-18 base (pfl/models/resnet.py)
TORCHVISION_RESNET = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def read_weights(path: str | Path) -> State:
    """The tensors of a weights file (a state dict, or one nested under ``state_dict`` / ``model``).

    Raises:
        ValueError: the file is missing, of an unknown type, damaged (a garbage or truncated ``.safetensors``),
            holds no tensors, or cannot be read without unpickling arbitrary objects; the message names the file
            and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained: {path} does not exist; give a .safetensors or .pth file, "
                         "pretrained=timm, or init_from=runs:/<run id>")
    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ValueError(f"pretrained: {path} is not a weights file ({', '.join(CHECKPOINT_SUFFIXES)})")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:  # garbage, truncated or empty: its header cannot be read
            raise ValueError(f"pretrained: {path} is not a readable .safetensors file ({err}); it may be truncated "
                             "or of another format: write it again with safetensors.torch.save_file, or pass "
                             "another file") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal or damage is one message
        raise ValueError(f"pretrained: {path} cannot be read as plain tensors ({type(err).__name__}); "
                         "convert it to .safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)} if isinstance(loaded, dict) else {}
    if not tensors:
        raise ValueError(f"pretrained: {path} holds no state dict of tensors")
    return tensors


def split_layout(weights: State) -> State:
    """``weights`` in pfl's ``base.*`` / ``head.*`` layout (already so: unchanged; see the module docstring)."""
    if all(k.startswith(("base.", "head.")) for k in weights):
        return dict(weights)

    def name(key: str) -> str:
        first, rest = key.split(".", 1) if "." in key else (key, "")
        if key.startswith(CLASSIFIER_PREFIXES):
            return f"head.{rest}"
        return f"base.{TORCHVISION_RESNET.get(first, first)}{'.' + rest if rest else ''}"

    return {name(k): v for k, v in weights.items()}


def adapt_weights(model: nn.Module, weights: State, source: str) -> tuple[State, list[str]]:
    """``weights`` (any layout) made to fit ``model``: mapped, position embeddings resampled, a head of another
    shape dropped. Returns the adapted state and notes on what was changed (for the run's log).

    Raises:
        ValueError: the base does not match (missing or unexpected entries, other shapes); the message
            names ``source``, a few entries, and the fix.
    """
    weights = split_layout(weights)
    own = model.state_dict()
    notes = []
    pos = "base.pos_embed"
    if pos in weights and pos in own and weights[pos].shape != own[pos].shape:
        from timm.layers import resample_abs_pos_embed

        prefix = getattr(model.base, "num_prefix_tokens", 1)
        grid = model.base.patch_embed.grid_size
        weights[pos] = resample_abs_pos_embed(weights[pos], new_size=list(grid), num_prefix_tokens=prefix)
        notes.append(f"position embeddings resampled to a {grid[0]}x{grid[1]} grid")
    head = {k for k in weights if k.startswith("head.")}
    if any(k not in own or own[k].shape != weights[k].shape for k in head):
        weights = {k: v for k, v in weights.items() if k not in head}
        notes.append(f"head re-initialized for {model.head.out_features} classes")
    base_own = {k for k in own if k.startswith("base.")}
    missing = sorted(base_own - weights.keys())
    unexpected = sorted(weights.keys() - own.keys())
    wrong = sorted(k for k in weights.keys() & own.keys() if weights[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", wrong)) if keys]
        raise ValueError(f"{source} does not fit this model ({'; '.join(parts)}); use weights of the same "
                         "architecture, or pretrained=none")
    return weights, notes


def timm_weights(name: str) -> State:
    """timm's published weights of architecture ``name`` (downloaded from the Hugging Face Hub, or its cache).

    Raises:
        ValueError: no weights for ``name``, or the download failed (offline); the message names the alternatives.
    """
    from pfl.models.vit import TIMM_VITS, timm_module

    if name not in TIMM_VITS:
        raise ValueError(f"pretrained=timm: timm publishes no weights for model {name!r}; use one of "
                         f"{', '.join(TIMM_VITS)}, a weights file (pretrained=<path>), or init_from=runs:/<run id>")
    try:
        return timm_module().create_model(name, pretrained=True, num_classes=0).state_dict()
    except Exception as err:  # noqa: BLE001 - offline machines fail in many ways (DNS, proxy, hub errors)
        raise ValueError(f"pretrained=timm: could not fetch timm's weights of {name} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120] if str(err) else 'no message'}); on a machine without "
                         "the model hub, download them elsewhere and pass pretrained=<path to .safetensors>, or "
                         "start from a pfl run with init_from=runs:/<run id>") from None
