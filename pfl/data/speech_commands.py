"""Speech Commands v0.02 as 12-class keyword spotting: waveforms, labels and speakers.

Source: P. Warden, "Speech Commands: A Dataset for Limited-Vocabulary Speech Recognition", arXiv:1804.03209
(2018), whose evaluation (and its test-set release) uses twelve classes: the ten keywords ``yes no up down left
right on off stop go`` plus ``_silence_`` and ``_unknown_`` (any other word). How ``_silence_`` and ``_unknown_``
are built from the full release follows TensorFlow's ``speech_commands`` example that the paper's baselines use
(``tensorflow/examples/speech_commands/input_data.py``, read at github.com/ashuven63/tf_audio, a fork of
tensorflow/tensorflow, commit bc561b81; cited below as input_data.py:line, and its ``train.py`` as train.py:line).

Class order (ids 0..11): :data:`CLASS_NAMES`, ``_silence_, _unknown_, yes, no, up, down, left, right, on, off,
stop, go``, the example's ``prepare_words_list`` (input_data.py:49-58) with its default ``wanted_words``
(``train.py:397``).

Two layouts under ``data_dir`` (the full release is read when both are there):

- ``speech_commands_test_set_v0.02/``: the official test-set release, one folder per class (``_silence_/`` and
  ``_unknown_/`` included). Every clip is official test data, so ``num_train`` is ``None`` (a partition splits
  the pool with ``train_ratio``). Pool order: classes in :data:`CLASS_NAMES` order, files sorted by name.
- ``speech_commands_v0.02/``: the full release: one folder per word (35), ``_background_noise_/``,
  ``validation_list.txt`` and ``testing_list.txt``. A clip listed in neither list is a training clip. Words
  other than the keywords are ``_unknown_``. As in input_data.py:267-278, each split (training, validation,
  testing) gets ``ceil(10% x its keyword clips)`` ``_unknown_`` clips drawn without replacement from its own
  unknown-word clips (all of them when there are fewer), and as many ``_silence_`` clips, each a 1 s stretch of a
  background-noise file scaled by a volume drawn uniformly from [0, 1) (input_data.py:460-469: random file, random
  start in ``[0, length - 16000)``, ``np.random.uniform(0, 1)``). Pool: training, then validation (together the
  official train part, ``num_train``), then testing; within a split, classes in :data:`CLASS_NAMES` order, word
  clips sorted by path, silence in the order drawn.

Deliberate differences from input_data.py: the draws come from one ``numpy.random.default_rng(59185)`` (the
example's ``RANDOM_SEED``, input_data.py:46) over sorted file lists, in the order training, validation, testing
and within a split unknown clips then silence (file, start, volume per clip), so a pool is reproducible; the
example shuffles a file-system-ordered glob with Python's ``random`` and draws silence afresh at every batch from
an unseeded ``np.random``. Silence is therefore fixed once per load, and stored as int16: ``rint(noise x volume)``,
within half a quantization step of the example's float ``noise / 32768 x volume``. The split comes from the two
lists shipped with the release, not recomputed with the example's ``which_set`` hash (input_data.py:61-106).

Waveforms: every WAV is read with the standard library's ``wave`` module and must be 16-bit PCM, mono, 16 kHz
(plain ``WAVE_FORMAT_PCM``; Python 3.11's ``wave`` refuses the EXTENSIBLE header). Clips shorter than 1 s are
zero-padded at the end to 16,000 samples and longer ones cut to their first 16,000 (``decode_wav`` with
``desired_samples``, input_data.py:353). Inputs are the raw int16 samples (N, 16000); the ``audio`` modality's
front end (:class:`pfl.data.audio.AudioTransform`) turns them into log-mel spectrograms on the device.

Speakers: word clips are named ``<speaker>_nohash_<n>.wav`` (the test release's ``_unknown_`` clips
``<word>_<speaker>_nohash_<n>.wav.wav``): ``<speaker>`` is the speaker's hash, ``<n>`` the utterance number (the
n-th repetition of that word by that speaker). ``groups`` numbers the speakers by decreasing clip count in the
pool (ties by hash), so a natural partition (:func:`pfl.data.partition.natural`, the first ``num_clients`` groups)
takes the speakers with the most clips. ``_silence_`` clips have no speaker: the k-th silence clip of the pool goes
to speaker ``k mod S`` (S speakers, in id order) as its utterance ``k div S``, so every speaker that a natural
partition takes first holds silence before any holds two. ``keys["time"]`` orders each speaker's clips 0..n-1 by
utterance number, ties (the same n of different words) in a random order drawn once from ``default_rng(59185)``,
so ``split_by=time`` trains on a speaker's first utterances and its test split mixes the words (the pool order,
by class, would put the last classes in every test split).
"""

