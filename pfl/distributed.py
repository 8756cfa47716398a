"""Ray for sweeps and tuning across GPUs and machines (``--backend ray``).

``pfl sweep --backend ray`` runs every grid cell (its FL runs and their head runs,
:func:`pfl.sweep.run_cell`) as a Ray task (:func:`map_cells`); ``pfl tune --backend ray --workers N``
runs N Optuna workers on one RDB study as Ray tasks (:func:`tune_workers`). A task reserves one GPU
when the cluster has GPUs (Ray then sets its ``CUDA_VISIBLE_DEVICES``), else ``--cpus-per-task`` CPUs
(:func:`ray_session`). The driver (the ``pfl`` command) validates everything and owns the launch
run; the tasks reach the same tracking store, Optuna storage and data by absolute paths and URIs
(:func:`absolute_store`), so a cluster of several machines needs an MLflow tracking server, a
database server for Optuna and the data folder at the same path on every machine.

Built on Ray's own tasks (``ray.remote``, ``ray.wait``, ``ray.cancel``; Ray Core's task API,
https://docs.ray.io/en/latest/ray-core/tasks.html), not a home-made process pool. ``ray`` is imported
inside functions only: ``import pfl`` does not import it.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pfl.config import ConfigError, HeadConfig, RunConfig
from pfl.locking import sqlite_path

if TYPE_CHECKING:
    from types import ModuleType

    from pfl.sweep import CellRuns
    from tuning.spaces import SearchParam
    from tuning.study import StudySettings

CANCEL_WAIT_S = 60  # how long the driver waits for cancelled tasks to end their runs
CANCEL_RESEND_S = 1.0  # how often the driver sends its cancel again to a task that has not ended


@dataclass(frozen=True)
class RayOptions:
    """Where and how pfl runs its Ray tasks.

    Attributes:
        address: the cluster, as ``ray.init(address=...)`` takes it (``auto``, ``HOST:6379``,
            ``ray://HOST:10001``); ``None``: a local Ray instance started for the command.
        cpus_per_task: CPUs a task reserves on a cluster without GPUs (with GPUs a task reserves one GPU).
    """

    address: str | None = None
    cpus_per_task: int = 1


class TaskError(RuntimeError):
    """A pfl Ray task raised ``cause``; the message is one line naming the task and the cause."""

    def __init__(self, task: str, cause: BaseException):
        first = (str(cause).splitlines() or [""])[0]
        super().__init__(f"{task} failed: {type(cause).__name__}: {first}")
        self.cause = cause


def require_ray() -> ModuleType:
    """The ``ray`` module.

    Raises:
        ConfigError: ray is not installed (names ``--backend ray`` and the fix).
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--backend ray: ray is not installed; install it with pip install -c constraints.txt "
                          "ray, or use --backend local") from None
    return ray


def absolute_store(uri: str) -> str:
    """``uri`` with a relative SQLite file made absolute (``sqlite:///mlflow.db`` -> ``sqlite:////home/me/mlflow.db``)
    as this process resolves it, so a task whose working directory differs opens the same file; other URIs as
    they are."""
    path = sqlite_path(uri)
    if path is None or path.is_absolute():
        return uri
    from sqlalchemy.engine import make_url

    return make_url(uri).set(database=str(path.resolve())).render_as_string(hide_password=False)


def sqlite_warning(options: RayOptions, tracking_uri: str, storage: str | None = None) -> str | None:
    """The warning for ``--address`` with SQLite stores: Ray workers on other machines cannot open this machine's
    SQLite files. ``storage``: the Optuna storage (``pfl tune``). ``None`` without ``--address`` or SQLite stores."""
    stores = [(f"tracking store {tracking_uri}", "an MLflow tracking server (--tracking-uri http://HOST:5000)"),
              (f"Optuna storage {storage}", "a database server (--storage postgresql://USER@HOST/DB)")]
    local = [(what, fix) for (what, fix), uri in zip(stores, (tracking_uri, storage)) if uri and sqlite_path(uri)]
    if options.address is None or not local:
        return None
    return (f"warning: --address {options.address}: Ray workers on other machines cannot reach the SQLite "
            f"{' and '.join(w for w, _ in local)} on this machine; use {' and '.join(f for _, f in local)}")


