"""Per-batch image transforms on the training device: augmentation, normalization and resizing of uint8 batches.

pfl keeps every image as uint8 on the training device (DESIGN: speed); a batch is an index
gather followed by :class:`ImageTransform`, in this order:

1. augmentation, training batches only, on the uint8 pixels at the stored resolution:
   ``random_crop`` (zero-pad ``random_crop`` pixels on every side, then crop a window of the
   original size at a uniform offset: torchvision's ``RandomCrop(size, padding=random_crop)``)
   and ``hflip`` (mirror each image with probability 1/2: ``RandomHorizontalFlip()``);
2. conversion to float and normalization, ``(x / 255 - mean) / std`` per channel;
3. resizing to ``image_size`` x ``image_size`` with bilinear, antialiased interpolation
   (``torch.nn.functional.interpolate(..., mode="bilinear", antialias=True, align_corners=False)``,
   torchvision's ``Resize`` on tensors), skipped when the stored size already matches.

Cropping at the stored resolution before resizing costs (32/224)^2 = 2% of cropping the resized
image, and differs from it only by interpolation at the window's edge. Normalizing before resizing
gives the same result as after (bilinear weights sum to one), on 49x fewer pixels at 32 -> 224.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PFLLIB_MEAN = (0.5, 0.5, 0.5)  # PFLlib's CIFAR normalization (x / 255 - 0.5) / 0.5, and timm's ViT weights'
PFLLIB_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ImageTransform:
    """What turns a uint8 batch into the model's input.

    Attributes:
        image_size: side of the model's square input in pixels (``None``: the stored size).
        mean: per-channel mean of the normalization, in [0, 1] units (the model's, e.g. timm's ``pretrained_cfg``).
        std: per-channel std of the normalization.
        random_crop: zero padding in pixels of the random crop (0: no random crop).
        hflip: random horizontal flips.
    """

    image_size: int | None = None
    mean: tuple[float, ...] = PFLLIB_MEAN
    std: tuple[float, ...] = PFLLIB_STD
    random_crop: int = 0
    hflip: bool = False
    _constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False)  # per device, made once

    @property
    def augments(self) -> bool:
        """Whether training batches are augmented."""
        return self.random_crop > 0 or self.hflip

    def output_shape(self, stored: tuple[int, int, int]) -> tuple[int, int, int]:
        """The (C, H, W) of a transformed sample whose stored shape is ``stored``."""
        c, h, w = stored
        return (c, h, w) if self.image_size is None else (c, self.image_size, self.image_size)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Model input (B, C, S, S) float32, channels-last, from uint8 images (B, C, H, W) on any device.

        Args:
            images: the gathered uint8 batch.
            generator: a CPU generator that draws the augmentation (``None``: evaluation, no augmentation).
        """
        if generator is not None and self.augments:
            images = self.augment(images, generator)
        x = self.normalize(images)
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return x.contiguous(memory_format=torch.channels_last)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(x / 255 - mean) / std`` as float32 (B, C, H, W), computed as ``x / (255 std) - mean / std``
        (for PFLlib's 0.5 / 0.5, the ``x / 127.5 - 1`` of earlier pfl versions, bit for bit)."""
        if images.device not in self._constants:
            shape = (1, -1, 1, 1)
            scale = torch.tensor([255.0 * s for s in self.std], device=images.device).view(shape)
            shift = torch.tensor([m / s for m, s in zip(self.mean, self.std)], device=images.device).view(shape)
            self._constants[images.device] = scale, shift
        scale, shift = self._constants[images.device]
        return images.float().div_(scale).sub_(shift)

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random crop and horizontal flip of uint8 images (B, C, H, W), drawn from ``generator`` on the host
        (2B small integers per batch) and applied as one gather on the images' device."""
        b, _, h, w = images.shape
        rows = torch.arange(h).expand(b, h)
        cols = torch.arange(w).expand(b, w)
        if self.random_crop:
            p = self.random_crop
            images = F.pad(images, (p, p, p, p))  # zeros: black pixels, as torchvision's RandomCrop(padding=p)
            rows = rows + torch.randint(0, 2 * p + 1, (b, 1), generator=generator)
            cols = cols + torch.randint(0, 2 * p + 1, (b, 1), generator=generator)
        if self.hflip:
            flip = torch.rand(b, generator=generator) < 0.5
            cols = torch.where(flip[:, None], cols.flip(1), cols)
        dev = images.device
        rows, cols = rows.to(dev, non_blocking=True), cols.to(dev, non_blocking=True)
        batch = torch.arange(b, device=dev)[:, None, None, None]
        channel = torch.arange(images.shape[1], device=dev)[None, :, None, None]
        return images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
