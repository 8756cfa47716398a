"""Optuna studies in RDB storage, tracked as an MLflow study run with one nested run per trial.

Storage is ``sqlite:///optuna.db`` beside ``mlflow.db`` by default, or any SQLAlchemy URL
(e.g. a shared PostgreSQL database). Studies are created with ``load_if_exists``, so
rerunning the same command resumes the study, and several processes or machines
pointing at the same storage and study name work on it together (each logs its own
study run). A study is pinned to its tuning split (``tuning_val_ratio``) and its metric
(Optuna's metric names, so the dashboard shows ``val/acc`` rather than "Objective 0"); a
resumed study refuses others.

What Optuna keeps, for optuna-dashboard: each trial's MLflow run id (trial user attribute
``mlflow_run_id``); the study's MLflow runs, one per process that worked on it, oldest first
(study user attribute ``mlflow_study_run_ids``) and the base config of the latest
(``base_config``, the run's flat params).

What the study run logs: the best value under the metric's own name (``val/acc``, so the
collapsed runs table shows it), ``study/best_trial``, ``study/n_complete``, ``study/n_pruned``,
``study/n_failed``, ``best_params.json`` and ``best_<study>.yaml``, a config that ``pfl train
--config`` accepts. ``final_repeats`` retrains that config with that many seeds as FL runs nested
under the study run and logs their mean and std over seeds as
:func:`pfl.summary.seed_summary` names them in the cell ``final``: ``final/test_acc``,
``final/test_acc_seed_std``, ``final/best_test_acc``, ..., ``final/seeds``.

:func:`summary_lines` is what ``pfl tune`` prints at the end; :func:`dataset_fallback_note` the
note it prints first when ``--dataset`` comes without ``--config``.
"""

from __future__ import annotations

import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import yaml

from pfl.config import ConfigError, RunConfig
from pfl.locking import store_lock
from pfl.summary import seed_summary, summary_table, ui_hint
from pfl.train import build_algorithm, prepare, train_repeats
from tuning.objective import DIRECTIONS, Objective, trial_config, validation_metric
from tuning.spaces import SearchParam

DEFAULT_STORAGE = "sqlite:///optuna.db"


@dataclass(frozen=True)
class StudySettings:
    """How to search.

    Attributes:
        n_trials: trials this process runs (added to whatever the study holds).
        metric: validation metric (``val/acc`` is maximized; ``val/nll``, ``val/f_ece``, ``val/ece_mean``,
            ``val/global_ece``, ``val/brier`` minimized); the old spellings ``val_acc``, ``val_nll``,
            ``val_ece`` (F-ECE) and ``val_brier`` are accepted and stored as the new names.
        storage: Optuna storage URL.
        study_name: name in the storage (default from algorithm, dataset, partition, join ratio).
        pruner: ``median`` (MedianPruner) or ``none``.
        final_repeats: seeds to retrain the best config with (0: none).
        out_dir: where the best config YAML is written.
        progress: Optuna's progress bar over this process's trials (and the final repeats' round bars).
        register: register the final repeats' client models in the MLflow Model Registry as
            ``<study>-client_XXX`` (one version per seed), alias ``champion`` on the first seed's versions
            (:func:`register_finals`); nothing without final repeats.

    Raises:
        ConfigError: ``metric`` is not a validation metric (:func:`tuning.objective.validation_metric`).
    """

    n_trials: int = 20
    metric: str = "val/acc"
    storage: str = DEFAULT_STORAGE
    study_name: str | None = None
    pruner: str = "median"
    final_repeats: int = 0
    out_dir: Path = Path(".")
    progress: bool = True
    register: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "metric", validation_metric(self.metric))


@dataclass(frozen=True)
class StudyResult:
    """What a study command did: its MLflow run, the best trial, the written config and the final repeats.

    Attributes:
        best_run_id: the best trial's MLflow run (``None`` for a trial of a study older than the attribute).
        final_run_ids: the FL runs of the final repeats (empty without them).
        tracking_uri: the MLflow store of all of them.
        registered: ``(registered model name, version)`` of every registered client model (``--register``).
    """

    study_run_id: str
    study_name: str
    storage: str
    metric: str
    best_trial: int
    best_value: float
    best_params: dict
    best_run_id: str | None
    states: dict[str, int]
    best_config: Path
    tracking_uri: str
    final_run_ids: list[str]
    registered: list[tuple[str, str]] = field(default_factory=list)


