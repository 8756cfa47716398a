"""Shared fixtures: real data extracted from ../shared/data into temp dirs.

CIFAR-10 and CIFAR-100 as slices of the real pickles; Tiny-ImageNet as the whole reduced folder
(16,000 train + 4,000 val JPEGs, decoded once per session).

Every test runs in its own temporary folder (its ``tmp_path``) and the session's fixtures in a temporary folder of
their own, so whatever lands in the working directory (MLflow's default artifact root ``./mlruns`` of a SQLite
store, ``sqlite:///mlflow.db``, ``.pfl_cache/``, ``optuna.db``) stays out of the checkout. The session fails when
the checkout gained files while it ran (:func:`pytest_sessionfinish`).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

from pfl.data.datasets import (CIFAR10_FOLDER, CIFAR100_FOLDER, TINYIMAGENET_FOLDER, load_cifar10,
                               load_cifar100, load_tinyimagenet)

REPO = Path(__file__).resolve().parents[1]  # the checkout the tests must leave as they found it
SHARED_DATA = Path(os.environ.get("PFL_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR10_SLICE = {f"data_batch_{i}": 600 for i in range(1, 6)} | {"test_batch": 600}  # 3,600 real images
CIFAR100_SLICE = {"train": 3000, "test": 1000}  # rows kept per CIFAR-100 file


UNWATCHED = {".git", "__pycache__", ".pytest_cache"}  # git's own folder; what Python and pytest cache by design
CHECKOUT_BEFORE = pytest.StashKey[set]()  # the checkout's paths when the session started


def checkout_paths(root: Path) -> set[str]:
    """Every file and folder under ``root`` as a relative POSIX path, except :data:`UNWATCHED` folders and virtual
    environments (a folder holding ``pyvenv.cfg``), which the test run itself changes."""
    found = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in UNWATCHED and not (Path(folder) / d / "pyvenv.cfg").exists()]
        here = Path(folder).relative_to(root)
        found.update((here / name).as_posix() for name in (*dirs, *files))
    return found


def written_into(root: Path, before: set[str]) -> list[str]:
    """What appeared under ``root`` since :func:`checkout_paths` gave ``before``: the topmost new paths (a new
    folder stands for its content) that git ignores (``mlruns/``, ``mlflow.db``, ``.pfl_cache/``: what a program
    run from the checkout writes) or that lie at the top level. New files in the checkout's folders that git would
    track are left out: in a checkout being edited while the tests run, they are someone's new sources. Outside a
    git checkout every new path counts."""
    new = sorted(checkout_paths(root) - before)
    topmost = [p for p in new if Path(p).parent.as_posix() not in new]
    if not topmost:
        return []
    ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "--stdin"], input="\n".join(topmost),
                             capture_output=True, text=True)
    if ignored.returncode not in (0, 1):  # 128: not a git checkout
        return topmost
    ignored_paths = set(ignored.stdout.splitlines())
    return [p for p in topmost if p in ignored_paths or "/" not in p]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Record the checkout's paths (:func:`checkout_paths`) before any test runs."""
    session.config.stash[CHECKOUT_BEFORE] = checkout_paths(REPO)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when the checkout gained files while it ran (:func:`written_into`), naming them."""
    before = session.config.stash.get(CHECKOUT_BEFORE, None)
    written = written_into(REPO, before) if before is not None else []
    if not written:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"tests wrote into the checkout {REPO}: {', '.join(written)}; a test must write "
                            "under its tmp_path", red=True)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def _session_outside_the_checkout(tmp_path_factory):
    """Session and module fixtures run in a temporary folder, not in the checkout."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield


@pytest.fixture(autouse=True)
def _test_in_its_tmp_path(tmp_path, monkeypatch):
    """Each test runs in its own ``tmp_path``: a SQLite store it opens keeps its artifacts there (MLflow resolves
    the default artifact root ``./mlruns`` against the working directory when the store is first opened)."""
    monkeypatch.chdir(tmp_path)


def _extract_shared(archive_name: str, what: str, tmp_path_factory) -> Path:
    """Extract ``SHARED_DATA/archive_name`` into a fresh temp dir; fail clearly if the archive is missing."""
    archive = SHARED_DATA / archive_name
    if not archive.is_file():
        pytest.fail(f"real {what} archive not found at {archive}; set PFL_SHARED_DATA to the shared data folder")
    out = tmp_path_factory.mktemp(what.lower())
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out


