"""Everything pfl writes to or reads from MLflow; the only module that imports mlflow.

Run hierarchy: a *launch* run (one per command) holds one nested *FL run* per seed
(repeats); head runs (APH, LoRAPH) nest under the FL run whose client models they
read. An FL run carries flat searchable params, per-round metrics with
``step=round``, the partition's label counts, per-client test metrics, and every
client's personalized model as an MLflow Model directory ``clients/client_XXX/`` (a ``pyfunc`` flavor logged
from code, :mod:`pfl.pyfunc`; its weights ``artifacts/model.safetensors`` carry the client's own architecture,
the :class:`~pfl.models.ModelSpec`, as JSON in the file's metadata; a run may mix architectures), so
:func:`load_client_model` and ``mlflow.pyfunc.load_model("runs:/<run id>/clients/client_003")`` rebuild a
client's model from the run id and client id alone. Runs logged before MLflow models hold
``clients/client_XXX.safetensors``, which :func:`load_client_model` still reads. Head runs log their ensembles
the same way (``heads/client_XXX/``). :func:`register_client_models` puts client models in the Model Registry.

The tracking store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///mlflow.db``
in the working directory.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from pfl.federated.checkpoint import CHECKPOINT_FILE, STATES_DIR
from pfl.federated.engine import Callback, Evaluation, RunInterrupted
from pfl.federated.state import State
from pfl.config import ConfigError
from pfl.models import ModelSpec, SplitModel, build_model
from pfl.vocabulary import QUALITY, best_name, headline_score

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
CLIENT_DIR = "clients"
CHECKPOINT_DIR = "checkpoint"  # an FL run's logged checkpoint (while it can resume, or with keep_checkpoint=true)
HEADS_DIR = "heads"
BACKBONE_FILE = "server/backbone.safetensors"  # the frozen entries every client shares (FedLoRA)
MODEL_SPEC_FILE = "model.json"  # runs before per-client specs: one architecture for the whole run
# safetensors metadata key of a client file: JSON {"client_id": ..., "model_spec": {...}}. One key, because
# safetensors writes metadata in hash-map order, which differs between processes: one key keeps files byte-identical
CLIENT_METADATA = "pfl_client"
MODEL_WEIGHTS = "model.safetensors"  # a client's weights in its MLflow model directory (artifacts/model.safetensors)
MEMBERS_FILE = "members.safetensors"  # a head ensemble's members in its MLflow model directory
PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")  # the models-from-code file of every client model


def _open_database_store(uri: str) -> None:
    """First contact with a SQLite or PostgreSQL store, holding its lock (:func:`pfl.locking.store_lock`: a file
    lock; an advisory lock); other stores (an MLflow server) are left alone.

    That contact creates or migrates the schema (and the Default experiment); MLflow's migrations
    crash when two processes run them at once (``table latest_metrics already exists``). MLflow
    caches the store per URI, so later calls in this process do not migrate again.
    """
    from pfl.locking import is_postgresql, sqlite_path, store_lock

    path = sqlite_path(uri)
    if path is None and not is_postgresql(uri):
        return
    if path is not None:
        try:  # MLflow creates a missing folder itself, but only after the lock file would have needed it
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # the store reports it
    with store_lock(uri):
        mlflow.MlflowClient(uri).search_experiments(max_results=1)


def configure_tracking(uri: str | None = None, must_exist: bool = False) -> str:
    """Point MLflow at ``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``; returns the URI used.

    A SQLite or PostgreSQL store is opened (created or migrated) right away, one process at a time, so that
    several ``pfl`` commands started together on a fresh store all work. ``must_exist``: commands that
    read runs (``pfl heads``, ``report``, ``runs``) refuse a SQLite store whose file does not exist
    instead of creating an empty one.

    Raises:
        ConfigError: the store cannot be opened (e.g. an unwritable path), or ``must_exist`` and its file is
            missing; before any data loads.
    """
    from pfl.locking import sqlite_path

    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    path = sqlite_path(uri)
    if must_exist and path is not None and not path.is_file():
        raise ConfigError(f"tracking store {uri}: no such store ({path.resolve()} does not exist); pass the store "
                          "the runs are in with --tracking-uri (or MLFLOW_TRACKING_URI), or run from its folder")
    mlflow.set_tracking_uri(uri)
    # one download bar per client model would bury pfl's own progress bar
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # schema creation chatter on stderr; "Validating input example" and registration lines per client model
    for name in ("mlflow.store.db.utils", "mlflow.tracking.fluent", "mlflow.pyfunc", "mlflow.models.model"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        _open_database_store(uri)
    except Exception as err:  # MLflow's and SQLAlchemy's errors for unusable stores vary
        detail = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise ConfigError(f"tracking store {uri}: cannot open it ({detail}); pass a writable --tracking-uri or "
                          "set MLFLOW_TRACKING_URI (e.g. sqlite:///mlflow.db)") from None
    return uri


def tracking_uri() -> str:
    """The tracking URI in use (for the loading snippets of run descriptions and summaries)."""
    return mlflow.get_tracking_uri()


def _log_missing_params(run: mlflow.ActiveRun, params: dict[str, Any]) -> None:
    """Log the params a (possibly resumed) run does not have yet; MLflow refuses to change logged ones."""
    mlflow.log_params({k: v for k, v in params.items() if k not in run.data.params})


def _status_of(exc: BaseException | None) -> str:
    """MLflow status a run ends with: FINISHED, KILLED (a stop signal: :class:`RunInterrupted`, Ctrl-C) or FAILED."""
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, (RunInterrupted, KeyboardInterrupt)) else "FAILED"


@contextmanager
def _ended(run: mlflow.ActiveRun) -> Iterator[str]:
    """Yield the run's id and end that run (not whichever is active) with :func:`_status_of` the outcome."""
    try:
        yield run.info.run_id
    except BaseException as exc:
        mlflow.end_run(_status_of(exc))
        raise
    mlflow.end_run("FINISHED")


