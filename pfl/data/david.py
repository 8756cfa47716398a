"""David MMSys'18 head traces as sliding windows for viewport prediction.

Source: E. David, J. Gutierrez, A. Coutrot, M. Perreira da Silva, P. Le Callet, "A Dataset of Head and Eye Movements
for 360 Videos", ACM MMSys 2018: 19 videos, 57 viewers each, 20 s of head movement per trace. Two on-disk layouts
under ``<data_dir>/David_MMSys_18/`` are read (``../shared/data/david-mmsys18.tar.xz`` holds both):

- ``sampled_dataset/<video>/<viewer>``: TRACK's 5 Hz layout (M. F. Romero Rondon et al., "TRACK: A New Method from
  a Novel Perspective for Viewport Prediction in 360 Videos", PAMI 2021; code: github.com/MiguelFRomeroR/
  Analysis-of-head-motion-prediction-in-VR at 6364a558, written by ``David_MMSys_18/Read_Dataset.py``,
  ``create_and_store_sampled_dataset``): rows ``t, x, y, z``, seconds and a unit vector every 0.2 s, read as they
  are (the ``t`` column is not used: row k is step k).
- ``H/Scanpaths/<video>_fixations.csv``: the original head scanpaths, header ``Idx, longitude, latitude, start
  timestamp, duration, start frame, end frame``; longitude and latitude normalized to [0, 1] on the equirectangular
  frame, timestamps in ms; ``Idx`` restarts at 0 for each viewer, so viewer k is the k-th block of rows. Each
  block becomes a 5 Hz trace exactly as TRACK built ``sampled_dataset`` (:func:`resample_track`), so both layouts
  give the same windows (positions within 1e-11 of TRACK's files; equal float32 windows on the shared copy).

Positions are unit vectors in TRACK's axes (``Utils.py:23-38``, ``eulerian_to_cartesian``): with theta = longitude x
2 pi and phi = latitude x pi (0 at the north pole, ``Read_Dataset.py:87-90``), ``(x, y, z) = (cos theta sin phi,
sin theta sin phi, cos phi)``; longitude 0 on the equator is (1, 0, 0), the north pole (0, 0, 1).

Viewers: file ``k`` of ``sampled_dataset/<video>/`` is the k-th block of that video's CSV, and the same ``k`` in
every video is the same person: TRACK keys its traces by this block index alone (``Read_Dataset.py:70-79``,
``dataset[str(user_id)][video]``) and draws its train and test users from ``np.arange(57)`` across videos
(``get_traces_for_train_and_test``). The David files carry no participant id of their own; the correspondence is
TRACK's reading of them, taken over here.

Samples are sliding windows, stride 1, over every trace (one viewer watching one video). A window whose last input
is step t of its trace holds ``history`` positions t - history + 1 .. t as input, float32 (history, 3); its target
is the position at t + horizon, float32 (3,) (``predict="point"``), or positions t + 1 .. t + horizon flattened
step-major, float32 (3 * horizon,) (``predict="sequence"``). A trace of L positions gives
L - history - horizon + 1 windows, t = history - 1 .. L - horizon - 1. These are TRACK's windows with
history = M_WINDOW + 1 and t = x_i (``training_procedure.py``, ``generate_arrays``: encoder positions
x_i - M_WINDOW .. x_i - 1, decoder input x_i, outputs x_i + 1 .. x_i + H_WINDOW; ``SampledDataset.py``, the
``partition_in_train_and_test*`` functions: x_i in ``range(M_WINDOW, L - H_WINDOW)``). The researchers' setting
"David-m10-h1" is read as history 10 (2 s at 5 Hz) and a horizon of 1 s, i.e. ``horizon=5`` steps: the defaults.

Sample order: by video (names in natural order, 1_PortoRiverside .. 19_Touvet as TRACK's ``VIDEOS`` list,
``Read_Dataset.py:26``), then viewer, then t. ``groups`` is the viewer, ``keys["video"]`` the video's index in that
order, ``keys["time"]`` the step t of the window's last input.
"""

from __future__ import annotations

import numbers
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pfl.data.datasets import CATALOG, Dataset, DatasetFormatError, DatasetNotFoundError
from pfl.models.viewport import from_normalized_eulerian

