"""Benchmark: pfl's on-device input path against torchvision's DataLoader + PIL at a ViT's input size.

Both produce the same training batches of CIFAR-10 (random crop with 4 pixels of padding, random
horizontal flip, bilinear antialiased resize to ``--size``, normalization) as float32 tensors on the
device the model trains on:

* ``pfl``: uint8 images resident on the device, batches are index gathers through
  :class:`pfl.data.transforms.ImageTransform` (crop and flip on uint8 at 32x32, then normalize and resize);
* ``dataloader-N``: a ``torch.utils.data.DataLoader`` with N worker processes over PIL images, each sample
  through ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``Resize(size)`` (PIL, antialiased),
  ``ToTensor()``, ``Normalize`` (what the researchers' pipeline did), then copied to the device.

Prints samples/s of each on the CPU and, when one is present, the GPU, and the ratio to the best
DataLoader. Usage::

    .venv/bin/python benchmarks/input_bench.py [--size 224] [--samples 4096] [--batch-size 256] [--workers 2 8]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from pfl._torchvision import import_torchvision
from pfl.benchmarking import sync
from pfl.data.datasets import load_dataset
from pfl.data.loader import DeviceData
from pfl.data.transforms import ImageTransform

MEAN = STD = (0.5, 0.5, 0.5)


def pfl_path(images: DeviceData, samples: int, batch_size: int) -> float:
    """Samples/s of ``images.batch`` over ``samples`` random training samples (after one warm-up batch, which
    makes the normalization constants; nothing else is prepared ahead)."""
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images.inputs), generator=gen)[:samples].to(images.device)
    images.batch(order[:batch_size], gen)
    sync(images.device)
    start = time.perf_counter()
    for b in range(0, samples, batch_size):
        x, _ = images.batch(order[b:b + batch_size], gen)
    sync(images.device)
    return samples / (time.perf_counter() - start)


class _PILDataset(torch.utils.data.Dataset):
    """CIFAR images as PIL images through a torchvision transform (the per-sample path)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.inputs, self.targets, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.inputs[i])), int(self.targets[i])


def dataloader_path(images: np.ndarray, labels: np.ndarray, size: int, samples: int, batch_size: int, workers: int,
                    device: torch.device) -> float:
    """Samples/s of a DataLoader with ``workers`` workers and PIL transforms, batches moved to ``device``: one pass
    over ``samples`` samples timed from the iterator's creation (worker start-up included; timing from the first
    batch instead would count the batches every worker prefetched meanwhile as free)."""
    tv = import_torchvision()
    t = tv.transforms
    transform = t.Compose([t.RandomCrop(32, padding=4), t.RandomHorizontalFlip(), t.Resize(size), t.ToTensor(),
                           t.Normalize(MEAN, STD)])
    subset = torch.utils.data.Subset(_PILDataset(images, labels, transform), range(samples))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=False,
                                         generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    seen = 0
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        seen += len(x)
    sync(device)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("PFL_DATA_DIR", "data"))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 8])
    args = parser.parse_args()
    dataset = load_dataset("cifar10", args.data_dir)
    hwc = dataset.inputs.permute(0, 2, 3, 1).contiguous().numpy()
    labels = dataset.targets.numpy()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    transform = ImageTransform(args.size, MEAN, STD, random_crop=4, hflip=True)
    print(f"CIFAR-10 training batches at {args.size}x{args.size}: {args.samples} samples, batch {args.batch_size}, "
          f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
    print("| device | path | samples/s | vs best DataLoader |\n|---|---|---|---|")
    for device in devices:
        rows = {f"dataloader-{w}": dataloader_path(hwc, labels, args.size, args.samples, args.batch_size, w, device)
                for w in args.workers}
        rows["pfl on-device"] = pfl_path(DeviceData(dataset, device, transform), args.samples, args.batch_size)
        best = max(v for k, v in rows.items() if k.startswith("dataloader"))
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        for path, rate in rows.items():
            print(f"| {name} | {path} | {rate:,.0f} | {rate / best:.2f}x |")


if __name__ == "__main__":
    main()
