"""AG News (pfl.data.agnews) and the text modality (pfl.data.text): the loader on the real shared copy, the
character quantization on hand-computed strings and against a line-by-line port of Crepe's reading, and every
bad-input error."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from pfl.data.agnews import load_agnews
from pfl.data.datasets import DatasetFormatError, DatasetNotFoundError
from pfl.data.text import ALPHABET, NUM_IDS, TextTransform, quantize, quantize_many, read_backward

TRAIN_CLASS_COUNTS = [2630, 2452, 2594, 2753]  # ../shared/data/README.md: the first 10,429 official train rows
CREPE_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-,;.!?:'\"/\\|_@#$%^&*~`+-=<>()[]{}"  # Crepe config.lua:11


@pytest.fixture(scope="module")
def agnews(agnews_dir):
    return load_agnews(agnews_dir)


def test_loader_on_the_shared_copy(agnews):
    assert len(agnews) == 10_429 + 7_600 and agnews.num_train == 10_429
    assert agnews.inputs.dtype == torch.uint8 and agnews.inputs.shape == (18_029, 1024)
    assert agnews.targets.dtype == torch.int64
    assert torch.bincount(agnews.targets[:10_429]).tolist() == TRAIN_CLASS_COUNTS
    assert torch.bincount(agnews.targets[10_429:]).tolist() == [1900] * 4  # the official test set
    assert (agnews.name, agnews.num_classes, agnews.modality, agnews.task) == ("agnews", 4, "text", "classification")
    assert agnews.class_names == ("World", "Sports", "Business", "Sci/Tech")
    assert int(agnews.inputs.max()) < NUM_IDS and agnews.groups is None
    # train.csv row 1: class "3", the title, then the description; Crepe joins description, space, title
    first = ("Reuters - Short-sellers, Wall Street's dwindling\\band of ultra-cynics, are seeing green again. "
             "Wall St. Bears Claw Back Into the Black (Reuters)")
    assert agnews.targets[0] == 2 and np.array_equal(agnews.inputs[0].numpy(), quantize(first))


def test_quantize_hand_computed():
    # A->a 3, b 4, space 2, '-' keeps its later slot 3 + 59, z 28, tab unknown, e-acute is 2 UTF-8 bytes (unknown),
    # '~' 3 + 56, newline 3 + 69, then padding
    assert quantize("Ab -z\t\u00e9~\n", length=12).tolist() == [3, 4, 2, 62, 28, 1, 1, 1, 59, 72, 0, 0]
    assert quantize("Zz9}0", length=3).tolist() == [28, 28, 38]  # truncation keeps the first bytes
    long = quantize("X" * 1030)
    assert long.dtype == np.uint8 and long.shape == (1024,) and set(long.tolist()) == {3 + 23}
    assert quantize("").tolist() == [0] * 1024


def test_quantize_many_is_quantize_per_text():
    texts = ["Ab -z\t\u00e9~\n", "", "Zz9}0" * 300, "\u00c9\x00"]
    many = quantize_many(texts)
    assert many.dtype == np.uint8 and many.shape == (4, 1024)
    assert all(np.array_equal(row, quantize(t)) for row, t in zip(many, texts, strict=True))
    assert many[3, :3].tolist() == [1, 1, 1]  # a NUL byte is an unknown character, not padding
    assert quantize_many([]).shape == (0, 1024)


def test_alphabet_is_the_papers_seventy_characters():
    assert len(ALPHABET) == 70 and ALPHABET == CREPE_ALPHABET + "\n" and NUM_IDS == 73
    assert ALPHABET.count("-") == 2 and len(set(ALPHABET)) == 69


def test_read_backward_hand_case():
    ids = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 5], [0, 0, 0, 0, 0]], dtype=torch.uint8)
    assert read_backward(ids).tolist() == [[7, 6, 5, 0, 0], [5, 4, 3, 2, 1], [0, 0, 0, 0, 0]]


def _crepe_lua_field(field: str) -> str:
    """csv2t7b.lua:109: gsub("\\\\n", "\\n") then trim Lua's %s."""
    return field.replace("\\n", "\n").strip(" \t\n\v\f\r")


def _crepe_string_to_tensor(s: bytes, length: int = 1014) -> np.ndarray:
    """Crepe data.lua:12-18 and 153-164, line by line: float (69, length) one-hot, read from the last byte back."""
    table = {}
    for i, char in enumerate(CREPE_ALPHABET.encode(), 1):
        table[char] = i
    s = bytes(c + 32 if 65 <= c <= 90 else c for c in s)  # str:lower() in the C locale
    t = np.zeros((len(CREPE_ALPHABET), length))
    for i in range(len(s), max(len(s) - length + 1, 1) - 1, -1):
        if s[i - 1] in table:
            t[table[s[i - 1]] - 1, len(s) - i] = 1
    return t