FOLDER = "David_MMSys_18"
ARCHIVE = "david-mmsys18.tar.xz"
SAMPLED = "sampled_dataset"  # TRACK's layout, under FOLDER
SCANPATHS = ("H", "Scanpaths")  # the original layout, under FOLDER
CSV_SUFFIX = "_fixations.csv"
RATE = CATALOG["david"].step_seconds  # seconds between positions: 0.2, 5 Hz (TRACK's SAMPLING_RATE, Read_Dataset.py:21)
LAYOUTS = ("auto", "sampled", "original")
PREDICTIONS = ("point", "sequence")
SAMPLED_COLUMNS = ("t", "x", "y", "z")
CSV_COLUMNS = ("Idx", "longitude", "latitude", "start timestamp", "duration", "start frame", "end frame")
_REEXTRACT = f"re-extract {ARCHIVE}"


@dataclass(frozen=True)
class Trace:
    """One viewer watching one video: ``positions`` float64 (L, 3) unit vectors, one every :data:`RATE` s."""

    video: int
    viewer: int
    positions: np.ndarray


@dataclass(frozen=True)
class _Source:
    """The layout found under ``<data_dir>/David_MMSys_18`` and its files, per video in natural order of the names:
    for the sampled layout the (viewer, file) pairs, for the original layout the CSV."""

    layout: str
    files: tuple[tuple[tuple[int, Path], ...] | Path, ...]


def load_david(data_dir: str | Path, download: bool = False, history: int = 10, horizon: int = 5,
               predict: str = "point", layout: str = "auto") -> Dataset:
    """David MMSys'18 as sliding windows over every head trace (module docstring: the layouts and the windows).

    Args:
        data_dir: folder holding ``David_MMSys_18/``.
        download: unused: there is no downloader (the not-found message says where the data comes from).
        history: positions per input window (10: 2 s at 5 Hz).
        horizon: steps from the last input to the target (5: 1 s).
        predict: ``"point"`` (the position ``horizon`` steps ahead) or ``"sequence"`` (all ``horizon`` positions).
        layout: ``"sampled"`` (TRACK's 5 Hz files), ``"original"`` (the CSVs, resampled as TRACK did), or
            ``"auto"`` (the sampled layout when present, else the original).

    Returns:
        A :class:`~pfl.data.datasets.Dataset` named ``"david"``: inputs float32 (N, history, 3), targets float32
        (N, 3) or (N, 3 * horizon), ``groups`` int64 (N,) viewer ids, ``keys`` ``"video"`` and ``"time"`` int64
        (N,); a regression (``num_classes=None``, ``task="viewport"``, ``modality="sequence"``) with no official
        split (``num_train=None``). N = sum over traces of L - history - horizon + 1 (93,138 for the full set
        at the defaults).

    Raises:
        ValueError: ``history`` or ``horizon`` not an integer >= 1, an unknown ``predict`` or ``layout``, or
            ``history + horizon`` more than the shortest trace holds; raised before the traces are read.
        DatasetNotFoundError: no ``David_MMSys_18`` layout (or not the one ``layout`` names) under ``data_dir``.
        DatasetFormatError: a malformed file; the message names the file and line.
    """
    _check_window_knobs(history, horizon, predict)
    source = _find_source(data_dir, layout)
    check_window_fits(history, horizon, _shortest(source))
    traces = _read_traces(source)
    positions = np.concatenate([t.positions for t in traces])
    lengths = np.array([len(t.positions) for t in traces])
    inputs, targets, trace, time = sliding_windows(positions, lengths, history, horizon, predict)
    viewers = np.array([t.viewer for t in traces], dtype=np.int64)
    videos = np.array([t.video for t in traces], dtype=np.int64)
    return Dataset("david", torch.from_numpy(inputs), torch.from_numpy(targets), None, (), None, modality="sequence",
                   task="viewport", groups=torch.from_numpy(viewers[trace]),
                   keys={"video": torch.from_numpy(videos[trace]), "time": torch.from_numpy(time)})