def process_tags() -> dict[str, str]:
    """``pfl.host`` and ``pfl.pid`` of this process, so a run whose process died can be recognized as stale."""
    return {"pfl.host": socket.gethostname(), "pfl.pid": str(os.getpid())}


@contextmanager
def launch_run(experiment: str, name: str, params: dict[str, Any], kind: str = "launch",
               tags: dict[str, str] | None = None) -> Iterator[str]:
    """Start a top-level run (a launch run, or ``kind="report"``) with extra ``tags``; yields its id.

    An exception marks it FAILED, a stop signal KILLED. When ``MLFLOW_RUN_ID`` is set
    (``mlflow run`` started the run and logged its entry-point parameters, which MLflow does
    not let us change), that run is resumed and only the params it lacks are added; ``params``
    are always saved as ``config.json``.
    """
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(experiment)
    run = mlflow.start_run(run_name=name, tags={"pfl.kind": kind, **process_tags()})
    with _ended(run) as run_id:
        mlflow.set_tags({"pfl.kind": kind, **process_tags(), **(tags or {})})  # start_run ignores tags on a resume
        _log_missing_params(run, params)
        mlflow.log_dict(params, "config.json")
        yield run_id


@contextmanager
def fl_run(name: str, params: dict[str, Any], parent_run_id: str | None = None) -> Iterator[str]:
    """Start an FL run nested under the active launch run; yields its run id (FAILED on exception, KILLED on a
    stop signal). Tagged with this process's host and pid (:func:`process_tags`).

    Args:
        parent_run_id: the launch run to nest under, in that run's experiment, for a process where it is not the
            active run (a sweep cell's Ray task, :mod:`pfl.distributed`); ``None``: the active run.
    """
    experiment = mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id if parent_run_id else None
    run = mlflow.start_run(run_name=name, nested=True, parent_run_id=parent_run_id, experiment_id=experiment,
                           tags={"pfl.kind": "fl", **process_tags()})
    with _ended(run) as run_id:
        mlflow.log_params(params)
        yield run_id


@contextmanager
def reopened_run(run_id: str) -> Iterator[str]:
    """Continue run ``run_id`` (same id, RUNNING again, nested when a run is active, tagged with this process's
    host and pid, so that it does not read as stale); yields its id and ends it as :func:`fl_run` does."""
    run = mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
    with _ended(run) as rid:
        mlflow.set_tags(process_tags())
        yield rid


def log_json(obj: Any, artifact_file: str) -> None:
    """Write a JSON-serializable object as an artifact of the active run."""
    mlflow.log_dict(obj, artifact_file)


def _is_quality(name: str) -> bool:
    """``test/<metric>`` or ``val/<metric>`` of :data:`pfl.vocabulary.QUALITY`, also per architecture
    (``test/acc_vgg11``); not the ``_std`` spreads."""
    group, _, metric = name.partition("/")
    return group in ("test", "val") and metric.startswith(QUALITY) and not metric.endswith("_std")


def best_metrics(best: Evaluation) -> dict[str, float]:
    """``best/<split>_<metric>`` and ``best/round`` of the evaluation with the best headline (the highest accuracy, the
    lowest regression error: :func:`pfl.vocabulary.headline_score`).

    PFLlib reports the best round's accuracy (``max(rs_test_acc)``), so runs log it beside
    the final metrics: ``best/test_acc`` and the other quality metrics of that same round
    (``best/test_nll``, ``best/test_f_ece``, ...; per architecture in a mixed run,
    ``best/test_acc_vgg11``, ...), and ``best/round``.
    """
    quality = {best_name(k): v for k, v in best.metrics.items() if _is_quality(k)}
    return {**quality, "best/round": float(best.round)}


def _score(evaluation: Evaluation) -> float:
    return headline_score(evaluation.metrics)


