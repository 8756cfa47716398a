"""VDCNN-9/17/29/49, the very deep character-level CNNs of Conneau et al., the VDCNN family of FlexiFed (Wang et al.,
WWW 2023).

Source: A. Conneau, H. Schwenk, L. Barrault, Y. LeCun, "Very Deep Convolutional Networks for Text Classification",
EACL 2017 (arXiv:1606.01781): Section 3 (architecture, Figures 1-2; Table 2, the convolutional layers per depth),
Section 4.2 (common settings: 16-d character embedding, He et al.'s initialization) and Section 4.3 (results). The
authors released no code; this follows the paper.

Layers (Figure 1): a look-up table of 16-d character embeddings (B, 16, 1024); a temporal convolution of 64 kernels of
size 3; four levels of convolutional blocks with 64, 128, 256 and 512 feature maps, each block two times (temporal
convolution of size 3, temporal batch norm, ReLU) (Figure 2), the first convolution of a level taking the previous
level's maps; between two levels a max-pool of size 3 and stride 2 halving the temporal resolution (of the paper's
three down-samplings the best, Section 4.3), 1024 -> 512 -> 256 -> 128 frames; k-max pooling with k = 8
(:class:`KMaxPool1d`) to 512 x 8 features; three fully-connected layers 4096 -> 2048 -> 2048 -> classes with ReLUs
between them and no dropout (Section 3). Convolutions are zero-padded by 1 to keep the resolution (the "same"
outputs of Figure 1).

Blocks per level (64, 128, 256, 512 maps), from the paper's Table 2 of convolutional layers per depth (2 per block;
the depth counts the first convolution too): VDCNN-9 1, 1, 1, 1; VDCNN-17 2, 2, 2, 2; VDCNN-29 5, 5, 2, 2;
VDCNN-49 8, 8, 5, 3. No shortcut connections at any depth: the paper's best results (depth 29) are without them, and
shortcuts only reduce the degradation at depth 49 (Section 4.3); one rule for all four depths keeps depth the only
difference between FlexiFed's V1..V4. The FlexiFed reimplementation (github.com/2006wzt/FlexiFed-IMP at 396b3a90,
``src/model/VDCNN.py`` lines 107-117) has the same blocks per level (one at each level's start plus its
``layers``: [0, 0, 0, 0], [1, 1, 1, 1], [4, 4, 1, 1], [7, 7, 4, 2]), but shortcuts at every depth, two max-pools
between levels and an adaptive max-pool instead of k-max pooling; pfl follows the paper.

``base`` is one flat ``nn.Sequential`` (embedding, first convolution, every convolution / batch norm / ReLU in forward
order, the pools, k-max pooling, ``Flatten``) and ``head`` the three fully-connected layers (as :mod:`pfl.models.vgg`).
FlexiFed's common prefix of two depths is the embedding, the first convolution and the shallower depth's blocks of
the first level (the first place where one depth pools and the other convolves ends it).

Init: convolutions He et al. (2015) normal (fan-in, ReLU) with zero bias, batch norms weight 1 and bias 0, the
embedding and the linear layers PyTorch's default.

Deliberate differences and readings of what the paper leaves open:

* The embedding covers the 73 ids of :mod:`pfl.data.text` (padding, unknown, space, the 70 characters of Zhang et
  al.'s alphabet); the paper's dictionary has 69 tokens. Padding is a token with a learned embedding, as in the paper's
  dictionary.
* Convolutions have a bias (the paper does not say; Torch 7's temporal convolution, its framework, has one).
* ``width`` scales every convolution's feature maps (64/128/256/512) and the 2048 hidden units:
  ``max(1, round(c * width))``; the 16-d embedding is the input's, like an image's channels, and is not scaled.
  Width 1 is the paper's network.
"""

from __future__ import annotations

import torch
from torch import nn

from pfl.data.text import NUM_IDS
from pfl.models.split import SplitModel
from pfl.models.vgg import _scaled

