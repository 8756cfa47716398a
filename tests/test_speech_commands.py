"""Speech Commands v0.02 (pfl.data.speech_commands) and the audio front end (pfl.data.audio): the loader on the real
test-set release, the full-release layout on a tiny copy made of real clips, every bad-input error, and the log-mel
spectrogram against transformers' own reference."""

from __future__ import annotations

import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from pfl.data.audio import AudioTransform
from pfl.data.datasets import DatasetFormatError, DatasetNotFoundError
from pfl.data.partition import PartitionSpec, natural
from pfl.data.speech_commands import (CLASS_NAMES, FULL_FOLDER, KEYWORDS, TEST_FOLDER, _speaker_keys,
                                     load_speech_commands)

HEADER = 44  # bytes of the canonical WAV header every shared clip has (RIFF, fmt, data chunk header)


@pytest.fixture(scope="module")
def shared(speech_commands_dir):
    return load_speech_commands(speech_commands_dir)


def _samples(path: Path) -> bytes:
    """The PCM bytes of a canonical 44-byte-header WAV, read without the ``wave`` module."""
    return path.read_bytes()[HEADER:]


def _speaker(path: Path) -> tuple[str, int]:
    """(hash, n) of ``[<word>_]<hash>_nohash_<n>.wav[.wav]``, split by hand."""
    stem = path.name.split(".")[0]
    hash_part, n = stem.split("_nohash_")
    return hash_part.split("_")[-1], int(n)


def _check_speakers(data, files: dict[bytes, Path]) -> None:
    """Each word clip of ``data`` found among ``files`` by its samples: its group ranks its speaker by decreasing
    clip count (ties by hash); the k-th silence clip is speaker k mod S as utterance k div S; the time keys rank each
    speaker's clips 0..n-1 by utterance number."""
    speakers = [None if label == 0 else _speaker(files[row.numpy().tobytes()])
                for row, label in zip(data.inputs, data.targets.tolist())]
    counts: dict[str, int] = {}
    for s in speakers:
        if s is not None:
            counts[s[0]] = counts.get(s[0], 0) + 1
    ranked = sorted(counts, key=lambda h: (-counts[h], h))
    k, utterances = 0, {}
    for s, group, time in zip(speakers, data.groups.tolist(), data.keys["time"].tolist()):
        if s is None:
            assert group == k % len(ranked)
            utterances.setdefault(group, {})[time] = k // len(ranked)
            k += 1
        else:
            assert ranked[group] == s[0]
            utterances.setdefault(group, {})[time] = s[1]
    for by_time in utterances.values():  # times 0..n-1, in utterance order
        assert sorted(by_time) == list(range(len(by_time)))
        assert [by_time[t] for t in range(len(by_time))] == sorted(by_time.values())


def test_loads_the_shared_test_release(speech_commands_dir, shared):
    root = speech_commands_dir / TEST_FOLDER
    assert shared.name == "speech_commands" and shared.inputs.shape == (960, 16000)
    assert shared.inputs.dtype == torch.int16 and shared.targets.dtype == torch.int64
    assert (shared.num_classes, shared.class_names, shared.num_train) == (12, CLASS_NAMES, None)
    assert CLASS_NAMES == ("_silence_", "_unknown_", "yes", "no", "up", "down", "left", "right", "on", "off", "stop",
                           "go")
    assert (shared.modality, shared.task) == ("audio", "classification")
    # pool order: classes in CLASS_NAMES order, files sorted by name, samples equal to the files' PCM bytes
    files = [p for name in CLASS_NAMES for p in sorted((root / name).glob("*.wav"))]
    assert shared.targets.tolist() == [i for i in range(12) for _ in range(80)]
    assert all(shared.inputs[i].numpy().tobytes() == _samples(p) for i, p in enumerate(files))
    assert shared.groups.dtype == torch.int64 and shared.keys["time"].dtype == torch.int64
    assert len(torch.unique(shared.groups[shared.targets != 0])) == 230  # speakers of the 880 word clips
    _check_speakers(shared, {_samples(p): p for p in files})
    word_counts = torch.bincount(shared.groups[shared.targets != 0])
    assert word_counts[:2].tolist() == [10, 10] and bool((word_counts[:-1] >= word_counts[1:]).all())