def _sliced_copy(src_dir: Path, dst_dir: Path, rows: dict[str, int], keys: tuple[bytes, ...]) -> None:
    """Copy a CIFAR pickle folder, keeping the first ``rows[name]`` rows of each listed file's ``keys``."""
    dst_dir.mkdir()
    for src in src_dir.iterdir():
        if src.name not in rows:
            (dst_dir / src.name).write_bytes(src.read_bytes())
            continue
        with src.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
        for key in keys:
            batch[key] = batch[key][:rows[src.name]]
        with (dst_dir / src.name).open("wb") as f:
            pickle.dump(batch, f)


def _sliced_data_dir(archive: str, what: str, folder: str, rows: dict[str, int], keys: tuple[bytes, ...],
                     tmp_path_factory) -> Path:
    """A fresh data dir holding ``folder`` extracted from ``archive`` and cut down to ``rows``."""
    full = _extract_shared(archive, what, tmp_path_factory) / folder
    out = tmp_path_factory.mktemp("data")
    _sliced_copy(full, out / folder, rows, keys)
    return out


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> Path:
    """A data dir holding ``cifar-10-batches-py`` with the first 600 real images of each batch file."""
    return _sliced_data_dir("cifar-10-python.tar.xz", "CIFAR-10", CIFAR10_FOLDER, CIFAR10_SLICE,
                            (b"data", b"labels", b"filenames"), tmp_path_factory)


@pytest.fixture(scope="session")
def cifar10(cifar10_dir):
    """The loaded CIFAR-10 slice (:class:`pfl.data.datasets.Dataset`, 3,600 images)."""
    return load_cifar10(cifar10_dir)


@pytest.fixture(scope="session")
def cifar100_dir(tmp_path_factory) -> Path:
    """A data dir holding ``cifar-100-python`` with the first 3,000 real ``train`` and 1,000 ``test`` rows."""
    return _sliced_data_dir("cifar-100-python-subset.tar.xz", "CIFAR-100", CIFAR100_FOLDER, CIFAR100_SLICE,
                            (b"data", b"fine_labels", b"coarse_labels", b"filenames"), tmp_path_factory)


@pytest.fixture(scope="session")
def cifar100(cifar100_dir):
    """The loaded CIFAR-100 slice (:class:`pfl.data.datasets.Dataset`, 4,000 images)."""
    return load_cifar100(cifar100_dir)


@pytest.fixture(scope="session")
def tinyimagenet_dir(tmp_path_factory) -> Path:
    """A data dir holding the whole reduced ``tiny-imagenet-200`` folder (80 train + 20 val JPEGs per class).

    Tests must not modify it (copy what they change); loading it writes the decode cache next to it.
    """
    out = _extract_shared("tiny-imagenet-200-subset.tar.xz", "Tiny-ImageNet", tmp_path_factory)
    assert (out / TINYIMAGENET_FOLDER).is_dir(), f"archive did not extract to {TINYIMAGENET_FOLDER}/"
    return out


