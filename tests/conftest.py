"""Shared fixtures: a real CIFAR-10 slice extracted from ../shared/data into a temp dir."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import pytest

from pfl.data.datasets import CIFAR10_FOLDER, load_cifar10

SHARED_DATA = Path(os.environ.get("PFL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SLICE_PER_BATCH = 600  # 6 batch files -> 3,600 real images


def _write_slice(src: Path, dst: Path, rows: int) -> None:
    with src.open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    for key in (b"data", b"labels", b"filenames"):
        batch[key] = batch[key][:rows]
    with dst.open("wb") as f:
        pickle.dump(batch, f)


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """A data dir holding ``cifar-10-batches-py`` with the first 600 real images of each batch file."""
    archive = SHARED_DATA / "cifar-10-python.tar.xz"
    if not archive.is_file():
        pytest.fail(f"real CIFAR-10 archive not found at {archive}; set PFL_SHARED_DATA to the shared data folder")
    full = tmp_path_factory.mktemp("cifar_full")
    with tarfile.open(archive) as tar:
        tar.extractall(full, filter="data")
    out = tmp_path_factory.mktemp("data")
    (out / CIFAR10_FOLDER).mkdir()
    for src in (full / CIFAR10_FOLDER).iterdir():
        dst = out / CIFAR10_FOLDER / src.name
        if src.name.startswith(("data_batch", "test_batch")):
            _write_slice(src, dst, SLICE_PER_BATCH)
        else:
            dst.write_bytes(src.read_bytes())
    return out


@pytest.fixture(scope="session")
def cifar10(cifar10_dir):
    """The loaded CIFAR-10 slice (:class:`pfl.data.datasets.ImageDataset`, 3,600 images)."""
    return load_cifar10(cifar10_dir)
