"""FlexiFed's text model families: CharCNN (Zhang et al. 2015) with 3..6 convolutions, VDCNN-9/17/29/49 (Conneau et
al. 2017).

Shapes on real AG News ids, the CharCNN's backward one-hot reading and k-max pooling on hand-written inputs, VDCNN's
parameter counts worked out by hand from the paper's layer table, and the common prefixes FlexiFed shares between
every pair of depths.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pfl.algorithms.flexifed import common_prefix, signature
from pfl.data.agnews import load_agnews
from pfl.data.text import TextTransform
from pfl.models.charcnn import CHARCNN_DEPTHS, CharacterQuantization, CharCNN
from pfl.models.vdcnn import VDCNN_BLOCKS, VDCNN, KMaxPool1d

SMALL = 1 / 16  # width of the shape and prefix tests: 16 CharCNN features, 64 hidden; VDCNN maps 4..32, 128 hidden


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def ids(agnews_dir) -> torch.Tensor:
    """Two real AG News texts as the models receive them: int64 ids (2, 1024)."""
    return TextTransform()(load_agnews(agnews_dir).inputs[:2])


@pytest.mark.parametrize(("depth", "frames"), [(3, 36), (4, 35), (5, 34), (6, 34)])
def test_charcnn_output_shapes(ids, depth, frames):
    # 1014 -(conv 7)-> 1008 -(pool 3)-> 336 -(conv 7)-> 330 -(pool 3)-> 110, then 2 frames per 3-convolution and the
    # final pool: 108 // 3 = 36, 106 // 3 = 35, 104 // 3 = 34, 102 // 3 = 34 (the paper's 34 x 256 = 8704 at depth 6)
    model = CharCNN(4, depth, SMALL).eval()
    assert model.base(ids).shape == (2, 16 * frames)
    assert model(ids).shape == (2, 4)
    with torch.device("meta"):  # width 1, shapes only
        assert CharCNN(4, depth).head[0].in_features == 256 * frames


@pytest.mark.parametrize("depth", VDCNN_BLOCKS)
def test_vdcnn_output_shapes(ids, depth):
    model = VDCNN(4, depth, SMALL).eval()
    assert model.base(ids).shape == (2, 32 * 8)  # 512 / 16 maps x k = 8
    assert model(ids).shape == (2, 4)


def test_charcnn_quantization_reads_backward():
    # The bytes "hi, \xe9b" as ids (pfl.data.text): h = 3 + 7, i = 3 + 8, "," = 3 + 37, space 2, the byte 0xE9
    # outside the alphabet (unknown) 1, b = 3 + 1, then padding 0. Read backward: frame 0 "b" (channel 1), frame 1
    # unknown and frame 2 space (zero vectors), frame 3 "," (channel 37), frame 4 "i" (channel 8), frame 5 "h"
    # (channel 7); frames 6..1013 zero.
    text = [10, 11, 40, 2, 1, 4]
    expected = torch.zeros(1, 70, 1014)
    for frame, channel in [(0, 1), (3, 37), (4, 8), (5, 7)]:
        expected[0, channel, frame] = 1
    quantize = CharacterQuantization()
    stored = torch.tensor([text + [0] * (1024 - len(text))])
    assert torch.equal(quantize(stored), expected)
    assert torch.equal(quantize(torch.tensor([text])), expected)  # a shorter input: zero frames after the text's start


def test_charcnn_quantization_keeps_the_last_1014_stored_characters():
    # 1024 stored ids: "b" at 0, "c" at 10, "z" at 1023, "a" elsewhere. Frame k is id 1023 - k: frame 0 "z"
    # (channel 25), frame 1013 id 10 "c" (channel 2); ids 0..9 ("b" among them) fall outside the 1014 frames.
    stored = torch.full((1, 1024), 3)
    stored[0, 0], stored[0, 10], stored[0, 1023] = 4, 5, 28
    frames = CharacterQuantization()(stored)[0]
    assert frames[25, 0] == 1 and frames[2, 1013] == 1 and frames[1].sum() == 0
    assert frames[0].sum() == 1012 and frames.sum() == 1014  # every frame one-hot: 1012 "a", one "z", one "c"


def test_kmax_pool_keeps_the_k_largest_in_temporal_order():
    # k = 3. Channel [1, 5, 2, 7, 3, 6]: largest 7, 6, 5 at positions 3, 5, 1 -> in order 1, 3, 5: [5, 7, 6].
    # Channel [9, 0, 8, 1, 7, 2]: largest at 0, 2, 4 -> [9, 8, 7]. Channel [0, 1, 2, 3, 4, 5]: [3, 4, 5].
    x = torch.tensor([[[1.0, 5, 2, 7, 3, 6], [9, 0, 8, 1, 7, 2]], [[0, 1, 2, 3, 4, 5], [6, 5, 4, 3, 2, 1]]],
                     requires_grad=True)
    out = KMaxPool1d(3)(x)
    assert torch.equal(out, torch.tensor([[[5.0, 7, 6], [9, 8, 7]], [[3, 4, 5], [6, 5, 4]]]))
    out.sum().backward()  # the gradient reaches exactly the kept positions
    assert torch.equal(x.grad, torch.tensor([[[0.0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0]],
                                             [[0, 0, 0, 1, 1, 1], [1, 1, 1, 0, 0, 0]]]))


def test_vdcnn_parameter_counts_from_the_paper_table():
    # From the paper's layers with 4 classes. A convolution of kernel 3 with bias: 3 * in * out + out; its batch norm
    # 2 * out. Embedding 73 * 16 = 1,168; first convolution 3 * 16 * 64 + 64 = 3,136.
    # Convolution + batch norm: 64->64 12,352 + 128 = 12,480; 64->128 24,704 + 256 = 24,960;
    # 128->128 49,280 + 256 = 49,536; 128->256 98,560 + 512 = 99,072; 256->256 196,864 + 512 = 197,376;
    # 256->512 393,728 + 1,024 = 394,752; 512->512 786,944 + 1,024 = 787,968.
    # Classifier: 4096 * 2048 + 2048 = 8,390,656; 2048 * 2048 + 2048 = 4,196,352; 2048 * 4 + 4 = 8,196: 12,595,204.
    # VDCNN-9, 2 convolutions per level: 2 * 12,480 + (24,960 + 49,536) + (99,072 + 197,376) + (394,752 + 787,968)
    #   = 24,960 + 74,496 + 296,448 + 1,182,720 = 1,578,624; base 1,168 + 3,136 + 1,578,624 = 1,582,928.
    # VDCNN-29, 10, 10, 4, 4 convolutions: 10 * 12,480 + (24,960 + 9 * 49,536) + (99,072 + 3 * 197,376)
    #   + (394,752 + 3 * 787,968) = 124,800 + 470,784 + 691,200 + 2,758,656 = 4,045,440; base 4,049,744.
    for depth, base, total in [(9, 1_582_928, 14_178_132), (29, 4_049_744, 16_644_948)]:
        model = VDCNN(4, depth)
        assert (_count(model.base), _count(model.head), _count(model)) == (base, 12_595_204, total)


@pytest.mark.parametrize("depth", VDCNN_BLOCKS)
def test_vdcnn_depth_counts_its_convolutions(depth):
    assert sum(isinstance(m, nn.Conv1d) for m in VDCNN(4, depth, SMALL).modules()) == depth


def test_charcnn_gaussian_init_of_every_parameter():
    # Section 2.3 / Crepe: all parameters, biases too, from N(0, 0.05^2); the 8.9M weights of fc 8704 x 1024 pin the
    # std well within 1 %
    model = CharCNN(4, 6)
    assert model.head[0].weight.std().item() == pytest.approx(0.05, rel=0.01)
    assert model.base[1].bias.std().item() == pytest.approx(0.05, rel=0.3)  # 256 samples
    assert _count(model) == (70 * 256 * 7 + 256) + (256 * 256 * 7 + 256) + 4 * (256 * 256 * 3 + 256) \
        + (8704 * 1024 + 1024) + (1024 * 1024 + 1024) + (1024 * 4 + 4)  # 11,339,780


# FlexiFed's common prefix: leading state entries equal in position, name and shape. CharCNN: the quantization has
# no entries; a convolution has 2 (weight, bias). After the shallower version's last convolution come a pool and the
# head (head.0.weight) where the deeper one has its next convolution (base.<i>.weight): prefix 2 * min(depths).
CHARCNN_PREFIX = {(3, 4): 6, (3, 5): 6, (3, 6): 6, (4, 5): 8, (4, 6): 8, (5, 6): 10}
# VDCNN: embedding 1 entry, first convolution 2, each convolution + batch norm 7 (weight, bias; weight, bias,
# running_mean, running_var, num_batches_tracked), a block 14. After the shallower depth's first-level blocks it pools
# (its next convolution is one index later) where the deeper one convolves: prefix 3 + 14 * min(first-level blocks),
# with 1, 2, 5, 8 first-level blocks at depths 9, 17, 29, 49.
VDCNN_PREFIX = {(9, 17): 17, (9, 29): 17, (9, 49): 17, (17, 29): 31, (17, 49): 31, (29, 49): 73}


@pytest.mark.parametrize("pair", list(itertools.combinations(CHARCNN_DEPTHS, 2)))
def test_charcnn_common_prefix_between_depths(pair):
    a, b = (signature(CharCNN(4, depth, SMALL).state_dict()) for depth in pair)
    assert common_prefix(a, b) == CHARCNN_PREFIX[pair]
    # convolutions sit at base.1, base.4, base.7, then every other index (no pool after 3..5): base.9, base.11, base.13
    assert a[CHARCNN_PREFIX[pair] - 1][0] == f"base.{2 * min(pair) + 1}.bias"  # the shallower one's last one


@pytest.mark.parametrize("pair", list(itertools.combinations(VDCNN_BLOCKS, 2)))
def test_vdcnn_common_prefix_between_depths(pair):
    a, b = (signature(VDCNN(4, depth, SMALL).state_dict()) for depth in pair)
    assert common_prefix(a, b) == VDCNN_PREFIX[pair]
    assert a[VDCNN_PREFIX[pair] - 1][0].endswith("num_batches_tracked")  # ends after a whole convolution + batch norm


@pytest.mark.parametrize(("build", "message"), [
    (lambda: CharCNN(4, 9), "CharCNN depth (convolutional layers) must be one of 3, 4, 5, 6, got 9"),
    (lambda: CharCNN(4, 6, 0.0), "CharCNN width must be positive, got 0.0"),
    (lambda: VDCNN(4, 18), "VDCNN depth must be one of 9, 17, 29, 49, got 18"),
    (lambda: VDCNN(4, 9, -1.0), "VDCNN width must be positive, got -1.0"),
])
def test_unknown_depth_or_width_is_refused_in_one_line(build, message):
    with pytest.raises(ValueError) as raised:
        build()
    assert str(raised.value) == message
