"""ResNet-18 as MocoSFL builds it (Li et al., ICLR 2023; SonyResearch/MocoSFL ``models/resnet.py``), split at a cut
layer.

No BatchNorm anywhere: every convolution is weight-standardized (:class:`WSConv2d`, Qiao et al. 2019) and
followed by ``GroupNorm`` with 4 channels per group, so per-client batches of one sample are fine and
nothing depends on batch statistics. The stem is a 3x3, stride-1 convolution (3 -> 64) + GroupNorm + ReLU
(CIFAR's 32x32, no max-pooling). The network is the sequence of 9 layers

    [stem, block64, block64, block128/2, block128, block256/2, block256, block512/2, block512]

of basic residual blocks (1x1 weight-standardized projection + GroupNorm on a shortcut that changes
shape). ``cut_layer`` c gives the client the first c layers (c=1: the stem alone; c=2: the stem and the
first 64-channel block; both send 64x32x32 activations) and the server the rest, global average pooling,
and the projection MLP ``Linear(512, 1024) - ReLU - Linear(1024, 1024)`` (MoCo v2 as MocoSFL sizes it).

Initialization: PyTorch's defaults for the weight-standardized convolutions (the official code's Xavier
initialization skips them: it matches ``type(m) == nn.Conv2d`` exactly) and Xavier-uniform with zero bias
for the MLP's linear layers, as the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pfl.models.split import SplitModel

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # MocoSFL's input normalization (official datasets.py)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
GROUP_CHANNELS = 4  # channels per GroupNorm group
PROJECTION = (1024, 1024)  # MoCo v2 MLP: hidden, output (MocoSFL's K_dim for V2)


class WSConv2d(nn.Conv2d):
    """A convolution whose weight is standardized per output channel before use:
    ``(w - mean(w)) / (std(w) + 1e-5)`` over (in, kh, kw), with the unbiased std (``torch.std``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = w - w.mean(dim=(1, 2, 3), keepdim=True)
        w = w / (w.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(channels // GROUP_CHANNELS, 1), channels)


class Stem(nn.Sequential):
    """3x3 weight-standardized convolution (3 -> 64, stride 1) + GroupNorm + ReLU: (B, 3, H, W) -> (B, 64, H, W)."""

    def __init__(self, in_channels: int = 3, planes: int = 64):
        super().__init__(WSConv2d(in_channels, planes, 3, padding=1, bias=False), _norm(planes), nn.ReLU())


class Block(nn.Module):
    """Basic residual block: two 3x3 weight-standardized convolutions with GroupNorm, ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = WSConv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(planes)
        self.conv2 = WSConv2d(planes, planes, 3, padding=1, bias=False)
        self.norm2 = _norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(WSConv2d(in_planes, planes, 1, stride=stride, bias=False), _norm(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def layers(in_channels: int = 3, width: float = 1.0) -> list[nn.Module]:
    """The 9 layers of the network in order (module docstring); ``width`` scales every layer's channels
    (64 -> ``round(64 width)``)."""
    def channels(c: int) -> int:
        return max(GROUP_CHANNELS, round(c * width))

    out: list[nn.Module] = [Stem(in_channels, channels(64))]
    in_planes = channels(64)
    for planes, stride in ((64, 1), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1)):
        out.append(Block(in_planes, channels(planes), stride))
        in_planes = channels(planes)
    return out


def projection_mlp(features: int = 512, hidden: int = PROJECTION[0], dim: int = PROJECTION[1]) -> nn.Sequential:
    """``Linear(512, 1024) - ReLU - Linear(1024, 1024)``, Xavier-uniform weights and zero biases."""
    mlp = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, dim))
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return mlp


def swav_projection(features: int = 512) -> nn.Module:
    """SwAV's projection head (Caron et al. 2020, Sec. 4): lightly's ``SwaVProjectionHead``,
    ``Linear(512, 2048) - BatchNorm - ReLU - Linear(2048, 128)`` (official ``hidden_mlp=2048``, ``feat_dim=128``).
    It runs on the server once per step over every crop of every client's samples, so its BatchNorm normalizes
    with all of them (:meth:`pfl.algorithms.mocosfl.MocoSFL._swav_embeddings`; official ``src/resnet50.py``)."""
    from pfl._torchvision import import_torchvision

    import_torchvision()  # lightly imports torchvision (pfl's shim on CPU-only torch)
    from lightly.models.modules import SwaVProjectionHead

    return SwaVProjectionHead(features, 2048, 128)


class MocoSFLResNet18(SplitModel):
    """The whole network as one model: ``base`` = the 9 layers, global average pooling and flattening,
    (B, C, 32, 32) -> (B, 512); ``head`` = the projection MLP, (B, 512) -> (B, 1024). ``model(x)`` is the
    normalized-later projection the MoCo loss and MocoSFL's kNN monitor read. A cut layer splits it by
    entry names (:func:`client_entries`), so one model serves every client's stem and the server's trunk.
    ``width`` (``model_width``) scales the channels (0.25: 16 to 128, for CPU-sized runs; features 128-d).
    ``projection="swav"`` (architecture ``resnet18_sfl_swav``) ends in SwAV's projection head instead
    (:func:`swav_projection`, 128-d embeddings, :attr:`embedding_dim`)."""

    def __init__(self, in_channels: int = 3, width: float = 1.0, projection: str = "moco"):
        trunk = layers(in_channels, width)
        features = trunk[-1].conv2.out_channels
        head = projection_mlp(features) if projection == "moco" else swav_projection(features)
        super().__init__(nn.Sequential(*trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten()), head)
        self.embedding_dim = PROJECTION[1] if projection == "moco" else 128


def check_cut_layer(cut_layer: int) -> None:
    """Raises ValueError unless ``cut_layer`` is 1 or 2 (the cuts MocoSFL studies)."""
    if cut_layer not in (1, 2):
        raise ValueError(f"cut_layer={cut_layer}: MocoSFL cuts ResNet-18 after layer 1 (the stem) or 2 (the stem and "
                         "its first block); set cut_layer=1 or cut_layer=2")


def client_entries(names: list[str], cut_layer: int) -> list[str]:
    """The entries of a :class:`MocoSFLResNet18` state a client holds: those of its first ``cut_layer`` layers.

    Raises:
        ValueError: ``cut_layer`` is not 1 or 2.
    """
    check_cut_layer(cut_layer)
    prefixes = tuple(f"base.{i}." for i in range(cut_layer))
    return [n for n in names if n.startswith(prefixes)]


def split(model: MocoSFLResNet18, cut_layer: int) -> tuple[nn.Sequential, nn.Sequential]:
    """``(client stem, server side)`` views of ``model`` sharing its parameters: the first ``cut_layer`` layers,
    (B, C, 32, 32) -> (B, 64, 32, 32); the rest with the MLP, -> (B, 1024).

    Raises:
        ValueError: ``cut_layer`` is not 1 or 2.
    """
    check_cut_layer(cut_layer)
    return model.base[:cut_layer], nn.Sequential(*model.base[cut_layer:], model.head)
