"""CINIC-10 loader on the real reduced copy (120 / 40 / 40 PNGs per class in train / valid / test): counts, labels,
pixels, the decode cache, and bad input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pfl.data.cinic import CLASSES, FOLDER, MEAN, STD, URL, cinic10_cache_path, load_cinic10
from pfl.data.datasets import DatasetFormatError, DatasetNotFoundError

CIFAR10_LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PER_CLASS = {"train": 120, "valid": 40, "test": 40}  # the shared copy


@pytest.fixture(scope="module")
def cinic10(cinic10_dir):
    return load_cinic10(cinic10_dir)


def _pil_chw(path: Path) -> torch.Tensor:
    with PIL.Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy())


def _by_class(counts: dict[str, int]) -> torch.Tensor:
    """Hand-built labels of a pool holding ``counts[split]`` images per class, split after split."""
    return torch.cat([torch.arange(10).repeat_interleave(n) for n in counts.values()])


def test_class_ids_are_sorted_folder_names_in_cifar10_order():
    assert CLASSES == tuple(sorted(CLASSES)) == CIFAR10_LABEL_NAMES  # CIFAR-10's batches.meta label_names


def test_loads_the_shared_copy(cinic10):
    assert cinic10.name == "cinic10" and cinic10.modality == "image" and cinic10.task == "classification"
    assert cinic10.inputs.shape == (2000, 3, 32, 32) and cinic10.inputs.dtype == torch.uint8
    assert cinic10.targets.dtype == torch.int64 and torch.equal(cinic10.targets, _by_class(PER_CLASS))
    assert cinic10.num_classes == 10 and cinic10.class_names == CIFAR10_LABEL_NAMES
    assert cinic10.num_train == 10 * (120 + 40)  # train + valid


def test_pixels_are_pils_decoding_in_pool_order(cinic10, cinic10_dir):
    cats = sorted((cinic10_dir / FOLDER / "valid" / "cat").glob("*.png"))
    index = 10 * 120 + CLASSES.index("cat") * 40 + 7  # after train, then 3 classes of valid
    assert torch.equal(cinic10.inputs[index], _pil_chw(cats[7]))
    last_truck = sorted((cinic10_dir / FOLDER / "test" / "truck").glob("*.png"))[-1]
    assert torch.equal(cinic10.inputs[-1], _pil_chw(last_truck))


def test_without_valid_the_pool_is_train_then_test(cinic10, cinic10_dir):
    data = load_cinic10(cinic10_dir, train_on_valid=False)
    assert data.num_train == 1200 and len(data) == 1600
    assert torch.equal(data.targets, _by_class({"train": 120, "test": 40}))
    assert torch.equal(data.inputs[:1200], cinic10.inputs[:1200])
    assert torch.equal(data.inputs[1200:], cinic10.inputs[1600:])


def test_published_channel_statistics_fit_the_shared_copy(cinic10):
    pixels = cinic10.inputs.float().div(255).transpose(0, 1).reshape(3, -1)  # RGB rows
    assert torch.allclose(pixels.mean(1), torch.tensor(MEAN), atol=0.02)
    assert torch.allclose(pixels.std(1), torch.tensor(STD), atol=0.02)


def test_second_load_reads_the_cache_without_decoding(cinic10, cinic10_dir, monkeypatch):
    assert cinic10_cache_path(cinic10_dir).is_file()

    def no_decode(*args, **kwargs):
        raise AssertionError("a PNG was decoded although the cache is valid")

    monkeypatch.setattr(PIL.Image, "open", no_decode)
    again = load_cinic10(cinic10_dir)
    assert torch.equal(again.inputs, cinic10.inputs) and torch.equal(again.targets, cinic10.targets)


@pytest.fixture
def small(cinic10_dir, tmp_path) -> Path:
    """A data dir with the first 3 PNGs of every class and split of the shared copy (90 images)."""
    for split in PER_CLASS:
        for name in CLASSES:
            dst = tmp_path / FOLDER / split / name
            dst.mkdir(parents=True)
            for png in sorted((cinic10_dir / FOLDER / split / name).glob("*.png"))[:3]:
                shutil.copy2(png, dst)
    return tmp_path


def _first_png(data_dir: Path, split: str = "train", name: str = "bird") -> Path:
    return sorted((data_dir / FOLDER / split / name).glob("*.png"))[0]


def test_touching_a_file_invalidates_the_cache(small):
    first = load_cinic10(small)
    cache1 = cinic10_cache_path(small)
    assert cache1.is_file() and cache1.parent == small
    png = _first_png(small)
    st = png.stat()
    os.utime(png, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    cache2 = cinic10_cache_path(small)
    assert cache2 != cache1
    assert torch.equal(load_cinic10(small).inputs, first.inputs)
    assert cache2.is_file() and not cache1.exists()  # the stale cache is dropped


def test_unreadable_cache_warns_and_decodes_again(small):
    first = load_cinic10(small)
    cinic10_cache_path(small).write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="ignoring unreadable CINIC-10 cache"):
        assert torch.equal(load_cinic10(small).inputs, first.inputs)


def test_unwritable_cache_warns_and_still_loads(small):
    cinic10_cache_path(small).mkdir()  # the rename onto it fails like a read-only folder would
    with pytest.warns(UserWarning, match="cannot write CINIC-10 decode cache"):
        assert len(load_cinic10(small)) == 90
    assert not list(small.glob(".*.tmp"))


def test_greyscale_png_becomes_three_equal_channels(small):
    png = _first_png(small, "test", "ship")
    grey = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    PIL.Image.fromarray(grey, mode="L").save(png)
    data = load_cinic10(small)
    image = data.inputs[2 * 30 + CLASSES.index("ship") * 3]  # train, valid, then 3 per class of test
    assert all(torch.equal(image[c], torch.from_numpy(grey)) for c in range(3))


def _one_line_error(error: type[Exception], data_dir: Path, path: Path) -> str:
    with pytest.raises(error) as info:
        load_cinic10(data_dir)
    message = str(info.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}:") or f"looked for {path}." in message, message
    return message


def test_empty_class_folder_names_it(small):
    folder = small / FOLDER / "valid" / "deer"
    for png in folder.iterdir():
        png.unlink()
    assert "no .png image" in _one_line_error(DatasetFormatError, small, folder)


def test_unknown_class_folder_names_it(small):
    folder = small / FOLDER / "train" / "zebra"
    folder.mkdir()
    shutil.copy2(_first_png(small), folder)
    assert "not a CINIC-10 class folder" in _one_line_error(DatasetFormatError, small, folder)


def test_png_of_wrong_size_names_the_file(small):
    png = _first_png(small, "valid", "frog")
    PIL.Image.new("RGB", (16, 16)).save(png)
    assert "expected a 32x32 image, got 16x16" in _one_line_error(DatasetFormatError, small, png)


def test_corrupt_png_names_the_file(small):
    png = _first_png(small, "test", "dog")
    data = png.read_bytes()
    png.write_bytes(data[:len(data) // 2])  # the header survives, the pixel data is cut
    assert "cannot decode image" in _one_line_error(DatasetFormatError, small, png)


@pytest.mark.parametrize("download", [False, True])
def test_missing_folder_names_the_path_and_url(tmp_path, download):
    with pytest.raises(DatasetNotFoundError) as info:
        load_cinic10(tmp_path, download=download)
    message = str(info.value)
    assert f"looked for {tmp_path / FOLDER}." in message and URL in message and "\n" not in message
    assert ("cannot fetch" in message) == download


def test_missing_split_names_it(small):
    shutil.rmtree(small / FOLDER / "valid")
    assert URL in _one_line_error(DatasetNotFoundError, small, small / FOLDER / "valid")
