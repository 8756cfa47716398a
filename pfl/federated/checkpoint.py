"""Checkpoints: an algorithm's state as named tensors plus JSON and back, and the checkpoint on disk.

A checkpoint is a manifest, ``checkpoint.safetensors``, whose metadata holds the JSON part (key
``pfl_checkpoint``) and, by group, the files its tensors are in (key ``pfl_checkpoint_files``), and
those files beside it in ``states/``. A group is the tensors of one name prefix, the name up to its
last ``/`` (one client's state in one store, ``algorithm/models/3``; the generators, ``rng``), and its
file is named by the SHA-256 of its names, dtypes, shapes and bytes. A checkpoint therefore writes only
the groups that changed since the previous one (a round changes the states of the clients it sampled)
and stores a state held twice (e.g. in two stores) once. Every file is written to a temporary name and
renamed; the manifest goes last, and the files only the previous manifest named are deleted after it,
so a crash at any point leaves a whole checkpoint. Nothing is pickled. A checkpoint written before
``states/`` (its tensors inside the manifest) still loads.

Each attribute named in ``Algorithm.state_attributes`` is exported by kind:

* a :class:`~pfl.federated.store.ClientStore`: every written client's state as tensors
  ``"<attr>/<client>/<entry>"`` (clients never written keep their defaults);
* a named state (``dict[str, Tensor]``): tensors ``"<attr>/<entry>"``;
* a tensor: tensor ``"<attr>"``;
* anything else JSON-able (ints, floats, lists, sets of ints, dicts with int keys): in the JSON part.

Import restores each attribute in place on an algorithm built from the same config and seed,
so a resumed run continues bit for bit (tested per algorithm).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pfl.federated.state import State, state_digest
from pfl.federated.store import ClientStore

CHECKPOINT_FILE = "checkpoint.safetensors"
STATES_DIR = "states"  # beside the manifest: one file per group of tensors
_META_KEY = "pfl_checkpoint"
_FILES_KEY = "pfl_checkpoint_files"


def _is_state(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _to_json(value: Any) -> Any:
    if isinstance(value, set):
        return {"set": sorted(value)}
    if isinstance(value, dict):
        return {"items": [[k, _to_json(v)] for k, v in value.items()]}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"set"}:
        return set(value["set"])
    if isinstance(value, dict) and set(value) == {"items"}:
        return {k: _from_json(v) for k, v in value["items"]}
    return value


def export_state(obj: object, attributes: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of ``obj``'s ``attributes`` (module docstring); tensors are host copies."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for attr in attributes:
        value = getattr(obj, attr)
        if isinstance(value, ClientStore):
            meta[attr] = {"kind": "store", "clients": value.written()}
            for cid, state in value.items():
                tensors.update({f"{attr}/{cid}/{k}": v for k, v in state.items()})
        elif _is_state(value):
            meta[attr] = {"kind": "state", "keys": list(value)}
            tensors.update({f"{attr}/{k}": v for k, v in value.items()})
        elif isinstance(value, torch.Tensor):
            meta[attr] = {"kind": "tensor"}
            tensors[attr] = value
        else:
            meta[attr] = {"kind": "json", "value": _to_json(value)}
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, meta


def import_state(obj: object, attributes: tuple[str, ...], tensors: dict[str, torch.Tensor],
                 meta: dict[str, Any]) -> None:
    """Set ``obj``'s ``attributes`` from :func:`export_state`'s output.

    Raises:
        ValueError: an attribute is missing from ``meta``.
    """
    for attr in attributes:
        if attr not in meta:
            raise ValueError(f"saved state has no {attr!r} (saved: {', '.join(meta)}); was it saved by another "
                             "algorithm?")
        entry = meta[attr]
        kind = entry["kind"]
        if kind == "store":
            store: ClientStore = getattr(obj, attr)
            store.clear()
            for cid in entry["clients"]:
                prefix = f"{attr}/{cid}/"
                store[cid] = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        elif kind == "state":
            setattr(obj, attr, {k: tensors[f"{attr}/{k}"].clone() for k in entry["keys"]})
        elif kind == "tensor":
            setattr(obj, attr, tensors[attr].clone())
        else:
            setattr(obj, attr, _from_json(entry["value"]))


def _groups(tensors: dict[str, torch.Tensor]) -> dict[str, State]:
    """``tensors`` by group: the name up to its last ``/`` -> {the rest of the name: tensor}."""
    groups: dict[str, State] = {}
    for name, tensor in tensors.items():
        group, _, entry = name.rpartition("/")
        groups.setdefault(group, {})[entry] = tensor.detach().cpu().contiguous()
    return groups


def _file_name(group: State) -> str:
    """The content address of a group: SHA-256 of its entries' names, dtypes, shapes and bytes."""
    layout = json.dumps([[k, str(v.dtype), list(v.shape)] for k, v in sorted(group.items())]).encode()
    return hashlib.sha256(layout + state_digest(group)).hexdigest()[:32] + ".safetensors"


