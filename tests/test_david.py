"""David MMSys'18 (pfl.data.david): the windows on a hand-made trace folder, TRACK's resampling on hand cases, the
two layouts of the real data against each other, and every bad-input error."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from pfl.data.datasets import DatasetFormatError, DatasetNotFoundError, load_dataset
from pfl.data.david import load_david, resample_track, to_unit_vectors, trace_length

REAL_VIDEOS = ("1_PortoRiverside", "2_Diner")  # the slice of the real archive the tests read
HEADER = "# Idx, longitude, latitude, start timestamp, duration, start frame, end frame\n"


def _equator(degrees: float) -> str:
    """A sampled-layout row body ``x,y,z``: the unit vector on the equator at ``degrees`` of longitude."""
    a = np.radians(degrees)
    return f"{float(np.cos(a))!r},{float(np.sin(a))!r},0.0"


def _write_sampled(root, traces: dict[str, dict[int, list[float]]]) -> None:
    """A sampled layout under ``root``: per video, per viewer, rows ``t, x, y, z`` on the equator at the listed
    longitudes (degrees), every 0.2 s."""
    for video, viewers in traces.items():
        folder = root / "David_MMSys_18" / "sampled_dataset" / video
        folder.mkdir(parents=True)
        for viewer, longitudes in viewers.items():
            rows = [f"{0.2 * s!r},{_equator(d)}" for s, d in enumerate(longitudes)]
            (folder / str(viewer)).write_text("\n".join(rows) + "\n")


def _codes(vectors: torch.Tensor) -> np.ndarray:
    """The longitudes, in whole degrees, of unit vectors on the equator (..., 3)."""
    return np.rint(np.degrees(np.arctan2(vectors[..., 1].numpy(), vectors[..., 0].numpy()))).astype(int)


@pytest.fixture()
def tiny(tmp_path):
    """2 videos x 2 viewers x 8 positions; position s of viewer u in the video of sorted id v lies on the equator at
    longitude 100 v + 10 u + s degrees. "10_Cows" sorts after "2_Diner" (natural order)."""
    _write_sampled(tmp_path, {video: {u: [100 * v + 10 * u + s for s in range(8)] for u in (0, 1)}
                              for v, video in enumerate(("2_Diner", "10_Cows"))})
    return tmp_path


def test_windows_point_hand_case(tiny):
    data = load_david(tiny, history=3, horizon=2, predict="point")
    first = [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]  # video 0, viewer 0: t = 2..5
    offsets = [0, 10, 100, 110]  # (video, viewer) = (0, 0), (0, 1), (1, 0), (1, 1)
    assert data.inputs.dtype == torch.float32 and data.inputs.shape == (16, 3, 3)
    assert data.targets.dtype == torch.float32 and data.targets.shape == (16, 3)
    assert _codes(data.inputs).tolist() == [[c + o for c in row] for o in offsets for row in first]
    assert _codes(data.targets).tolist() == [t + o for o in offsets for t in (4, 5, 6, 7)]
    assert data.groups.tolist() == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 4
    assert data.keys["video"].tolist() == [0] * 8 + [1] * 8
    assert data.keys["time"].tolist() == [2, 3, 4, 5] * 4
    assert data.groups.dtype == data.keys["video"].dtype == data.keys["time"].dtype == torch.int64
    assert (data.name, data.num_classes, data.class_names, data.num_train) == ("david", None, (), None)
    assert (data.modality, data.task, data.num_outputs) == ("sequence", "viewport", 3)


def test_windows_sequence_hand_case(tiny):
    data = load_david(tiny, history=3, horizon=2, predict="sequence")
    assert data.targets.shape == (16, 6)
    steps = _codes(data.targets.view(16, 2, 3))  # step-major: positions t + 1, t + 2
    assert steps.tolist() == [[t + o, t + 1 + o] for o in (0, 10, 100, 110) for t in (3, 4, 5, 6)]
    assert torch.equal(data.inputs, load_david(tiny, history=3, horizon=2).inputs)


def test_load_dataset_dispatches_with_options(tiny):
    data = load_dataset("david", tiny, history=4, horizon=1)
    assert data.inputs.shape == (16, 4, 3) and data.keys["time"].tolist()[:4] == [3, 4, 5, 6]


def _write_scanpaths(path, rows: list[tuple[int, float, float, float]]) -> None:
    """An original-layout CSV of rows (Idx, longitude, latitude, start timestamp in ms)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [f"{i},{lon!r},{lat!r},{ms!r},200.0,1,5" for i, lon, lat, ms in rows]
    path.write_text(HEADER + "\n".join(body) + "\n")