def trace_length(data_dir: str | Path, layout: str = "auto") -> int:
    """The number of positions in the shortest trace (100 for the full set: 20 s at 5 Hz), read cheaply: the sampled
    layout's rows are counted, not parsed; the original layout's CSVs are parsed for their ``Idx`` and timestamps.

    Raises:
        ValueError: unknown ``layout``.
        DatasetNotFoundError: no layout under ``data_dir`` (see :func:`load_david`).
        DatasetFormatError: a malformed original CSV, an empty sampled file, or one not named by a viewer number.
    """
    return _shortest(_find_source(data_dir, layout))


def check_window_fits(history: int, horizon: int, length: int) -> None:
    """Refuse windows longer than a trace of ``length`` positions (:func:`trace_length`).

    Raises:
        ValueError: ``history + horizon > length``, in one line naming both knobs and the fix.
    """
    if history + horizon > length:
        raise ValueError(f"history={history} + horizon={horizon} needs {history + horizon} positions but the traces "
                         f"of David MMSys'18 hold {length} ({length * RATE:g} s at {1 / RATE:g} Hz); lower history "
                         "or horizon")


def sliding_windows(positions: np.ndarray, lengths: np.ndarray, history: int, horizon: int,
                    predict: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every window (stride 1) of every trace, in trace order then time (module docstring: the semantics).

    Args:
        positions: the traces one after the other, (sum(lengths), F).
        lengths: positions per trace, int (T,); a trace shorter than ``history + horizon`` gives no window.
        history, horizon, predict: see :func:`load_david`.

    Returns:
        ``inputs`` float32 (N, history, F); ``targets`` float32 (N, F) (``"point"``) or (N, F * horizon)
        (``"sequence"``, step-major); ``trace`` int64 (N,) each window's trace index; ``time`` int64 (N,) the step,
        within its trace, of the window's last input.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    counts = np.maximum(lengths - history - horizon + 1, 0)
    trace = np.repeat(np.arange(len(lengths)), counts)
    time = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + history - 1
    last = np.repeat(np.cumsum(lengths) - lengths, counts) + time  # flat index of each window's last input
    inputs = positions[last[:, None] + np.arange(1 - history, 1)]
    if predict == "point":
        targets = positions[last + horizon]
    else:
        targets = positions[last[:, None] + np.arange(1, horizon + 1)].reshape(len(last), -1)
    return inputs.astype(np.float32), targets.astype(np.float32), trace, time


def to_unit_vectors(longitude: np.ndarray, latitude: np.ndarray) -> np.ndarray:
    """Unit vectors (n, 3) of normalized equirectangular coordinates (n,) in [0, 1] (latitude 0: the top row, the
    north pole), in TRACK's axes: ``eulerian_to_cartesian(longitude * 2 pi, latitude * pi)`` (``Utils.py:34-38``,
    ``Read_Dataset.py:87-90``): :func:`pfl.models.viewport.from_normalized_eulerian`, in float64."""
    return from_normalized_eulerian(torch.from_numpy(np.stack([longitude, latitude], axis=1))).numpy()


def resample_track(times: np.ndarray, points: np.ndarray, rate: float = RATE) -> np.ndarray:
    """A trace at exact ``rate`` steps, as TRACK built ``sampled_dataset`` from the irregular original timestamps.

    TRACK (``Read_Dataset.py:101-118``, ``create_sampled_dataset``; ``Utils.py:125-135`` and ``144-157``): each
    point becomes the shortest rotation taking (1, 0, 0) onto it (``rotationBetweenVectors``: the identity when the
    point is numpy-``allclose`` to (1, 0, 0), a half turn about (0, -1, 0) when it is ``allclose`` to (-1, 0, 0));
    when the first timestamp is later than ``rate / 2`` a copy of the first rotation is put at t = 0; the rotations
    are spherically interpolated (scipy's ``Slerp``) at ``arange(t_0, t_last + rate / 2, rate)``, the last time
    clipped to ``t_last``; each interpolated rotation is applied to (1, 0, 0) (``recover_xyz_from_quaternions_trace``,
    ``Read_Dataset.py:142-149``). Here the slerp is the closed-form shortest-arc quaternion slerp, equal to scipy's
    (TRACK hands pyquaternion's (w, x, y, z) to scipy's scalar-last ``from_quat``; the shortest-arc slerp of unit
    4-vectors does not depend on the order of their components, so the result is the same).

    Args:
        times: (n,) seconds, strictly increasing, n >= 2.
        points: (n, 3) unit vectors at those times.
        rate: seconds between output positions.

    Returns:
        (m, 3) unit vectors, m = len(arange(t_0', t_last + rate / 2, rate)) with t_0' = 0 when t_0 > rate / 2,
        else t_0 (:func:`_grid`).
    """
    quats = _rotations_from_x(points)
    keys = _key_times(times, rate)
    if len(keys) > len(times):
        quats = np.concatenate([quats[:1], quats])
    grid = _grid(keys, rate)
    k = np.clip(np.searchsorted(keys, grid, side="right") - 1, 0, len(keys) - 2)
    fraction = (grid - keys[k]) / (keys[k + 1] - keys[k])
    w, x, y, z = _slerp(quats[k], quats[k + 1], fraction).T
    return np.stack([1 - 2 * (y * y + z * z), 2 * (x * y + w * z), 2 * (x * z - w * y)], axis=1)


def _key_times(times: np.ndarray, rate: float) -> np.ndarray:
    """TRACK's interpolation keys: ``times``, with 0 put first when the first is later than ``rate / 2``."""
    return np.concatenate([[0.0], times]) if times[0] > rate / 2 else times


def _grid(keys: np.ndarray, rate: float) -> np.ndarray:
    """TRACK's output times: ``arange(keys[0], keys[-1] + rate / 2, rate)``, the last clipped to ``keys[-1]``."""
    grid = np.arange(keys[0], keys[-1] + rate / 2, rate)
    grid[-1] = min(keys[-1], grid[-1])
    return grid


def _rotations_from_x(points: np.ndarray) -> np.ndarray:
    """Unit quaternions (n, 4), (w, x, y, z), of the shortest rotations taking (1, 0, 0) onto ``points`` (n, 3):
    ``(1 + p_x, 0, -p_z, p_y)`` normalized (angle acos(p_x) about (1, 0, 0) x p), with ``rotationBetweenVectors``'
    two special cases (``Utils.py:125-135``)."""
    x_axis = np.array([1.0, 0.0, 0.0])
    quats = np.stack([1 + points[:, 0], np.zeros(len(points)), -points[:, 2], points[:, 1]], axis=1)
    same = np.all(np.abs(x_axis - points) <= 1e-8 + 1e-5 * np.abs(points), axis=1)  # np.allclose(u, v)
    opposite = np.all(np.abs(x_axis + points) <= 1e-8 + 1e-5 * np.abs(points), axis=1)  # np.allclose(u, -v)
    quats[same] = (1.0, 0.0, 0.0, 0.0)
    quats[opposite] = (0.0, 0.0, -1.0, 0.0)  # half turn about orthogonal((1, 0, 0)) = (0, -1, 0)
    return quats / np.linalg.norm(quats, axis=1, keepdims=True)


def _slerp(q0: np.ndarray, q1: np.ndarray, fraction: np.ndarray) -> np.ndarray:
    """Shortest-arc spherical interpolation of unit quaternions (n, 4) at ``fraction`` (n,) in [0, 1]."""
    dot = np.sum(q0 * q1, axis=1)
    q1 = np.where(dot[:, None] < 0, -q1, q1)
    angle = np.arccos(np.clip(np.abs(dot), -1.0, 1.0))
    sin = np.sin(angle)
    tiny = sin < 1e-12  # (nearly) the same rotation: linear weights
    safe = np.where(tiny, 1.0, sin)
    w0 = np.where(tiny, 1 - fraction, np.sin((1 - fraction) * angle) / safe)
    w1 = np.where(tiny, fraction, np.sin(fraction * angle) / safe)
    out = w0[:, None] * q0 + w1[:, None] * q1
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _check_window_knobs(history: int, horizon: int, predict: str) -> None:
    for name, value, default in (("history", history, "10 (2 s at 5 Hz)"), ("horizon", horizon, "5 (1 s at 5 Hz)")):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}; set e.g. {name}={default}")
    if predict not in PREDICTIONS:
        raise ValueError(f"predict must be 'point' (the position horizon steps ahead) or 'sequence' (all horizon "
                         f"positions), got {predict!r}")