class MLflowCallback(Callback):
    """Logs round metrics and evaluations of the active run with ``step=round``; at the end, the per-client
    metrics and the best round's metrics (:func:`best_metrics`; the earliest round on ties).

    Args:
        logged: metric name -> last step already in the store (a resumed run re-running a round that was
            partly logged before the interruption logs nothing twice).
    """

    def __init__(self, logged: dict[str, int] | None = None):
        self.best: Evaluation | None = None
        self.logged = logged or {}

    def _log(self, metrics: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in metrics.items() if step > self.logged.get(k, 0)}
        if fresh:
            mlflow.log_metrics(fresh, step=step)

    def on_round_end(self, rnd: int, metrics: dict[str, float]) -> None:
        self._log(metrics, rnd)

    def on_evaluate(self, evaluation: Evaluation) -> None:
        self._log(evaluation.metrics, evaluation.round)
        if self.best is None or _score(evaluation) > _score(self.best):
            self.best = evaluation

    def on_run_end(self, final: Evaluation) -> None:
        log_json({"round": final.round, "clients": final.per_client}, "client_metrics.json")
        log_csv(final.per_client, "client_metrics.csv")
        mlflow.log_metrics(best_metrics(self.best))

    def state_dict(self) -> dict:
        return {"best": None if self.best is None else {"round": self.best.round, "metrics": self.best.metrics}}

    def load_state_dict(self, state: dict) -> None:
        best = state.get("best")
        self.best = None if best is None else Evaluation(best["round"], best["metrics"])


def parent_run_id(run_id: str) -> str | None:
    """The id of a run's parent (an FL run's launch run)."""
    return mlflow.MlflowClient().get_run(run_id).data.tags.get("mlflow.parentRunId")


def logged_steps(run_id: str) -> dict[str, int]:
    """Metric name -> the last step a run logged it at."""
    client = mlflow.MlflowClient()
    return {k: max(m.step for m in client.get_metric_history(run_id, k)) for k in client.get_run(run_id).data.metrics}


def _client_name(client_id: int) -> str:
    return f"client_{client_id:03d}"


