"""Datasets loaded once into tensors: the image classification sets, and the container of every modality.

A :class:`Dataset` holds the whole pool (train and test files
together, as PFLlib pools them before partitioning): for the image sets ``inputs`` uint8 of shape
(N, C, H, W) and ``targets`` int64 class labels of shape (N,), the official train set first; ``num_train``
records where it ends, so a partition can keep the official split (``official_split``). Files are validated by shape
and label range, not by md5 (copies rebuilt from the originals differ in a few
pixels; see ``../shared/data/README.md``). Loaders read whatever number of
images the files hold (reduced copies are fine). The CIFAR pickles are read with
:func:`pfl.data.safe_pickle.restricted_load`, which builds only plain data and numpy
arrays, so a crafted data file cannot run code.

Datasets (name: folder under ``data_dir``, pool):

- ``cifar10``: ``cifar-10-batches-py/``, 5 train batches then ``test_batch``; 10 classes, 3x32x32.
- ``cifar100``: ``cifar-100-python/``, ``train`` then ``test`` (fine labels); 100 classes, 3x32x32.
- ``tinyimagenet``: ``tiny-imagenet-200/``, ``train/<wnid>/images`` then ``val/images`` (labels
  from ``val/val_annotations.txt``); 200 classes, 3x64x64. Class ids are indices into the
  sorted wnids (torchvision ImageFolder's convention). The JPEGs are decoded once into
  ``<data_dir>/tiny-imagenet-200.<fingerprint>.safetensors`` (see :func:`tinyimagenet_cache_path`);
  there is no downloader: get the zip manually.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pfl.data.errors import DatasetFormatError, DatasetNotFoundError  # re-exported: every loader's errors
from pfl.data.image_cache import DecodeCache, decode_images
from pfl.data.safe_pickle import PickleRejectedError, restricted_load


TASKS = ("classification", "viewport")  # what a dataset's targets are for (pfl.tasks)


@dataclass(frozen=True)
class DatasetInfo:
    """What is known of a dataset before it is read: its task (:data:`TASKS`), its inputs' modality, whether its
    samples carry natural groups (``partition=natural``), and for a time series the seconds between its steps
    (reports put horizon steps in seconds)."""

    task: str
    modality: str
    groups: bool = False
    step_seconds: float | None = None


CATALOG = {"cifar10": DatasetInfo("classification", "image"), "cifar100": DatasetInfo("classification", "image"),
           "tinyimagenet": DatasetInfo("classification", "image"), "cinic10": DatasetInfo("classification", "image"),
           "agnews": DatasetInfo("classification", "text"),
           "speech_commands": DatasetInfo("classification", "audio", groups=True),  # groups: the speakers
           "david": DatasetInfo("viewport", "sequence", groups=True, step_seconds=0.2)}  # 5 Hz (TRACK's rate)


@dataclass(frozen=True)
class Dataset:
    """A pool of samples of any modality: the inputs, their targets and, optionally, a natural group per sample.

    Attributes:
        name: dataset name, e.g. ``"cifar10"``.
        inputs: the samples, a tensor of any dtype and shape (N, ...): uint8 images (N, C, H, W) with pixel values
            0..255, int64 token or character ids (N, L), float sequences (N, T, F).
        targets: int64 class labels (N,) in [0, num_classes), or float targets (N, D) of a regression.
        num_classes: number of classes; ``None`` for a regression.
        class_names: human-readable class names, length ``num_classes`` (empty for a regression).
        num_train: the pool's first ``num_train`` samples are the dataset's official train set and the rest
            its official test set (CIFAR: the train batches, then the test batch; Tiny-ImageNet: train, then
            val); ``None`` when the pool has no such split (a PFLlib import). Not part of :meth:`fingerprint`.
        modality: what the inputs are, which decides their on-device transform (:data:`pfl.data.loader.TRANSFORMS`):
            ``"image"``, ``"sequence"``, ``"text"`` (uint8 character ids (N, L), :mod:`pfl.data.text`) or
            ``"audio"`` (int16 waveforms (N, samples), :mod:`pfl.data.audio`).
        task: what the targets are for (:data:`TASKS`, :mod:`pfl.tasks`).
        groups: int64 (N,): each sample's natural group (the viewer, the speaker, the writer), the client of a
            natural partition (:func:`pfl.data.partition.natural`); ``None``: the dataset has none.
        keys: further int64 (N,) per-sample keys a natural partition may split a group's samples by (David
            MMSys'18: ``"video"``, and ``"time"``, the order within a trace).
    """

    name: str
    inputs: torch.Tensor
    targets: torch.Tensor
    num_classes: int | None
    class_names: tuple[str, ...] = ()
    num_train: int | None = None
    modality: str = "image"
    task: str = "classification"
    groups: torch.Tensor | None = None
    keys: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def num_outputs(self) -> int:
        """A model's output size: the classes, or the width D of regression targets (N, D)."""
        return self.num_classes if self.num_classes is not None else int(self.targets.shape[1])

    def fingerprint(self) -> str:
        """Content hash (BLAKE2b, 16 hex chars) of inputs, targets and class count, then groups and keys when the
        dataset has them; logged as a run param.

        Hashes the tensors' memory in place (no copy of a contiguous tensor); for an image dataset the value equals
        that of hashing ``tobytes()`` of images then labels, as earlier versions did, so partition caches keyed by
        it stay valid.
        """
        h = hashlib.blake2b(digest_size=8)
        h.update(_bytes_view(self.inputs))
        h.update(_bytes_view(self.targets))
        h.update(str(self.num_classes).encode())
        for name, tensor in ([("groups", self.groups)] if self.groups is not None else []) + sorted(self.keys.items()):
            h.update(name.encode())
            h.update(_bytes_view(tensor))
        return h.hexdigest()


