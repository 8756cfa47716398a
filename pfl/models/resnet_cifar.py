"""The CIFAR ResNets (ResNet-20/32/44/56), the ResNet family of FlexiFed (Wang et al., WWW 2023).

Source: He et al., CVPR 2016, Sec. 4.2: a 3x3 convolution with 16 filters, then three stages of n basic blocks
on 32x32, 16x16 and 8x8 maps with 16, 32 and 64 filters (the first block of stages 2 and 3 subsamples with
stride 2), global average pooling and a fully-connected layer: 6n + 2 weighted layers. A basic block is
conv3x3 + BN + ReLU + conv3x3 + BN, added to the shortcut, then ReLU. Convolutions have no bias.

Shortcuts are the paper's option A, parameter-free: the identity, and where the shape changes the input
subsampled with stride 2 (every other pixel) and zero-padded in channels. The paper does not say where the
zero channels go; we append them after the input's (reimplementations that pad on both sides differ only by
a relabelling of the block's output channels).

Deliberate differences: ``width`` scales the 16/32/64 filters to ``max(1, round(c * width))`` (width 1 is the
paper's network); ``image_size`` is accepted for the factory's signature but the global pool absorbs any size.

``base`` = Sequential(conv, BN, ReLU, stage1, stage2, stage3, AdaptiveAvgPool2d(1), Flatten), each stage a
Sequential of blocks with submodules ``conv1``, ``bn1``, ``conv2``, ``bn2`` (state names such as
``base.3.0.conv1.weight``), all in forward order; ``head`` is the final linear layer. Init: convolutions
Kaiming-normal (fan_out, ReLU), batch norms weight 1 and bias 0, the linear layer PyTorch's default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pfl.models.split import SplitModel

RESNET_CIFAR_DEPTHS = (20, 32, 44, 56)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers plus the parameter-free option-A shortcut.

    Args:
        in_channels: input channels.
        out_channels: output channels (>= ``in_channels``).
        stride: 1, or 2 to halve the side (the shortcut then takes every other pixel).

    Shapes: (B, in_channels, H, W) -> (B, out_channels, ceil(H / stride), ceil(W / stride)).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride != 1 else x
        if self.extra_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return F.relu(out + shortcut, inplace=True)


class CifarResNet(SplitModel):
    """CIFAR ResNet-``depth`` (option-A shortcuts) as ``base`` (up to the pooled features) + ``head`` (linear).

    Args:
        num_classes: logits per sample.
        in_channels: input channels (3 for RGB).
        image_size: input side in pixels, or ``(H, W)`` (any size; the global average pool absorbs it).
        depth: 6n + 2 weighted layers, one of 20, 32, 44, 56 (n = 3, 5, 7, 9 blocks per stage).
        width: multiplier of the 16/32/64 filters of the three stages.

    Shapes: input (B, in_channels, H, W) -> base (B, C) -> logits (B, num_classes),
    with C = max(1, round(64 * width)).

    Raises:
        ValueError: ``depth`` not one of 20, 32, 44, 56, or ``width`` <= 0.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int | tuple[int, int] = 32,
                 depth: int = 20, width: float = 1.0):
        if depth not in RESNET_CIFAR_DEPTHS:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, one of {', '.join(map(str, RESNET_CIFAR_DEPTHS))},"
                             f" got {depth}")
        if width <= 0:
            raise ValueError(f"CIFAR ResNet width must be positive, got {width}")
        blocks = (depth - 2) // 6
        stem = _scaled(16, width)
        layers: list[nn.Module] = [_conv3x3(in_channels, stem), nn.BatchNorm2d(stem), nn.ReLU(inplace=True)]
        channels = stem
        for stage, filters in enumerate((16, 32, 64)):
            out = _scaled(filters, width)
            stage_blocks = []
            for index in range(blocks):
                stride = 2 if stage > 0 and index == 0 else 1
                stage_blocks.append(BasicBlock(channels, out, stride))
                channels = out
            layers.append(nn.Sequential(*stage_blocks))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        super().__init__(nn.Sequential(*layers), nn.Linear(channels, num_classes))
        for module in self.base.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