@functools.cache
def _requirements() -> tuple[str, ...]:
    """The pip requirements written beside every client model: pfl and what its model code imports."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for package in ("pfl", "torch", "mlflow", "safetensors", "numpy", "timm", "peft"):
        try:
            reqs.append(f"{package}=={version(package).split('+')[0]}")  # torch's local tag (+cpu) is this build's
        except PackageNotFoundError:
            pass
    return tuple(reqs)


def _signature(spec: ModelSpec, example: np.ndarray, output: str) -> mlflow.models.ModelSignature:
    """Input: ``example``'s dtype and shape per sample (uint8 images (-1, C, H, W) at the stored size; float32
    sequences (-1, T, F)); output: float32 (-1, K) probabilities, (-1, D) regression values (a viewport predictor's
    positions), or (-1, D) embeddings for a self-supervised model. Marked as checked by the model (MLmodel
    ``is_signature_from_type_hint: true``): MLflow then passes inputs to :mod:`pfl.pyfunc` as given, which checks
    them itself, instead of casting a JSON payload to uint8 (see :func:`pfl.pyfunc.as_images`)."""
    from mlflow.types.schema import Schema, TensorSpec

    width = spec.num_classes if output in ("probabilities", "values") else -1
    signature = mlflow.models.ModelSignature(Schema([TensorSpec(example.dtype, (-1, *example.shape[1:]))]),
                                             Schema([TensorSpec(np.dtype(np.float32), (-1, width))]))
    signature._is_signature_from_type_hint = True
    return signature


def save_mlflow_model(folder: Path, spec: ModelSpec, example: np.ndarray, artifacts: dict[str, str],
                      config: dict[str, Any]) -> None:
    """Write an MLflow Model directory ``folder`` of a client model (:class:`pfl.pyfunc.ClientModel`), from code.

    Args:
        spec: the client's architecture (the signature's class count).
        example: samples (n, ...) as stored (uint8 images (n, C, H, W), float32 sequences (n, T, F)): the input
            example and the signature's input dtype and shape.
        artifacts: files copied into the directory's ``artifacts/`` (``weights``, ``members``).
        config: the model config (``output``, ``backbone``, ``base``: :mod:`pfl.pyfunc`).
    """
    import warnings

    with warnings.catch_warnings():  # MLflow warns about the example's integer columns and missing types
        warnings.simplefilter("ignore")
        mlflow.pyfunc.save_model(str(folder), python_model=str(PYFUNC_CODE), artifacts=artifacts,
                                 model_config=config, signature=_signature(spec, example, config["output"]),
                                 input_example=example, pip_requirements=list(_requirements()))


def log_client_models(specs: list[ModelSpec], state_of: Callable[[int], State], backbone: State | None = None,
                      example_of: Callable[[int], torch.Tensor] | None = None, output: str = "probabilities",
                      client_ids: list[int] | None = None) -> None:
    """Save every client's personalized model as an MLflow Model directory ``clients/client_XXX/``.

    Each holds the ``pyfunc`` flavor from code (:mod:`pfl.pyfunc`), the signature (uint8 images (-1, C, H, W) ->
    float32 probabilities (-1, K); float32 sequences (-1, T, F) -> float32 values (-1, D)), an input example, and ``artifacts/model.safetensors``: the client's named
    state with its architecture in the file's metadata. Nothing is pickled.

    Args:
        specs: each client's architecture, stored in its file's metadata.
        state_of: client id -> its named state (fetched one client at a time).
        backbone: entries every client shares (FedLoRA's frozen backbone), logged once as
            ``server/backbone.safetensors``; each client file then holds only its other entries and names the
            backbone file in its metadata (:func:`load_client_state` joins them), the model config its URI.
        example_of: client id -> samples (n, ...) as the dataset stores them (the input example: a test sample of
            the client); ``None``: one zero sample of the model's input shape (images: uint8).
        output: what ``predict`` returns (:mod:`pfl.pyfunc`): ``probabilities`` (a classifier), ``values`` (a
            regression's outputs), or ``embeddings`` (self-supervised).
        client_ids: the clients to save (``None``: all; a run with new-client evaluation saves its training
            clients, the held-out ones having no model of their own).
    """
    shared = {}
    config: dict[str, Any] = {"output": output}
    if backbone:
        log_state(backbone, BACKBONE_FILE)
        shared = {"backbone": BACKBONE_FILE}
        config["backbone"] = f"runs:/{mlflow.active_run().info.run_id}/{BACKBONE_FILE}"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / CLIENT_DIR
        ids = list(range(len(specs))) if client_ids is None else client_ids
        for cid in ids:
            spec = specs[cid]
            state = {k: v.detach().cpu().contiguous() for k, v in state_of(cid).items() if k not in (backbone or {})}
            meta = {"client_id": cid, "model_spec": spec.to_dict(), **shared}
            weights = Path(tmp) / "weights" / _client_name(cid) / MODEL_WEIGHTS
            weights.parent.mkdir(parents=True)
            save_file(state, weights, metadata={CLIENT_METADATA: json.dumps(meta)})
            example = example_of(cid) if example_of else \
                torch.zeros(1, *spec.sample_shape, dtype=torch.float32 if spec.input_shape else torch.uint8)
            save_mlflow_model(folder / _client_name(cid), spec, example.cpu().numpy(), {"weights": str(weights)},
                              config)
        mlflow.log_artifacts(str(folder), CLIENT_DIR)
    _show_models_column([f"{CLIENT_DIR}/{_client_name(cid)}" for cid in ids])


def _show_models_column(paths: list[str]) -> None:
    """List the run's MLflow models (artifact paths) in the MLflow UI's "Models" column: its tag
    ``mlflow.log-model.history``, which ``mlflow.<flavor>.log_model`` sets, holding as many leading paths as fit in
    a tag value (8,000 characters: about 50 clients; the rest are in the artifact tree all the same)."""
    from datetime import datetime, timezone

    run = mlflow.active_run().info
    created = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")
    entries = []
    for path in paths:
        entry = {"run_id": run.run_id, "artifact_path": path, "utc_time_created": created,
                 "flavors": {"python_function": {"loader_module": "mlflow.pyfunc.loaders.code_model"}}}
        if len(json.dumps([*entries, entry])) > 8000:
            break
        entries.append(entry)
    mlflow.set_tag("mlflow.log-model.history", json.dumps(entries))


def client_weights_path(run_id: str, client_id: int) -> str:
    """Where client ``client_id``'s weights are among run ``run_id``'s artifacts: ``clients/client_XXX/artifacts/
    model.safetensors`` (an MLflow model), or ``clients/client_XXX.safetensors`` (runs logged before).

    Raises:
        FileNotFoundError: the run has no saved model for that client (the message lists the clients it has).
    """
    names = {Path(a.path).name for a in mlflow.MlflowClient().list_artifacts(run_id, CLIENT_DIR)}
    name = _client_name(client_id)
    if name in names:
        return f"{CLIENT_DIR}/{name}/artifacts/{MODEL_WEIGHTS}"
    if f"{name}.safetensors" in names:
        return f"{CLIENT_DIR}/{name}.safetensors"
    have = sorted(int(n[7:10]) for n in names if n.startswith("client_"))
    raise FileNotFoundError(f"run {run_id} has no model for client {client_id}; saved clients: {have}")


def _client_number(client_id: int | str) -> int:
    """A client id as an int (``"3"`` is accepted).

    Raises:
        FLRunError: not a non-negative whole number.
    """
    if isinstance(client_id, str) and client_id.strip().isdigit():
        return int(client_id)
    if isinstance(client_id, bool) or not isinstance(client_id, int) or client_id < 0:
        raise FLRunError(f"client_id {client_id!r}: pass a client number (0, 1, ...)")
    return client_id


def load_client_state(run_id: str, client_id: int) -> tuple[ModelSpec, State]:
    """Client ``client_id``'s architecture and complete named state (on the host) from an FL run's artifacts.

    The architecture comes from the client file's metadata (runs saved before per-client architectures:
    the run's ``model.json``), the weights from ``clients/client_XXX.safetensors``, joined with the
    run's ``server/backbone.safetensors`` when the file names one (FedLoRA). Uses the current tracking URI.

    Raises:
        FLRunError: an unknown run id (in this store), or a client id that is not a number.
        FileNotFoundError: the run has no saved model for that client (the message lists the clients it has).
    """
    client_id = _client_number(client_id)
    _fl_run(run_id, check_kind=False)  # an unknown id is a one-line error; any run holding client files loads
    wanted = client_weights_path(run_id, client_id)
    with tempfile.TemporaryDirectory() as tmp:
        def download(path: str) -> str:
            return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp)

        weights = download(wanted)
        meta = client_file_metadata(weights)
        # runs saved before per-client architectures: one model.json for the run
        spec = meta["model_spec"] if meta else json.loads(Path(download(MODEL_SPEC_FILE)).read_text())
        state = load_file(download(meta["backbone"])) if "backbone" in meta else {}
        state.update(load_file(weights))
    return ModelSpec.from_dict(spec), state


def client_file_metadata(path: str) -> dict[str, Any]:
    """A client file's metadata: ``client_id``, ``model_spec``, ``backbone`` (``{}`` for the oldest runs' files)."""
    with safe_open(path, framework="pt") as f:
        entry = (f.metadata() or {}).get(CLIENT_METADATA)
    return json.loads(entry) if entry is not None else {}


def read_client_file(path: str) -> tuple[ModelSpec, State]:
    """The architecture and tensors of a client file (its own entries: without a shared backbone).

    Raises:
        KeyError: the file has no ``model_spec`` in its metadata (runs older than per-client architectures).
    """
    return ModelSpec.from_dict(client_file_metadata(path)["model_spec"]), load_file(path)


def load_client_model(run_id: str, client_id: int, map_location: str = "cpu") -> SplitModel:
    """Rebuild client ``client_id``'s personalized model from an FL run's artifacts (:func:`load_client_state`):
    only the run id and the client id are needed.

    Returns:
        the model in eval mode on ``map_location``.

    Raises:
        FLRunError: an unknown run id (in this store), or a client id that is not a number.
        FileNotFoundError: the run has no saved model for that client (the message lists
            the clients it has).
    """
    spec, state = load_client_state(run_id, client_id)
    model = build_model(spec)
    model.load_state_dict(state)
    return model.to(map_location).eval()


class FLRunError(ConfigError):
    """An FL run id that cannot be used: unknown, not an FL run, or without client models."""


@dataclass(frozen=True)
class FLRunInputs:
    """What a head run needs from an FL run.

    Attributes:
        config: the run configuration (the FL run's ``config.json``, or its launch run's for older runs).
        params: the FL run's params (``seed``, ``dataset_fingerprint``, ``partition_key``, ...).
        experiment_id: where the FL run lives (head runs go to the same experiment).
        num_clients: clients with a saved model (all but those held out for new-client evaluation).
        name: the FL run's name.
    """

    config: dict[str, Any]
    params: dict[str, str]
    experiment_id: str
    num_clients: int
    name: str


def _fl_run(run_id: str, check_kind: bool = True) -> mlflow.entities.Run:
    """The FL run ``run_id`` (``check_kind=False``: any run, e.g. one logged by hand).

    Raises:
        FLRunError: unknown run id (in this store), or a run that is not an FL run (e.g. the launch run).
    """
    if not isinstance(run_id, str) or not run_id.strip():
        raise FLRunError(f"run id {run_id!r}: pass the id of an FL run (shown by `pfl train` as 'FL run: ...')")
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise FLRunError(f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}; pass the id of "
                         "an FL run (shown by `pfl train` as 'FL run: ...'), and --tracking-uri if it lives "
                         "elsewhere") from None
    if check_kind and run.data.tags.get("pfl.kind") != "fl":
        raise FLRunError(f"run {run_id} is not an FL run (pfl.kind={run.data.tags.get('pfl.kind')!r}); pass one "
                         "of the nested FL runs of a launch run (named <algo>-<dataset>-<partition>-jr<join "
                         "ratio>-s<seed>, e.g. fedfomo-cifar10-dir0.1-jr0.2-s0)")
    return run


def _run_config(run: mlflow.entities.Run) -> dict[str, Any]:
    """An FL run's ``config.json`` (older FL runs: their launch run's)."""
    own = any(a.path == "config.json" for a in mlflow.MlflowClient().list_artifacts(run.info.run_id))
    source = run.info.run_id if own else run.data.tags.get("mlflow.parentRunId")
    return mlflow.artifacts.load_dict(f"runs:/{source}/config.json")


def fl_run_config(run_id: str) -> dict[str, Any]:
    """The config of FL run ``run_id`` (its ``config.json``).

    Raises:
        FLRunError: unknown run id, or not an FL run.
    """
    return _run_config(_fl_run(run_id))


def _trained_clients(params: dict[str, str]) -> int:
    """How many clients of an FL run trained and have a model: ``num_clients`` less the ``new_clients`` held out."""
    return int(params["num_clients"]) - int(params.get("new_clients", 0))


def fl_run_inputs(run_id: str) -> FLRunInputs:
    """Check that ``run_id`` is a finished FL run with every client's model and read its config.

    Raises:
        FLRunError: unknown run id, a run that is not an FL run (e.g. the launch run), or an
            FL run without the models of all its clients; the message says what to pass instead.
    """
    run = _fl_run(run_id)
    expected = _trained_clients(run.data.params)
    saved = [a for a in mlflow.MlflowClient().list_artifacts(run_id, CLIENT_DIR)
             if Path(a.path).name.startswith("client_")]
    if len(saved) != expected:
        raise FLRunError(f"FL run {run_id} holds {len(saved)} of its {expected} client models (status "
                         f"{run.info.status}); rerun training, which saves them when it finishes")
    return FLRunInputs(_run_config(run), dict(run.data.params), run.info.experiment_id, expected, run.info.run_name)


def process_alive(run: mlflow.entities.Run) -> bool | None:
    """Whether the process that ran ``run`` (its ``pfl.host`` / ``pfl.pid`` tags) still exists: ``None`` when
    it ran on another host or has no such tags (cannot tell from here)."""
    tags = run.data.tags
    if tags.get("pfl.host") != socket.gethostname() or "pfl.pid" not in tags:
        return None
    try:
        os.kill(int(tags["pfl.pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def resumable_fl_run(run_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Check that FL run ``run_id`` can be resumed; returns its config and params.

    Raises:
        FLRunError: unknown or not an FL run; FINISHED (nothing to resume); RUNNING in a process that is
            still alive on this host (stop it first).
    """
    run = _fl_run(run_id)
    status = run.info.status
    if status == "FINISHED":
        raise FLRunError(f"FL run {run_id} is FINISHED; there is nothing to resume")
    if status == "RUNNING" and process_alive(run):
        raise FLRunError(f"FL run {run_id} is still running (pid {run.data.tags['pfl.pid']} on this host); stop "
                         f"it first (kill -TERM {run.data.tags['pfl.pid']}), then resume")
    return _run_config(run), dict(run.data.params)


