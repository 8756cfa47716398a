"""VGG-11/13/16/19 with batch norm for CIFAR-size inputs, the VGG family of FlexiFed (Wang et al., WWW 2023).

Source: Simonyan & Zisserman, ICLR 2015, configurations A (11 layers), B (13), D (16) and E (19), in the
batch-norm variant (Conv2d 3x3 padding 1 + BatchNorm2d + ReLU per convolution, max-pooling 2x2 stride 2 at
each ``'M'``). The convolutional part is the paper's (and torchvision's ``vgg*_bn``'s) layer for layer.

Deliberate differences:

* Classifier: FC(C_last*s*s -> 512) + ReLU + FC(512 -> 512) + ReLU + FC(512 -> classes), no dropout. ImageNet
  VGG (and torchvision, and the FlexiFed-IMP reimplementation) use 4096 hidden units with dropout and an
  adaptive 7x7 average pool; on 32x32 inputs the five poolings leave 1x1 maps, so we flatten them as they
  are ((H // 32) x (W // 32) maps: a 40 x 98 log-mel spectrogram leaves 1 x 3) and keep the classifier
  CIFAR-sized.
* ``width`` scales every convolution's channels and the classifier's hidden units:
  ``max(1, round(c * width))``; width 1 is the paper's network.

``base`` is one flat ``nn.Sequential`` (every layer of the configuration, then ``Flatten``) and ``head`` the
classifier, so state-dict names come in forward order (``base.0.weight``, ``base.1.weight``, ...,
``head.0.weight``, ...). FlexiFed matches layers position by position between depths: VGG-16 and VGG-19
share their first 7 convolutions (with their batch norms), VGG-11 and VGG-13 only the first.

Init (torchvision's): convolutions Kaiming-normal (fan_out, ReLU) with zero bias, batch norms weight 1 and
bias 0, linear layers PyTorch's default.
"""

from __future__ import annotations

from torch import nn

from pfl.models.split import SplitModel

# channels of each 3x3 convolution, 'M' a 2x2 max-pool (Simonyan & Zisserman, Table 1)
VGG_CONFIGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
_POOLS = 5  # every configuration halves the side five times


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class VGG(SplitModel):
    """VGG-``depth`` with batch norm: ``base`` (all conv/pool layers, flattened) + ``head`` (3 FC layers).

    Args:
        num_classes: logits per sample.
        in_channels: input channels (3 for RGB, 1 for a spectrogram).
        image_size: input side in pixels, a multiple of 32 (32 for CIFAR), or the input's ``(H, W)`` with both at
            least 32 (a spectrogram's mel bins x frames; each pooling floors an odd size, as ``MaxPool2d`` does).
        depth: 11, 13, 16 or 19 (configurations A, B, D, E).
        width: multiplier of every convolution's channels and of the 512 hidden units of the classifier.

    Shapes: input (B, in_channels, H, W) -> base (B, C * (H // 32) * (W // 32)) -> logits (B, num_classes),
    with C = max(1, round(512 * width)).

    Raises:
        ValueError: unknown ``depth``, a square ``image_size`` not a positive multiple of 32, an ``(H, W)`` side
            below 32, or ``width`` <= 0.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, image_size: int | tuple[int, int] = 32,
                 depth: int = 11, width: float = 1.0):
        if depth not in VGG_CONFIGS:
            raise ValueError(f"VGG depth must be one of {', '.join(map(str, VGG_CONFIGS))}, got {depth}")
        if isinstance(image_size, int) and (image_size <= 0 or image_size % 2**_POOLS):
            raise ValueError(f"VGG image_size must be a positive multiple of 32, got {image_size}")
        height, width_px = (image_size, image_size) if isinstance(image_size, int) else image_size
        if min(height, width_px) < 2**_POOLS:
            raise ValueError(f"VGG inputs must be at least 32 x 32, got {height} x {width_px}")
        if width <= 0:
            raise ValueError(f"VGG width must be positive, got {width}")
        layers: list[nn.Module] = []
        channels = in_channels
        for entry in VGG_CONFIGS[depth]:
            if entry == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = _scaled(entry, width)
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        layers.append(nn.Flatten())
        hidden = _scaled(512, width)
        flat = channels * (height // 2**_POOLS) * (width_px // 2**_POOLS)
        head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
        super().__init__(nn.Sequential(*layers), head)
        for module in self.base.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
