"""Vision Transformers from timm, split into base (the transformer up to its pooled, normalized features) and head.

The architectures are timm's own (``timm.create_model`` / ``VisionTransformer``), built with
``num_classes=0`` so that timm's model returns the pooled pre-logits features (B, D); pfl's head is
a ``nn.Linear(D, num_classes)`` named ``head`` as timm's classifier is, so timm checkpoints map onto
``base.*`` + ``head.*`` by a prefix (:mod:`pfl.models.pretrained`).

* ``vit_tiny_patch16_224``, ``vit_small_patch16_224``, ``vit_base_patch16_224``: timm's ViT-Ti/S/B with
  16x16 patches (Dosovitskiy et al., ICLR 2021); the input side is the spec's ``image_size`` (224 for
  timm's published weights; another size resamples the position embeddings).
* ``vit_cifar``: a ViT for 32x32 images that trains on a CPU: timm's ``VisionTransformer`` with 4x4
  patches (64 tokens + the class token), width 128, 4 blocks of 4 heads of 32 dimensions (0.8 M parameters).

timm is imported when a ViT is built (it takes seconds), through :mod:`pfl._torchvision`.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from pfl.models.split import ModelSpec, SplitModel

TIMM_VITS = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")
CIFAR_VIT = {"patch_size": 4, "embed_dim": 128, "depth": 4, "num_heads": 4}  # ``vit_cifar``
VITS = (*TIMM_VITS, "vit_cifar")


def timm_module() -> ModuleType:
    """The ``timm`` module, imported on first use (it takes seconds) after pfl's torchvision shim."""
    from pfl._torchvision import import_torchvision

    import_torchvision()  # timm imports torchvision, which needs pfl's shim on CPU-only torch
    import timm

    return timm


def build_vit(spec: ModelSpec) -> SplitModel:
    """The ViT named ``spec.name`` (:data:`VITS`) for ``spec.image_size`` inputs, randomly initialized
    (timm's initialization; the head: ``nn.Linear``'s).

    Raises:
        ValueError: ``image_size`` is not a multiple of the patch size.
    """
    timm = timm_module()
    patch = CIFAR_VIT["patch_size"] if spec.name == "vit_cifar" else 16
    if spec.image_size % patch:
        fit = max(patch, spec.image_size // patch * patch)
        raise ValueError(f"image_size={spec.image_size} is not a multiple of {spec.name}'s {patch}-pixel patches; "
                         f"set image_size to a multiple of {patch} (e.g. {fit})")
    kwargs = {"img_size": spec.image_size, "in_chans": spec.in_channels, "num_classes": 0}
    if spec.name == "vit_cifar":
        from timm.models.vision_transformer import VisionTransformer

        base = VisionTransformer(**CIFAR_VIT, **kwargs)
    else:
        base = timm.create_model(spec.name, pretrained=False, **kwargs)
    return SplitModel(base, nn.Linear(base.num_features, spec.num_classes))


def vit_normalization(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` per channel of the inputs timm's published weights of ``name`` expect (its ``pretrained_cfg``;
    0.5 / 0.5 for the three ViTs here); ``vit_cifar``: PFLlib's 0.5 / 0.5."""
    if name == "vit_cifar":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    cfg = timm_module().models.get_pretrained_cfg(name)
    return tuple(cfg.mean), tuple(cfg.std)