def _bytes_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in C order, as a view of its memory (copied only if it is not contiguous)."""
    array = tensor.contiguous().numpy()
    return memoryview(array.reshape(-1).view(np.uint8))


CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def _not_found(name: str, path: Path, archive: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found: looked for {path}. Provide the data by extracting {archive} into "
        f"{path.parent} (e.g. `mkdir -p {path.parent} && tar -xf {archive} -C {path.parent}`), "
        "or point pfl at a folder that holds it with PFL_DATA_DIR=... or data_dir=..., "
        "or set download=true on a machine with internet access."
    )


def _reextract(path: Path, archive: str) -> str:
    return f"replace it by extracting {archive} again into {path.parent.parent}"


def _check_files(name: str, root: Path, files: tuple[str, ...] | list[str], archive: str) -> None:
    """Check that each of ``files`` in the dataset folder ``root`` is a regular file (or a link to one).

    Raises:
        DatasetFormatError: one of them is a folder, another non-file, or a link to nothing; the message
            names that file and what it is.
        DatasetNotFoundError: one of them is missing (:func:`_not_found`).
    """
    for path in (root / f for f in files):
        if path.is_symlink() and not path.exists():
            raise DatasetFormatError(f"{path}: a link to {os.readlink(path)}, which does not exist; point the link "
                                     f"at the {name} file, or {_reextract(path, archive)}")
        if path.exists() and not path.is_file():
            what = "a folder" if path.is_dir() else "not a regular file"
            raise DatasetFormatError(f"{path}: {what}, not a {name} data file; {_reextract(path, archive)}")
    if any(not (root / f).is_file() for f in files):
        raise _not_found(name, root, archive)


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of dtype {value.dtype} and shape {value.shape}"
    return f"a {type(value).__name__}"


def _read_cifar_pickle(path: Path, archive: str) -> dict:
    """The dict pickled in a CIFAR batch or meta file, read without running code from the file.

    Raises:
        DatasetFormatError: the file is empty, truncated or not a pickle, names anything but plain
            data and numpy arrays (refused before anything it names is imported or called), or
            does not hold a dict; the message names ``path`` and the archive to re-extract.
    """
    try:
        with path.open("rb") as f:
            content = restricted_load(f, encoding="bytes")
    except PickleRejectedError as err:
        raise DatasetFormatError(f"{path}: not a CIFAR pickle: {err}; {_reextract(path, archive)}") from None
    if not isinstance(content, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {_describe(content)}; "
                                 f"{_reextract(path, archive)}")
    return content


def _read_cifar_batch(path: Path, label_key: bytes, num_classes: int, archive: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR batch: data uint8 (n, 3072) and labels int64 (n,) from ``batch[label_key]``.

    Raises:
        DatasetFormatError: the file is unreadable or refused (see :func:`_read_cifar_pickle`), or has
            a missing key, data that is not a uint8 array of shape (n, 3072), a label count other than
            n, or labels outside [0, num_classes); the message names ``path``.
    """
    batch = _read_cifar_pickle(path, archive)
    if b"data" not in batch or label_key not in batch:
        keys = sorted(map(repr, batch))
        raise DatasetFormatError(f"{path}: expected keys b'data' and {label_key!r}, got {', '.join(keys[:8])}; "
                                 f"{_reextract(path, archive)}")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(f"{path}: expected b'data' to be a uint8 array of shape (n, 3072), got "
                                 f"{_describe(data)}; {_reextract(path, archive)}")
    try:
        labels = np.asarray(batch[label_key])
        got = _describe(labels)
    except (ValueError, TypeError, OverflowError):
        labels, got = np.asarray(None), f"a ragged or non-numeric {type(batch[label_key]).__name__}"
    if labels.dtype.kind not in "iu" or labels.shape != (len(data),):
        raise DatasetFormatError(f"{path}: expected {label_key!r} to hold {len(data)} integer labels (one per row of "
                                 f"b'data'), got {got}; {_reextract(path, archive)}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFormatError(f"{path}: labels must lie in 0..{num_classes - 1}, "
                                 f"got {labels.min()}..{labels.max()}; {_reextract(path, archive)}")
    return data, labels