def tinyimagenet_classes(tinyimagenet_dir: Path, out: Path, num_classes: int) -> Path:
    """A data dir ``out`` holding the first ``num_classes`` classes (sorted wnids) of the reduced Tiny-ImageNet:
    their train and val JPEGs, ``wnids.txt`` and ``words.txt``."""
    src, dst = tinyimagenet_dir / TINYIMAGENET_FOLDER, out / TINYIMAGENET_FOLDER
    wnids = sorted((src / "wnids.txt").read_text().split())[:num_classes]
    for wnid in wnids:
        shutil.copytree(src / "train" / wnid, dst / "train" / wnid)
    (dst / "val" / "images").mkdir(parents=True)
    lines = [line for line in (src / "val" / "val_annotations.txt").read_text().splitlines()
             if line.split("\t")[1] in wnids]
    for line in lines:
        shutil.copy2(src / "val" / "images" / line.split("\t")[0], dst / "val" / "images")
    (dst / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (dst / "wnids.txt").write_text("\n".join(wnids) + "\n")
    shutil.copy2(src / "words.txt", dst / "words.txt")
    return out


@pytest.fixture(scope="session")
def tinyimagenet(tinyimagenet_dir):
    """The loaded reduced Tiny-ImageNet (:class:`pfl.data.datasets.Dataset`, 20,000 images)."""
    return load_tinyimagenet(tinyimagenet_dir)


@pytest.fixture(scope="session")
def david_dir(tmp_path_factory) -> Path:
    """A data dir holding the real David MMSys'18 head traces (both layouts, all 19 videos x 57 viewers)."""
    return _extract_shared("david-mmsys18.tar.xz", "David", tmp_path_factory)


@pytest.fixture(scope="session")
def cinic10_dir(tmp_path_factory) -> Path:
    """A data dir holding the reduced real ``CINIC-10`` (120 / 40 / 40 PNGs per class in train / valid / test)."""
    return _extract_shared("cinic-10-subset.tar.xz", "CINIC-10", tmp_path_factory)


@pytest.fixture(scope="session")
def agnews_dir(tmp_path_factory) -> Path:
    """A data dir holding the reduced real ``ag_news_csv`` (the official 7,600 test rows, the first 10,429 train)."""
    return _extract_shared("ag_news_csv.tar.xz", "AGNews", tmp_path_factory)


@pytest.fixture(scope="session")
def speech_commands_dir(tmp_path_factory) -> Path:
    """A data dir holding the reduced real ``speech_commands_test_set_v0.02`` (12 label folders of 80 clips)."""
    return _extract_shared("speech_commands_test_set_v0.02-subset.tar.xz", "SpeechCommands", tmp_path_factory)


@pytest.fixture(scope="session")
def data_dir(cifar10_dir, cifar100_dir, tmp_path_factory) -> Path:
    """A data dir holding the CIFAR-10 slice (in-distribution) and the CIFAR-100 slice (its default OOD set)."""
    out = tmp_path_factory.mktemp("cifar10_and_100")
    for folder in (CIFAR10_FOLDER, CIFAR100_FOLDER):
        (out / folder).symlink_to((cifar10_dir if folder == CIFAR10_FOLDER else cifar100_dir) / folder)
    return out


def _equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def check_exact_resumption(cifar10_dir: Path, tmp_path: Path, algo: str, *overrides: str) -> tuple:
    """Run ``algo`` 2 rounds on 5 CIFAR-10 clients (2 per round), export its state through a safetensors file and
    JSON, restore it into a fresh algorithm of the same config and seed, and run round 3 on both from the same global
    RNG state (a checkpoint holds it: :func:`pfl.seed.rng_state`): the clients' models, the round's training loss and
    samples, and the whole state after it must be bit-identical.

    Returns:
        ``(original, resumed)`` after round 3, for algorithm-specific checks.
    """
    from safetensors.torch import load_file, save_file

    from pfl.federated.engine import Engine, Schedule
    from pfl.config import load_config
    from pfl.seed import rng_state, set_rng_state
    from pfl.train import build_algorithm, prepare

    cfg = load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", f"algo={algo}", "num_clients=5",
                             "join_ratio=0.4", "global_rounds=3", "device=cpu", "num_threads=1", *overrides])
    prepared = prepare(cfg)
    schedule = Schedule(global_rounds=3, num_join_clients=cfg.num_join_clients)
    original = build_algorithm(prepared, seed=0)
    engine = Engine(original, schedule)
    for rnd in (1, 2):
        engine.run_round(rnd)
    tensors, meta = original.state_dict()
    save_file(tensors, tmp_path / "state.safetensors")  # the export survives a file and JSON: nothing pickled
    tensors, meta = load_file(tmp_path / "state.safetensors"), json.loads(json.dumps(meta))
    resumed = build_algorithm(prepared, seed=0)
    # not vacuous: two rounds moved the state away from a fresh algorithm's
    assert any(not _equal(original.personalized_state(c), resumed.personalized_state(c)) for c in range(5))
    resumed.load_state_dict(tensors, meta)
    for c in range(5):
        assert _equal(resumed.personalized_state(c), original.personalized_state(c)), c
    rng = rng_state()  # the global generators a checkpoint holds beside the state (dropout draws from them)
    after = engine.run_round(3)
    set_rng_state(*rng)
    again = Engine(resumed, schedule).run_round(3)
    assert {k: v for k, v in after.items() if not k.startswith(("time/", "memory/"))} == \
        {k: v for k, v in again.items() if not k.startswith(("time/", "memory/"))}
    for c in range(5):
        assert _equal(resumed.personalized_state(c), original.personalized_state(c)), c
    (t1, m1), (t2, m2) = original.state_dict(), resumed.state_dict()
    assert m1 == m2 and _equal(t1, t2)  # the whole algorithm state after round 3, every tensor bit for bit
    return original, resumed