def _connect(ray: ModuleType, address: str | None) -> None:
    """``ray.init`` for pfl's commands: no dashboard, Ray's own log lines from warnings up, the tasks' output
    forwarded to this terminal.

    Raises:
        ConfigError: the cluster at ``address`` cannot be reached (checked first for ``HOST:PORT`` and
            ``ray://HOST:PORT``: ``ray.init`` retries an unreachable address for minutes), or no local instance
            starts.
    """
    _check_reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    except Exception as err:  # ConnectionError, RuntimeError, ValueError (a malformed address) and others
        detail = (str(err).splitlines() or [type(err).__name__])[0][:200]
        if address is None:
            raise ConfigError(f"--backend ray: cannot start a local Ray instance ({detail}); use --backend "
                              "local") from None
        raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({detail}); start one with "
                          "`ray start --head` there, or drop --address for a local instance") from None


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """Open and close a TCP connection to a ``HOST:PORT`` or ``ray://HOST:PORT`` address (others, ``auto`` and
    ``None``, are left to ``ray.init``).

    Raises:
        ConfigError: nothing answers at that address within ``timeout_s`` seconds.
    """
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ConfigError(f"--address {address}: nothing answers there ({err.strerror or err}); start the head "
                          "with `ray start --head --port PORT` on that machine, or drop --address for a local "
                          "instance") from None


def task_resources(ray: ModuleType, device: str, cpus_per_task: int) -> dict[str, int]:
    """What one task reserves: one GPU when the cluster has GPUs and ``device`` is not ``cpu``, else
    ``cpus_per_task`` CPUs.

    Raises:
        ConfigError: a task needs more CPUs than the whole cluster has (it would wait for ever).
    """
    cluster = ray.cluster_resources()
    if cluster.get("GPU", 0) > 0 and device != "cpu":
        return {"num_gpus": 1}
    cpus = int(cluster.get("CPU", 0))
    if cpus_per_task > cpus:
        raise ConfigError(f"--cpus-per-task: {cpus_per_task} CPUs per task, but the Ray cluster has {cpus}; pass "
                          f"--cpus-per-task {max(cpus, 1)} or fewer")
    return {"num_cpus": cpus_per_task}


@contextmanager
def ray_session(options: RayOptions, device: str) -> Iterator[dict[str, int]]:
    """Connect to the cluster at ``options.address`` (or start a local Ray instance) for a command's tasks; yields
    what each task reserves (:func:`task_resources`, for runs on ``device``). A Ray already initialized in this
    process (a notebook, the tests) is used as it is and left running; one started here is shut down at the end.

    Raises:
        ConfigError: ray is not installed, the cluster cannot be reached, or it has fewer CPUs than a task needs.
    """
    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        _connect(ray, options.address)
    try:
        yield task_resources(ray, device, options.cpus_per_task)
    finally:
        if started:
            ray.shutdown()


def _for_task(config: RunConfig | HeadConfig, resources: dict[str, int]) -> RunConfig | HeadConfig:
    """``config`` as a task runs it: its folders (``data_dir``, ``cache_dir``) absolute as this process resolves
    them (a worker's working directory may differ); on a CPU task ``num_threads=0`` (all cores) becomes the task's
    CPUs, so that tasks sharing a machine do not oversubscribe its cores."""
    folders = {k: getattr(config, k, None) for k in ("data_dir", "cache_dir")}
    update: dict[str, Any] = {k: Path(v).resolve() for k, v in folders.items() if v is not None}
    if "num_cpus" in resources and config.num_threads == 0:
        update["num_threads"] = resources["num_cpus"]
    return config.model_copy(update=update)