from __future__ import annotations

import math
import os
import re
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pfl.data.datasets import Dataset, DatasetFormatError, DatasetNotFoundError

FULL_FOLDER = "speech_commands_v0.02"
TEST_FOLDER = "speech_commands_test_set_v0.02"
FULL_URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
TEST_URL = "http://download.tensorflow.org/data/speech_commands_test_set_v0.02.tar.gz"
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
SILENCE, UNKNOWN = "_silence_", "_unknown_"
CLASS_NAMES = (SILENCE, UNKNOWN, *KEYWORDS)
SILENCE_INDEX, UNKNOWN_INDEX = CLASS_NAMES.index(SILENCE), CLASS_NAMES.index(UNKNOWN)
BACKGROUND = "_background_noise_"
LISTS = ("validation_list.txt", "testing_list.txt")
SAMPLE_RATE = 16_000  # Hz
CLIP_SAMPLES = 16_000  # 1 s
SILENCE_PERCENTAGE = UNKNOWN_PERCENTAGE = 10.0  # of each split's keyword clips (train.py:316-327 defaults)
SEED = 59185  # input_data.py's RANDOM_SEED
_CLIP_NAME = re.compile(r"(?:[a-z]+_)?(?P<speaker>[0-9a-f]+)_nohash_(?P<n>\d+)\.wav(?:\.wav)?")


@dataclass(frozen=True)
class _Clip:
    """A word clip (a keyword or an unknown word): its file, class id, speaker hash and utterance number."""

    path: Path
    label: int
    speaker: str
    number: int


@dataclass(frozen=True)
class _Split:
    """A split of the pool: its ``_silence_`` waveforms int16 (s, 16000), then its word clips in pool order."""

    silence: np.ndarray
    clips: list[_Clip]

    @property
    def labels(self) -> list[int]:
        """The class ids of the split's samples, silence first."""
        return [SILENCE_INDEX] * len(self.silence) + [c.label for c in self.clips]