def _read_label_names(path: Path, key: bytes, count: int, archive: str) -> tuple[str, ...]:
    """The ``count`` class names stored under ``key`` in a CIFAR meta pickle.

    Raises:
        DatasetFormatError: the file is unreadable or refused (see :func:`_read_cifar_pickle`), or
            ``key`` does not hold ``count`` UTF-8 names; the message names ``path``.
    """
    names = _read_cifar_pickle(path, archive).get(key)
    if isinstance(names, (list, tuple)) and len(names) == count and all(isinstance(n, (bytes, str)) for n in names):
        try:
            return tuple(n.decode() if isinstance(n, bytes) else n for n in names)
        except UnicodeDecodeError:
            pass
    got = f"{len(names)} entries" if isinstance(names, (list, tuple)) else _describe(names)
    raise DatasetFormatError(f"{path}: expected {count} UTF-8 names under {key!r}, got {got}; "
                             f"{_reextract(path, archive)}")


def load_cifar10(data_dir: str | Path, download: bool = False) -> Dataset:
    """Load CIFAR-10 (train + test pooled) from ``<data_dir>/cifar-10-batches-py``.

    Returns:
        :class:`Dataset` with images (N, 3, 32, 32) uint8 and labels (N,) int64 in [0, 10);
        N = 60,000 for the full set, the 5 train batches' rows first (``num_train``: 50,000 for the full set).

    Raises:
        DatasetNotFoundError: the folder or one of its batch files is missing (and
            ``download`` is false); the message names the path and how to provide it.
        DatasetFormatError: a batch or ``batches.meta`` is empty, truncated, not a pickle of plain
            data and numpy arrays (anything else is refused unrun), has the wrong shape, or
            labels outside 0..9; the message names the file.
    """
    root = Path(data_dir) / CIFAR10_FOLDER
    if download and not root.is_dir():
        from pfl._torchvision import import_torchvision

        import_torchvision().datasets.CIFAR10(str(data_dir), download=True)
    archive = "cifar-10-python.tar.gz"
    _check_files("CIFAR-10", root, _CIFAR10_FILES, archive)
    parts = [_read_cifar_batch(root / f, b"labels", 10, archive) for f in _CIFAR10_FILES]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    names = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    meta = root / "batches.meta"
    if meta.is_file():
        names = _read_label_names(meta, b"label_names", 10, archive)
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    num_train = sum(len(p[1]) for p in parts[:-1])  # every file but test_batch
    return Dataset("cifar10", images, torch.from_numpy(labels), 10, names, num_train)


