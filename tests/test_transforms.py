"""The on-device input path: resizing against torch's and torchvision's, normalization, random crop and flip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pfl._torchvision import import_torchvision
from pfl.data.transforms import ImageTransform


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_resize_matches_interpolate_and_torchvision_on_the_same_batch():
    import_torchvision()
    from torchvision.transforms.v2.functional import resize

    x = _images()
    norm = (x.float() / 255 - 0.5) / 0.5
    for size in (224, 16):  # up to a ViT's input, down below the stored size
        got = ImageTransform(image_size=size)(x)
        want = F.interpolate(norm, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        assert got.shape == (4, 3, size, size)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(got, resize(norm, [size, size], antialias=True), rtol=0, atol=1e-5)


def test_default_transform_is_pfllibs_normalization_bit_for_bit():
    x = _images()
    assert torch.equal(ImageTransform()(x), x.float().div(127.5).sub(1.0))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    want = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(ImageTransform(mean=mean, std=std)(x), want)


def test_random_crop_and_flip_against_a_per_image_reference():
    """Each image equals torchvision's RandomCrop(32, padding=4) + hflip with the offsets and flips drawn in the
    documented order (rows, then columns, then flips) from the same generator; without a generator: no change."""
    x = _images(6)
    t = ImageTransform(random_crop=4, hflip=True)
    got = t.augment(x, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 9, (6, 1), generator=gen), torch.randint(0, 9, (6, 1), generator=gen)
    flip = torch.rand(6, generator=gen) < 0.5
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(6):
        img = padded[i, :, dy[i, 0]:dy[i, 0] + 32, dx[i, 0]:dx[i, 0] + 32]
        assert torch.equal(got[i], img.flip(-1) if flip[i] else img)
    assert 0 < flip.sum() < 6
    assert torch.equal(t(x), ImageTransform()(x))  # evaluation batches are not augmented