# blocks per level of 64, 128, 256, 512 feature maps (the paper's Table 2 of convolutional layers per depth, halved)
VDCNN_BLOCKS: dict[int, tuple[int, int, int, int]] = {9: (1, 1, 1, 1), 17: (2, 2, 2, 2), 29: (5, 5, 2, 2),
                                                      49: (8, 8, 5, 3)}
LEVEL_CHANNELS = (64, 128, 256, 512)
EMBEDDING_DIM = 16  # f0 (Sections 3 and 4.2)
K_MAX = 8  # k of the final k-max pooling (Section 3)
HIDDEN = 2048  # units of the two hidden fully-connected layers (Section 3)


class CharacterEmbedding(nn.Embedding):
    """The look-up table of character embeddings, laid out for temporal convolutions.

    Shapes: ids int64 (B, L) -> float (B, embedding_dim, L).
    """

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).transpose(1, 2)


class KMaxPool1d(nn.Module):
    """k-max pooling (Kalchbrenner et al., ACL 2014; VDCNN Section 3): the k largest values of each channel, kept in
    their temporal order. Among equal values, which ones are kept is unspecified (their values are equal).

    Args:
        k: values kept per channel.

    Shapes: (B, C, L) with L >= k -> (B, C, k).

    Raises:
        RuntimeError: L < k (from ``torch.topk``).
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = x.topk(self.k, dim=2, sorted=False).indices.sort(dim=2).values
        return x.gather(2, positions)

    def extra_repr(self) -> str:
        return f"k={self.k}"


def _conv(in_channels: int, out_channels: int) -> nn.Conv1d:
    return nn.Conv1d(in_channels, out_channels, kernel_size=3, padding=1)


class VDCNN(SplitModel):
    """VDCNN-``depth`` without shortcuts: ``base`` (embedding to k-max pooled features) + ``head`` (3 fully-connected
    layers); module docstring.

    Args:
        num_classes: logits per sample.
        depth: convolutional layers, one of 9, 17, 29, 49 (FlexiFed's V1..V4).
        width: multiplier of the 64/128/256/512 feature maps and of the 2048 hidden units.

    Shapes: ids int64 (B, L) -> base (B, 8 * C) -> logits (B, num_classes), with C = max(1, round(512 * width));
    L = 1024 in the paper, any L > 56 works (the three pools leave ceil(L / 8) >= k = 8 frames).

    Raises:
        ValueError: unknown ``depth`` or ``width`` <= 0.
    """

    def __init__(self, num_classes: int, depth: int = 9, width: float = 1.0):
        if depth not in VDCNN_BLOCKS:
            raise ValueError(f"VDCNN depth must be one of {', '.join(map(str, VDCNN_BLOCKS))}, got {depth}")
        if width <= 0:
            raise ValueError(f"VDCNN width must be positive, got {width}")
        channels = _scaled(LEVEL_CHANNELS[0], width)
        layers: list[nn.Module] = [CharacterEmbedding(NUM_IDS, EMBEDDING_DIM), _conv(EMBEDDING_DIM, channels)]
        for level, (blocks, maps) in enumerate(zip(VDCNN_BLOCKS[depth], LEVEL_CHANNELS)):
            if level:
                layers.append(nn.MaxPool1d(kernel_size=3, stride=2, padding=1))
            out = _scaled(maps, width)
            for _ in range(2 * blocks):  # two convolutions per block
                layers += [_conv(channels, out), nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
                channels = out
        layers += [KMaxPool1d(K_MAX), nn.Flatten()]
        hidden = _scaled(HIDDEN, width)
        head = nn.Sequential(nn.Linear(channels * K_MAX, hidden), nn.ReLU(inplace=True),
                             nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))
        super().__init__(nn.Sequential(*layers), head)
        for module in self.base.modules():
            if isinstance(module, nn.Conv1d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)
