"""``pfl sweep``: FL runs over a grid of algorithm x Dirichlet alpha x join ratio, and head runs on each.

Everything nests under one launch run: launch -> FL run per (algorithm, alpha, join ratio, seed)
-> APH / LoRAPH head runs per FL run. Every grid cell is validated (config, data,
partition feasibility, algorithm hyperparameters) before the launch run starts. The
runs feed the report's bar-line plots (ECE vs alpha, ECE vs participation ratio).

A cell (its FL runs and their head runs, :func:`run_cell`) runs in this process, one after
another, or as a Ray task (:mod:`pfl.distributed`, ``pfl sweep --backend ray``), cells side by
side on the GPUs or CPUs of a Ray cluster; the runs are the same either way.
"""

from __future__ import annotations

from contextlib import closing, nullcontext
from dataclasses import dataclass

from pydantic import ValidationError

from pfl.algorithms import Algorithm
from pfl.config import ConfigError, HeadConfig, RunConfig, format_validation_error
from pfl.distributed import RayOptions, map_cells, ray_session
from pfl.heads.ood import OODPool
from pfl.summary import seed_summary
from pfl.train import Prepared, build_algorithm, prepare, train_repeats


@dataclass(frozen=True)
class SweepResult:
    """Ids of the runs a sweep created."""

    launch_run_id: str
    fl_run_ids: list[str]
    head_run_ids: list[str]


@dataclass(frozen=True)
class CellRuns:
    """Ids of the runs of one grid cell: its FL runs (one per seed) and, per head method, its head runs on them
    (in FL-run order)."""

    fl_run_ids: list[str]
    head_run_ids: dict[str, list[str]]


def grid(cfgs: list[RunConfig], alphas: list[float], join_ratios: list[float]) -> list[RunConfig]:
    """One validated config per (algorithm, join ratio, alpha), alpha varying fastest: ``cfgs`` holds the run config
    of each algorithm swept (``pfl sweep --algos``; one config: its own algorithm).

    Raises:
        ConfigError: an empty list, or a value out of range (names the field).
    """
    if not alphas or not join_ratios:
        raise ConfigError("sweep: give at least one alpha (--alphas) and one join ratio (--join-ratios)")
    cells = []
    for cfg in cfgs:
        if cfg.partition != "dirichlet" and len(alphas) > 1:
            raise ConfigError(f"alpha: sweeping alpha needs partition=dirichlet (the config has {cfg.partition})")
        for jr in join_ratios:
            for alpha in alphas:
                try:
                    cells.append(RunConfig(**{**cfg.model_dump(), "alpha": alpha, "join_ratio": jr}))
                except ValidationError as err:
                    raise ConfigError(format_validation_error(err)) from None
    return cells


def run_sweep(cfg: RunConfig | list[RunConfig], alphas: list[float], join_ratios: list[float],
              heads: list[HeadConfig], progress: bool = True, ray: RayOptions | None = None) -> SweepResult:
    """Train every grid cell (``cfg.repeats`` seeds each) and run every head config on each FL run.

    Args:
        cfg: the run config of every cell, or one per algorithm swept (the same setting, another ``algo``).
        ray: run the cells side by side as Ray tasks (:func:`pfl.distributed.map_cells`) on the cluster these
            options name; ``None``: in this process, one after another. The runs are the same either way, and the
            launch run gets the cells' summaries in grid order.

    Raises:
        ConfigError, DatasetNotFoundError, DatasetFormatError: before any run is created (with ``ray``: also
            ray missing, a cluster that cannot be reached or too small; :func:`pfl.distributed.ray_session`).
        Any error during the work: the interrupted runs end FAILED; finished ones stay.
    """
    from pfl import tracking

    cfgs = cfg if isinstance(cfg, list) else [cfg]
    cfg, several = cfgs[0], len(cfgs) > 1
    cells = grid(cfgs, alphas, join_ratios)
    prepared = [prepare(cells[0])]
    prepared += [prepare(c, like=prepared[0]) for c in cells[1:]]  # one copy of the image pool
    firsts = [build_algorithm(p, p.cfg.seed) for p in prepared]
    pools = ood_pools(heads, prepared)  # loaded and checked now
    shared = prepared[0].cfg.flat_params()  # eval_batch_size resolved for the device, as the FL runs log it
    params = {**shared, "join_ratio": str(join_ratios), "head_methods": ",".join(h.method for h in heads),
              **({"alpha": str(alphas)} if "alpha" in shared else {}),
              **({"algo": ",".join(c.algo for c in cfgs)} if several else {})}
    if several:  # hyperparameters differ by algorithm: each FL run logs its own
        params = {k: v for k, v in params.items() if k not in cfg.hparams}
    fl_ids, head_ids = [], []
    name = sweep_name(cells[0], alphas, join_ratios, [c.algo_label for c in cfgs])
    with (ray_session(ray, cfg.device) if ray else nullcontext()) as resources, \
            tracking.launch_run(cfg.experiment, name, params) as launch_id:
        done = (map_cells(cells, heads, launch_id, resources, progress) if ray else
                (run_cell(p, first, heads, pools, progress) for p, first in zip(prepared, firsts)))
        with closing(done):  # a failure here cancels the cells' tasks still running
            for cell, runs in zip(prepared, done):
                fl_ids += runs.fl_run_ids
                head_ids += [i for ids in runs.head_run_ids.values() for i in ids]
                _log_cell_summary(cell_name(cell.cfg, several), runs.fl_run_ids, runs.head_run_ids)
        swept = cfg.describe(", ".join(f"{a:g}" for a in alphas), ", ".join(f"{j:g}" for j in join_ratios))
        if several:
            swept = f"algorithms {', '.join(c.algo_label for c in cfgs)}; " + swept
        names = ", ".join(cell_name(p.cfg, several) for p in prepared)
        tracking.set_description(launch_id, f"**{name}**: {swept}; head methods "
                                 f"{', '.join(h.method for h in heads) or 'none'}.\n\nMetrics per cell ({names}): "
                                 "`<cell>/<metric>` (mean over seeds) and `<cell>/<metric>_seed_std`; head methods "
                                 "under `<cell>/<method>/`.")
    return SweepResult(launch_id, fl_ids, head_ids)