def test_backward_one_hot_is_crepes_reading_on_real_rows(agnews, agnews_dir):
    with open(agnews_dir / "ag_news_csv" / "test.csv", newline="", encoding="utf-8") as f:
        rows = [row for _, row in zip(range(300), csv.reader(f), strict=False)]
    strings = [" ".join(_crepe_lua_field(x) for x in reversed(row[1:])).encode() for row in rows]  # data.lua:141-144
    assert any(b"\n" in s for s in strings)  # the slice holds a "\n" sequence (line 8: "...social\network")
    ids = read_backward(agnews.inputs[agnews.num_train:agnews.num_train + len(rows)])[:, :1014].long()
    ours = torch.nn.functional.one_hot(ids, NUM_IDS)[:, :, 3:72]  # Crepe's 69 rows: ids 3..71 (no newline)
    for row, s in zip(ours, strings, strict=True):
        assert np.array_equal(row.T.numpy(), _crepe_string_to_tensor(s))


def test_text_transform():
    ids = torch.tensor([[3, 72, 2, 1, 0]], dtype=torch.uint8)
    out = TextTransform()(ids, torch.Generator().manual_seed(0))
    assert out.dtype == torch.int64 and out.tolist() == [[3, 72, 2, 1, 0]]
    assert TextTransform().output_shape((1024,)) == (1024,) and TextTransform.augments is False


GOOD_ROWS = '"1","Title one","Desc, with ""quotes"""\n"4","T2","D2"\n'


def _ag_dir(tmp_path, train=GOOD_ROWS, test=GOOD_ROWS, classes="World\nSports\nBusiness\nSci/Tech\n"):
    root = tmp_path / "ag_news_csv"
    root.mkdir()
    for name, text in (("train.csv", train), ("test.csv", test), ("classes.txt", classes)):
        if text is not None:
            (root / name).write_text(text)
    return tmp_path


def test_fields_joined_as_crepe_does(tmp_path):
    data = load_agnews(_ag_dir(tmp_path, train='"2"," Ti\\ntle ","\\nDesc\\a, ""q"" "\n'))
    assert data.targets.tolist() == [1, 0, 3] and data.num_train == 1
    assert np.array_equal(data.inputs[0].numpy(), quantize('Desc\\a, "q" Ti\ntle'))
    assert np.array_equal(data.inputs[1].numpy(), quantize('Desc, with "quotes" Title one'))


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("files", "where"), [
    ({"train": '"1","a","b"\n"5","c","d"\n'}, "train.csv:2: class must be an integer in 1..4, got '5'"),
    ({"test": '"1","a","b"\n"0","c","d"\n'}, "test.csv:2: class must be an integer in 1..4, got '0'"),
    ({"test": '"x","a","b"\n'}, "test.csv:1: class must be an integer"),
    ({"train": '"1","a","b"\n"2","c"\n'}, "train.csv:2: expected 3 fields"),
    ({"train": '"1","a","b"\n\n"2","c","d"\n'}, "train.csv:2: expected 3 fields (class, title, description), got 0"),
    ({"test": '"1","a","b","c"\n'}, "test.csv:1: expected 3 fields"),
    ({"train": '"1","a"b","c"\n'}, "train.csv:1: malformed CSV"),
    ({"test": ""}, "test.csv: empty file"),
    ({"classes": "World\nSports\nBusiness\n"}, "classes.txt: expected 4 class names, one a line, got 3"),
])
def test_bad_files_name_file_and_line(tmp_path, files, where):
    with pytest.raises(DatasetFormatError) as err:
        load_agnews(_ag_dir(tmp_path, **files))
    assert where in _one_line(err) and str(tmp_path) in str(err.value)


@pytest.mark.parametrize("missing", ["train", "test", "classes"])
def test_missing_file(tmp_path, missing):
    with pytest.raises(DatasetNotFoundError) as err:
        load_agnews(_ag_dir(tmp_path, **{missing: None}))
    name = {"train": "train.csv", "test": "test.csv", "classes": "classes.txt"}[missing]
    assert f"looked for {tmp_path / 'ag_news_csv' / name}" in _one_line(err)
    assert "zhangxiangxiao/Crepe" in str(err.value)


def test_missing_folder_and_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_agnews(tmp_path, download=True)
    message = _one_line(err)
    assert message.startswith("download=true cannot fetch AG News") and str(tmp_path / "ag_news_csv") in message


def test_folder_in_place_of_a_file(tmp_path):
    root = _ag_dir(tmp_path, train=None)
    (root / "ag_news_csv" / "train.csv").mkdir()
    with pytest.raises(DatasetFormatError) as err:
        load_agnews(root)
    assert "train.csv: a folder" in _one_line(err)
