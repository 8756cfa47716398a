"""CINIC-10: 270,000 32x32 colour images of the 10 CIFAR-10 classes, from CIFAR-10 and downsampled ImageNet.

Source: L. N. Darlow, E. J. Crowley, A. Antoniou, A. J. Storkey, "CINIC-10 is not ImageNet or CIFAR-10", Report
EDI-INF-ANC-1802, 2018 (arXiv:1810.03505); data and layout: github.com/BayesWatch/cinic-10 at 9e008d0
(``README.md``, "Details" and "Data loading"). Get ``CINIC-10.tar.gz`` from :data:`URL`; it holds ``train/``,
``valid/`` and ``test/`` at its top, so extract it into ``<data_dir>/CINIC-10/``. There is no downloader.

Layout read: ``<data_dir>/CINIC-10/{train,valid,test}/<class>/*.png``, one folder per class in each split, 32x32
PNGs (9,000 per class and split in the full set; the shared copy holds 120 / 40 / 40). Other files (the
``LICENSE``, stray files beside the class folders) are not read.

Labels and order follow torchvision's ``ImageFolder``, the loader the dataset's README and FlexiFed
(fio1982/FlexiFed ``utils.py:90-99``) use: class id = index of the class folder in sorted order
(``torchvision/datasets/folder.py``, ``_find_classes`` and ``make_dataset``), images of a class sorted by file
name. The sorted folder names ``airplane automobile bird cat deer dog frog horse ship truck`` are CIFAR-10's own
label order (its ``batches.meta``), so class k means the same in both datasets. Each image is decoded as
``ImageFolder``'s ``pil_loader`` does (``Image.convert("RGB")``): a greyscale PNG (ImageNet contributes some)
becomes 3 equal channels, a palette or alpha PNG its RGB colours. The shared copy holds RGB PNGs only.

Pool: train, then valid, then test, each split class by class. ``num_train`` covers train + valid by default: the
authors' second benchmark setting ("trained on the combined train and validation sets, and tested on the test
set", README "Benchmarks"), which also keeps the :class:`~pfl.data.datasets.Dataset` contract that everything
after ``num_train`` is the official test set. ``train_on_valid=False`` leaves ``valid`` out of the pool, so
``official_split`` trains on ``train`` alone and tests on ``test``, as FlexiFed's code does (``utils.py:90-101``:
``ImageFolder`` on ``train`` and ``test``, ``valid`` unused).

The PNGs are decoded once into ``<data_dir>/CINIC-10.<fingerprint>.safetensors`` (:func:`cinic10_cache_path`),
as Tiny-ImageNet's (:mod:`pfl.data.image_cache`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pfl.data.datasets import Dataset, DatasetFormatError, DatasetNotFoundError
from pfl.data.image_cache import DecodeCache, decode_images


FOLDER = "CINIC-10"
URL = "https://datashare.ed.ac.uk/handle/10283/3192"
ARCHIVE = "CINIC-10.tar.gz"
SPLITS = ("train", "valid", "test")
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")  # sorted
SIZE = 32
# the authors' per-channel RGB statistics of all 270,000 images, pixels scaled to [0, 1] (README.md:39-44); FlexiFed
# normalizes CINIC-10 inputs with them (utils.py:88-99), not with CIFAR-10's
MEAN = (0.47889522, 0.47227842, 0.43047404)
STD = (0.24205776, 0.23828046, 0.25874835)
_CACHE = DecodeCache("CINIC-10", FOLDER, "cinic10", version=1, files="PNGs")


@dataclass(frozen=True)
class _Sources:
    """The CINIC-10 PNGs the loader reads: ``splits[split][k]`` are class k's files (:data:`CLASSES` order) of a
    split (:data:`SPLITS`), sorted by name."""

    root: Path
    splits: dict[str, tuple[tuple[Path, ...], ...]]

    def files(self) -> list[Path]:
        """Every PNG in pool order: the splits in :data:`SPLITS` order, each class by class."""
        return [p for split in SPLITS for cls in self.splits[split] for p in cls]

    def labels(self) -> list[int]:
        """The class id of each of :meth:`files`."""
        return [k for split in SPLITS for k, cls in enumerate(self.splits[split]) for _ in cls]

    def count(self, split: str) -> int:
        return sum(map(len, self.splits[split]))

    def cache_path(self) -> Path:
        return _CACHE.path(self.root, self.files())


def _not_found(path: Path, root: Path, download: bool) -> DatasetNotFoundError:
    why = "download=true cannot fetch CINIC-10 (pfl has no downloader for it). " if download else ""
    return DatasetNotFoundError(
        f"{why}CINIC-10 not found: looked for {path}. Download {ARCHIVE} from {URL} manually and extract it into "
        f"{root} (it holds train/, valid/, test/: `mkdir -p {root} && tar -xzf {ARCHIVE} -C {root}`), "
        "or point pfl at a folder that holds it with PFL_DATA_DIR=... or data_dir=..."
    )


def _list_split(split_dir: Path, root: Path, download: bool) -> tuple[tuple[Path, ...], ...]:
    """Per class of :data:`CLASSES`, the PNGs of ``split_dir/<class>`` sorted by name.

    Raises:
        DatasetNotFoundError: ``split_dir`` or one of its class folders is missing.
        DatasetFormatError: ``split_dir`` holds a folder that is not a CINIC-10 class, or a class folder holds no PNG.
    """
    if not split_dir.is_dir():
        raise _not_found(split_dir, root, download)
    unknown = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in CLASSES)
    if unknown:
        raise DatasetFormatError(f"{split_dir / unknown[0]}: not a CINIC-10 class folder (a split holds only "
                                 f"{', '.join(CLASSES)}); move it out of {split_dir}")
    classes = []
    for name in CLASSES:
        folder = split_dir / name
        if not folder.is_dir():
            raise _not_found(folder, root, download)
        files = tuple(sorted(folder.glob("*.png")))
        if not files:
            raise DatasetFormatError(f"{folder}: no .png image in this class folder; extract {ARCHIVE} again")
        classes.append(files)
    return tuple(classes)


def _list_cinic10(data_dir: str | Path, download: bool = False) -> _Sources:
    """List the CINIC-10 PNGs under ``<data_dir>/CINIC-10`` (nothing decoded); errors as :func:`_list_split`."""
    root = Path(data_dir) / FOLDER
    if not root.is_dir():
        raise _not_found(root, root, download)
    return _Sources(root, {split: _list_split(root / split, root, download) for split in SPLITS})


def cinic10_cache_path(data_dir: str | Path) -> Path:
    """Path of the decode cache for the current CINIC-10 files of ``data_dir``:
    ``<data_dir>/CINIC-10.<fingerprint>.safetensors`` (:class:`DecodeCache`; every PNG of the three splits counts).

    Raises:
        DatasetNotFoundError, DatasetFormatError: as :func:`load_cinic10` for the file listing.
    """
    return _list_cinic10(data_dir).cache_path()


def load_cinic10(data_dir: str | Path, download: bool = False, train_on_valid: bool = True) -> Dataset:
    """Load CINIC-10 (train, valid and test pooled) from ``<data_dir>/CINIC-10`` (module docstring: layout, labels,
    order). The PNGs are decoded once and cached in :func:`cinic10_cache_path`; later loads with unchanged files
    read only the cache.

    Args:
        data_dir: the folder holding ``CINIC-10/``.
        download: not supported (no downloader); only changes the not-found message.
        train_on_valid: ``True``: the pool is train, valid, test and ``num_train`` covers train + valid (the
            authors' combined training set); ``False``: valid is left out, the pool is train, test and ``num_train``
            covers train (FlexiFed's ``utils.py``).

    Returns:
        :class:`~pfl.data.datasets.Dataset` ``"cinic10"`` with images (N, 3, 32, 32) uint8 and labels (N,) int64 in
        [0, 10), class names :data:`CLASSES`, ``modality="image"``; N = 270,000 for the full set (180,000 without
        valid), ``num_train`` 180,000 (90,000).

    Raises:
        DatasetNotFoundError: ``CINIC-10/``, a split folder or a class folder is missing (also with ``download``).
        DatasetFormatError: a folder in a split that is not one of :data:`CLASSES`, a class folder without PNGs, a
            PNG that does not decode or is not 32x32; the message names the folder or file.

    Warns:
        UserWarning: ``data_dir`` is not writable, so the decode cache is not written.
    """
    sources = _list_cinic10(data_dir, download)
    files, cache = sources.files(), sources.cache_path()
    cached = _CACHE.read(cache, {"images": (torch.uint8, (len(files), 3, SIZE, SIZE))}) if cache.is_file() else None
    if cached is None:
        images = torch.from_numpy(decode_images(files, SIZE, "Decoding CINIC-10",
                                                f"replace it with the file from {ARCHIVE}"))
        _CACHE.write(cache, {"images": images})
    else:
        images = cached["images"]
    labels = torch.tensor(sources.labels(), dtype=torch.int64)
    num_train, num_valid = sources.count("train"), sources.count("valid")
    if train_on_valid:
        num_train += num_valid
    else:  # drop the valid block between train and test
        images = torch.cat([images[:num_train], images[num_train + num_valid:]])
        labels = torch.cat([labels[:num_train], labels[num_train + num_valid:]])
    return Dataset("cinic10", images, labels, len(CLASSES), CLASSES, num_train, modality="image")
