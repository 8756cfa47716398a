"""``pfl sweep``: FL runs over a grid of Dirichlet alpha x join ratio, and head runs on each.

Everything nests under one launch run: launch -> FL run per (alpha, join ratio, seed)
-> APH / LoRAPH head runs per FL run. Every grid cell is validated (config, data,
partition feasibility, algorithm hyperparameters) before the launch run starts. The
runs feed the report's bar-line plots (ECE vs alpha, ECE vs participation ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError

from pfl.config import ConfigError, HeadConfig, RunConfig, format_validation_error
from pfl.train import build_algorithm, prepare, train_repeats


@dataclass(frozen=True)
class SweepResult:
    """Ids of the runs a sweep created."""

    launch_run_id: str
    fl_run_ids: list[str]
    head_run_ids: list[str]


def grid(cfg: RunConfig, alphas: list[float], join_ratios: list[float]) -> list[RunConfig]:
    """One validated config per (alpha, join ratio), alpha varying fastest.

    Raises:
        ConfigError: an empty list, or a value out of range (names the field).
    """
    if not alphas or not join_ratios:
        raise ConfigError("sweep: give at least one alpha (--alphas) and one join ratio (--join-ratios)")
    if cfg.partition != "dirichlet" and len(alphas) > 1:
        raise ConfigError(f"alpha: sweeping alpha needs partition=dirichlet (the config has {cfg.partition})")
    cells = []
    for jr in join_ratios:
        for alpha in alphas:
            try:
                cells.append(RunConfig(**{**cfg.model_dump(), "alpha": alpha, "join_ratio": jr}))
            except ValidationError as err:
                raise ConfigError(format_validation_error(err)) from None
    return cells


def run_sweep(cfg: RunConfig, alphas: list[float], join_ratios: list[float], heads: list[HeadConfig],
              progress: bool = True) -> SweepResult:
    """Train every grid cell (``cfg.repeats`` seeds each) and run every head config on each FL run.

    Raises:
        ConfigError, DatasetNotFoundError, DatasetFormatError: before any run is created.
        Any error during the work: the interrupted runs end FAILED; finished ones stay.
    """
    from pfl import tracking
    from pfl.heads.run import fl_config, ood_pool, run_heads

    cells = grid(cfg, alphas, join_ratios)
    prepared = [prepare(cells[0])]
    prepared += [prepare(c, like=prepared[0]) for c in cells[1:]]  # one copy of the image pool
    firsts = [build_algorithm(p, p.cfg.seed) for p in prepared]
    by_setting = {hc.ood_dataset: hc for hc in heads}  # one OOD pool per setting, loaded and checked now
    pools = {name: ood_pool(hc, fl_config(cells[0].flat_params(), hc), prepared) for name, hc in by_setting.items()}
    params = {**cfg.flat_params(), "alpha": str(alphas), "join_ratio": str(join_ratios),
              "head_methods": ",".join(h.method for h in heads)}
    fl_ids, head_ids = [], []
    with tracking.launch_run(cfg.experiment, f"sweep-{cfg.algo}-{cfg.dataset}", params) as launch_id:
        for cell, first in zip(prepared, firsts):
            ids = train_repeats(cell, first, progress=progress)
            fl_ids += ids
            head_ids += [run_heads(fl_id, hc, progress=progress, like=cell, pools=pools) for fl_id in ids
                         for hc in heads]
    return SweepResult(launch_id, fl_ids, head_ids)
