"""CIFAR-100 and Tiny-ImageNet loaders on the real reduced archives (fixtures in conftest.py), and the fingerprint."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tinyimagenet_classes

from pfl.data.datasets import (CIFAR100_FOLDER, TINYIMAGENET_FOLDER, TINYIMAGENET_URL, DatasetFormatError,
                               DatasetNotFoundError, Dataset, load_cifar100, load_dataset, load_tinyimagenet,
                               tinyimagenet_cache_path)


def _pickle(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def _pil_chw(path: Path) -> torch.Tensor:
    """PIL's own decode of ``path`` as uint8 (3, H, W)."""
    with PIL.Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy())


def _mode(path: Path) -> str:
    with PIL.Image.open(path) as img:
        return img.mode


def _annotations(root: Path) -> dict[str, str]:
    """val_annotations.txt parsed as {filename: wnid}."""
    lines = (root / "val" / "val_annotations.txt").read_text().splitlines()
    return {f[0]: f[1] for f in (line.split("\t") for line in lines if line)}


def _train_files(root: Path, wnid: str) -> list[Path]:
    return sorted((root / "train" / wnid / "images").glob("*.JPEG"))


def _sorted_wnids(root: Path) -> list[str]:
    return sorted((root / "wnids.txt").read_text().split())


def _train_index(root: Path, wnid: str, file: Path) -> int:
    """Pool index of a train image: all images of the classes before ``wnid`` (sorted) come first."""
    before = _sorted_wnids(root)[:_sorted_wnids(root).index(wnid)]
    return sum(len(_train_files(root, w)) for w in before) + _train_files(root, wnid).index(file)


# ---------------------------------------------------------------- CIFAR-100

def test_cifar100_pools_train_then_test_with_fine_labels(cifar100, cifar100_dir):
    root = cifar100_dir / CIFAR100_FOLDER
    train, test, meta = (_pickle(root / f) for f in ("train", "test", "meta"))
    n_train, n_test = len(train[b"data"]), len(test[b"data"])
    assert cifar100.name == "cifar100" and cifar100.num_classes == 100
    assert cifar100.inputs.shape == (n_train + n_test, 3, 32, 32) and cifar100.inputs.dtype == torch.uint8
    assert cifar100.targets.dtype == torch.int64
    assert 0 <= cifar100.targets.min() and cifar100.targets.max() < 100
    assert cifar100.class_names == tuple(n.decode() for n in meta[b"fine_label_names"])
    for i, (batch, row) in {0: (train, 0), n_train - 1: (train, n_train - 1), n_train: (test, 0),
                            n_train + n_test - 1: (test, n_test - 1)}.items():
        assert torch.equal(cifar100.inputs[i].flatten(), torch.from_numpy(batch[b"data"][row]))
        assert cifar100.targets[i] == batch[b"fine_labels"][row]
    assert torch.equal(cifar100.targets, torch.tensor(train[b"fine_labels"] + test[b"fine_labels"]))


def test_cifar100_wrong_shape_names_the_file(cifar100_dir, tmp_path):
    shutil.copytree(cifar100_dir / CIFAR100_FOLDER, tmp_path / CIFAR100_FOLDER)
    bad = tmp_path / CIFAR100_FOLDER / "test"
    batch = _pickle(bad)
    batch[b"data"] = batch[b"data"][:, :1024]
    bad.write_bytes(pickle.dumps(batch))
    with pytest.raises(DatasetFormatError, match=re.escape(str(bad))):
        load_cifar100(tmp_path)


def test_cifar100_missing_folder_names_the_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / CIFAR100_FOLDER))):
        load_cifar100(tmp_path)


# ------------------------------------------------------------ Tiny-ImageNet

def test_tinyimagenet_counts_and_shapes_come_from_the_folder(tinyimagenet, tinyimagenet_dir):
    root = tinyimagenet_dir / TINYIMAGENET_FOLDER
    wnids = _sorted_wnids(root)
    n_train = sum(len(_train_files(root, w)) for w in wnids)
    n_val = len(list((root / "val" / "images").glob("*.JPEG")))
    assert (n_train, n_val) == (16_000, 4_000)  # the shared reduced archive
    assert tinyimagenet.name == "tinyimagenet" and tinyimagenet.num_classes == len(wnids) == 200
    assert tinyimagenet.inputs.shape == (n_train + n_val, 3, 64, 64) and tinyimagenet.inputs.dtype == torch.uint8
    assert tinyimagenet.targets.dtype == torch.int64
    assert 0 <= tinyimagenet.targets.min() and tinyimagenet.targets.max() < 200
    assert torch.equal(tinyimagenet.targets[:n_train], torch.tensor(
        [i for i, w in enumerate(wnids) for _ in _train_files(root, w)]))
    words = dict(line.split("\t", 1) for line in (root / "words.txt").read_text().splitlines())
    assert tinyimagenet.class_names == tuple(words[w] for w in wnids)