CIFAR100_FOLDER = "cifar-100-python"
_CIFAR100_FILES = ("train", "test")


def load_cifar100(data_dir: str | Path, download: bool = False) -> Dataset:
    """Load CIFAR-100 (train + test pooled, fine labels) from ``<data_dir>/cifar-100-python``.

    Reads the pickles ``train``, ``test`` (uint8 ``data`` (n, 3072), ``fine_labels``) and
    ``meta`` (``fine_label_names``).

    Returns:
        :class:`Dataset` with images (N, 3, 32, 32) uint8 and labels (N,) int64 in [0, 100);
        N = rows of ``train`` + rows of ``test`` (60,000 for the full set), train rows first
        (``num_train``: the rows of ``train``, 50,000 for the full set).

    Raises:
        DatasetNotFoundError: the folder or one of its files is missing (and ``download`` is
            false); the message names the path and how to provide it.
        DatasetFormatError: a file is empty, truncated, not a pickle of plain data and numpy arrays
            (anything else is refused unrun), has the wrong shape or labels outside 0..99, or
            ``meta`` does not hold 100 fine label names; the message names the file.
    """
    root = Path(data_dir) / CIFAR100_FOLDER
    if download and not root.is_dir():
        from pfl._torchvision import import_torchvision

        import_torchvision().datasets.CIFAR100(str(data_dir), download=True)
    archive = "cifar-100-python.tar.gz"
    _check_files("CIFAR-100", root, (*_CIFAR100_FILES, "meta"), archive)
    parts = [_read_cifar_batch(root / f, b"fine_labels", 100, archive) for f in _CIFAR100_FILES]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    names = _read_label_names(root / "meta", b"fine_label_names", 100, archive)
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return Dataset("cifar100", images, torch.from_numpy(labels), 100, names, len(parts[0][1]))


TINYIMAGENET_FOLDER = "tiny-imagenet-200"
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_SIZE = 64
_TINY_CACHE = DecodeCache("Tiny-ImageNet", TINYIMAGENET_FOLDER, "tinyimagenet", version=1, files="JPEGs")


@dataclass(frozen=True)
class _TinySources:
    """The Tiny-ImageNet files the loader reads, in pool order.

    Attributes:
        root: the ``tiny-imagenet-200`` folder.
        wnids: class wnids, sorted; class id = index here.
        train: per class (in ``wnids`` order), its ``train/<wnid>/images/*.JPEG`` sorted by name.
        val: ``val/images/*.JPEG`` sorted by name.
        text_files: ``wnids.txt``, ``words.txt`` (if present), ``val/val_annotations.txt``.
    """

    root: Path
    wnids: tuple[str, ...]
    train: tuple[tuple[Path, ...], ...]
    val: tuple[Path, ...]
    text_files: tuple[Path, ...]

    @property
    def annotations(self) -> Path:
        return self.root / "val" / "val_annotations.txt"

    def cache_path(self) -> Path:
        """The decode cache for the current state of the files read (:class:`~pfl.data.image_cache.DecodeCache`)."""
        return _TINY_CACHE.path(self.root, [*self.text_files, *(p for cls in self.train for p in cls), *self.val])


def _tinyimagenet_not_found(path: Path, root: Path, download: bool) -> DatasetNotFoundError:
    why = ("download=true cannot fetch Tiny-ImageNet (torchvision has no downloader for it). "
           if download else "")
    return DatasetNotFoundError(
        f"{why}Tiny-ImageNet not found: looked for {path}. Download {TINYIMAGENET_URL} manually and "
        f"extract it into {root.parent} (e.g. `unzip tiny-imagenet-200.zip -d {root.parent}`), "
        "or point pfl at a folder that holds it with PFL_DATA_DIR=... or data_dir=..."
    )