def test_speaker_ids_by_clip_count_and_silence_round_robin():
    # pool: S b0 S c1 a0 S b1 c0 S (S: silence; word clips as speaker + utterance number). Counts b 2, c 2, a 1:
    # ids b 0, c 1 (tie: by hash), a 2; the k-th silence clip goes to speaker k mod 3 as utterance k div 3. Time
    # ranks a speaker's clips by utterance: b holds S(n0) b0 b1 S(n1): times {0, 1} for the first two (a tie, in
    # seeded order), 2 for b1, 3 for the last S; c holds S(n0) c1 c0: c1 is time 2; a holds a0 S(n0): times {0, 1}
    is_silence = np.array([1, 0, 1, 0, 0, 1, 0, 0, 1], dtype=bool)
    groups, time = _speaker_keys(is_silence, ["b", "c", "a", "b", "c"], [0, 1, 0, 1, 0])
    assert groups.tolist() == [0, 0, 1, 1, 2, 2, 0, 1, 0]
    assert {time[0], time[1]} == {0, 1} and (time[6], time[8]) == (2, 3)
    assert time[3] == 2 and {time[2], time[7]} == {0, 1} and {time[4], time[5]} == {0, 1}
    again = _speaker_keys(is_silence, ["b", "c", "a", "b", "c"], [0, 1, 0, 1, 0])[1]
    assert again.tolist() == time.tolist()  # the tie order is seeded


def test_natural_partition_takes_the_speakers_with_most_clips(shared):
    partition = natural(shared.groups, shared.keys, PartitionSpec("natural", 8, seed=0))
    for group, client in enumerate(partition.clients):
        mine = torch.cat([client.train, client.test])
        assert bool((shared.groups[mine] == group).all()) and len(mine) == int((shared.groups == group).sum())
        assert len(client.train) > 0 and len(client.test) > 0
        assert 0 in shared.targets[mine].tolist()  # every client holds silence
        assert shared.keys["time"][client.train].max() < shared.keys["time"][client.test].min()
    test_labels = torch.cat([shared.targets[c.test] for c in partition.clients])
    assert len(torch.unique(test_labels)) >= 8  # the test splits mix the words (not only the last classes)


def _write_wav(path: Path, samples: np.ndarray, channels: int = 1, width: int = 2, rate: int = 16000) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())


def _full_release(src: Path, dst: Path) -> tuple[Path, dict[str, list[str]]]:
    """A tiny ``speech_commands_v0.02`` of real clips: per keyword its first 4 test-release clips (2 training, 1
    validation, 1 testing) and a fifth training clip of ``yes`` (21 training keyword clips), the words seven and one
    from ``_unknown_`` (3 each: 2 training, then seven's third validation, one's third testing), and a 3 s
    background noise made of 3 real ``_silence_`` clips; also returns each split's ``<word>/<file>`` names."""
    root = dst / FULL_FOLDER
    splits: dict[str, list[str]] = {"training": [], "validation": [], "testing": []}
    for word in KEYWORDS:
        (root / word).mkdir(parents=True)
        for i, clip in enumerate(sorted((src / word).glob("*.wav"))[:5 if word == "yes" else 4]):
            shutil.copy(clip, root / word / clip.name)
            splits[("training", "training", "validation", "testing", "training")[i]].append(f"{word}/{clip.name}")
    for word, last in (("seven", "validation"), ("one", "testing")):
        (root / word).mkdir()
        for i, clip in enumerate(sorted((src / "_unknown_").glob(f"{word}_*.wav"))[:3]):
            name = clip.name.removeprefix(f"{word}_").removesuffix(".wav")  # <hash>_nohash_<n>.wav
            shutil.copy(clip, root / word / name)
            splits["training" if i < 2 else last].append(f"{word}/{name}")
    (root / "_background_noise_").mkdir()
    noise = np.concatenate([np.frombuffer(_samples(p), "<i2") for p in sorted((src / "_silence_").glob("*.wav"))[:3]])
    _write_wav(root / "_background_noise_" / "noise.wav", noise)
    (root / "_background_noise_" / "README.md").write_text("background noise\n")
    (root / "validation_list.txt").write_text("\n".join(splits["validation"]) + "\n")
    (root / "testing_list.txt").write_text("\n".join(splits["testing"]) + "\n")
    return root, splits


