"""The character-level CNN (CharCNN) of Zhang, Zhao & LeCun, the CharCNN family of FlexiFed (Wang et al., WWW 2023).

Source: X. Zhang, J. Zhao, Y. LeCun, "Character-level Convolutional Networks for Text Classification", NeurIPS 2015,
Section 2 and Tables 1-2, the "small" model, and the authors' code, github.com/zhangxiangxiao/Crepe
(``train/config.lua`` lines 28-62, the layers; ``train/data.lua`` lines 153-164, the quantization;
``train/model.lua`` lines 41-44 with ``train/main.lua`` lines 95-96 and ``config.lua`` line 89, the initialization).

Input: int64 character ids (B, L) of :mod:`pfl.data.text` (0 padding after the text, 1 unknown, 2 space, 3..72 the
paper's 70-character alphabet). :class:`CharacterQuantization` reads each text backward (Section 2.2, "the
quantization order is backward"; Crepe's ``stringToTensor``: input frame k holds the text's k-th character counted from
its end) over the first l0 = 1014 frames and one-hot encodes the 70 alphabet characters; padding, space and unknown
characters are all-zero vectors, as in the paper and Crepe. Output (B, 70, 1014).

The paper's six convolutions (Table 1, small: 256 features; kernels 7, 7, 3, 3, 3, 3; a non-overlapping max-pool of 3
after convolutions 1, 2 and 6), each followed by a ReLU, then three fully-connected layers (Table 2, small: 1024,
1024, classes) with dropout 0.5 between them (Section 2.3). All parameters, weights and biases, are drawn from
N(0, 0.05^2) (Section 2.3, small model; Crepe randomizes the flat parameter vector).

Versions (FlexiFed's V1..V4; its paper does not spell them out): ``charcnn3`` .. ``charcnn6`` have the paper's first
3, 4, 5 and 6 convolutions in its order, and the final max-pool of 3 after the last of them; ``charcnn6`` is the
paper's network. The number counts convolutional layers, as VDCNN's depths do and as both public FlexiFed
reimplementations name their versions (github.com/2006wzt/FlexiFed-IMP at 396b3a90, ``src/model/CharCNN.py`` lines
83-93, ``charcnn3`` .. ``charcnn6``; github.com/Ruicrand/FlexiFed at 724840a8, ``FlexiFed/models/CharCNN.py`` lines
100-113, ``CharCNN_3`` .. ``CharCNN_6``: both insert 3-convolutions before the last one, the same networks since
convolutions 3..6 are alike, but add batch norms the paper does not have). Frame lengths: 1014 -(conv 7)-> 1008
-(pool)-> 336 -(conv 7)-> 330 -(pool)-> 110, then each 3-convolution takes 2 frames: the last pool leaves
108 // 3 = 36, 106 // 3 = 35, 104 // 3 = 34 and 102 // 3 = 34 frames (the paper's 34 x 256 = 8704 features for
``charcnn6``).

``base`` is one flat ``nn.Sequential`` (quantization, convolutions, ReLUs, pools, ``Flatten``) and ``head`` the three
fully-connected layers with their dropouts (as :mod:`pfl.models.vgg`), so state-dict names come in forward order.
FlexiFed's common prefix of two versions is the shallower one's convolutions (2 entries each: weight and bias).
Dropout is active in train mode and off in eval mode (as Crepe switches it, ``main.lua`` lines 130-145); it draws
from torch's global generator of the device.

Deliberate differences:

* ReLU instead of Torch 7's ``nn.Threshold()`` (Crepe's non-linearity: zero at or below 1e-6 instead of at or below 0).
* Texts longer than 1024 characters were cut to their first 1024 when stored (:mod:`pfl.data.text`), so their
  backward reading starts from character 1024 instead of the text's last (Crepe reads the last 1014 characters of any
  text); for texts of at most 1024 characters the reading is Crepe's.
* ``width`` scales the 256 features of every convolution and the 1024 units of the two hidden layers:
  ``max(1, round(c * width))``; width 1 is the paper's small model.
"""

from __future__ import annotations

import torch
from torch import nn

from pfl.data.text import ALPHABET_OFFSET, NUM_IDS, read_backward
from pfl.models.split import SplitModel
from pfl.models.vgg import _scaled

