"""AG News topic classification as character ids (the ``text`` modality, :mod:`pfl.data.text`).

Source: the dataset release of X. Zhang, J. Zhao, Y. LeCun, "Character-level Convolutional Networks for Text
Classification", NIPS 2015 (``ag_news_csv.tar.gz``, linked from github.com/zhangxiangxiao/Crepe,
``data/README.md``): ``<data_dir>/ag_news_csv/`` holds ``train.csv`` (120,000 rows), ``test.csv`` (7,600) and
``classes.txt`` (World, Sports, Business, Sci/Tech, one a line). CSV rows are ``"class","title","description"``
with classes 1..4, ``""`` for a quote inside a field and ``\\n`` (a backslash, then ``n``) for a line break.

Each row becomes one text as Crepe builds it (at 449852dc):

- each field has every ``\\n`` replaced by a newline, then leading and trailing whitespace (space, tab, newline,
  vertical tab, form feed, carriage return: Lua's ``%s``) removed (``data/csv2t7b.lua:109,155``);
- the fields are joined last to first with a space between them (``train/data.lua:67-70, 141-144``), so an AG News
  text is the description, a space, then the title; a model reading it backward (:func:`pfl.data.text.read_backward`)
  reads the title first, as Crepe's does.

Consequence taken over from Crepe: the release marks most line breaks with a lone backslash (kept, an unknown
character), and ``\\n`` is also the start of such a break before a word beginning with ``n`` (``...other\\name``),
which thus becomes a newline and ``ame``; 20 of the shared copy's 18,029 rows hold such a ``\\n``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

from pfl.data.datasets import Dataset, DatasetFormatError, DatasetNotFoundError, _check_files
from pfl.data.text import LENGTH, quantize_many

FOLDER = "ag_news_csv"
ARCHIVE = "ag_news_csv.tar.gz"
ORIGIN = "the char-CNN datasets release of Zhang, Zhao & LeCun 2015 (linked from github.com/zhangxiangxiao/Crepe)"
SPLITS = ("train.csv", "test.csv")  # pool order: the official train rows, then the test rows
CLASSES_FILE = "classes.txt"
NUM_CLASSES = 4
FIELDS = ("class", "title", "description")
_LUA_SPACE = " \t\n\v\f\r"  # Lua's %s in the C locale, what csv2t7b.lua strips


def load_agnews(data_dir: str | Path, download: bool = False) -> Dataset:
    """Load AG News (train + test pooled) from ``<data_dir>/ag_news_csv`` as character ids (module docstring).

    Args:
        data_dir: folder holding ``ag_news_csv/``.
        download: not supported (there is no downloader); only changes the message when the data is missing.

    Returns:
        :class:`Dataset` ``"agnews"``: inputs uint8 (N, 1024) character ids (:mod:`pfl.data.text`), targets int64
        (N,) in 0..3 (class c of the files is label c - 1), ``class_names`` from ``classes.txt``; the train rows
        first (``num_train``: 120,000 for the full set, N = 127,600), whatever number of rows the files hold.

    Raises:
        DatasetNotFoundError: the folder or one of its three files is missing; the message names the path and
            where the data comes from.
        DatasetFormatError: a file that is not a regular file, an empty CSV, a row with other than 3 fields or a
            class outside 1..4, unbalanced quotes, or a ``classes.txt`` with other than 4 names; the message names
            the file and line. Raised before any text is quantized.
    """
    root = Path(data_dir) / FOLDER
    files = (*SPLITS, CLASSES_FILE)
    for path in (root, *(root / f for f in files)):
        if not os.path.lexists(path):
            raise _agnews_not_found(path, download)
    _check_files("AG News", root, files, ARCHIVE)
    class_names = _read_class_names(root / CLASSES_FILE)
    splits = [_read_rows(root / f) for f in SPLITS]
    texts = [t for split_texts, _ in splits for t in split_texts]
    labels = np.concatenate([split_labels for _, split_labels in splits])
    return Dataset("agnews", torch.from_numpy(quantize_many(texts, LENGTH)), torch.from_numpy(labels), NUM_CLASSES,
                   class_names, num_train=len(splits[0][0]), modality="text", task="classification")


def _agnews_not_found(path: Path, download: bool) -> DatasetNotFoundError:
    why = "download=true cannot fetch AG News (pfl has no downloader for it). " if download else ""
    root = path if path.name == FOLDER else path.parent
    return DatasetNotFoundError(
        f"{why}AG News not found: looked for {path}. Get {ARCHIVE} from {ORIGIN} and extract it into {root.parent} "
        f"(e.g. `tar -xzf {ARCHIVE} -C {root.parent}`), or point pfl at a folder that holds {FOLDER}/ with "
        "PFL_DATA_DIR=... or data_dir=..."
    )


def _refix(path: Path) -> str:
    return f"fix that line or extract {ARCHIVE} again into {path.parent.parent}"


def _read_class_names(path: Path) -> tuple[str, ...]:
    """The class names of ``classes.txt``, one a non-empty line; DatasetFormatError unless there are 4."""
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except UnicodeDecodeError as err:
        raise DatasetFormatError(f"{path}: not UTF-8 text ({err}); extract {ARCHIVE} again into "
                                 f"{path.parent.parent}") from None
    if len(names) != NUM_CLASSES:
        raise DatasetFormatError(f"{path}: expected {NUM_CLASSES} class names, one a line, got {len(names)}; "
                                 f"extract {ARCHIVE} again into {path.parent.parent}")
    return names


def _read_rows(path: Path) -> tuple[list[str], np.ndarray]:
    """The texts (Crepe's joined fields, module docstring) and int64 labels 0..3 of one CSV file.

    Raises:
        DatasetFormatError: the file is empty, a row does not have 3 fields (a blank line has none), a class is
            not an integer in 1..4, or a quoted field is malformed; the message names the file and line.
    """
    texts, labels = [], []
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        rows = csv.reader(f, strict=True)
        try:
            for row in rows:
                labels.append(_label(row, path, rows.line_num))
                texts.append(" ".join(_clean(field) for field in reversed(row[1:])))
        except csv.Error as err:
            raise DatasetFormatError(f"{path}:{rows.line_num}: malformed CSV ({err}); {_refix(path)}") from None
    if not labels:
        raise DatasetFormatError(f"{path}: empty file, expected rows {','.join(map(repr, FIELDS))}; "
                                 f"extract {ARCHIVE} again into {path.parent.parent}")
    return texts, np.array(labels, dtype=np.int64)


def _label(row: list[str], path: Path, line: int) -> int:
    """Label 0..3 of a CSV row ``class, title, description`` (class 1..4); DatasetFormatError naming the line."""
    if len(row) != len(FIELDS):
        raise DatasetFormatError(f"{path}:{line}: expected {len(FIELDS)} fields ({', '.join(FIELDS)}), got "
                                 f"{len(row)}; {_refix(path)}")
    try:
        label = int(row[0])
    except ValueError:
        label = None
    if label is None or not 1 <= label <= NUM_CLASSES:
        raise DatasetFormatError(f"{path}:{line}: class must be an integer in 1..{NUM_CLASSES}, got {row[0]!r}; "
                                 f"{_refix(path)}")
    return label - 1


def _clean(field: str) -> str:
    """A text field as Crepe's ``csv2t7b.lua`` stores it: ``\\n`` made a newline, surrounding whitespace removed."""
    return field.replace("\\n", "\n").strip(_LUA_SPACE)