def test_resample_track_hand_cases():
    equator = to_unit_vectors(np.array([0.0, 0.25]), np.array([0.5, 0.5]))  # longitudes 0 and 90 degrees
    np.testing.assert_allclose(equator, [[1, 0, 0], [0, 1, 0]], atol=1e-15)
    half = [np.sqrt(0.5), np.sqrt(0.5), 0]
    # keys at 0 and 0.4 s: steps 0, 0.2, 0.4; the middle one halfway along the great circle
    np.testing.assert_allclose(resample_track(np.array([0.0, 0.4]), equator), [[1, 0, 0], half, [0, 1, 0]],
                               atol=1e-12)
    # first key at 0.3 s > 0.1 s: a copy of it goes to t = 0; steps 0, 0.2, 0.4 (arange to 0.6, then clipped)
    np.testing.assert_allclose(resample_track(np.array([0.3, 0.5]), equator), [[1, 0, 0], [1, 0, 0], half],
                               atol=1e-12)
    poles = to_unit_vectors(np.array([0.3, 0.3]), np.array([0.0, 1.0]))  # latitude 0: the north pole
    np.testing.assert_allclose(poles, [[0, 0, 1], [0, 0, -1]], atol=1e-15)


def test_original_layout_hand_case(tmp_path):
    _write_scanpaths(tmp_path / "David_MMSys_18" / "H" / "Scanpaths" / "1_A_fixations.csv",
                     [(0, 0.0, 0.5, 0.0), (1, 0.25, 0.5, 400.0),  # viewer 0: steps 0, 0.2, 0.4
                      (0, 0.0, 0.5, 300.0), (1, 0.25, 0.5, 500.0)])  # viewer 1: t = 0 added, steps 0, 0.2, 0.4
    assert trace_length(tmp_path) == 3
    data = load_david(tmp_path, history=2, horizon=1)
    assert _codes(data.inputs).tolist() == [[0, 45], [0, 0]]
    assert _codes(data.targets).tolist() == [90, 45]
    assert data.groups.tolist() == [0, 1] and data.keys["time"].tolist() == [1, 1]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Both layouts of two real videos, extracted from the shared archive."""
    archive = SHARED_DATA / "david-mmsys18.tar.xz"
    if not archive.is_file():
        pytest.fail(f"real David MMSys'18 archive not found at {archive}; set PFL_SHARED_DATA to the shared data "
                    "folder")
    out = tmp_path_factory.mktemp("david")
    wanted = tuple(f"David_MMSys_18/{where}/{v}" for v in REAL_VIDEOS for where in ("sampled_dataset", "H/Scanpaths"))
    with tarfile.open(archive) as tar:
        tar.extractall(out, members=[m for m in tar if m.name.startswith(wanted)], filter="data")
    return out


def test_layouts_agree_on_real_data(real):
    assert trace_length(real, "sampled") == trace_length(real, "original") == 100  # 20 s at 5 Hz
    sampled, original = load_david(real, layout="sampled"), load_david(real, layout="original")
    assert len(sampled) == 2 * 57 * (100 - 10 - 5 + 1)
    torch.testing.assert_close(original.inputs, sampled.inputs, atol=1e-6, rtol=0)  # TRACK's resampling, redone
    torch.testing.assert_close(original.targets, sampled.targets, atol=1e-6, rtol=0)
    for key in ("video", "time"):
        assert torch.equal(original.keys[key], sampled.keys[key])
    assert torch.equal(original.groups, sampled.groups)
    assert torch.equal(load_david(real).inputs, sampled.inputs)  # auto: the sampled layout when present
    assert torch.allclose(sampled.inputs.norm(dim=-1), torch.ones(1), atol=1e-6)


def test_raw_positions_match_sampled_files(real):
    """Row k of viewer k's block in the CSV, mapped by longitude x 2 pi, latitude x pi, lies within TRACK's
    resampling of row k of sampled file k (99% of a video's rows within 1.5 degrees, all within 5), and each block
    is nearer its own file than any other viewer's."""
    folder = real / "David_MMSys_18"
    for video in REAL_VIDEOS:
        rows = np.loadtxt(folder / "H" / "Scanpaths" / f"{video}_fixations.csv", delimiter=",")
        blocks = np.split(rows, np.flatnonzero(rows[:, 0] == 0)[1:])
        files = [np.loadtxt(folder / "sampled_dataset" / video / str(k), delimiter=",")[:, 1:]
                 for k in range(len(blocks))]
        assert len(blocks) == 57
        own = []
        for k, block in enumerate(blocks):
            raw = to_unit_vectors(block[:, 1], block[:, 2])
            degrees = [np.degrees(np.arccos(np.clip((raw * f).sum(1), -1, 1))) for f in files]
            assert np.argmin([d.mean() for d in degrees]) == k
            own.append(degrees[k])
        assert np.percentile(own, 99) < 1.5 and np.max(own) < 5


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("knobs, field", [({"history": 0}, "history"), ({"horizon": -1}, "horizon"),
                                          ({"history": "10"}, "history"), ({"horizon": True}, "horizon"),
                                          ({"history": 2.0}, "history"), ({"predict": "points"}, "predict"),
                                          ({"layout": "both"}, "layout")])
def test_bad_knobs(tiny, knobs, field):
    with pytest.raises(ValueError) as err:
        load_david(tiny, **knobs)
    assert _one_line(err).startswith(f"{field} must be")


def test_window_longer_than_traces_refused_before_reading(tiny):
    bad = tiny / "David_MMSys_18" / "sampled_dataset" / "2_Diner" / "1"
    bad.write_text(bad.read_text().replace("0.2,", "0.2,oops,", 1))  # a malformed row is not read: refused first
    with pytest.raises(ValueError) as err:
        load_david(tiny, history=6, horizon=3)
    assert _one_line(err) == ("history=6 + horizon=3 needs 9 positions but the traces of David MMSys'18 hold 8 "
                              "(1.6 s at 5 Hz); lower history or horizon")
    assert trace_length(tiny) == 8


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        load_david(tmp_path)
    message = _one_line(err)
    assert str(tmp_path / "David_MMSys_18" / "sampled_dataset") in message
    assert str(tmp_path / "David_MMSys_18" / "H" / "Scanpaths") in message
    assert "david-mmsys18.tar.xz" in message and "PFL_DATA_DIR" in message
    with pytest.raises(DatasetNotFoundError):
        trace_length(tmp_path)


def test_forced_layout_missing(tiny):
    with pytest.raises(DatasetNotFoundError) as err:
        load_david(tiny, layout="original")
    message = _one_line(err)
    assert str(tiny / "David_MMSys_18" / "H" / "Scanpaths") in message and "layout='auto'" in message


def test_empty_layout_folder(tmp_path):
    (tmp_path / "David_MMSys_18" / "sampled_dataset").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError) as err:
        load_david(tmp_path)
    assert "holds none" in _one_line(err)