def load_speech_commands(data_dir: str | Path, download: bool = False) -> Dataset:
    """Speech Commands v0.02, 12 classes, from either release layout under ``data_dir`` (module docstring).

    Args:
        data_dir: folder holding ``speech_commands_v0.02/`` or ``speech_commands_test_set_v0.02/``.
        download: accepted for the common loader signature; there is no downloader (the message of a missing
            folder names the archives' URLs).

    Returns:
        A :class:`~pfl.data.datasets.Dataset` named ``"speech_commands"``: inputs int16 (N, 16000), 1 s at 16 kHz;
        targets int64 (N,) in [0, 12) (:data:`CLASS_NAMES`); ``groups`` int64 (N,) speaker ids;
        ``keys["time"]`` int64 (N,) utterance numbers; ``modality="audio"``, ``task="classification"``;
        ``num_train``: the training + validation clips of the full release, ``None`` for the test-set release.

    Raises:
        DatasetNotFoundError: neither layout, or a class or keyword folder, ``_background_noise_/`` or a list of
            the full release is missing; the message names the path and how to get the data.
        DatasetFormatError: an empty label folder, a clip not named ``<speaker>_nohash_<n>.wav``, a list entry
            naming no clip, a WAV that is not 16-bit PCM mono 16 kHz (or no WAV at all), a background file of 1 s
            or less; one line naming the folder, file or list line. Folders, names and lists are checked before
            any WAV is read.
    """
    data_dir = Path(data_dir)
    full, test = data_dir / FULL_FOLDER, data_dir / TEST_FOLDER
    if full.is_dir():
        splits = _full_release(full)
        return _dataset(splits, num_train=len(splits[0].labels) + len(splits[1].labels))
    if test.is_dir():
        return _dataset([_test_release(test)], num_train=None)
    why = "download=true cannot fetch Speech Commands (pfl has no downloader for it). " if download else ""
    raise DatasetNotFoundError(
        f"{why}Speech Commands not found: looked for {full} and {test}. Download {FULL_URL} (or the test set, "
        f"{TEST_URL}) and extract it into that folder (the archives have no top folder: `mkdir -p {full} && "
        f"tar -xzf speech_commands_v0.02.tar.gz -C {full}`), or extract speech_commands_test_set_v0.02-subset.tar.xz "
        f"into {data_dir}; or point pfl at the folder that holds it with PFL_DATA_DIR=... or data_dir=...")


def _dataset(splits: list[_Split], num_train: int | None) -> Dataset:
    """The pool of ``splits`` in order, each its silence then its word clips (read here)."""
    clips = [c for s in splits for c in s.clips]
    labels = np.array([label for s in splits for label in s.labels], dtype=np.int64)
    waveforms = np.zeros((len(labels), CLIP_SAMPLES), dtype=np.int16)  # filled in place: 1.5 GB for the full release
    start = 0
    for s in splits:
        words = start + len(s.silence)
        waveforms[start:words] = s.silence
        _read_clips([c.path for c in s.clips], waveforms[words:words + len(s.clips)])
        start = words + len(s.clips)
    groups, time = _speaker_keys(labels == SILENCE_INDEX, [c.speaker for c in clips], [c.number for c in clips])
    return Dataset("speech_commands", torch.from_numpy(waveforms), torch.from_numpy(labels), len(CLASS_NAMES),
                   CLASS_NAMES, num_train, modality="audio", task="classification", groups=torch.from_numpy(groups),
                   keys={"time": torch.from_numpy(time)})