def _finished(refs: list, labels: list[str]) -> Iterator[tuple[int, Any]]:
    """``(index, result)`` of each task in ``refs`` as it finishes.

    When the caller stops early (a failure here or in the caller), the tasks still pending are cancelled
    (:func:`_cancel`: a running one gets a KeyboardInterrupt, so its runs end KILLED; a queued one never starts).

    Raises:
        TaskError: a task raised or its worker died (``labels``: the tasks' names in the message).
    """
    ray = require_ray()
    index = {ref: i for i, ref in enumerate(refs)}
    pending = list(refs)
    try:
        while pending:
            (ready,), pending = ray.wait(pending, num_returns=1)
            try:
                result = ray.get(ready)
            except ray.exceptions.RayError as err:
                cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
                raise TaskError(labels[index[ready]], cause) from err
            yield index[ready], result
    finally:
        _cancel(ray, pending)


def _cancel(ray: ModuleType, pending: list) -> None:
    """Cancel the tasks ``pending`` (``ray.cancel``, not forced) and wait up to :data:`CANCEL_WAIT_S` seconds for
    them to end.

    Ray's cancel is best effort: one that reaches the worker before the task does (the cancel travels through the
    raylet, the task straight from this process) or while the worker moves the task from its queue to its main
    thread finds nothing to cancel, and Ray does not try again (``NormalTaskSubmitter::CancelTask`` in Ray's
    ``normal_task_submitter.cc`` retries only a task the worker reports running); the task then runs to its end.
    So the cancel is sent again every :data:`CANCEL_RESEND_S` seconds until every task has ended. A pfl task takes
    only the first of those interrupts (:func:`_interrupted_once`), so a repeated cancel never cuts short the
    ending of its runs.
    """
    deadline = time.monotonic() + CANCEL_WAIT_S
    while pending and (left := deadline - time.monotonic()) > 0:
        for ref in pending:
            ray.cancel(ref)
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=min(CANCEL_RESEND_S, left))