def _scaled_stretch(clip: np.ndarray, noise: np.ndarray) -> tuple[int, float]:
    """(start, volume) with ``clip == rint(noise[start:start + len(clip)] * volume)`` up to one step, found by
    cross-correlation; AssertionError if there is none."""
    n = len(noise) + len(clip)
    corr = np.fft.irfft(np.fft.rfft(noise, n) * np.conj(np.fft.rfft(clip.astype(float), n)), n)[:len(noise) - len(clip)]
    start = int(np.argmax(corr))
    stretch = noise[start:start + len(clip)].astype(float)
    volume = float(stretch @ clip / (stretch @ stretch))
    assert np.abs(np.rint(stretch * volume) - clip).max() <= 1
    return start, volume


def test_full_release_layout_builds_unknown_and_silence_per_split(speech_commands_dir, tmp_path):
    root, splits = _full_release(speech_commands_dir / TEST_FOLDER, tmp_path)
    data = load_speech_commands(tmp_path)
    # each split: ceil(10% of its keyword clips) silence clips, as many unknown-word clips, then its keyword clips
    # (training: ceil(2.1) = 3 of each from 21 keyword clips; validation and testing: 1 of each from 10)
    keywords = {"training": [2] + [k for k in range(2, 12) for _ in range(2)], "validation": list(range(2, 12)),
                "testing": list(range(2, 12))}
    drawn = {"training": 3, "validation": 1, "testing": 1}
    assert data.targets.tolist() == [c for s in splits for c in [0] * drawn[s] + [1] * drawn[s] + keywords[s]]
    assert data.num_train == 27 + 12 and data.inputs.shape == (27 + 12 + 12, 16000)
    files = {_samples(p): p for p in root.glob("[!_]*/*.wav")}
    name = {b: f"{p.parent.name}/{p.name}" for b, p in files.items()}
    pool = [name.get(row.numpy().tobytes()) for row in data.inputs]  # None: silence, drawn from the noise
    assert pool == [n for s in splits for n in [None] * drawn[s] + [m for m in pool if m in splits[s]]]
    assert len(set(pool) - {None}) == len(pool) - 5  # no clip twice; 5 silence clips
    noise = np.frombuffer(_samples(root / "_background_noise_" / "noise.wav"), "<i2")
    for i in np.flatnonzero(data.targets.numpy() == 0):  # silence: a 1 s stretch of the noise at a volume in [0, 1)
        start, volume = _scaled_stretch(data.inputs[i].numpy(), noise)
        assert 0 <= start < len(noise) - 16000 and 0 <= volume < 1
    _check_speakers(data, files)
    again = load_speech_commands(tmp_path)  # the draws are seeded
    assert torch.equal(again.inputs, data.inputs) and torch.equal(again.groups, data.groups)


def _mini_test_release(src: Path, dst: Path) -> Path:
    """A test-release layout holding each class's first real clip."""
    root = dst / TEST_FOLDER
    for name in CLASS_NAMES:
        (root / name).mkdir(parents=True)
        clip = sorted((src / name).glob("*.wav"))[0]
        shutil.copy(clip, root / name / clip.name)
    return root


@pytest.mark.parametrize("channels, width, rate, what", [(2, 2, 16000, "16-bit, 2-channel, 16000 Hz"),
                                                         (1, 1, 16000, "8-bit, 1-channel, 16000 Hz"),
                                                         (1, 2, 44100, "16-bit, 1-channel, 44100 Hz")])