def _speaker_keys(is_silence: np.ndarray, speakers: list[str], numbers: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``groups`` and ``keys["time"]``, int64 (N,), of a pool whose word clips (``~is_silence``, in pool order)
    have ``speakers`` and utterance ``numbers`` (module docstring: ids by decreasing clip count, ties by hash;
    the k-th silence clip to speaker ``k mod S`` as utterance ``k div S``; time: the rank within the speaker by
    utterance number, ties in a seeded random order)."""
    hashes, inverse, counts = np.unique(np.asarray(speakers, dtype=str), return_inverse=True, return_counts=True)
    rank = np.empty(len(hashes), dtype=np.int64)
    rank[np.argsort(-counts, kind="stable")] = np.arange(len(hashes))  # hashes come sorted: ties stay in hash order
    k = np.arange(int(is_silence.sum()))
    groups, number = np.empty(len(is_silence), dtype=np.int64), np.empty(len(is_silence), dtype=np.int64)
    groups[~is_silence], number[~is_silence] = rank[inverse], numbers
    groups[is_silence], number[is_silence] = k % len(hashes), k // len(hashes)
    order = np.lexsort((np.random.default_rng(SEED).permutation(len(groups)), number, groups))
    starts = np.searchsorted(groups[order], groups[order])  # where each sample's speaker begins in ``order``
    time = np.empty(len(groups), dtype=np.int64)
    time[order] = np.arange(len(groups)) - starts
    return groups, time


def _missing(path: Path, url: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(f"Speech Commands incomplete: {path} is missing; extract {url} into "
                                f"{path.parent} again")


def _wavs(folder: Path, url: str) -> list[Path]:
    """The ``*.wav`` files of a label folder, sorted by name.

    Raises:
        DatasetNotFoundError: the folder is missing. DatasetFormatError: it holds no ``.wav`` file.
    """
    if not folder.is_dir():
        raise _missing(folder, url)
    with os.scandir(folder) as entries:
        files = [folder / name for name in sorted(e.name for e in entries if e.name.endswith(".wav") and e.is_file())]
    if not files:
        raise DatasetFormatError(f"{folder}: an empty label folder (no .wav clip); remove it or extract {url} "
                                 "again")
    return files


def _clip(path: Path, label: int) -> _Clip:
    """The :class:`_Clip` of a file named ``[<word>_]<speaker>_nohash_<n>.wav[.wav]``.

    Raises:
        DatasetFormatError: another name.
    """
    match = _CLIP_NAME.fullmatch(path.name)
    if match is None:
        raise DatasetFormatError(f"{path}: expected a clip named <speaker>_nohash_<n>.wav (the speaker's hash and "
                                 "the utterance number); rename or remove it")
    return _Clip(path, label, match["speaker"], int(match["n"]))


def _test_release(root: Path) -> _Split:
    """The test-set release: the 12 class folders, silence first."""
    silence = _wavs(root / SILENCE, TEST_URL)
    clips = [_clip(path, label) for label, name in enumerate(CLASS_NAMES) if label != SILENCE_INDEX
             for path in _wavs(root / name, TEST_URL)]
    return _Split(_read_clips(silence, np.zeros((len(silence), CLIP_SAMPLES), dtype=np.int16)), clips)


def _full_release(root: Path) -> list[_Split]:
    """The full release's training, validation and testing splits (module docstring)."""
    words = {p.name: CLASS_NAMES.index(p.name) if p.name in KEYWORDS else UNKNOWN_INDEX
             for p in root.iterdir() if p.is_dir() and p.name[0] not in "_."}
    for keyword in KEYWORDS:
        if keyword not in words:
            raise _missing(root / keyword, FULL_URL)
    clips = {f"{word}/{path.name}": _clip(path, words[word])  # in pool order: by class, word, file name
             for word in sorted(words, key=lambda w: (words[w], w)) for path in _wavs(root / word, FULL_URL)}
    background = _wavs(root / BACKGROUND, FULL_URL)
    validation, testing = (_read_list(root / name, clips) for name in LISTS)
    both = sorted(validation & testing)
    if both:
        raise DatasetFormatError(f"{root / LISTS[1]}: {both[0]} is in {LISTS[0]} too, and a clip belongs to one "
                                 f"split; extract {FULL_URL} again")
    noise = [_background(path) for path in background]
    rng = np.random.default_rng(SEED)
    splits: tuple[list[_Clip], ...] = ([], [], [])  # training, validation, testing
    for key, clip in clips.items():
        splits[1 if key in validation else 2 if key in testing else 0].append(clip)
    return [_draw(split, noise, rng) for split in splits]


def _read_list(path: Path, clips: dict[str, _Clip]) -> set[str]:
    """The clips (``<word>/<file>.wav``, keys of ``clips``) that a split list names.

    Raises:
        DatasetNotFoundError: the list is missing. DatasetFormatError: a line names no clip of a word folder.
    """
    if not path.is_file():
        raise _missing(path, FULL_URL)
    entries = set()
    for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        entry = line.strip()
        if entry and entry not in clips:
            raise DatasetFormatError(f"{path}:{lineno}: {entry!r} names no clip of a word folder; extract "
                                     f"{FULL_URL} again")
        entries.add(entry)
    return entries - {""}


def _share(count: int, percentage: float) -> int:
    """``ceil(count x percentage / 100)``, in input_data.py's order of operations (input_data.py:269, 277)."""
    return int(math.ceil(count * percentage / 100))


def _draw(clips: list[_Clip], noise: list[np.ndarray], rng: np.random.Generator) -> _Split:
    """One split of the full release from its word clips sorted by (class, path): the keyword clips, a shuffled
    first ``_share`` of the unknown-word clips (input_data.py:276-278) and as many silence clips (:func:`_silence`).
    """
    unknown = [c for c in clips if c.label == UNKNOWN_INDEX]
    keywords = [c for c in clips if c.label != UNKNOWN_INDEX]
    picked = np.sort(rng.permutation(len(unknown))[:_share(len(keywords), UNKNOWN_PERCENTAGE)])
    return _Split(_silence(noise, _share(len(keywords), SILENCE_PERCENTAGE), rng),
                  [unknown[i] for i in picked] + keywords)


def _silence(noise: list[np.ndarray], count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` silence clips int16 (count, 16000): for each, a background file, a start in
    ``[0, length - 16000)`` and a volume in [0, 1), drawn as input_data.py:461-469 does, then
    ``rint(noise[start:start + 16000] x volume)``."""
    files = rng.integers(len(noise), size=count)
    starts = rng.integers(0, np.array([len(n) for n in noise])[files] - CLIP_SAMPLES)
    volumes = rng.uniform(0, 1, size=count)
    clips = np.empty((count, CLIP_SAMPLES), dtype=np.int16)
    for clip, file, start, volume in zip(clips, files, starts, volumes):
        clip[:] = np.rint(noise[file][start:start + CLIP_SAMPLES] * volume)
    return clips


def _background(path: Path) -> np.ndarray:
    """The int16 samples of a background-noise file, longer than a clip.

    Raises:
        DatasetFormatError: not 16-bit PCM mono 16 kHz (:func:`_read_wav`), or 16,000 samples or fewer.
    """
    samples = _read_wav(path)
    if len(samples) <= CLIP_SAMPLES:
        raise DatasetFormatError(f"{path}: {len(samples)} samples; a background-noise file must be longer than a "
                                 f"clip ({CLIP_SAMPLES} samples, 1 s) for silence to be cut from it; remove it")
    return samples


def _read_clips(paths: list[Path], out: np.ndarray) -> np.ndarray:
    """``out``, int16 (n, 16000) of zeros, filled with each WAV's first 16,000 samples (zero-padded at the end when
    shorter)."""
    for row, path in zip(out, paths):
        samples = _read_wav(path)[:CLIP_SAMPLES]
        row[:len(samples)] = samples
    return out


def _read_wav(path: Path) -> np.ndarray:
    """The samples int16 (n,) of a 16-bit PCM mono 16 kHz WAV file, read with the standard library's ``wave``.

    Raises:
        DatasetFormatError: the file is no PCM WAV (the ``wave`` module's reason quoted), or has another sample
            width, channel count or rate (each named); one line naming the file and the fix.
    """
    try:
        with wave.open(str(path), "rb") as wav:
            form = wav.getsampwidth(), wav.getnchannels(), wav.getframerate()
            frames = wav.readframes(wav.getnframes()) if form == (2, 1, SAMPLE_RATE) else b""
    except (wave.Error, EOFError) as err:
        raise DatasetFormatError(f"{path}: not a PCM WAV file ({err}); Speech Commands clips are 16-bit PCM mono "
                                 "16 kHz WAVs: replace or remove it") from None
    if form != (2, 1, SAMPLE_RATE):
        width, channels, rate = form
        raise DatasetFormatError(f"{path}: a {8 * width}-bit, {channels}-channel, {rate} Hz WAV; Speech Commands "
                                 f"clips are 16-bit PCM mono {SAMPLE_RATE} Hz: convert it (e.g. `sox {path.name} -b 16 "
                                 f"-c 1 -r {SAMPLE_RATE} converted.wav`) or remove it")
    return np.frombuffer(frames, dtype="<i2", count=len(frames) // 2)