def log_checkpoint(path: Path) -> None:
    """Log the checkpoint whose manifest is ``path`` (:mod:`pfl.federated.checkpoint`: the manifest and its
    ``states/``) as the active run's ``checkpoint/``, in place of one logged before."""
    run_id = mlflow.active_run().info.run_id
    delete_logged_checkpoint(run_id)
    mlflow.log_artifact(str(path), CHECKPOINT_DIR)
    mlflow.log_artifacts(str(path.parent / STATES_DIR), f"{CHECKPOINT_DIR}/{STATES_DIR}")


def download_checkpoint(run_id: str, dst: Path) -> Path | None:
    """The run's logged checkpoint downloaded into ``dst``: its manifest's path; ``None`` when it has none."""
    logged = mlflow.MlflowClient().list_artifacts(run_id, CHECKPOINT_DIR)
    if not any(Path(a.path).name == CHECKPOINT_FILE for a in logged):
        return None
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_DIR, dst_path=str(dst))
    return Path(folder) / CHECKPOINT_FILE


def delete_logged_checkpoint(run_id: str) -> None:
    """Delete run ``run_id``'s logged ``checkpoint/`` (nothing when it has none).

    An artifact store that cannot delete (some cloud stores) leaves it; a one-line warning on stderr says where.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client = mlflow.MlflowClient()
    if not client.list_artifacts(run_id, CHECKPOINT_DIR):
        return
    uri = client.get_run(run_id).info.artifact_uri
    try:
        get_artifact_repository(uri).delete_artifacts(CHECKPOINT_DIR)
    except (NotImplementedError, mlflow.exceptions.MlflowException):
        pass  # reported below
    if client.list_artifacts(run_id, CHECKPOINT_DIR):
        print(f"pfl: warning: the artifact store cannot delete run {run_id}'s checkpoint; delete "
              f"{uri}/{CHECKPOINT_DIR} by hand", file=sys.stderr)


def fl_runs_by_seed(launch_run_id: str) -> dict[int, str]:
    """Seed -> id of each FL run nested under launch run ``launch_run_id``."""
    client = mlflow.MlflowClient()
    launch = client.get_run(launch_run_id)
    runs = client.search_runs([launch.info.experiment_id], f"tags.`mlflow.parentRunId` = '{launch_run_id}' AND "
                              "tags.`pfl.kind` = 'fl'", max_results=50000)
    return {int(r.data.params["seed"]): r.info.run_id for r in runs}


def is_train_launch(run_id: str, fl_config: dict[str, Any]) -> bool:
    """Whether ``run_id`` is the launch run of a ``pfl train`` command whose FL runs have config ``fl_config``: a
    launch run whose ``config.json`` is theirs (a sweep's launch run logs its grid; a study's run is kind study)."""
    run = mlflow.MlflowClient().get_run(run_id)
    return run.data.tags.get("pfl.kind") == "launch" and _run_config(run) == fl_config


def stale_runs() -> list[tuple[mlflow.entities.Run, bool | None]]:
    """RUNNING launch and FL runs of every experiment with whether their process is alive (:func:`process_alive`)."""
    client = mlflow.MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=50000) if ids else []
    return [(r, process_alive(r)) for r in runs if r.data.tags.get("pfl.kind") in ("launch", "fl")]


def mark_failed(run_id: str) -> None:
    """End a (stale) run with status FAILED."""
    mlflow.MlflowClient().set_terminated(run_id, "FAILED")


@contextmanager
def head_run(fl_run_id: str, experiment_id: str, name: str, params: dict[str, Any]) -> Iterator[str]:
    """Start a head run nested under FL run ``fl_run_id``; yields its id (FAILED on exception).

    Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) that run is resumed and tagged as the FL run's child.
    """
    resumed = bool(os.environ.get("MLFLOW_RUN_ID"))
    tags = {"mlflow.parentRunId": fl_run_id, "pfl.kind": "heads"}
    nested = mlflow.active_run() is not None  # inside a sweep's launch run
    with mlflow.start_run(run_name=name, tags=tags, experiment_id=None if resumed or nested else experiment_id,
                          nested=nested) as run:
        mlflow.set_tags(tags)  # the FL run is the parent, also when nested under a sweep
        _log_missing_params(run, params)
        yield run.info.run_id


def log_state(state: State, artifact_file: str) -> None:
    """Save a named state as a safetensors artifact ``artifact_file`` (e.g. ``server/generator.safetensors``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, path)
        mlflow.log_artifact(str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None)