def ood_pools(heads: list[HeadConfig], cells: list[Prepared]) -> dict[str, OODPool | None]:
    """One OOD pool per ``ood_dataset`` setting of ``heads`` for head runs on FL runs of ``cells``
    (:func:`pfl.heads.run.ood_pool`).

    Raises:
        ConfigError: an OOD set is missing, the cells' dataset, or too small.
    """
    from pfl.heads.run import fl_config, ood_pool

    by_setting = {hc.ood_dataset: hc for hc in heads}
    return {name: ood_pool(hc, fl_config(cells[0].cfg.flat_params(), hc), cells) for name, hc in by_setting.items()}


def run_cell(cell: Prepared, first: Algorithm, heads: list[HeadConfig], pools: dict[str, OODPool | None],
             progress: bool = True, parent_run_id: str | None = None) -> CellRuns:
    """One grid cell: its FL runs (:func:`pfl.train.train_repeats`), then every head config on each of them
    (:func:`pfl.heads.run.run_heads`).

    Args:
        first: the algorithm built for the cell's first seed.
        pools: the OOD pools of the head configs (:func:`ood_pools`).
        parent_run_id: the sweep's launch run when it is not active in this process (a Ray task).

    Raises:
        Any error of training or head runs: the interrupted run ends FAILED.
    """
    from pfl.heads.run import run_heads

    ids = train_repeats(cell, first, progress=progress, parent_run_id=parent_run_id)
    return CellRuns(ids, {hc.method: [run_heads(i, hc, progress=progress, like=cell, pools=pools) for i in ids]
                          for hc in heads})


def cell_name(cfg: RunConfig, with_algo: bool = False) -> str:
    """A grid cell's name in the sweep's metrics: ``<partition label>-jr<ratio>``, e.g. ``dir0.1-jr0.2``; in a sweep
    of several algorithms prefixed with the algorithm, e.g. ``fedper-dir0.1-jr0.2``."""
    name = f"{cfg.partition_label}-jr{cfg.join_ratio:g}"
    return f"{cfg.algo_label}-{name}" if with_algo else name


def sweep_name(cfg: RunConfig, alphas: list[float], join_ratios: list[float], algos: list[str] | None = None) -> str:
    """The sweep's launch run name, e.g. ``sweep-fedfomo-cifar10-dir0.1,0.5-jr0.1,0.2-cnn-r3-s0`` (several
    algorithms: ``sweep-fedavg,fedper-cifar10-...``); ``cfg``: a grid cell's config (so a partition that does not sweep
    alpha shows the alpha its cells run at)."""
    part = "dir" + ",".join(f"{a:g}" for a in alphas) if cfg.partition == "dirichlet" else cfg.partition_label
    algo = ",".join(algos) if algos else cfg.algo_label
    return (f"sweep-{algo}-{cfg.dataset}-{part}-jr{','.join(f'{j:g}' for j in join_ratios)}-{cfg.model}"
            f"-r{cfg.global_rounds}-{cfg.seeds_label}")


def _log_cell_summary(cell: str, fl_ids: list[str], head_ids: dict[str, list[str]]) -> None:
    """Log on the sweep's launch run the cell's mean and std over seeds of its FL runs' final and best metrics
    (``<cell>/test_acc``, ...) and of each head method's (``<cell>/<method>/test_f_ece``, ...)."""
    from pfl import tracking

    tracking.log_metrics(seed_summary([tracking.run_metrics(i) for i in fl_ids], cell=cell))
    for method, ids in head_ids.items():
        tracking.log_metrics(seed_summary([tracking.run_metrics(i) for i in ids], cell=f"{cell}/{method}"))