def default_study_name(cfg: RunConfig) -> str:
    """``<algo>-<dataset>-<partition>-jr<join ratio>``: the study a command resumes unless named."""
    return f"{cfg.algo}-{cfg.dataset}-{cfg.partition}-jr{cfg.join_ratio}"


def dataset_fallback_note(config_path: str | Path | None, dataset: str | None, cfg: RunConfig) -> str | None:
    """The note ``pfl tune`` prints when ``--dataset`` is given without ``--config`` and no partition override:
    the run then uses the default partition (pathological, PFLlib's classes per client for that dataset).

    Returns:
        one line naming the partition used and how to choose another, or ``None`` when it does not apply.
    """
    if config_path or not dataset or {"partition", "classes_per_client"} & cfg.model_fields_set:
        return None
    return (f"note: --dataset {dataset} without --config uses the default partition: pathological, "
            f"{cfg.classes_per_client} classes per client; pass --config or e.g. "
            "partition=dirichlet alpha=0.1")


def open_study(settings: StudySettings, name: str, seed: int) -> optuna.Study:
    """Create or load (``load_if_exists``) the study; SQLite storages wait up to 60 s for locks held by other workers.

    A SQLite or PostgreSQL storage's schema is created under :func:`pfl.locking.store_lock` (a file lock; an
    advisory lock), so workers started together on a fresh database take turns instead of racing in
    ``create_all``. A new study's direction follows ``settings.metric`` (:data:`tuning.objective.DIRECTIONS`); a loaded one keeps its own.
    """
    kwargs = {"connect_args": {"timeout": 60}} if settings.storage.startswith("sqlite") else {}
    with store_lock(settings.storage):
        storage = optuna.storages.RDBStorage(settings.storage, engine_kwargs=kwargs)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2) if settings.pruner == "median" else \
        optuna.pruners.NopPruner()
    return optuna.create_study(storage=storage, study_name=name, direction=DIRECTIONS[settings.metric],
                               pruner=pruner, sampler=optuna.samplers.TPESampler(seed=seed), load_if_exists=True)


def _pin(study: optuna.Study, base: RunConfig, metric: str) -> None:
    """Record the tuning split and the metric on a new study; refuse a resumed study set up with others.

    Raises:
        ConfigError: another ``tuning_val_ratio`` or another metric (a study older than metric names: another
            direction) than the study's.
    """
    name = study.study_name
    fixed = study.user_attrs.get("tuning_val_ratio")
    if fixed is None:
        study.set_user_attr("tuning_val_ratio", base.tuning_val_ratio)
    elif fixed != base.tuning_val_ratio:
        raise ConfigError(f"tuning_val_ratio: study {name} scores every trial on tuning_val_ratio={fixed}, not "
                          f"{base.tuning_val_ratio}; pass tuning_val_ratio={fixed} or name a new study with --study")
    named = study.metric_names
    if named is None and study.direction.name.lower() == DIRECTIONS[metric]:
        with warnings.catch_warnings():  # set_metric_names is experimental (Optuna 3.2+)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])
    elif named != [metric]:
        was = named[0] if named else f"a metric to {study.direction.name.lower()}"
        raise ConfigError(f"metric: study {name} optimizes {was}, not {metric}; tune {was} or name a new study "
                          "with --study")


def _record_run(study: optuna.Study, storage: str, run_id: str, base: RunConfig) -> None:
    """Add ``run_id`` to the study's ``mlflow_study_run_ids`` and set its ``base_config``.

    The list is read and written under :func:`pfl.locking.store_lock`, so workers starting together on a SQLite
    or PostgreSQL storage keep every id (on other storages two workers starting in the same instant may keep one).
    """
    with store_lock(storage):
        study.set_user_attr("mlflow_study_run_ids", [*study.user_attrs.get("mlflow_study_run_ids", []), run_id])
    study.set_user_attr("base_config", base.flat_params())


