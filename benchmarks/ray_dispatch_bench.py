"""Benchmark: what Ray's dispatch costs a sweep cell, against the in-process loop, on one machine.

The same sweep of ``--cells`` tiny cells (FedAvg, 4 CIFAR-10 clients, one round, one seed, no head runs;
alphas 0.1, 0.2, ...) runs three times through :func:`pfl.sweep.run_sweep`, each into a fresh SQLite store:

* ``local``: the cells in this process, one after another (``--backend local``), after one untimed sweep that
  warms this process (torch's first operations, the partition cache);
* ``ray, cold``: the cells as Ray tasks (:func:`pfl.distributed.map_cells`) on a local Ray instance of ``--cpus``
  CPUs, one CPU per task, the workers importing torch and pfl on their first cell;
* ``ray, warm``: the same again, the workers already warm.

With ``--cpus 1`` (the default) Ray runs one cell at a time, so ``ray, warm`` minus ``local`` per cell is the
dispatch's cost: shipping the config, the task's own ``prepare`` (data load, cached partition), its tracking set-up
and returning the ids. Also printed: ``ray.init`` of the local instance and the bare ``ray.get(noop.remote())``
round trip (the first, which starts a worker, and the median of 50 warm ones). Usage::

    .venv/bin/python benchmarks/ray_dispatch_bench.py [--data-dir data] [--cells 4] [--cpus 1]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray

from pfl import tracking
from pfl.config import load_config
from pfl.distributed import RayOptions
from pfl.sweep import run_sweep

CELL = ["algo=fedavg", "num_clients=4", "global_rounds=1", "partition=dirichlet", "device=cpu", "num_threads=1"]


@ray.remote
def noop() -> None:
    """The cheapest task: its round trip is Ray's own dispatch."""


def round_trips(n: int) -> tuple[float, float]:
    """Seconds of the first ``ray.get(noop.remote())`` (it starts a worker) and the median of ``n`` more."""
    times = []
    for _ in range(n + 1):
        start = time.perf_counter()
        ray.get(noop.remote())
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def sweep_seconds(data_dir: str, cells: int, ray_options: RayOptions | None, folder: Path) -> float:
    """Wall seconds of a sweep of ``cells`` cells into a fresh store in ``folder`` (``ray_options``: on Ray)."""
    folder.mkdir()
    tracking.configure_tracking(f"sqlite:///{folder / 'mlflow.db'}")
    cfg = load_config(None, [f"data_dir={data_dir}", f"cache_dir={folder.parent / 'cache'}", *CELL])
    alphas = [round(0.1 * (k + 1), 1) for k in range(cells)]
    start = time.perf_counter()
    result = run_sweep(cfg, alphas, [0.5], [], progress=False, ray=ray_options)
    seconds = time.perf_counter() - start
    assert len(result.fl_run_ids) == cells
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.environ.get("PFL_DATA_DIR", "data"))
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs of the local Ray instance (1: one cell at a time)")
    args = parser.parse_args()
    data_dir = str(Path(args.data_dir).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        sweep_seconds(data_dir, args.cells, None, Path(tmp) / "warm-up")
        local = sweep_seconds(data_dir, args.cells, None, Path(tmp) / "local")
        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
        init = time.perf_counter() - start
        first, warm = round_trips(50)
        cold = sweep_seconds(data_dir, args.cells, RayOptions(), Path(tmp) / "ray-cold")
        again = sweep_seconds(data_dir, args.cells, RayOptions(), Path(tmp) / "ray-warm")
        ray.shutdown()
    n = args.cells
    print(f"{n} cells (FedAvg, 4 CIFAR-10 clients, 1 round, 1 seed, no head runs), {os.cpu_count()} CPU cores, "
          f"Ray instance of {args.cpus} CPU(s), 1 CPU per task")
    print(f"ray.init (local instance): {init:.2f} s; ray.get(noop.remote()): first {first * 1e3:.0f} ms, "
          f"warm median {warm * 1e3:.2f} ms")
    print("| backend | sweep s | s per cell | vs local per cell |\n|---|---|---|---|")
    for name, seconds in (("local", local), ("ray, cold workers", cold), ("ray, warm workers", again)):
        print(f"| {name} | {seconds:.2f} | {seconds / n:.2f} | {(seconds - local) / n:+.2f} s |")


if __name__ == "__main__":
    main()