def test_refuses_a_wav_of_another_format(speech_commands_dir, tmp_path, channels, width, rate, what):
    root = _mini_test_release(speech_commands_dir / TEST_FOLDER, tmp_path)
    clip = next((root / "yes").glob("*.wav"))
    samples = np.frombuffer(_samples(clip), "<i2")
    _write_wav(clip, (samples >> 8).astype(np.uint8) + 128 if width == 1 else samples, channels, width, rate)
    with pytest.raises(DatasetFormatError) as err:
        load_speech_commands(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{clip}: a {what} WAV") and "16-bit PCM mono 16000 Hz" in message
    assert "\n" not in message


def test_refuses_bad_folders_names_and_files(speech_commands_dir, tmp_path):
    root = _mini_test_release(speech_commands_dir / TEST_FOLDER, tmp_path)
    yes = next((root / "yes").glob("*.wav"))
    text = root / "no" / "0a0b0c0d_nohash_0.wav"
    text.write_text("not audio")
    with pytest.raises(DatasetFormatError, match=rf"^{text}: not a PCM WAV file \(.*\); ") as err:
        load_speech_commands(tmp_path)
    assert "\n" not in str(err.value)
    text.unlink()
    renamed = yes.rename(root / "yes" / "clip.wav")
    with pytest.raises(DatasetFormatError, match=rf"^{renamed}: expected a clip named <speaker>_nohash_<n>.wav"):
        load_speech_commands(tmp_path)
    renamed.unlink()
    with pytest.raises(DatasetFormatError, match=rf"^{root / 'yes'}: an empty label folder"):
        load_speech_commands(tmp_path)
    (root / "yes").rmdir()
    with pytest.raises(DatasetNotFoundError, match=rf"{root / 'yes'} is missing; extract .*test_set"):
        load_speech_commands(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=rf"looked for {tmp_path / 'elsewhere' / FULL_FOLDER} and "):
        load_speech_commands(tmp_path / "elsewhere")


def test_refuses_bad_lists_and_background_of_the_full_release(speech_commands_dir, tmp_path):
    root, _ = _full_release(speech_commands_dir / TEST_FOLDER, tmp_path)
    listing = root / "testing_list.txt"
    listing.write_text(listing.read_text() + "yes/missing_nohash_0.wav\n")
    with pytest.raises(DatasetFormatError, match=rf"^{listing}:12: 'yes/missing_nohash_0.wav' names no clip"):
        load_speech_commands(tmp_path)
    listing.write_text("\n".join(listing.read_text().splitlines()[:11]) + "\n")
    noise = root / "_background_noise_" / "noise.wav"
    _write_wav(noise, np.zeros(16000, np.int16))
    with pytest.raises(DatasetFormatError, match=rf"^{noise}: 16000 samples; a background-noise file must be longer"):
        load_speech_commands(tmp_path)
    shutil.rmtree(root / "go")
    with pytest.raises(DatasetNotFoundError, match=rf"{root / 'go'} is missing"):
        load_speech_commands(tmp_path)


def test_log_mel_matches_transformers_reference_on_a_real_clip(shared):
    clip = shared.inputs[shared.targets == CLASS_NAMES.index("yes")][0]
    ours = AudioTransform()(clip[None])[0, 0].double().numpy()
    assert ours.shape == (40, 98) and AudioTransform().output_shape((16000,)) == (1, 40, 98)
    filters = mel_filter_bank(257, 40, 20.0, 8000.0, 16000, norm=None, mel_scale="htk")
    mel = spectrogram(clip.numpy() / 32768.0, window_function(480, "hann", periodic=True), frame_length=480,
                      hop_length=160, fft_length=512, power=2.0, center=False, mel_filters=filters, mel_floor=0.0,
                      log_mel=None)
    reference = np.log(mel + 1e-6)
    # a log difference d is a relative difference d of the mel energies: 1e-4 within 50 dB of the clip's peak;
    # below it, float32 FFT rounding (relative to the frame's energy) shows, still under 1e-3
    loud = mel > 1e-5 * mel.max()
    assert np.abs(ours - reference)[loud].max() < 1e-4 and np.abs(ours - reference).max() < 1e-3


def test_front_end_knobs_and_batches():
    transform = AudioTransform(n_mels=64, window_ms=25.0, hop_ms=12.5)
    assert (transform.window, transform.hop, transform.n_fft) == (400, 200, 512)
    assert transform.output_shape((16000,)) == (1, 64, 79) and not transform.augments
    with pytest.raises(ValueError, match=r"^n_mels=127 leaves 1 mel filters without an FFT bin at window_ms=30.0"):
        AudioTransform(n_mels=127)
    with pytest.raises(ValueError, match=r"^hop_ms=0.01 gives a hop of 0 samples"):
        AudioTransform(hop_ms=0.01)
    with pytest.raises(ValueError, match=r"^window_ms=0.1 gives a window of 1 samples"):
        AudioTransform(window_ms=0.1)
    with pytest.raises(ValueError, match=r"waveforms of shape \(L,\)"):
        AudioTransform().output_shape((1, 16000))
    waves = torch.from_numpy(np.random.default_rng(0).integers(-2000, 2000, (3, 16000), dtype=np.int16))
    batch = AudioTransform()(waves)
    assert batch.dtype == torch.float32 and batch.shape == (3, 1, 40, 98)
    torch.testing.assert_close(batch[1:2], AudioTransform()(waves[1:2]))