FRAMES = 1014  # l0, the input frames (Section 2.3)
ALPHABET_SIZE = NUM_IDS - ALPHABET_OFFSET  # 70 one-hot channels (m in Section 2.2)
# (kernel size, max-pool of 3 after it) of the paper's six convolutions (Table 1)
PAPER_CONVOLUTIONS: tuple[tuple[int, bool], ...] = ((7, True), (7, True), (3, False), (3, False), (3, False), (3, True))
CHARCNN_DEPTHS = (3, 4, 5, 6)  # convolutional layers of FlexiFed's V1..V4
FEATURES = 256  # frame features of the small model (Table 1)
HIDDEN = 1024  # units of the two hidden fully-connected layers of the small model (Table 2)
POOL = 3  # max-pool kernel and stride (Table 1)
DROPOUT = 0.5  # between the fully-connected layers (Section 2.3)
INIT_STD = 0.05  # standard deviation of the Gaussian initialization of the small model (Section 2.3)


class CharacterQuantization(nn.Module):
    """Character ids to the paper's one-hot frames, read backward (Zhang et al. 2015, Section 2.2).

    Frame k of a text holds its k-th character counted from its last (``pfl.data.text.read_backward``); frames past
    the text's start, and spaces, unknown characters and padding, are all-zero vectors (Crepe ``data.lua`` 157-161).
    Has no parameters and no state entries.

    Args:
        frames: frames per text, l0 (1014 in the paper).

    Shapes: ids (B, L) of any integer dtype, any L (at most ``frames`` characters are read; shorter inputs are
    zero-padded) -> float32 (B, 70, frames), channel c being alphabet character c (id ``ALPHABET_OFFSET + c``).
    """

    def __init__(self, frames: int = FRAMES):
        super().__init__()
        self.frames = frames
        ids = torch.arange(ALPHABET_OFFSET, NUM_IDS).view(1, -1, 1)
        self.register_buffer("alphabet_ids", ids, persistent=False)  # follows .to(device); not in the state dict

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        backward = read_backward(ids)[:, :self.frames]
        backward = nn.functional.pad(backward, (0, self.frames - backward.shape[1]))
        return (backward.unsqueeze(1) == self.alphabet_ids).float()


class CharCNN(SplitModel):
    """CharCNN (small) with the paper's first ``depth`` convolutions: ``base`` (quantization, convolutions, flattened)
    + ``head`` (3 fully-connected layers with dropout); module docstring.

    Args:
        num_classes: logits per sample.
        depth: convolutional layers, one of 3, 4, 5, 6 (FlexiFed's V1..V4; 6 is the paper's network).
        width: multiplier of the 256 convolution features and of the 1024 hidden units.

    Shapes: ids int64 (B, L) -> base (B, C * T) -> logits (B, num_classes), with C = max(1, round(256 * width)) and
    T = 36, 35, 34, 34 frames for depths 3, 4, 5, 6.

    Raises:
        ValueError: unknown ``depth`` or ``width`` <= 0.
    """

    def __init__(self, num_classes: int, depth: int = 6, width: float = 1.0):
        if depth not in CHARCNN_DEPTHS:
            raise ValueError(f"CharCNN depth (convolutional layers) must be one of "
                             f"{', '.join(map(str, CHARCNN_DEPTHS))}, got {depth}")
        if width <= 0:
            raise ValueError(f"CharCNN width must be positive, got {width}")
        features, hidden = _scaled(FEATURES, width), _scaled(HIDDEN, width)
        layers: list[nn.Module] = [CharacterQuantization()]
        channels, frames = ALPHABET_SIZE, FRAMES
        for index, (kernel, pool) in enumerate(PAPER_CONVOLUTIONS[:depth]):
            layers += [nn.Conv1d(channels, features, kernel), nn.ReLU(inplace=True)]
            channels, frames = features, frames - kernel + 1
            if pool or index == depth - 1:  # the paper's last pool follows the last convolution of every version
                layers.append(nn.MaxPool1d(POOL))
                frames //= POOL
        layers.append(nn.Flatten())
        head = nn.Sequential(nn.Linear(channels * frames, hidden), nn.ReLU(inplace=True), nn.Dropout(DROPOUT),
                             nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(DROPOUT),
                             nn.Linear(hidden, num_classes))
        super().__init__(nn.Sequential(*layers), head)
        for parameter in self.parameters():
            nn.init.normal_(parameter, mean=0.0, std=INIT_STD)
