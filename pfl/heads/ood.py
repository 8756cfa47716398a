"""Out-of-distribution (OOD) data for head runs: APH's second claim, better uncertainty on unseen data.

Chen et al. (AAAI 2024, "Watch Your Head") report that head ensembles separate a client's own
test data from data of another dataset better than the unmodified model. A head run scores
every client's models (w/o and with the method) on the client's test split, as in-distribution
(ID), and on an equal-size sample of an OOD pool, with the scores and metrics of
:func:`pfl.metrics.ood_detection`.

* The OOD set (``ood_dataset``; ``auto`` = :data:`DEFAULT_OOD`) is the whole pool pfl loads for
  it (train + test files, :func:`pfl.data.datasets.load_dataset`), from the FL run's data folder.
  It is loaded once per head run and kept uint8 on the device (:class:`pfl.data.loader.DeviceData`).
* Batches go through the same normalization as the ID data (``DeviceData.batch``), then are
  resized on the device to the ID image size by bilinear interpolation
  (``torch.nn.functional.interpolate``, antialiased when shrinking). Normalization is affine per
  pixel and the interpolation weights sum to 1, so resizing after normalizing equals resizing
  the raw images first.
* Each client's sample is drawn without replacement from the random stream ``ood_sample`` of
  the head run's seed and the client id.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from pfl.config import ConfigError
from pfl.data.datasets import (CIFAR10_FOLDER, CIFAR100_FOLDER, TINYIMAGENET_FOLDER, DatasetNotFoundError,
                               load_dataset)
from pfl.data.loader import DeviceData
from pfl.seed import derive_seed

DEFAULT_OOD = {"cifar10": "cifar100", "cifar100": "cifar10", "tinyimagenet": "cifar100"}
FOLDERS = {"cifar10": CIFAR10_FOLDER, "cifar100": CIFAR100_FOLDER, "tinyimagenet": TINYIMAGENET_FOLDER}


def resolve_ood_dataset(setting: str, dataset: str) -> str | None:
    """The OOD set of a head run: ``auto`` -> :data:`DEFAULT_OOD` of ``dataset``, ``none`` -> ``None``, else the name.

    Raises:
        ConfigError: the OOD set is the in-distribution dataset itself.
    """
    if setting == "none":
        return None
    name = DEFAULT_OOD[dataset] if setting == "auto" else setting
    if name == dataset:
        raise ConfigError(f"ood_dataset: {name} is the FL run's own dataset; pick another one, auto or none")
    return name


class OODPool:
    """An OOD image pool on the device, served at the in-distribution image size.

    Args:
        name: the OOD dataset's name.
        data: its images (uint8 (N, C, h, w), on the device).
        size: the in-distribution image size (H, W) batches are resized to.
    """

    def __init__(self, name: str, data: DeviceData, size: tuple[int, int]):
        self.name, self.data, self.size = name, data, tuple(size)

    def __len__(self) -> int:
        return len(self.data.inputs)

    def batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Normalized float images (B, C, H, W) of pool indices ``idx`` (B,), resized to ``size`` when they differ."""
        x = self.data.batch(idx)[0]
        if tuple(x.shape[-2:]) == self.size:
            return x
        shrink = x.shape[-2] > self.size[0] or x.shape[-1] > self.size[1]
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=shrink)
        return x.contiguous(memory_format=torch.channels_last)

    def sample(self, n: int, seed: int, client_id: int) -> torch.Tensor:
        """``n`` distinct pool indices (n,) on the device, from stream ``ood_sample`` of ``(seed, client_id)``.

        Raises:
            ValueError: ``n`` exceeds the pool size.
        """
        if n > len(self):
            raise ValueError(f"client {client_id} needs {n} OOD samples but {self.name} holds {len(self)}")
        gen = torch.Generator().manual_seed(derive_seed(seed, "ood_sample", client_id))
        return torch.randperm(len(self), generator=gen)[:n].to(self.data.device)


def load_ood_pool(name: str, data_dir: str | Path, device: torch.device, size: tuple[int, int],
                  max_samples: int) -> OODPool:
    """Load OOD set ``name`` from ``data_dir`` onto ``device`` (no download).

    Args:
        name: dataset name (see :data:`FOLDERS`).
        data_dir: the data folder holding ``FOLDERS[name]``.
        device: where the uint8 pool is kept.
        size: in-distribution image size (H, W).
        max_samples: the largest client test split (each client draws that many OOD samples).

    Raises:
        ConfigError: the folder is missing, or the pool is smaller than ``max_samples``; the
            message names the folder and the fix ``ood_dataset=none``.
        DatasetFormatError: the folder holds malformed files.
    """
    folder = Path(data_dir) / FOLDERS[name]
    try:
        dataset = load_dataset(name, data_dir)
    except DatasetNotFoundError:
        raise ConfigError(f"ood_dataset: the OOD set {name} is missing at {folder}; extract it there, pick "
                          "another ood_dataset, or set ood_dataset=none") from None
    if len(dataset) < max_samples:
        raise ConfigError(f"ood_dataset: {folder} holds {len(dataset)} images, fewer than the {max_samples} "
                          "test samples of the largest client; use a bigger OOD set or ood_dataset=none")
    return OODPool(name, DeviceData(dataset, device), size)