def test_tinyimagenet_train_class_id_is_sorted_wnid_index(tinyimagenet, tinyimagenet_dir):
    root = tinyimagenet_dir / TINYIMAGENET_FOLDER
    wnid = (root / "wnids.txt").read_text().split()[0]  # first in the file, not first when sorted
    assert _sorted_wnids(root).index(wnid) != 0
    file = _train_files(root, wnid)[7]
    i = _train_index(root, wnid, file)
    assert tinyimagenet.targets[i] == _sorted_wnids(root).index(wnid)
    assert torch.equal(tinyimagenet.inputs[i], _pil_chw(file))


def test_tinyimagenet_val_labels_come_from_annotations(tinyimagenet, tinyimagenet_dir):
    root = tinyimagenet_dir / TINYIMAGENET_FOLDER
    wnids, annotations = _sorted_wnids(root), _annotations(root)
    val = sorted((root / "val" / "images").glob("*.JPEG"))
    n_train = len(tinyimagenet) - len(val)
    for k in range(0, len(val), 397):
        assert tinyimagenet.targets[n_train + k] == wnids.index(annotations[val[k].name]), val[k].name
    for k in (0, len(val) - 1):
        assert torch.equal(tinyimagenet.inputs[n_train + k], _pil_chw(val[k]))


def test_tinyimagenet_greyscale_becomes_three_equal_channels(tinyimagenet, tinyimagenet_dir):
    root = tinyimagenet_dir / TINYIMAGENET_FOLDER
    for wnid in _sorted_wnids(root):
        grey = next((p for p in _train_files(root, wnid) if _mode(p) == "L"), None)
        if grey is not None:
            break
    assert grey is not None, "the reduced archive should hold greyscale JPEGs"
    image = tinyimagenet.inputs[_train_index(root, wnid, grey)]
    with PIL.Image.open(grey) as img:
        expected = torch.from_numpy(np.asarray(img).copy())
    for c in range(3):
        assert torch.equal(image[c], expected)


def test_tinyimagenet_second_load_reads_the_cache_without_decoding(tinyimagenet, tinyimagenet_dir, monkeypatch):
    assert tinyimagenet_cache_path(tinyimagenet_dir).is_file()

    def no_decode(*args, **kwargs):
        raise AssertionError("a JPEG was decoded although the cache is valid")

    monkeypatch.setattr(PIL.Image, "open", no_decode)
    again = load_tinyimagenet(tinyimagenet_dir)
    assert torch.equal(again.inputs, tinyimagenet.inputs) and torch.equal(again.targets, tinyimagenet.targets)
    assert again.class_names == tinyimagenet.class_names and again.num_classes == tinyimagenet.num_classes


@pytest.fixture
def tiny_small(tinyimagenet_dir, tmp_path) -> Path:
    """A data dir with a 3-class copy of the reduced Tiny-ImageNet (240 train + 60 val JPEGs)."""
    return tinyimagenet_classes(tinyimagenet_dir, tmp_path, 3)


def test_cache_path_changes_when_a_source_file_changes(tiny_small):
    root = tiny_small / TINYIMAGENET_FOLDER
    first = load_tinyimagenet(tiny_small)
    cache1 = tinyimagenet_cache_path(tiny_small)
    assert cache1.is_file() and cache1.parent == tiny_small and tinyimagenet_cache_path(tiny_small) == cache1

    jpeg = _train_files(root, _sorted_wnids(root)[1])[0]
    st = jpeg.stat()
    os.utime(jpeg, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    cache2 = tinyimagenet_cache_path(tiny_small)
    assert cache2 != cache1
    assert torch.equal(load_tinyimagenet(tiny_small).inputs, first.inputs)
    assert cache2.is_file() and not cache1.exists()  # the stale cache is dropped

    shutil.copy2(jpeg, jpeg.with_name("zzz_extra.JPEG"))
    cache3 = tinyimagenet_cache_path(tiny_small)
    assert cache3 not in (cache1, cache2)
    assert len(load_tinyimagenet(tiny_small)) == len(first) + 1


def test_unwritable_cache_warns_and_still_loads(tiny_small):
    tinyimagenet_cache_path(tiny_small).mkdir()  # the rename onto it fails like a read-only folder would
    with pytest.warns(UserWarning, match="cannot write Tiny-ImageNet decode cache"):
        data = load_tinyimagenet(tiny_small)
    assert len(data) == 300 and data.num_classes == 3
    assert not list(tiny_small.glob(".*.tmp"))  # the temp file is cleaned up


def test_val_image_without_annotation_names_the_file(tiny_small):
    annotations = tiny_small / TINYIMAGENET_FOLDER / "val" / "val_annotations.txt"
    lines = annotations.read_text().splitlines()
    annotations.write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"val_annotations\.txt.*" + re.escape(lines[0].split("\t")[0])):
        load_tinyimagenet(tiny_small)