def _read_wnids(path: Path) -> tuple[str, ...]:
    """The sorted class wnids of ``wnids.txt`` (one a line); DatasetFormatError if empty or duplicated."""
    wnids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetFormatError(f"{path}: expected one distinct wnid a line, got {len(wnids)} lines "
                                 f"with {len(set(wnids))} distinct wnids")
    return tuple(sorted(wnids))


def _list_tinyimagenet(data_dir: str | Path, download: bool = False) -> _TinySources:
    """List the Tiny-ImageNet source files (no decoding, no annotation parsing).

    Raises:
        DatasetNotFoundError: the folder, ``wnids.txt``, ``val/val_annotations.txt``, ``val/images``
            or a ``train/<wnid>/images`` folder is missing.
        DatasetFormatError: ``wnids.txt`` is empty or repeats a wnid, or ``train/`` holds a
            class folder not listed in ``wnids.txt``.
    """
    root = Path(data_dir) / TINYIMAGENET_FOLDER
    wnids_file, words_file = root / "wnids.txt", root / "words.txt"
    annotations, val_dir = root / "val" / "val_annotations.txt", root / "val" / "images"
    for path in (root, wnids_file, root / "train", annotations, val_dir):
        if not path.exists():
            raise _tinyimagenet_not_found(path, root, download)
    wnids = _read_wnids(wnids_file)
    extra = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and d.name not in wnids)
    if extra:
        raise DatasetFormatError(f"{root / 'train'}: class folders {extra[:5]} are not listed in {wnids_file}")
    train = []
    for wnid in wnids:
        images = root / "train" / wnid / "images"
        if not images.is_dir():
            raise _tinyimagenet_not_found(images, root, download)
        train.append(tuple(sorted(images.glob("*.JPEG"))))
    text_files = (wnids_file, *([words_file] if words_file.is_file() else []), annotations)
    return _TinySources(root, wnids, tuple(train), tuple(sorted(val_dir.glob("*.JPEG"))), text_files)


def tinyimagenet_cache_path(data_dir: str | Path) -> Path:
    """Path of the decode cache for the current Tiny-ImageNet files of ``data_dir``.

    ``<data_dir>/tiny-imagenet-200.<fingerprint>.safetensors``, where the fingerprint (BLAKE2b,
    16 hex chars) covers the relative path, size and mtime_ns of every source file read plus a
    cache format version, so touching, adding or removing a file gives a new path.

    Raises:
        DatasetNotFoundError, DatasetFormatError: as :func:`load_tinyimagenet` for the file listing.
    """
    return _list_tinyimagenet(data_dir).cache_path()


def _class_names(words_file: Path, wnids: tuple[str, ...]) -> tuple[str, ...]:
    """Names of ``wnids`` from ``words.txt`` (wnid<TAB>names); a wnid absent there (or no file) names itself."""
    words: dict[str, str] = {}
    if words_file.is_file():
        for line in words_file.read_text().splitlines():
            wnid, _, names = line.partition("\t")
            words[wnid.strip()] = names.strip()
    return tuple(words.get(w) or w for w in wnids)