def _interrupted_once(function: Any) -> Any:
    """``function`` as a Ray task body that takes one KeyboardInterrupt: the first ``ray.cancel`` interrupts it
    (Ray's ``kill_main_task`` in ``_raylet.pyx`` calls ``_thread.interrupt_main``, which runs Python's SIGINT
    handler, as Ctrl-C does), later ones are ignored while it ends its runs KILLED (:func:`_cancel` repeats its
    cancel). The worker's own SIGINT handler is restored when ``function`` returns, as Ray reuses the worker; a
    cancel repeated in the instant between that and Ray's own bookkeeping of the task can still end the worker
    process, after the runs have ended, and Ray reports the task cancelled all the same."""

    def interrupt_once(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    @functools.wraps(function)
    def task(*args: Any, **kwargs: Any) -> Any:
        previous = signal.signal(signal.SIGINT, interrupt_once)
        try:
            return function(*args, **kwargs)
        finally:
            signal.signal(signal.SIGINT, previous)

    return task


def _remote(function: Any, resources: dict[str, int]) -> Any:
    """``function`` as a Ray task reserving ``resources``, never retried (a retry would repeat its runs), taking only
    the first of repeated cancels (:func:`_interrupted_once`)."""
    return require_ray().remote(_interrupted_once(function)).options(**resources, max_retries=0)


def _worker_tracking(uri: str) -> None:
    """Point a task at the driver's tracking store. ``MLFLOW_RUN_ID`` (the run ``mlflow run`` started, inherited
    from a driver that started Ray) is dropped: that run is the driver's, and a task only creates runs."""
    from pfl import tracking

    os.environ.pop("MLFLOW_RUN_ID", None)
    tracking.configure_tracking(uri)


def _cell_task(cfg: RunConfig, heads: list[HeadConfig], launch_run_id: str, tracking_uri: str) -> CellRuns:
    """A sweep cell in a Ray worker: prepare it, build its first algorithm, load its OOD pools and run it
    (:func:`pfl.sweep.run_cell`) under launch run ``launch_run_id``, without progress bars."""
    from pfl.sweep import ood_pools, run_cell
    from pfl.train import build_algorithm, prepare

    _worker_tracking(tracking_uri)
    prepared = prepare(cfg)
    return run_cell(prepared, build_algorithm(prepared, cfg.seed), heads, ood_pools(heads, [prepared]),
                    progress=False, parent_run_id=launch_run_id)


def map_cells(cells: list[RunConfig], heads: list[HeadConfig], launch_run_id: str, resources: dict[str, int],
              progress: bool = True) -> Iterator[CellRuns]:
    """Run every grid cell as a Ray task under launch run ``launch_run_id``; yield the cells' runs in grid order as
    they are done (a cell that finishes early waits for the cells before it).

    Args:
        cells: the grid's validated configs (:func:`pfl.sweep.grid`), shipped with absolute folders.
        heads: the head configs run on every FL run.
        resources: what each task reserves (:func:`ray_session`).
        progress: a bar over the cells in this process (the tasks show none).

    Raises:
        The first failing cell's exception (its runs end FAILED); the cells still running are cancelled first
        (their runs end KILLED).
    """
    from tqdm.auto import tqdm

    from pfl import tracking
    from pfl.sweep import cell_name

    task = _remote(_cell_task, resources)
    uri = absolute_store(tracking.tracking_uri())
    shipped = [_for_task(hc, resources) for hc in heads]
    refs = [task.remote(_for_task(c, resources), shipped, launch_run_id, uri) for c in cells]
    waiting: dict[int, CellRuns] = {}
    following = 0  # the next cell in grid order
    with tqdm(total=len(cells), desc="sweep cells", disable=not progress) as bar, \
            closing(_finished(refs, [f"cell {cell_name(c)}" for c in cells])) as finished:
        try:
            for i, runs in finished:
                bar.update()
                waiting[i] = runs
                while following in waiting:
                    yield waiting.pop(following)
                    following += 1
        except TaskError as err:
            raise err.cause from err


def split_trials(n_trials: int, workers: int) -> list[int]:
    """``n_trials`` split over ``workers``, the first ones taking the remainder: 5 over 2 -> ``[3, 2]``.

    Raises:
        ConfigError: more workers than trials.
    """
    if workers > n_trials:
        raise ConfigError(f"--workers: {workers} workers for {n_trials} trials (--n-trials); pass --n-trials "
                          f"{workers} or more, or fewer workers")
    return [n_trials // workers + (k < n_trials % workers) for k in range(workers)]


def _tune_task(base: RunConfig, space: dict[str, SearchParam], settings: StudySettings, tracking_uri: str) -> str:
    """An Optuna worker in a Ray worker: :func:`tuning.study.run_study` with ``settings``, its best config written
    to a temporary folder (it stays an artifact of its study run; the driver writes the user's). Returns the
    worker's study run id."""
    from tuning.study import run_study

    _worker_tracking(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        return run_study(base, space, replace(settings, out_dir=Path(tmp))).study_run_id


def tune_workers(base: RunConfig, space: dict[str, SearchParam], settings: StudySettings, workers: int,
                 options: RayOptions) -> list[str]:
    """Run ``settings.n_trials`` trials of one study as ``workers`` Ray tasks, as several ``pfl tune`` processes
    would: each is :func:`tuning.study.run_study` on the same storage (made absolute) and study name with its share
    of the trials (:func:`split_trials`) and no final repeats, and logs its own study run. The caller then runs
    ``run_study`` with ``n_trials=0`` for the best config, the final repeats and the summary (``pfl tune`` does).

    Returns:
        the workers' study run ids, in worker order.

    Raises:
        ConfigError: more workers than trials (before Ray starts), or Ray's (:func:`ray_session`).
        TaskError: a worker raised (one line); the other workers are cancelled first.
    """
    from pfl import tracking

    counts = split_trials(settings.n_trials, workers)
    shipped = replace(settings, storage=absolute_store(settings.storage), final_repeats=0, progress=False)
    with ray_session(options, base.device) as resources:
        task = _remote(_tune_task, resources)
        uri = absolute_store(tracking.tracking_uri())
        refs = [task.remote(_for_task(base, resources), space, replace(shipped, n_trials=n), uri) for n in counts]
        labels = [f"tune worker {k + 1} of {workers}" for k in range(workers)]
        with closing(_finished(refs, labels)) as finished:
            return [run_id for _, run_id in sorted(finished)]