def test_unknown_wnid_in_annotations_names_the_file(tiny_small):
    annotations = tiny_small / TINYIMAGENET_FOLDER / "val" / "val_annotations.txt"
    name, _, *bbox = annotations.read_text().splitlines()[0].split("\t")
    with annotations.open("a") as f:
        f.write("\t".join([name + "x", "n99999999", *bbox]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"val_annotations\.txt:\d+: wnid 'n99999999'"):
        load_tinyimagenet(tiny_small)


def test_image_of_wrong_size_names_the_file(tiny_small):
    root = tiny_small / TINYIMAGENET_FOLDER
    jpeg = _train_files(root, _sorted_wnids(root)[0])[3]
    PIL.Image.new("RGB", (32, 32)).save(jpeg, format="JPEG")
    with pytest.raises(DatasetFormatError, match=re.escape(f"{jpeg}: expected a 64x64 image, got 32x32")):
        load_tinyimagenet(tiny_small)


@pytest.mark.parametrize("download", [False, True])
def test_tinyimagenet_missing_folder_names_the_path_and_url(tmp_path, download):
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / TINYIMAGENET_FOLDER))) as err:
        load_tinyimagenet(tmp_path, download=download)
    assert TINYIMAGENET_URL in str(err.value)
    assert ("cannot fetch" in str(err.value)) == download


def test_load_dataset_dispatches(cifar100, cifar100_dir, tinyimagenet, tinyimagenet_dir):
    c = load_dataset("cifar100", cifar100_dir)
    assert c.name == "cifar100" and torch.equal(c.inputs, cifar100.inputs)
    t = load_dataset("tinyimagenet", tinyimagenet_dir)
    assert t.name == "tinyimagenet" and torch.equal(t.targets, tinyimagenet.targets)


# ------------------------------------------------------------ fingerprint

def _fingerprint_by_copy(dataset) -> str:
    """The fingerprint as pfl computed it before hashing in place: BLAKE2b over ``tobytes()`` copies."""
    h = hashlib.blake2b(digest_size=8)
    h.update(dataset.inputs.contiguous().numpy().tobytes())
    h.update(dataset.targets.numpy().tobytes())
    h.update(str(dataset.num_classes).encode())
    return h.hexdigest()


def test_fingerprint_is_unchanged_so_partition_caches_stay_valid(cifar100, tinyimagenet):
    for dataset in (cifar100, tinyimagenet):
        assert dataset.fingerprint() == _fingerprint_by_copy(dataset)
    # a non-contiguous view of the same pixels hashes like its contiguous copy
    strided = dataclasses.replace(cifar100, inputs=cifar100.inputs.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2))
    assert not strided.inputs.is_contiguous()
    assert strided.fingerprint() == cifar100.fingerprint()
    # and it still depends on pixels, labels and class count
    assert dataclasses.replace(cifar100, num_classes=99).fingerprint() != cifar100.fingerprint()
    flipped = cifar100.inputs.clone()
    flipped[-1, -1, -1, -1] ^= 1
    assert dataclasses.replace(cifar100, inputs=flipped).fingerprint() != cifar100.fingerprint()


def test_fingerprint_does_not_copy_the_images():
    images = np.random.default_rng(0).integers(0, 256, (16_384, 3, 32, 32), dtype=np.uint8)  # 50 MB
    dataset = Dataset("cifar10", torch.from_numpy(images), torch.zeros(len(images), dtype=torch.int64), 10,
                           tuple("abcdefghij"))

    def peak_traced_bytes(fingerprint) -> tuple[str, int]:
        tracemalloc.start()
        try:
            value = fingerprint()
            return value, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    value, peak = peak_traced_bytes(dataset.fingerprint)
    old_value, old_peak = peak_traced_bytes(lambda: _fingerprint_by_copy(dataset))
    assert value == old_value
    assert old_peak >= images.nbytes  # tracemalloc sees a copy of the buffer...
    assert peak < images.nbytes / 50  # ...and the fingerprint makes none (labels are 128 KB: not copied either)