def _val_labels(sources: _TinySources) -> list[int]:
    """Class ids of ``sources.val`` from ``val_annotations.txt`` (filename<TAB>wnid<TAB>bbox...).

    Raises:
        DatasetFormatError: a malformed or conflicting line, an unknown wnid, or a val image
            without an entry; the message names ``val_annotations.txt``.
    """
    path, index = sources.annotations, {w: i for i, w in enumerate(sources.wnids)}
    label_of: dict[str, int] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise DatasetFormatError(f"{path}:{lineno}: expected filename<TAB>wnid<TAB>..., got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DatasetFormatError(f"{path}:{lineno}: wnid {wnid!r} of {name} is not listed in wnids.txt")
        if label_of.setdefault(name, index[wnid]) != index[wnid]:
            raise DatasetFormatError(f"{path}:{lineno}: {name} is annotated with two different wnids")
    missing = [p.name for p in sources.val if p.name not in label_of]
    if missing:
        raise DatasetFormatError(f"{path}: no annotation for {len(missing)} val images, e.g. {missing[:3]}")
    return [label_of[p.name] for p in sources.val]


def load_tinyimagenet(data_dir: str | Path, download: bool = False) -> Dataset:
    """Load Tiny-ImageNet-200 (train + val pooled) from ``<data_dir>/tiny-imagenet-200``.

    Reads the standard layout: ``wnids.txt``, ``words.txt`` (optional, for class names),
    ``train/<wnid>/images/*.JPEG`` and ``val/images/*.JPEG`` labelled by
    ``val/val_annotations.txt``; there is no ``test/`` (it has no labels). Class id = index of
    the wnid in ``sorted(wnids)``. Pool order: train images (classes in that order, files sorted
    by name), then val images (sorted by name). The JPEGs are decoded once and cached in
    :func:`tinyimagenet_cache_path`; later loads with unchanged files read only the cache.

    Returns:
        :class:`Dataset` with images (N, 3, 64, 64) uint8 (greyscale images become 3 equal
        channels) and labels (N,) int64 in [0, number of wnids); N = number of train + val JPEGs
        (110,000 for the full set), train first (``num_train``: the train JPEGs, 100,000 for the full set).

    Raises:
        DatasetNotFoundError: the folder or one of its parts is missing (also with ``download``:
            the set must be downloaded manually from :data:`TINYIMAGENET_URL`).
        DatasetFormatError: an image that cannot be decoded or is not 64x64, a val image without
            an annotation, an annotation with an unknown wnid, or a bad ``wnids.txt``; the
            message names the file.

    Warns:
        UserWarning: ``data_dir`` is not writable, so the decode cache is not written.
    """
    sources = _list_tinyimagenet(data_dir, download)
    files = [p for cls in sources.train for p in cls] + list(sources.val)
    cache, size = sources.cache_path(), TINYIMAGENET_SIZE
    expected = {"images": (torch.uint8, (len(files), 3, size, size)), "labels": (torch.int64, (len(files),))}
    cached = _TINY_CACHE.read(cache, expected) if cache.is_file() else None
    if cached is None:
        labels = [i for i, cls in enumerate(sources.train) for _ in cls] + _val_labels(sources)  # checked first
        images = decode_images(files, size, "Decoding Tiny-ImageNet",
                               "replace it with the file from tiny-imagenet-200.zip")
        cached = {"images": torch.from_numpy(images), "labels": torch.tensor(labels, dtype=torch.int64)}
        _TINY_CACHE.write(cache, cached)
    images, labels = cached["images"], cached["labels"]
    names = _class_names(sources.root / "words.txt", sources.wnids)
    num_train = sum(map(len, sources.train))
    return Dataset("tinyimagenet", images, labels, len(sources.wnids), names, num_train)


_LOADERS = {"cifar10": load_cifar10, "cifar100": load_cifar100, "tinyimagenet": load_tinyimagenet}


_MODULE_LOADERS = {"cinic10": "pfl.data.cinic:load_cinic10", "agnews": "pfl.data.agnews:load_agnews",
                   "speech_commands": "pfl.data.speech_commands:load_speech_commands",
                   "david": "pfl.data.david:load_david"}  # a module per dataset beyond CIFAR and Tiny-ImageNet


def load_dataset(name: str, data_dir: str | Path, download: bool = False, **options: Any) -> Dataset:
    """Load a dataset by name (see :data:`pfl.config.DATASETS`); ``options`` are the dataset's own knobs
    (David MMSys'18's ``history``, ``horizon``, ``predict``; :data:`DATASET_OPTIONS`).

    Raises:
        KeyError: unknown dataset name.
        DatasetNotFoundError, DatasetFormatError: see the per-dataset loaders.
    """
    if name in _LOADERS:
        return _LOADERS[name](data_dir, download=download)
    module, function = _MODULE_LOADERS[name].split(":")
    return getattr(importlib.import_module(module), function)(data_dir, download=download, **options)


DATASET_OPTIONS = {"history": ("david",), "horizon": ("david",), "predict": ("david",),
                   "train_on_valid": ("cinic10",)}  # knob -> its datasets