def write_config(cfg: RunConfig, path: Path) -> Path:
    """Write ``cfg`` as a YAML run config (unset fields left out) that ``pfl train --config`` reads."""
    values = {k: v for k, v in cfg.flat_params().items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _final_repeats(best: RunConfig, repeats: int, progress: bool) -> list[str]:
    """Retrain ``best`` with ``repeats`` seeds as FL runs nested under the study run; log their seed summary
    (``final/test_acc``, ``final/test_acc_seed_std``, ...) to it and return their ids."""
    from pfl import tracking

    cfg = RunConfig(**{**best.model_dump(), "repeats": repeats})
    prepared = prepare(cfg)
    ids = train_repeats(prepared, build_algorithm(prepared, cfg.seed), progress=progress)
    tracking.log_metrics(seed_summary([tracking.run_metrics(i) for i in ids], cell="final"))
    return ids


def run_study(base: RunConfig, space: dict[str, SearchParam], settings: StudySettings) -> StudyResult:
    """Run ``settings.n_trials`` trials on the (new or resumed) study, then log and write the best config.

    Raises:
        ConfigError: the study was started with another ``tuning_val_ratio`` or metric (before any trial).
        ValueError: the study holds no completed trial after this process's trials.
    """
    from pfl import tracking

    name = settings.study_name or default_study_name(base)
    study = open_study(settings, name, base.seed)
    _pin(study, base, settings.metric)
    params = {**base.flat_params(), "study_name": name, "storage": settings.storage, "metric": settings.metric,
              "n_trials": settings.n_trials, "pruner": settings.pruner,
              "space": {k: [p.kind, *p.bounds(base.num_clients), p.log] for k, p in space.items()}}
    with tracking.launch_run(base.experiment, f"study-{name}", params, kind="study") as run_id:
        _record_run(study, settings.storage, run_id, base)
        study.optimize(Objective(base, space, settings.metric), n_trials=settings.n_trials, catch=(Exception,),
                       show_progress_bar=settings.progress)
        states = {s.name.lower(): len(study.get_trials(states=(s,))) for s in
                  (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)}
        if states["complete"] == 0:
            raise ValueError(f"study {name} has no completed trial ({states}); run more trials or relax pruning")
        best = study.best_trial
        best_cfg = trial_config(base, best.params)
        path = write_config(best_cfg, settings.out_dir / f"best_{name}.yaml")
        tracking.log_metrics({settings.metric: study.best_value, "study/best_trial": best.number,
                              **{f"study/n_{k}": v for k, v in states.items()}})
        tracking.log_json(best.params, "best_params.json")
        tracking.log_file(path)
        finals = _final_repeats(best_cfg, settings.final_repeats, settings.progress) if settings.final_repeats else []
    registered = register_finals(name, finals) if settings.register else []
    result = StudyResult(run_id, name, settings.storage, settings.metric, best.number, study.best_value, best.params,
                         best.user_attrs.get("mlflow_run_id"), states, path, tracking.tracking_uri(), finals,
                         registered)
    tracking.set_description(run_id, "```\n" + "\n".join(summary_lines(result)) + "\n```")  # the printed summary
    return result


def register_finals(study_name: str, final_run_ids: list[str]) -> list[tuple[str, str]]:
    """Register every client model of the final repeats as ``<study>-client_XXX``, one version per seed in seed
    order, with alias ``champion`` on the first seed's (the best config as found; no seed is picked on test data).

    Returns:
        ``(registered model name, version)`` per client and seed.
    """
    from pfl import tracking

    return [version for k, run_id in enumerate(final_run_ids)
            for version in tracking.register_client_models(run_id, None, study_name, "champion" if k == 0 else None)]


def summary_lines(result: StudyResult) -> list[str]:
    """The lines ``pfl tune`` prints at the end: the trials, the best trial (value, params, MLflow run), the best
    config, the final repeats' table (:func:`pfl.summary.summary_table`, read from the tracking store) when they
    ran, and the next commands: train the best config, open the Optuna dashboard and the MLflow UI."""
    from pfl import tracking

    trials = ", ".join(f"{n} {state}" for state, n in result.states.items())
    run = f" (MLflow run {result.best_run_id})" if result.best_run_id else ""
    lines = [f"study {result.study_name} in {result.storage}: {trials} (study run {result.study_run_id})",
             f"best trial {result.best_trial}: {result.metric} = {result.best_value:.4f}{run}",
             f"best params: {result.best_params}", f"best config: {result.best_config}"]
    if result.final_run_ids:
        lines += [f"final repeats of the best config ({len(result.final_run_ids)} seeds, test split):",
                  *summary_table([tracking.run_summary(i) for i in result.final_run_ids]).splitlines()]
    if result.registered:
        names = sorted({name for name, _ in result.registered})
        lines.append(f"registered {len(result.registered)} client models: {names[0]} .. {names[-1]} "
                     f"(models:/{names[0]}@champion)")
    ui = ui_hint(result.tracking_uri)
    return [*lines, "next:", f"  pfl train --config {shlex.quote(str(result.best_config))}",
            f"  optuna-dashboard {shlex.quote(result.storage)}", f"  {ui}"]