def _not_found(data_dir: Path, looked: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"David MMSys'18 not found: looked for {looked}. Extract {ARCHIVE} (e.g. ../shared/data/{ARCHIVE}) into "
        f"{data_dir} (`mkdir -p {data_dir} && tar -xJf {ARCHIVE} -C {data_dir}`), or point pfl at the folder that "
        f"holds {FOLDER}/ with PFL_DATA_DIR=... or data_dir=...")


def _find_source(data_dir: str | Path, layout: str) -> _Source:
    """The layout to read under ``<data_dir>/David_MMSys_18`` and its files (no file is opened).

    Raises:
        ValueError: unknown ``layout``.
        DatasetNotFoundError: the layout's folder is missing or holds no video.
        DatasetFormatError: a sampled-layout file not named by a viewer number.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    data_dir = Path(data_dir)
    sampled, original = data_dir / FOLDER / SAMPLED, data_dir / FOLDER / Path(*SCANPATHS)
    if layout == "auto":
        if not sampled.is_dir() and not original.is_dir():
            raise _not_found(data_dir, f"{sampled} or {original}")
        layout = "sampled" if sampled.is_dir() else "original"
    folder = sampled if layout == "sampled" else original
    if not folder.is_dir():
        raise _not_found(data_dir, f"{folder} (layout={layout!r}; layout='auto' reads whichever layout is there)")
    if layout == "sampled":
        videos = {p.name: _viewer_files(p) for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    else:
        videos = {p.name[:-len(CSV_SUFFIX)]: p for p in folder.glob(f"*{CSV_SUFFIX}") if p.is_file()}
    if not videos:
        what = "video folders" if layout == "sampled" else f"<video>{CSV_SUFFIX} files"
        raise _not_found(data_dir, f"{what} in {folder}, which holds none")
    names = sorted(videos, key=_natural_key)
    return _Source(layout, tuple(videos[n] for n in names))


def _natural_key(name: str) -> list:
    """Sort key comparing digit runs as numbers: ``2_Diner`` before ``10_Cows``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _viewer_files(video_dir: Path) -> tuple[tuple[int, Path], ...]:
    files = [p for p in video_dir.iterdir() if not p.name.startswith(".")]
    for path in files:
        if not path.name.isdigit() or not path.is_file():
            raise DatasetFormatError(f"{path}: expected only files named by viewer number (0, 1, ...) in "
                                     f"{video_dir}; remove it or {_REEXTRACT}")
    return tuple(sorted((int(p.name), p) for p in files))


