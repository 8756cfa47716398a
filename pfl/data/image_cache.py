"""Image-folder datasets decoded once: the decoding (:func:`decode_images`) and its safetensors cache next to the
dataset folder (:class:`DecodeCache`), used by Tiny-ImageNet (:mod:`pfl.data.datasets`) and CINIC-10
(:mod:`pfl.data.cinic`)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from pfl.data.errors import DatasetFormatError


@dataclass(frozen=True)
class DecodeCache:
    """Decoded images of an image-folder dataset, cached in one safetensors file next to the folder.

    The file is ``<data_dir>/<folder>.<fingerprint>.safetensors``; the fingerprint (BLAKE2b, 16 hex chars) covers
    ``tag``, ``version`` and the relative path, size and mtime_ns of every source file, so touching, adding or
    removing a file gives a new path, and writing a new cache drops the stale ones. Caches are written atomically
    (temp file + rename) and read without unpickling anything.

    Attributes:
        name: the dataset's display name in warnings, e.g. ``"CINIC-10"``.
        folder: the dataset folder under ``data_dir``; also the cache file's prefix.
        tag: the dataset's name in the fingerprint, e.g. ``"cinic10"``.
        version: the cache format version; bump it when the layout or the decoding changes.
        files: what the cache saves decoding, in warnings, e.g. ``"PNGs"``.
    """

    name: str
    folder: str
    tag: str
    version: int
    files: str

    def path(self, root: Path, sources: Iterable[Path]) -> Path:
        """The cache file for the current state of ``sources`` (files under the dataset folder ``root``)."""
        h = hashlib.blake2b(digest_size=8)
        h.update(f"pfl-{self.tag}-cache-v{self.version}\n".encode())
        for rel, file in sorted((p.relative_to(root).as_posix(), p) for p in sources):
            st = file.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return root.parent / f"{self.folder}.{h.hexdigest()}.safetensors"

    def read(self, path: Path, expected: dict[str, tuple[torch.dtype, tuple[int, ...]]]
             ) -> dict[str, torch.Tensor] | None:
        """The tensors named in ``expected`` from the cache ``path``.

        Returns ``None``, with a warning, when the file is unreadable or a tensor is missing or has another dtype or
        shape than ``expected[name]`` = (dtype, shape); the caller then decodes again.
        """
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {name: f.get_tensor(name) for name in expected}
        except (OSError, SafetensorError, KeyError, ValueError) as err:
            warnings.warn(f"ignoring unreadable {self.name} cache {path} ({err}); decoding the {self.files} again",
                          stacklevel=3)
            return None
        if any(tensors[n].dtype != dtype or tuple(tensors[n].shape) != shape for n, (dtype, shape) in expected.items()):
            warnings.warn(f"ignoring {self.name} cache {path}: its contents do not match the files; decoding the "
                          f"{self.files} again", stacklevel=3)
            return None
        return tensors

    def write(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        """Write ``tensors`` to the cache ``path`` and drop this dataset's stale caches.

        Warns (and writes nothing) when the folder is not writable, so the next load decodes again.
        """
        metadata = {"format_version": str(self.version)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # same folder: atomic rename
        try:
            with tmp.open("xb"):  # created with the user's umask; save_file alone would leave the file 0600
                mode = tmp.stat().st_mode & 0o777
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            tmp.chmod(mode)
            os.replace(tmp, path)
        except (OSError, SafetensorError) as err:
            tmp.unlink(missing_ok=True)
            warnings.warn(f"cannot write {self.name} decode cache {path} ({err}); continuing without it, so the next "
                          f"load decodes the {self.files} again", stacklevel=3)
            return
        stale_name = re.compile(re.escape(self.folder) + r"\.[0-9a-f]{16}\.safetensors")
        for stale in path.parent.iterdir():  # caches of earlier file states can never match again
            if stale != path and stale_name.fullmatch(stale.name):
                with contextlib.suppress(OSError):  # e.g. another user's file in a sticky folder
                    stale.unlink()


def decode_images(paths: Sequence[Path], size: int, desc: str, fix: str) -> np.ndarray:
    """Decode ``size`` x ``size`` images to uint8 (n, 3, size, size), as ``Image.convert("RGB")`` gives them
    (greyscale becomes 3 equal channels), with a progress bar titled ``desc``.

    Raises:
        DatasetFormatError: an image cannot be decoded (corrupt, truncated, not an image, or declaring a
            decompression-bomb size) or is not ``size`` x ``size``; the message names the file and ends with
            ``fix``, what to do about it.
    """
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(tqdm(paths, desc=desc, unit="img", disable=None)):
        try:
            with Image.open(path) as img:
                if img.size != (size, size):
                    raise DatasetFormatError(f"{path}: expected a {size}x{size} image, got {img.size[0]}x"
                                             f"{img.size[1]}; {fix}")
                out[i] = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
        except DatasetFormatError:
            raise
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            raise DatasetFormatError(f"{path}: cannot decode image ({err}); {fix}") from None
    return out