@pytest.mark.parametrize("line, expected", [("0.4,abc,0.0,0.0", "expected 4 comma-separated numbers"),
                                            ("0.4,1.0,0.0", "expected 4 comma-separated numbers"),
                                            ("0.4,0.5,0.0,0.0", "norm 0.5, not a unit vector")])
def test_malformed_sampled_row(tiny, line, expected):
    path = tiny / "David_MMSys_18" / "sampled_dataset" / "10_Cows" / "1"
    rows = path.read_text().splitlines()
    rows[2] = line
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetFormatError) as err:
        load_david(tiny, history=3, horizon=2)
    message = _one_line(err)
    assert message.startswith(f"{path}, line 3: ") and expected in message and "re-extract" in message


def test_empty_sampled_file(tiny):
    path = tiny / "David_MMSys_18" / "sampled_dataset" / "2_Diner" / "0"
    path.write_text("")
    with pytest.raises(DatasetFormatError) as err:
        load_david(tiny, history=1, horizon=1)
    assert _one_line(err).startswith(f"{path}: holds no rows of t, x, y, z")


def test_sampled_file_not_named_by_viewer(tiny):
    (tiny / "David_MMSys_18" / "sampled_dataset" / "2_Diner" / "notes.txt").write_text("x")
    with pytest.raises(DatasetFormatError) as err:
        load_david(tiny)
    assert "notes.txt: expected only files named by viewer number" in _one_line(err)


@pytest.mark.parametrize("rows, line, expected", [
    ([(0, 0.0, 0.5, 0.0), (1, 0.1, 1.5, 200.0)], 3, "outside [0, 1]"),
    ([(1, 0.0, 0.5, 0.0), (2, 0.1, 0.5, 200.0)], 2, "Idx 1 in the first row: expected 0"),
    ([(0, 0.0, 0.5, 0.0), (2, 0.1, 0.5, 200.0)], 3, "Idx 2 after 0: expected 1"),
    ([(0, 0.0, 0.5, 0.0), (1, 0.1, 0.5, 0.0)], 3, "not after the previous row's"),
    ([(0, 0.0, 0.5, 0.0), (1, 0.1, 0.5, 200.0), (0, 0.2, 0.5, 0.0)], 4, "a viewer of a single row"),
])
def test_malformed_scanpaths(tmp_path, rows, line, expected):
    path = tmp_path / "David_MMSys_18" / "H" / "Scanpaths" / "1_A_fixations.csv"
    _write_scanpaths(path, rows)
    with pytest.raises(DatasetFormatError) as err:
        load_david(tmp_path, history=1, horizon=1)
    message = _one_line(err)
    assert message.startswith(f"{path}, line {line}: ") and expected in message


def test_unparsable_scanpaths_row(tmp_path):
    path = tmp_path / "David_MMSys_18" / "H" / "Scanpaths" / "1_A_fixations.csv"
    path.parent.mkdir(parents=True)
    path.write_text(HEADER + "0,0.1,0.5,0.0,200.0,1,5\n1,0.1,0.5\n")
    with pytest.raises(DatasetFormatError) as err:
        trace_length(tmp_path)
    assert _one_line(err).startswith(f"{path}, line 3: expected 7 comma-separated numbers (Idx, longitude")
