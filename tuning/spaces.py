"""Search spaces: each algorithm's defaults (``Algorithm.search_space``), the shared ``lr``, YAML overrides.

A YAML space file maps config fields to ranges, e.g.::

    M: {type: int, low: 2, high: 10}
    epsilon: {type: float, low: 0.0, high: 0.3}
    lr: {type: float, low: 0.001, high: 0.05, log: true}

Entries replace (or add to) the algorithm's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pfl.algorithms import REGISTRY
from pfl.federated.base import SearchParam
from pfl.config import ConfigError, RunConfig

LR = SearchParam("float", 1e-3, 1e-1, log=True)  # shared option: SGD learning rate, log scale


def _searchable(algo: str | None) -> list[str]:
    """Run config fields and the hyperparameters of ``algo`` (``None``: of every algorithm)."""
    algos = [algo] if algo else list(REGISTRY)
    own = [f for a in algos for f in REGISTRY[a].Params.model_fields]
    return [f for f in RunConfig.model_fields if f != "hparams"] + own


def _param(name: str, spec: Any, where: str, algo: str | None = None) -> SearchParam:
    if name not in _searchable(algo):
        raise ConfigError(f"{where}: {name!r} is not a run config field or a hyperparameter of "
                          f"{algo or 'any algorithm'}; valid: {', '.join(_searchable(algo))}")
    if name == "tuning_val_ratio":
        raise ConfigError(f"{where}: tuning_val_ratio is fixed for a study (trials must score on the same "
                          "samples); remove it from the space and pass tuning_val_ratio=... to pfl tune")
    if not isinstance(spec, dict) or spec.get("type") not in ("int", "float") or not {"low", "high"} <= set(spec):
        raise ConfigError(f"{where}: {name} needs {{type: int|float, low: ..., high: ...[, log: true]}}, got {spec!r}")
    low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
    if not low <= high or (log and low <= 0):
        raise ConfigError(f"{where}: {name} needs low <= high (and low > 0 with log), got low={low}, high={high}")
    return SearchParam(spec["type"], low, high, log)


def load_space(path: str | Path, algo: str | None = None) -> dict[str, SearchParam]:
    """Read a YAML space file (module docstring); names are run fields or hyperparameters of ``algo``.

    Raises:
        ConfigError: missing file, unknown field, or a malformed range (names the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a search space is a mapping of field: {{type, low, high}}")
    return {name: _param(name, entry, str(path), algo) for name, entry in spec.items()}


def search_space(algo: str, tune_lr: bool = False, overrides: dict[str, SearchParam] | None = None
                 ) -> dict[str, SearchParam]:
    """The space searched for ``algo``: its defaults, ``lr`` if asked, then ``overrides``.

    Raises:
        ConfigError: the resulting space is empty (nothing to search).
    """
    space = dict(REGISTRY[algo].search_space)
    if tune_lr:
        space["lr"] = LR
    space.update(overrides or {})
    if not space:
        raise ConfigError(f"{algo} has no default search space; pass --tune-lr or --space FILE")
    return space


def suggest(trial: Any, space: dict[str, SearchParam], num_clients: int) -> dict[str, Any]:
    """Sample one value per entry from an Optuna trial (``suggest_int`` / ``suggest_float``)."""
    values = {}
    for name, p in space.items():
        low, high = p.bounds(num_clients)
        if p.kind == "int":
            values[name] = trial.suggest_int(name, int(low), int(high), log=p.log)
        else:
            values[name] = trial.suggest_float(name, float(low), float(high), log=p.log)
    return values
