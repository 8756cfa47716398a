"""LoRA adapters through peft (Hu et al., ICLR 2022), as FedLoRA trains and exchanges them.

:func:`add_lora` injects peft's LoRA layers (``peft.inject_adapter_in_model`` with a ``LoraConfig``)
into a model's base, which peft freezes; the head stays trainable. A wrapped linear layer
``W x`` becomes ``W x + (lora_alpha / rank) B A x`` with A (rank, in) drawn by peft's default
(Kaiming-uniform) and B (out, rank) zero, so the adapted model starts as the backbone.
Adapter entries are named ``...<layer>.lora_A.default.weight`` / ``...lora_B.default.weight`` and
the frozen layer's own weights ``...<layer>.base_layer.weight``.

With ``freeze_a`` the A matrices are frozen too, as FFA-LoRA (Sun et al., ICLR 2024, Sec. 3) does.

timm's ViT computes attention's Q, K and V with one fused linear layer ``qkv`` (d -> 3d). An adapter on it is
one B (3d, r) A (r, d): the three projections share A, so they are adapted in one rank-r subspace, where
separate adapters on ``q_proj``, ``k_proj``, ``v_proj`` (an LLM's layout, FedIT's) would have rank r each.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

TIMM_VIT_LORA_TARGETS = ("qkv", "fc1", "fc2")  # timm ViT blocks: attention's fused qkv and the MLP's two layers


@dataclass(frozen=True)
class LoraSpec:
    """The LoRA adapters of a model (part of its :class:`~pfl.models.ModelSpec`, so a saved client rebuilds).

    Attributes:
        rank: r, the inner dimension of ``B A``.
        alpha: ``lora_alpha``; the update is scaled by ``alpha / rank``.
        target_modules: names (suffixes) of the base's linear layers to adapt.
        dropout: dropout on the adapters' input.
        freeze_a: freeze A at its initialization (FFA-LoRA); only B and the head train.
    """

    rank: int
    alpha: float
    target_modules: tuple[str, ...] = TIMM_VIT_LORA_TARGETS
    dropout: float = 0.0
    freeze_a: bool = False


def add_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    """Inject LoRA adapters into ``model.base`` in place (peft), freezing the base; returns the model.

    Raises:
        ValueError: no linear layer of the base is named by ``target_modules`` (e.g. a CNN's base).
    """
    from pfl._torchvision import import_torchvision

    import_torchvision()  # peft imports transformers, which imports torchvision (pfl's shim on CPU-only torch)
    from peft import LoraConfig, inject_adapter_in_model

    linear = [name for name, m in model.base.named_modules() if isinstance(m, nn.Linear)]
    if not any(name.split(".")[-1] in lora.target_modules for name in linear):
        have = sorted({name.split(".")[-1] for name in linear}) or ["none"]
        raise ValueError(f"target_modules {list(lora.target_modules)} name no linear layer of {type(model).__name__}'s "
                         f"base (its linear layers: {', '.join(have[:6])}); use a ViT (e.g. model=vit_cifar) or set "
                         "target_modules to those layers")

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                        lora_dropout=lora.dropout)
    inject_adapter_in_model(config, model.base)
    if lora.freeze_a:
        for name, p in model.base.named_parameters():
            if ".lora_A." in name:
                p.requires_grad_(False)
    return model


def is_adapter_entry(name: str) -> bool:
    """Whether a state entry is a LoRA adapter matrix (``lora_A`` / ``lora_B``)."""
    return ".lora_A." in name or ".lora_B." in name
