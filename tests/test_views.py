"""Self-supervised views: shapes, per-image independence, reproducibility from the seed alone, the crops spec."""

from __future__ import annotations

import pytest
import torch

from pfl.data.views import ViewAugmentation, parse_crops


def _images(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_views_depend_on_the_seed_only_and_leave_the_global_stream_alone():
    aug, x = ViewAugmentation(), _images()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b, c = aug(x, seed=1), aug(x, seed=1), aug(x, seed=2)
    assert torch.equal(torch.random.get_rng_state(), before)
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
