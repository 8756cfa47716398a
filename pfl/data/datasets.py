"""Image classification datasets loaded once into uint8 tensors.

A :class:`ImageDataset` holds the whole labelled pool (train and test files
together, as PFLlib pools them before partitioning): ``images`` uint8 of shape
(N, C, H, W) and ``labels`` int64 of shape (N,). Files are validated by shape
and label range, not by md5 (copies rebuilt from the originals differ in a few
pixels; see ``../shared/data/README.md``).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


class DatasetNotFoundError(FileNotFoundError):
    """The dataset folder is missing or incomplete; the message says where pfl looked and what to do."""


class DatasetFormatError(ValueError):
    """A dataset file exists but holds data of the wrong shape or label range."""


@dataclass(frozen=True)
class ImageDataset:
    """A labelled image pool.

    Attributes:
        name: dataset name, e.g. ``"cifar10"``.
        images: uint8 tensor (N, C, H, W), pixel values 0..255.
        labels: int64 tensor (N,), values in [0, num_classes).
        num_classes: number of classes.
        class_names: human-readable class names, length ``num_classes``.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """Content hash (BLAKE2b, 16 hex chars) of images, labels and class count; logged as a run param."""
        h = hashlib.blake2b(digest_size=8)
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        h.update(str(self.num_classes).encode())
        return h.hexdigest()


CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _not_found(name: str, path: Path, archive: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found: looked for {path}. Provide the data by extracting {archive} into "
        f"{path.parent} (e.g. `mkdir -p {path.parent} && tar -xf {archive} -C {path.parent}`), "
        "or point pfl at a folder that holds it with PFL_DATA_DIR=... or data_dir=..., "
        "or set download=true on a machine with internet access."
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with path.open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DatasetFormatError(f"{path}: expected data of shape (n, 3072) and n labels, "
                                 f"got data {data.shape} and {len(labels)} labels")
    return data, labels


def load_cifar10(data_dir: str | Path, download: bool = False) -> ImageDataset:
    """Load CIFAR-10 (train + test pooled) from ``<data_dir>/cifar-10-batches-py``.

    Returns:
        :class:`ImageDataset` with images (N, 3, 32, 32) uint8 and labels (N,) int64 in [0, 10);
        N = 60,000 for the full set.

    Raises:
        DatasetNotFoundError: the folder or one of its batch files is missing (and
            ``download`` is false); the message names the path and how to provide it.
        DatasetFormatError: a batch has the wrong shape or labels outside 0..9.
    """
    root = Path(data_dir) / CIFAR10_FOLDER
    if download and not root.is_dir():
        from pfl._torchvision import import_torchvision

        import_torchvision().datasets.CIFAR10(str(data_dir), download=True)
    missing = [f for f in _CIFAR10_FILES if not (root / f).is_file()]
    if missing:
        raise _not_found("CIFAR-10", root, "cifar-10-python.tar.gz")
    parts = [_read_cifar_batch(root / f) for f in _CIFAR10_FILES]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.min() < 0 or labels.max() > 9:
        raise DatasetFormatError(f"{root}: CIFAR-10 labels must lie in 0..9, got {labels.min()}..{labels.max()}")
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    meta = root / "batches.meta"
    if meta.is_file():
        with meta.open("rb") as f:
            names = tuple(n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"])
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageDataset("cifar10", images, torch.from_numpy(labels), 10, names)


_LOADERS = {"cifar10": load_cifar10}


def load_dataset(name: str, data_dir: str | Path, download: bool = False) -> ImageDataset:
    """Load a dataset by name (see :data:`pfl.config.DATASETS`).

    Raises:
        KeyError: unknown dataset name.
        DatasetNotFoundError, DatasetFormatError: see the per-dataset loaders.
    """
    return _LOADERS[name](data_dir, download=download)