def _shortest(source: _Source) -> int:
    """Positions in the source's shortest trace; sampled files are counted by their non-blank, non-comment lines."""
    if source.layout == "sampled":
        return min(_count_rows(path) for viewers in source.files for _, path in viewers)
    return min(len(_grid(_key_times(times, RATE), RATE))
               for path in source.files for times, _ in _read_scanpaths(path))


def _read_traces(source: _Source) -> list[Trace]:
    """Every trace of the source, in video then viewer order."""
    if source.layout == "sampled":
        return [Trace(video, viewer, _read_sampled(path))
                for video, viewers in enumerate(source.files) for viewer, path in viewers]
    return [Trace(video, viewer, resample_track(times, points))
            for video, path in enumerate(source.files)
            for viewer, (times, points) in enumerate(_read_scanpaths(path))]


def _read_sampled(path: Path) -> np.ndarray:
    """The unit vectors (L, 3) of a TRACK file (rows ``t, x, y, z``).

    Raises:
        DatasetFormatError: a row that is not 4 finite numbers, or whose x, y, z is not a unit vector (within 1e-3).
    """
    rows = _read_rows(path, SAMPLED_COLUMNS)
    norms = np.linalg.norm(rows[:, 1:], axis=1)
    _refuse_rows(path, np.abs(norms - 1) > 1e-3, lambda r: f"x, y, z has norm {norms[r]:.6g}, not a unit vector")
    return rows[:, 1:]