def log_member_heads(client_id: int, members: nn.Module, lrs: torch.Tensor, fl_run_id: str, spec: ModelSpec,
                     example: torch.Tensor) -> None:
    """Save one client's head ensemble as an MLflow Model directory ``heads/client_XXX/`` of the active head run.

    Its ``artifacts/members.safetensors`` holds the trained members (stacked tensors) and their
    ``learning_rates``; its model config names the FL run's client file, whose base computes the features
    (:mod:`pfl.pyfunc`), so ``mlflow.pyfunc.load_model("runs:/<head run id>/heads/client_003")`` predicts the
    ensemble's mean probabilities (N, K).

    Args:
        spec: the client's architecture; example: uint8 images (n, C, H, W) as stored (the input example).
    """
    state = {k: v.detach().cpu().contiguous() for k, v in members.state_dict().items()}
    state["learning_rates"] = lrs.detach().cpu().contiguous()
    config = {"output": "probabilities", "base": f"runs:/{fl_run_id}/{client_weights_path(fl_run_id, client_id)}",
              **_shared_backbone(fl_run_id)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MEMBERS_FILE
        save_file(state, path, metadata={"client_id": str(client_id)})
        folder = Path(tmp) / _client_name(client_id)
        save_mlflow_model(folder, spec, example.cpu().numpy(), {"members": str(path)}, config)
        mlflow.log_artifacts(str(folder), f"{HEADS_DIR}/{folder.name}")


@functools.lru_cache(maxsize=64)
def _shared_backbone(fl_run_id: str) -> dict[str, str]:
    """``{"backbone": URI}`` of a finished FL run's ``server/backbone.safetensors`` (FedLoRA, MocoSFL), ``{}`` when
    it has none; listed once per run and process (a finished run's artifacts do not change)."""
    if any(a.path == BACKBONE_FILE for a in mlflow.MlflowClient().list_artifacts(fl_run_id, "server")):
        return {"backbone": f"runs:/{fl_run_id}/{BACKBONE_FILE}"}
    return {}


def log_folder(folder: Path) -> None:
    """Log every file of ``folder`` as artifacts of the active run (at the artifact root)."""
    mlflow.log_artifacts(str(folder))


def log_metrics(metrics: dict[str, float]) -> None:
    """Log summary metrics of the active run."""
    mlflow.log_metrics(metrics)


def log_csv(rows: list[dict[str, Any]], name: str) -> None:
    """Write rows (one dict each) as CSV file ``name`` at the artifact root of the active run."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        pd.DataFrame(rows).to_csv(path, index=False)
        mlflow.log_artifact(str(path))


@contextmanager
def trial_run(number: int, params: dict[str, Any], pruned: type[BaseException]) -> Iterator[str]:
    """A hyperparameter trial as a run nested under the active study run; yields its id.

    Ends FINISHED with tag ``optuna.state=complete``, KILLED with ``pruned`` when the body
    raises ``pruned``, or FAILED with ``failed`` on any other exception (which propagates).
    """
    run = mlflow.start_run(run_name=f"trial-{number}", nested=True,
                           tags={"pfl.kind": "trial", "optuna.trial": str(number)})
    state, status = "complete", "FINISHED"
    try:
        mlflow.log_params(params)
        yield run.info.run_id
    except pruned:
        state, status = "pruned", "KILLED"
        raise
    except BaseException:
        state, status = "failed", "FAILED"
        raise
    finally:
        mlflow.set_tag("optuna.state", state)
        mlflow.end_run(status)


def log_file(path: Path, folder: str | None = None) -> None:
    """Log one local file as an artifact of the active run (at the root, or under ``folder``)."""
    mlflow.log_artifact(str(path), folder)


def run_metrics(run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run."""
    return dict(mlflow.MlflowClient().get_run(run_id).data.metrics)


def set_description(run_id: str, text: str) -> None:
    """Set a run's description (Markdown, tag ``mlflow.note.content``), shown on its page in the MLflow UI."""
    mlflow.MlflowClient().set_tag(run_id, "mlflow.note.content", text)


def run_summary(run_id: str) -> dict[str, Any]:
    """``{"name", "metrics", "seconds", "artifact_uri"}`` of a run (``seconds``: wall time, ``None`` while running)."""
    run = mlflow.MlflowClient().get_run(run_id)
    end = run.info.end_time
    return {"name": run.info.run_name, "metrics": dict(run.data.metrics), "artifact_uri": run.info.artifact_uri,
            "seconds": None if end is None else (end - run.info.start_time) / 1000}


REGISTRY_TAGS = ("algo", "dataset", "model", "partition", "alpha", "classes_per_client", "join_ratio", "seed")


def registered_name(fl_run_name: str, client_id: int) -> str:
    """The default registered model name of a client: ``<FL run name>-client_XXX``."""
    return f"{fl_run_name}-{_client_name(client_id)}"


def register_client_models(run_id: str, clients: list[int] | None, name: str | None = None,
                           alias: str | None = None) -> list[tuple[str, str]]:
    """Register FL run ``run_id``'s client models (MLflow models ``clients/client_XXX/``) in the Model Registry.

    Each client becomes a new version of the registered model ``name`` (one client), or of ``<name>-client_XXX``
    (several; ``name`` defaults to the FL run's name), tagged with the run's :data:`REGISTRY_TAGS` params
    (``algo``, ``dataset``, ``partition``, ``alpha``, ...), ``fl_run_id``, ``client`` and the client's final
    metrics (``acc``, ``nll``, ``ece``, ... from ``client_metrics.json``); ``alias`` (e.g. ``champion``) then
    points at that version, so ``models:/<name>@champion`` loads it wherever MLflow does.

    Args:
        clients: client ids; ``None``: every client of the run.

    Returns:
        ``(registered name, version number as text)`` per client.

    Raises:
        FLRunError: unknown run id, not an FL run, or a client id that is not a number.
        FileNotFoundError: a client without an MLflow model (the message lists the clients it has; runs logged
            before MLflow models hold only safetensors files and cannot be registered).
    """
    run = _fl_run(run_id)
    params = run.data.params
    metrics = {row["client"]: row for row in _client_rows(run_id)}  # one row per client with a model
    every = sorted(metrics) or list(range(int(params["num_clients"])))  # runs without per-client metrics: all
    ids = every if clients is None else [_client_number(c) for c in clients]
    base_tags = {k: params[k] for k in REGISTRY_TAGS if k in params} | {"fl_run_id": run_id}
    registered, client = [], mlflow.MlflowClient()
    for cid in ids:
        if not client_weights_path(run_id, cid).endswith(f"/artifacts/{MODEL_WEIGHTS}"):
            raise FileNotFoundError(f"run {run_id} logged client {cid} before MLflow models (a bare safetensors "
                                    "file): load it with load_client_model; retrain to register it")
        target = name if name and len(ids) == 1 else registered_name(name or run.info.run_name, cid)
        row = {k: v for k, v in metrics.get(cid, {}).items() if isinstance(v, (int, float)) and k != "client"}
        tags = {**base_tags, "client": str(cid), **{k: f"{v:.6g}" for k, v in row.items()}}
        version = mlflow.register_model(f"runs:/{run_id}/{CLIENT_DIR}/{_client_name(cid)}", target, tags=tags)
        if alias:
            client.set_registered_model_alias(target, alias, version.version)
        registered.append((target, str(version.version)))
    return registered


def _client_rows(run_id: str) -> list[dict[str, Any]]:
    """The rows of an FL run's ``client_metrics.json`` (final per-client metrics); ``[]`` when it has none."""
    if not any(a.path == "client_metrics.json" for a in mlflow.MlflowClient().list_artifacts(run_id)):
        return []
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/client_metrics.json")["clients"]
