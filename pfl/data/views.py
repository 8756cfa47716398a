"""Self-supervised views on the device: MoCo v2's augmentation and SwAV's multi-crop, batched, per sample, from kornia.

MocoSFL's CIFAR-10 pipeline (SonyResearch/MocoSFL ``datasets.py``, "mocov2") draws every view independently:
random resized crop (scale 0.08-1, aspect 3/4-4/3), color jitter (0.4, 0.4, 0.4, 0.1) with probability 0.8,
grayscale with probability 0.2, Gaussian blur (sigma 0.1-2) with probability 0.5, horizontal flip, then
normalization with CIFAR-10's mean and std. Here the same runs on a whole uint8 batch already on the device
through kornia's augmentations (each image draws its own parameters), with no DataLoader workers.

SwAV's multi-crop (facebookresearch/swav ``src/multicropdataset.py``: ``RandomResizedCrop``, horizontal flip,
``get_color_distortion(s=1.0)``, ``PILRandomGaussianBlur``) is the same pipeline with a stronger color jitter,
(0.8, 0.8, 0.8, 0.2) with probability 0.8 (:data:`SWAV_JITTER`), then grayscale with probability 0.2 and blur
with probability 0.5 (radius 0.1-2); its flip comes before the color steps, which commute with it. SwAV
normalizes with ImageNet's statistics (its dataset); here the model's input normalization (MocoSFL's
CIFAR-10 statistics).

Differences from torchvision on PIL images, deliberate or kornia's: color jitter applies its four
adjustments in one random order per batch (torchvision: per image); the blur is a true Gaussian of kernel
13 (PIL's is box-approximated); the resize is bilinear without antialiasing.

Random streams: kornia draws every augmentation parameter from torch's global CPU generator (it samples on
the CPU whatever the images' device, then moves the parameters to them; the pipeline here is never moved, and
kornia takes no generator of its own). :meth:`ViewAugmentation.__call__` therefore forks the CPU generator
(``torch.random.fork_rng(devices=[])``) and seeds that one alone (``torch.default_generator.manual_seed``):
views depend on the caller's seed only, the CPU stream is restored afterwards, and no CUDA generator is ever
seeded (``torch.manual_seed`` would reseed every CUDA device's generator too, and fork_rng without devices
would not restore them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pfl.models.resnet_sfl import CIFAR10_MEAN, CIFAR10_STD

MOCO_V2_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue (MocoSFL datasets.py)
SWAV_JITTER = (0.8, 0.8, 0.8, 0.2)  # SwAV's get_color_distortion(s=1.0) (multicropdataset.py)
_CROPS = re.compile(r"(\d+)x(\d+)")


@dataclass(frozen=True)
class CropSpec:
    """``count`` views of ``size`` x ``size`` pixels, cropped from ``scale`` of the image's area."""

    count: int
    size: int
    scale: tuple[float, float]


def parse_crops(text: str, full: int = 32) -> list[CropSpec]:
    """``"2x32,6x16"`` -> 2 views at 32x32 and 6 at 16x16 (SwAV's multi-crop). Views at the image's own size
    (``full``) crop 8-100% of its area (SwAV's global crops: 14-100%; MoCo v2's 8-100% kept), smaller ones 5-14%.

    Raises:
        ValueError: not a comma-separated list of ``<count>x<size>``; the message shows the expected form.
    """
    specs = []
    for part in text.split(","):
        match = _CROPS.fullmatch(part.strip())
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise ValueError(f"crops={text!r}: write counts and sizes as <count>x<size>, e.g. crops=2x32,6x16")
        count, size = int(match[1]), int(match[2])
        specs.append(CropSpec(count, size, (0.08, 1.0) if size >= full else (0.05, 0.14)))
    return specs


class ViewAugmentation:
    """MoCo v2's view augmentation, or SwAV's with ``jitter=SWAV_JITTER`` (module docstring), at one output size.

    Args:
        size: output side in pixels.
        scale: area fraction range of the random resized crop.
        mean, std: per-channel normalization in [0, 1] units.
        jitter: color jitter's (brightness, contrast, saturation, hue), torchvision's ``ColorJitter`` arguments,
            applied with probability 0.8.
    """

    def __init__(self, size: int = 32, scale: tuple[float, float] = (0.08, 1.0),
                 mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD,
                 jitter: tuple[float, float, float, float] = MOCO_V2_JITTER):
        import kornia.augmentation as K

        self.jitter = jitter
        self.pipeline = K.AugmentationSequential(
            K.RandomResizedCrop((size, size), scale=scale, ratio=(3 / 4, 4 / 3), align_corners=False),
            K.ColorJitter(*jitter, p=0.8),
            K.RandomGrayscale(p=0.2),
            K.RandomGaussianBlur((13, 13), sigma=(0.1, 2.0), p=0.5),
            K.RandomHorizontalFlip(p=0.5),
        )
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        """One view (B, C, size, size) float32 of uint8 images (B, C, H, W) on any device, drawn from ``seed``
        alone; torch's global generators are left as they were (module docstring)."""
        x = images.float().div_(255)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            x = self.pipeline(x)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