def _read_scanpaths(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per viewer (block of rows from ``Idx`` 0), its timestamps in s (n,) and unit vectors (n, 3).

    Raises:
        DatasetFormatError: a row that is not 7 finite numbers, a longitude or latitude outside [0, 1], an ``Idx``
            that neither starts a viewer (0) nor follows the previous row's, a timestamp not after the previous
            one of its viewer, or a viewer of a single row (TRACK's interpolation needs two).
    """
    rows = _read_rows(path, CSV_COLUMNS)
    idx, times = rows[:, 0], rows[:, 3] / 1000.0
    coords = rows[:, 1:3]
    _refuse_rows(path, ((coords < 0) | (coords > 1)).any(axis=1),
                 lambda r: f"longitude, latitude {coords[r, 0]:g}, {coords[r, 1]:g} outside [0, 1]")
    previous = np.concatenate([[-1.0], idx[:-1]])
    _refuse_rows(path, (idx != 0) & (idx != previous + 1),
                 lambda r: f"Idx {idx[r]:g} after {previous[r]:g}: expected {previous[r] + 1:g}, or 0 to start the "
                           "next viewer" if r else f"Idx {idx[r]:g} in the first row: expected 0")
    starts = np.flatnonzero(idx == 0)
    sizes = np.diff(np.append(starts, len(idx)))
    _refuse_rows(path, np.isin(np.arange(len(idx)), starts[sizes < 2]),
                 lambda r: "a viewer of a single row; TRACK's resampling needs at least two")
    _refuse_rows(path, (idx != 0) & (times <= np.concatenate([[np.inf], times[:-1]])),
                 lambda r: f"start timestamp {rows[r, 3]:g} ms not after the previous row's {rows[r - 1, 3]:g} ms")
    points = to_unit_vectors(coords[:, 0], coords[:, 1])
    return [(times[s:s + n], points[s:s + n]) for s, n in zip(starts, sizes)]


def _read_rows(path: Path, columns: tuple[str, ...]) -> np.ndarray:
    """float64 rows (n, len(columns)), n >= 1, of a comma-separated file; blank lines and ``#`` comments skipped.

    Raises:
        DatasetFormatError: a row that is not ``len(columns)`` finite numbers (the message names its line), or no
            row at all.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # numpy warns on an empty file; refused below
            rows = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    except ValueError:
        rows = None
    if rows is not None and rows.size == 0:
        raise _empty(path, columns)
    if rows is None or rows.shape[1] != len(columns) or not np.isfinite(rows).all():
        raise _malformed(path, columns)
    return rows


def _data_lines(path: Path):
    """(line number, text) of each data line of a file, as ``np.loadtxt`` reads them."""
    with path.open(errors="replace") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if text:
                yield number, text


def _malformed(path: Path, columns: tuple[str, ...]) -> DatasetFormatError:
    """The error naming the first line of ``path`` that is not ``len(columns)`` finite comma-separated numbers."""
    for number, text in _data_lines(path):
        fields = text.split(",")
        try:
            good = len(fields) == len(columns) and all(np.isfinite(float(f)) for f in fields)
        except ValueError:
            good = False
        if not good:
            return DatasetFormatError(f"{path}, line {number}: expected {len(columns)} comma-separated numbers "
                                      f"({', '.join(columns)}), got {text[:80]!r}; {_REEXTRACT}")
    return DatasetFormatError(f"{path}: not comma-separated rows of {', '.join(columns)}; {_REEXTRACT}")


def _refuse_rows(path: Path, bad: np.ndarray, describe) -> None:
    """Raise a DatasetFormatError naming the line of the first data row where ``bad`` (n,) holds, with
    ``describe(row)``."""
    if bad.any():
        row = int(np.argmax(bad))
        number = next(n for i, (n, _) in enumerate(_data_lines(path)) if i == row)
        raise DatasetFormatError(f"{path}, line {number}: {describe(row)}; {_REEXTRACT}")


def _count_rows(path: Path) -> int:
    """Data rows of a sampled-layout file, not parsed.

    Raises:
        DatasetFormatError: it holds none.
    """
    count = sum(1 for _ in _data_lines(path))
    if not count:
        raise _empty(path, SAMPLED_COLUMNS)
    return count


def _empty(path: Path, columns: tuple[str, ...]) -> DatasetFormatError:
    return DatasetFormatError(f"{path}: holds no rows of {', '.join(columns)}; {_REEXTRACT}")
