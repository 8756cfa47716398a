"""Self-supervised views: shapes, per-image independence, reproducibility from the seed alone with torch's global
generators untouched (CPU and CUDA), the color jitter of MoCo v2 and SwAV, the crops spec."""

from __future__ import annotations

import pytest
import torch

from pfl.data.views import MOCO_V2_JITTER, SWAV_JITTER, ViewAugmentation, parse_crops


def cuda_seeding() -> tuple:
    """What torch holds of the CUDA generators' seeding: their states once CUDA is initialized; before that (and on a
    machine without CUDA) the seeding calls ``torch.manual_seed`` queues for CUDA's lazy initialization (compared by
    identity: a new seeding queues a new call)."""
    if torch.cuda.is_initialized():
        return tuple(state.numpy().tobytes() for state in torch.cuda.get_rng_state_all())
    return tuple(call and call[0] for call in torch.cuda._lazy_seed_tracker.get_calls())


def _images(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_views_depend_on_the_seed_only_and_leave_the_global_stream_alone():
    """The CPU stream is restored and no CUDA generator is seeded (``torch.manual_seed`` inside ``fork_rng(devices=[])``
    reseeded every CUDA device for good)."""
    aug, x = ViewAugmentation(), _images()
    torch.manual_seed(123)
    before, cuda = torch.random.get_rng_state(), cuda_seeding()
    a, b, c = aug(x, seed=1), aug(x, seed=1), aug(x, seed=2)
    assert torch.equal(torch.random.get_rng_state(), before) and torch.initial_seed() == 123
    assert cuda_seeding() == cuda
    assert a.shape == (6, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # every image draws its own parameters (two copies of one image differ)
    same = aug(x[:1].expand(2, -1, -1, -1).contiguous(), seed=3)
    assert not torch.equal(same[0], same[1])


def test_multi_crop_spec():
    specs = parse_crops("2x32,6x16")
    assert [(s.count, s.size) for s in specs] == [(2, 32), (6, 16)]
    assert specs[0].scale == (0.08, 1.0) and specs[1].scale == (0.05, 0.14)
    assert ViewAugmentation(16, specs[1].scale)(_images(), seed=0).shape == (6, 3, 16, 16)
    with pytest.raises(ValueError, match="<count>x<size>"):
        parse_crops("2 by 32")


def test_color_jitter_is_moco_v2s_by_default_and_swavs_on_request():
    """kornia's ColorJitter takes torchvision's arguments: MoCo v2's (0.4, 0.4, 0.4, 0.1) and SwAV's
    get_color_distortion(s=1.0), (0.8, 0.8, 0.8, 0.2), both applied with probability 0.8."""
    import kornia.augmentation as K

    def jitter(aug: ViewAugmentation) -> K.ColorJitter:
        return next(m for m in aug.pipeline.children() if isinstance(m, K.ColorJitter))

    moco, swav = ViewAugmentation(), ViewAugmentation(jitter=SWAV_JITTER)
    for aug, (b, c, s, h) in ((moco, MOCO_V2_JITTER), (swav, SWAV_JITTER)):
        cj = jitter(aug)
        assert (cj.brightness, cj.contrast, cj.saturation, cj.hue, cj.p) == (b, c, s, h, 0.8)
    assert SWAV_JITTER == (0.8, 0.8, 0.8, 0.2) and MOCO_V2_JITTER == (0.4, 0.4, 0.4, 0.1)