def _write_atomic(path: Path, tensors: State, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file under a temporary name in its folder, then rename it to ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
    """Write ``tensors`` and ``meta`` (JSON, no NaN) as the checkpoint whose manifest is ``path`` (module docstring):
    the groups without a file yet, then the manifest, then delete the files it no longer names.

    Returns:
        the checkpoint's size in bytes: the manifest and every file it names.
    """
    states = path.parent / STATES_DIR
    states.mkdir(parents=True, exist_ok=True)
    files = {}
    for group, entries in _groups(tensors).items():
        files[group] = _file_name(entries)
        if not (states / files[group]).is_file():
            _write_atomic(states / files[group], entries)
    _write_atomic(path, {}, {_META_KEY: json.dumps(meta, allow_nan=False), _FILES_KEY: json.dumps(files)})
    for stale in set(p.name for p in states.iterdir()) - set(files.values()):
        (states / stale).unlink(missing_ok=True)
    return path.stat().st_size + sum((states / name).stat().st_size for name in set(files.values()))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read the checkpoint whose manifest is ``path`` (:func:`save_checkpoint`; also one written before ``states/``).

    Raises:
        ValueError: the manifest or a file it names is missing or unreadable, or ``path`` is not a pfl checkpoint
            (names the file).
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))  # a checkpoint written before states/ holds its tensors here
        for group, name in json.loads(metadata.get(_FILES_KEY, "{}")).items():
            prefix = f"{group}/" if group else ""
            tensors.update({prefix + k: v for k, v in load_file(str(path.parent / STATES_DIR / name)).items()})
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"checkpoint {path} is unreadable ({err}); delete it to restart the run") from None
    if _META_KEY not in metadata:
        raise ValueError(f"{path} is not a pfl checkpoint (no {_META_KEY} metadata)")
    return tensors, json.loads(metadata[_META_KEY])


def delete_checkpoint(path: Path) -> None:
    """Delete the checkpoint whose manifest is ``path`` (the manifest and ``states/``), and its folder once empty."""
    path.unlink(missing_ok=True)
    shutil.rmtree(path.parent / STATES_DIR, ignore_errors=True)
    try:
        path.parent.rmdir()
    except OSError:  # missing, or holding other files
        pass


@dataclass
class Checkpointer:
    """Where and how often the engine saves the complete run state.

    Attributes:
        path: the checkpoint's manifest (only the latest checkpoint is kept; :func:`save_checkpoint`).
        every: save every ``every`` rounds; 0: every round while a checkpoint is under 100 MB, else every 5 rounds.
        at_end: also save after the last round (a run that keeps its checkpoint); otherwise the last round saves
            none, since a finished run deletes its checkpoint.
        sizes: bytes of each checkpoint written (manifest and files); seconds: time each write took.
    """

    path: Path
    every: int = 0
    at_end: bool = True
    sizes: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def due(self, rnd: int, last: int) -> bool:
        """Whether round ``rnd`` (of ``last``) ends with a checkpoint."""
        if rnd == last:
            return self.at_end
        every = self.every or (1 if not self.sizes or self.sizes[-1] < 100 * 2**20 else 5)
        return rnd % every == 0

    def save(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Write the checkpoint (:func:`save_checkpoint`) and record its size and time."""
        start = time.perf_counter()
        self.sizes.append(save_checkpoint(self.path, tensors, meta))
        self.seconds.append(time.perf_counter() - start)
