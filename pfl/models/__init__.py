"""Models split into ``base`` (feature extractor) + ``head`` (projection head); one file per family,
and the factory :func:`build_model` that rebuilds any client's architecture from its :class:`ModelSpec`."""

import logging
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from pfl.models.adapters import LoraSpec, add_lora
from pfl.models.charcnn import CHARCNN_DEPTHS, CharCNN
from pfl.models.cnn import CNN
from pfl.models.resnet import ResNet18
from pfl.models.resnet_cifar import RESNET_CIFAR_DEPTHS, CifarResNet
from pfl.models.resnet_sfl import CIFAR10_MEAN, CIFAR10_STD, MocoSFLResNet18
from pfl.models.split import ModelSpec, SplitModel
from pfl.models.vdcnn import VDCNN, VDCNN_BLOCKS
from pfl.models.vgg import VGG, VGG_CONFIGS
from pfl.models.viewport import VPLSTM, VPTransformer, build_vp_lstm, build_vp_transformer
from pfl.models.vit import VITS, build_vit, vit_normalization

_BUILDERS: dict[str, Callable[[ModelSpec], SplitModel]] = {
    "cnn": lambda s: CNN(s.num_classes, s.in_channels, s.image_size),
    "resnet18": lambda s: ResNet18(s.num_classes, s.in_channels, s.image_size),
    "resnet18_sfl": lambda s: MocoSFLResNet18(s.in_channels, s.width),  # self-supervised: 1024-d projections, not logits
    "resnet18_sfl_swav": lambda s: MocoSFLResNet18(s.in_channels, s.width, "swav"),  # 128-d SwAV projections
    # FlexiFed's families take images or spectrograms (1, mel bins, frames): the input's channels and (H, W)
    **{f"vgg{d}": (lambda s, d=d: VGG(s.num_classes, s.sample_shape[0], s.sample_shape[1:], d, s.width))
       for d in VGG_CONFIGS},
    **{f"resnet{d}": (lambda s, d=d: CifarResNet(s.num_classes, s.sample_shape[0], s.sample_shape[1:], d, s.width))
       for d in RESNET_CIFAR_DEPTHS},
    **{name: build_vit for name in VITS},
    "vp_lstm": build_vp_lstm,  # viewport prediction: head positions (history, 3) in, positions out
    "vp_transformer": build_vp_transformer,
    # text classification on character ids (B, 1024): CharCNN with 3..6 convolutions, VDCNN-9..49
    **{f"charcnn{d}": (lambda s, d=d: CharCNN(s.num_classes, d, s.width)) for d in CHARCNN_DEPTHS},
    **{f"vdcnn{d}": (lambda s, d=d: VDCNN(s.num_classes, d, s.width)) for d in VDCNN_BLOCKS},
}
ARCHITECTURES: tuple[str, ...] = tuple(_BUILDERS)  # every architecture name build_model takes
# FlexiFed's families of depths (VGG, CIFAR ResNet): architecture -> family. Their inputs are normalized with
# CIFAR-10's statistics as FlexiFed's code does (PFLlib's 0.5 / 0.5 before; ModelSpec.from_dict gives specs saved
# before then the values their runs used).
FAMILIES = {**{f"vgg{d}": "vgg" for d in VGG_CONFIGS}, **{f"resnet{d}": "resnet" for d in RESNET_CIFAR_DEPTHS},
            **{f"charcnn{d}": "charcnn" for d in CHARCNN_DEPTHS}, **{f"vdcnn{d}": "vdcnn" for d in VDCNN_BLOCKS}}
# The inputs (pfl.data.datasets.DatasetInfo.modality) each architecture takes; an architecture not listed takes
# images. VGG and the CIFAR ResNets also take log-mel spectrograms (1, mel bins, frames) of audio clips.
MODEL_MODALITIES = {"vp_lstm": ("sequence",), "vp_transformer": ("sequence",),
                    **{name: ("text",) for name, family in FAMILIES.items() if family in ("charcnn", "vdcnn")},
                    **{name: ("image", "audio") for name, family in FAMILIES.items() if family in ("vgg", "resnet")}}
# Each architecture's own run knobs, passed to its builder as ModelSpec.options (the dataset's horizon: the steps a
# viewport predictor rolls out).
MODEL_OPTIONS = {"vp_lstm": ("horizon",), "vp_transformer": ("horizon", "embedding")}
log = logging.getLogger(__name__)


def build_model(spec: ModelSpec, weights: Mapping[str, torch.Tensor] | None = None, source: str = "") -> SplitModel:
    """Instantiate the architecture named by ``spec``: randomly initialized from torch's global RNG, then
    ``weights`` loaded (pretrained weights in any layout :func:`pfl.models.pretrained.adapt_weights` maps; what
    it changed is logged), then ``spec.lora``'s adapters injected (:func:`pfl.models.adapters.add_lora`).

    Args:
        spec: the architecture.
        weights: initial weights, or ``None``.
        source: where ``weights`` came from, for messages (``pretrained=vit.safetensors``).

    Raises:
        ValueError: unknown architecture name, a size the architecture does not take, or weights of
            another architecture.
    """
    from pfl.federated.state import load_state
    from pfl.models.pretrained import adapt_weights

    if spec.name not in _BUILDERS:
        raise ValueError(f"unknown model {spec.name!r}; choose one of {', '.join(ARCHITECTURES)}")
    model = _BUILDERS[spec.name](replace(spec, lora=None))
    if weights is not None:
        adapted, notes = adapt_weights(model, dict(weights), source or "the weights")
        load_state(model, adapted)
        for note in notes:
            log.info("%s: %s", source, note)
    return add_lora(model, spec.lora) if spec.lora is not None else model


def modalities_of(name: str) -> tuple[str, ...]:
    """The input modalities architecture ``name`` takes (:data:`MODEL_MODALITIES`; ``("image",)`` if unlisted)."""
    return MODEL_MODALITIES.get(name, ("image",))


def input_normalization(name: str, dataset: str = "") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` (in [0, 1] units) the architecture's images are normalized with: timm's
    for its ViTs (:func:`pfl.models.vit.vit_normalization`), CIFAR-10's for MocoSFL's ResNet-18 (its official
    code's) and for FlexiFed's families, VGG-11..19 and the CIFAR ResNets (FlexiFed's official ``utils.py``,
    ``get_dataset``: ``Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))``), both on every dataset but
    CINIC-10, where FlexiFed's families take CINIC-10's own statistics as that function does for it
    (:data:`pfl.data.cinic.MEAN`, :data:`pfl.data.cinic.STD`); PFLlib's 0.5 / 0.5 for the others."""
    if name in FAMILIES and dataset == "cinic10":
        from pfl.data import cinic

        return cinic.MEAN, cinic.STD
    if name.startswith("resnet18_sfl") or name in FAMILIES:
        return CIFAR10_MEAN, CIFAR10_STD
    return vit_normalization(name) if name in VITS else ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


__all__ = ["ARCHITECTURES", "MODEL_MODALITIES", "MODEL_OPTIONS", "CNN", "FAMILIES", "VITS", "CharCNN", "CifarResNet",
           "LoraSpec", "ResNet18", "VDCNN", "VGG", "VPLSTM", "VPTransformer", "ModelSpec", "SplitModel", "build_model",
           "input_normalization", "modalities_of"]
