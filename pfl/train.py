"""The main job: config -> data -> partition -> model -> rounds -> evaluation -> MLflow.

:func:`prepare` does every check that can fail on bad input (data present and valid,
partition feasible) before :func:`run_training` opens any MLflow run.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from pfl.algorithms import REGISTRY, Algorithm, FederatedContext
from pfl.federated.checkpoint import CHECKPOINT_FILE, Checkpointer, delete_checkpoint, load_checkpoint
from pfl.federated.engine import Callback, Engine, Evaluation, RunInterrupted, Schedule
from pfl.federated.local import ModelRunner, SGDUpdate
from pfl.federated.state import State, model_state
from pfl.config import DATASETS, MODALITY_FIELDS, ConfigError, RunConfig, algorithm_fields
from pfl.data.datasets import DATASET_OPTIONS, Dataset, DatasetFormatError, DatasetNotFoundError, load_dataset
from pfl.data.audio import AudioTransform
from pfl.data.loader import TRANSFORMS, DeviceData, Transform, client_data, inference_batch_size
from pfl.data.transforms import ImageTransform
from pfl.data.partition import Partition, PartitionError, PartitionSpec, load_or_make_partition, natural
from pfl.federated.downlink import Downlink
from pfl.data.pfllib import PfllibImportError, load_imported
from pfl.models import MODEL_OPTIONS, ModelSpec, build_model, input_normalization
from pfl.tasks import Task, task_of
from pfl.seed import seed_everything
from pfl.summary import fl_description, launch_description, seed_summary


LABEL_COUNTS_FILE = "partition/label_counts.json"  # an FL run's artifact: the partition's label counts


@dataclass
class Prepared:
    """Validated inputs of a federated run, shared by all its repeats."""

    cfg: RunConfig
    dataset: Dataset
    fingerprint: str
    partition: Partition
    device: torch.device

    @property
    def task(self) -> Task:
        """The dataset's task (:mod:`pfl.tasks`): the loss, the evaluator, what applies."""
        return task_of(self.dataset.task)

    @property
    def model_specs(self) -> list[ModelSpec]:
        """Every client's architecture: ``cfg.models`` assigned round-robin (client k gets entry k mod len), with
        :meth:`spec`, as the algorithm adapts it (FedLoRA adds adapters)."""
        names = self.cfg.models
        algo = REGISTRY[self.cfg.algo]
        hp = algo.Params(**self.cfg.hparams)
        return [algo.model_spec(self.spec(names[k % len(names)]), hp) for k in range(self.cfg.num_clients)]

    def spec(self, name: str) -> ModelSpec:
        """Architecture ``name`` for this dataset: outputs :attr:`~pfl.data.datasets.Dataset.num_outputs`; for images
        the input size ``image_size`` (default: the dataset's) and the architecture's normalization; for other
        inputs one sample's shape and the architecture's own knobs (:data:`pfl.models.MODEL_OPTIONS`)."""
        data, cfg = self.dataset, self.cfg
        if data.modality == "image":
            _, c, h, _ = data.inputs.shape
            return ModelSpec(name, data.num_outputs, in_channels=c, image_size=cfg.image_size or h,
                             width=cfg.model_width, normalization=input_normalization(name, cfg.dataset))
        options = tuple(sorted((k, getattr(cfg, k)) for k in MODEL_OPTIONS.get(name, ())))
        frontend = tuple(sorted((k, getattr(cfg, k)) for k in MODALITY_FIELDS.get(data.modality, ())))
        shape = self.transform.output_shape(tuple(data.inputs.shape[1:]))
        return ModelSpec(name, data.num_outputs, width=cfg.model_width, input_shape=shape, options=options,
                         modality=data.modality, frontend=frontend)

    @property
    def transform(self) -> Transform:
        """The run's on-device input path (:func:`run_transform`)."""
        return run_transform(self.cfg, self.dataset.modality)

    @property
    def label_counts(self) -> dict:
        """Every client's train and test sizes and label counts (:meth:`Partition.label_counts`, JSON-ready): what
        an FL run logs as :data:`LABEL_COUNTS_FILE` and ``pfl data partition`` writes."""
        return self.partition.label_counts(self.dataset.targets, self.dataset.num_classes)

    def input_example(self, client_id: int) -> torch.Tensor:
        """(1, ...): the first sample of the client's test split (else its train split), as stored (uint8 (1, C, H, W)
        for images): the input example of its MLflow model."""
        split = self.partition.clients[client_id]
        return self.dataset.inputs[(split.test if len(split.test) else split.train)[:1]]

    def device_images(self) -> DeviceData:
        """The pool on the run's device, batched through :attr:`transform`."""
        return DeviceData(self.dataset, self.device, self.transform)

    @property
    def autocast(self) -> torch.dtype | None:
        """``torch.bfloat16`` for ``precision=bf16`` on a GPU, else ``None`` (fp32; CPU runs stay fp32)."""
        return torch.bfloat16 if self.cfg.precision == "bf16" and self.device.type == "cuda" else None


def run_transform(cfg: RunConfig, modality: str) -> Transform:
    """A run's on-device input path for inputs of ``modality`` (:data:`pfl.data.loader.TRANSFORMS`): for images the
    first architecture's normalization, resizing to ``image_size``, ``random_crop`` and ``hflip``
    (:mod:`pfl.data.transforms`); for audio the log-mel front end at ``n_mels``, ``window_ms``, ``hop_ms``
    (:mod:`pfl.data.audio`); for sequences and character ids their plain transforms."""
    if modality == "image":
        mean, std = input_normalization(cfg.models[0], cfg.dataset)
        return ImageTransform(cfg.image_size, mean, std, cfg.random_crop, cfg.hflip)
    if modality == "audio":
        return AudioTransform(cfg.n_mels, cfg.window_ms, cfg.hop_ms)
    return TRANSFORMS[modality]()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise ``torch.device(name)``.

    Raises:
        ConfigError: a CUDA device is requested on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but no CUDA device is available; use device=cpu or auto")
    return device


def use_deterministic_algorithms() -> None:
    """``deterministic=true``: deterministic GPU kernels (cuDNN without autotuning, cuBLAS with a fixed
    workspace, ``torch.use_deterministic_algorithms``; ops without a deterministic kernel warn instead of failing)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at the first cuBLAS call
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def partition_spec(cfg: RunConfig) -> PartitionSpec:
    """The partition settings of a run config (seeded by the run's base seed, shared by repeats)."""
    return PartitionSpec(scheme=cfg.partition, num_clients=cfg.num_clients, seed=cfg.seed, alpha=cfg.alpha,
                         classes_per_client=cfg.classes_per_client or 0, balance=cfg.balance,
                         train_ratio=cfg.train_ratio, shards_per_client=cfg.shards_per_client,
                         official_split=cfg.official_split, num_partitions=cfg.num_partitions,
                         split_by=cfg.split_by, num_test_keys=cfg.num_test_keys, sample_groups=cfg.sample_groups)


def dataset_options(cfg: RunConfig) -> dict:
    """The dataset's own knobs of ``cfg`` (:data:`pfl.data.datasets.DATASET_OPTIONS`), e.g. David's ``history``."""
    return {k: getattr(cfg, k) for k, datasets in DATASET_OPTIONS.items() if cfg.dataset in datasets}


def load_pfllib_import(cfg: RunConfig) -> tuple[Dataset, Partition]:
    """The pool and fixed partition imported as ``cfg.partition_name`` (``partition=pfllib``).

    Raises:
        DatasetNotFoundError, DatasetFormatError: the import is missing or damaged.
        ConfigError: ``partition_name`` is not a valid import name, or ``dataset`` or
            ``num_clients`` differ from the import's (the message gives the value to set).
    """
    try:
        dataset, partition = load_imported(cfg.data_dir, cfg.partition_name)
    except PfllibImportError as err:
        raise ConfigError(f"partition_name: {err}") from None
    where = f"the PFLlib import {cfg.partition_name!r}"
    if dataset.name != cfg.dataset:
        fix = (f"set dataset={dataset.name}" if dataset.name in DATASETS else
               f"re-import it with `pfl data import-pfllib DIR --name {cfg.partition_name} --dataset "
               f"{'|'.join(DATASETS)} --overwrite`")
        raise ConfigError(f"dataset: {where} holds {dataset.name}, not {cfg.dataset}; {fix}")
    if cfg.num_clients != len(partition.clients):
        raise ConfigError(f"num_clients: {where} has {len(partition.clients)} clients, not {cfg.num_clients}; "
                          f"set num_clients={len(partition.clients)}")
    return dataset, partition


def prepare(cfg: RunConfig, like: Prepared | None = None) -> Prepared:
    """Load and validate data and build (or load the cached) partition; no tracking yet.

    With ``partition=pfllib`` the data and partition come from a PFLlib import (see
    :func:`load_pfllib_import`) instead. ``like``: an earlier result on the same dataset and
    data folder, whose loaded pool (and fingerprint) is reused instead of read again (sweeps).

    Raises:
        DatasetNotFoundError, DatasetFormatError: the data folder is missing or malformed.
        ConfigError: the partition is infeasible for this dataset (message names the field).
    """
    torch.set_num_threads(cfg.num_threads or os.cpu_count() or 1)
    device = resolve_device(cfg.device)
    if cfg.deterministic:
        use_deterministic_algorithms()
    if cfg.partition == "pfllib":
        dataset, partition = load_pfllib_import(cfg)
        return _prepared(cfg, dataset, dataset.fingerprint(), partition, device)
    same = like is not None and (like.cfg.dataset, like.cfg.data_dir, dataset_options(like.cfg)) == \
        (cfg.dataset, cfg.data_dir, dataset_options(cfg))
    try:
        dataset = like.dataset if same else load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                                                         **dataset_options(cfg))
    except (DatasetNotFoundError, DatasetFormatError):
        raise
    except ValueError as err:  # a dataset knob the files cannot serve (a history longer than the traces)
        raise ConfigError(str(err)) from None
    if cfg.num_clients > len(dataset):
        raise ConfigError(f"num_clients: {cfg.num_clients} clients but only {len(dataset)} samples; "
                          "lower num_clients")
    fingerprint = like.fingerprint if same else dataset.fingerprint()
    try:
        if cfg.partition == "natural":
            partition = natural(dataset.groups, dataset.keys, partition_spec(cfg))
        else:
            partition, _ = load_or_make_partition(dataset.targets, dataset.num_classes, partition_spec(cfg),
                                                  fingerprint, cfg.cache_dir, dataset.num_train)
    except PartitionError as err:
        raise ConfigError(f"partition: {err}") from None
    return _prepared(cfg, dataset, fingerprint, partition, device)


def _prepared(cfg: RunConfig, dataset: Dataset, fingerprint: str, partition: Partition,
              device: torch.device) -> Prepared:
    """A :class:`Prepared` whose config has ``eval_batch_size`` set (the device's default when unset)."""
    size = run_transform(cfg, dataset.modality).output_shape(tuple(dataset.inputs.shape[1:]))
    batch = inference_batch_size(cfg.eval_batch_size, device, size)
    return Prepared(cfg.model_copy(update={"eval_batch_size": batch}), dataset, fingerprint, partition, device)


def initial_weights(cfg: RunConfig, spec: ModelSpec) -> tuple[State | None, str]:
    """The weights a run's models start from, and their source for messages: ``pretrained=timm`` (timm's
    published weights), ``pretrained=<file>``, ``init_from=runs:/<run id>[/clients/client_NNN]`` (a model a pfl
    run logged, e.g. by ``pfl pretrain``); ``(None, "")`` for a random initialization.

    Raises:
        ValueError: the weights cannot be had (offline, unreadable file, unknown run or client, a run's model of
            another architecture); the message names the source and the fix.
    """
    from pfl.models.pretrained import read_weights, timm_weights

    if cfg.init_from is not None:
        from pfl import tracking

        run_id, _, client = cfg.init_from.removeprefix("runs:/").partition("/clients/client_")
        try:
            source_spec, state = tracking.load_client_state(run_id, int(client or 0))
        except FileNotFoundError as err:  # no model of that client in the run
            raise ValueError(f"init_from={cfg.init_from}: {err}; start from one of those") from None
        if source_spec.name != spec.name or source_spec.lora is not None:
            what = f"{source_spec.name} with LoRA adapters" if source_spec.lora else source_spec.name
            raise ValueError(f"init_from: run {run_id}'s model is {what}, this run's model is {spec.name}; set "
                             f"model={source_spec.name}, or start from a run of {spec.name} without adapters")
        return state, f"init_from={cfg.init_from}"
    if cfg.pretrained == "timm":
        return timm_weights(spec.name), "pretrained=timm"
    if cfg.pretrained != "none":
        return read_weights(cfg.pretrained), f"pretrained={cfg.pretrained}"
    return None, ""


def check_input_fits(model: torch.nn.Module, spec: ModelSpec, device: torch.device) -> None:
    """A dry forward pass of one zero input (1, *spec.sample_shape), e.g. an image (1, C, image_size, image_size)
    (int64 character ids for a text model), through ``model`` in eval mode, without gradients; every module's
    train / eval mode is restored and no random number is drawn.

    Raises:
        ValueError: the architecture cannot take inputs of that size (e.g. the CNN below 16x16 pixels: its
            second 5x5 convolution would be larger than its input; a VGG below 32 mel bins); the message names
            ``image_size``, or for other inputs the knobs that shape them.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    dtype = torch.int64 if spec.modality == "text" else torch.float32
    try:
        with torch.no_grad():
            model(torch.zeros(1, *spec.sample_shape, dtype=dtype, device=device))
    except (RuntimeError, AssertionError) as err:
        detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        if spec.modality != "image":
            fix = "change n_mels, window_ms or hop_ms" if spec.modality == "audio" else "use another model"
            raise ValueError(f"model {spec.name} cannot take {spec.modality} inputs of shape {spec.sample_shape} "
                             f"({detail}); {fix}") from None
        raise ValueError(f"image_size={spec.image_size}: model {spec.name} cannot take {spec.image_size}x"
                         f"{spec.image_size} inputs ({detail}); set a larger image_size, or leave it unset for the "
                         "dataset's own size") from None
    finally:
        for module, training in modes.items():
            module.train(training)


def build_algorithm(prepared: Prepared, seed: int, holdout: bool = False) -> Algorithm:
    """Seed everything with ``seed``, initialize the model and wrap it in the configured algorithm.

    With ``holdout`` every client holds out the last ``tuning_val_ratio`` of its train split as the
    tuning split (the same for every trial); algorithms that need a validation split of their own
    (FedFomo) carve the last ``val_ratio`` of the rest.

    Raises:
        ConfigError: the model, the clients' data or the algorithm's hyperparameters do not fit
            together (e.g. FedALA's ``layer_idx`` beyond the model's parameter tensors, or a
            client too small for FedFomo's validation split).
    """
    cfg = prepared.cfg
    seed_everything(seed)
    cls = REGISTRY[cfg.algo]
    try:
        specs = prepared.model_specs
        models = {spec: build_model(spec, *initial_weights(cfg, spec)).to(prepared.device)
                  for spec in dict.fromkeys(specs)}  # in client order
        for spec, model in models.items():
            check_input_fits(model, spec, prepared.device)
        clients = client_data(prepared.partition, prepared.device, cls.validation_ratio(cls.Params(**cfg.hparams)),
                              cfg.tuning_val_ratio if holdout else None)
        runner = ModelRunner(models, prepared.device_images(), cfg.eval_batch_size, prepared.autocast)
        budget = cfg.client_state_budget_mb * 2**20 or None
        task = prepared.task
        update = SGDUpdate(cfg.batch_size, cfg.lr, cfg.local_epochs, cfg.optimizer, prepared.autocast,
                           cfg.weight_decay, cfg.lr_schedule, cfg.max_grad_norm, drop_last=cfg.drop_last,
                           loss_fn=task.loss())
        ctx = FederatedContext(clients, specs, runner, update, {spec: model_state(m) for spec, m in models.items()},
                               cfg.num_join_clients, seed, budget, cfg.client_parallelism,
                               cfg.global_rounds, task, Downlink.parse(cfg.downlink, cfg.downlink_blend),
                               cfg.new_client_ids)
        return cls(ctx, **cfg.hparams)
    except ValueError as err:  # PartitionError, model sizes and the algorithms' hyperparameter checks
        raise ConfigError(f"{cfg.algo} with model={cfg.model}: {err}") from None


def run_rounds(algorithm: Algorithm, cfg: RunConfig, callbacks: list[Callback], eval_split: str = "test") -> Evaluation:
    """Run all global rounds of ``cfg`` for a built algorithm, evaluating on ``eval_split``; returns the final evaluation."""
    return Engine(algorithm, schedule_of(cfg, eval_split), callbacks).run()


def schedule_of(cfg: RunConfig, eval_split: str = "test") -> Schedule:
    """The engine's :class:`~pfl.federated.engine.Schedule` of ``cfg``, evaluating on ``eval_split``."""
    return Schedule(cfg.global_rounds, cfg.num_join_clients, cfg.eval_gap, cfg.ece_bins, eval_split,
                    cfg.finetune_epochs, cfg.new_client_eval)


def run_federated(prepared: Prepared, seed: int, callbacks: list[Callback]) -> tuple[Algorithm, Evaluation]:
    """Build the algorithm for ``seed`` and run it without any tracking; returns it and the final evaluation."""
    algorithm = build_algorithm(prepared, seed)
    return algorithm, run_rounds(algorithm, prepared.cfg, callbacks)


def run_params(prepared: Prepared, algorithm: Algorithm) -> dict:
    """Flat searchable MLflow params of one FL run (config, seed, data and model identity)."""
    return {**prepared.cfg.flat_params(), "seed": algorithm.ctx.seed, "dataset_fingerprint": prepared.fingerprint,
            "partition_key": prepared.partition.spec.key(prepared.fingerprint),
            "num_join_clients": prepared.cfg.num_join_clients,
            "num_params": sum(v.numel() for v in algorithm.ctx.init_state(0).values() if v.is_floating_point()),
            "trainable_params": sum(p.numel() for p in algorithm.ctx.model(0).parameters() if p.requires_grad),
            "device_used": str(prepared.device), "threads_used": torch.get_num_threads()}


def checkpoint_path(cfg: RunConfig, run_id: str) -> Path:
    """The manifest of FL run ``run_id``'s latest checkpoint: ``checkpoint.safetensors`` in
    ``<cache_dir>/checkpoints/<run id>/``, its tensors in ``states/`` beside it (:mod:`pfl.federated.checkpoint`)."""
    return Path(cfg.cache_dir) / "checkpoints" / run_id / CHECKPOINT_FILE


def execute_fl_run(prepared: Prepared, algorithm: Algorithm, run_id: str, extra_callbacks: list[Callback] | None,
                   progress: bool, stop: Callable[[], int | None] | None = None,
                   snapshot: tuple[dict, dict] | None = None, logged: dict[str, int] | None = None) -> None:
    """The rounds of the active FL run ``run_id``, checkpointed, then its artifacts.

    From round 1, or after ``snapshot`` (a checkpoint of this run: a resume, with ``logged`` the last
    step of each metric already in the store). Every ``checkpoint_every`` rounds the complete run state is written
    to :func:`checkpoint_path`. A run that fails or is stopped logs its checkpoint (``checkpoint/``), so that it can
    resume anywhere. At the end: per-client metrics, the best round's metrics, the algorithm's server state, every
    client's personalized model, ``checkpoint/mb`` and ``time/checkpoint`` (the last checkpoint's size and the mean
    time of a write), and the run's description (:func:`fl_description`). A finished run then deletes its
    checkpoint, the local one and any logged one, since nothing can resume it; ``keep_checkpoint=true`` instead
    writes one after the last round and logs it.
    """
    from pfl import tracking
    from pfl.progress import ProgressBar

    cfg = prepared.cfg
    done = snapshot[1]["round"] if snapshot else 0
    callbacks = [tracking.MLflowCallback(logged), *(extra_callbacks or [])]
    if progress:
        callbacks.append(ProgressBar(cfg.global_rounds, desc=f"{cfg.algo} seed {algorithm.ctx.seed}", initial=done))
    checkpointer = Checkpointer(checkpoint_path(cfg, run_id), cfg.checkpoint_every, at_end=cfg.keep_checkpoint)
    engine = Engine(algorithm, schedule_of(cfg), callbacks, checkpointer, stop)
    start = engine.restore(*snapshot) if snapshot else 1
    try:
        engine.run(start)
    except BaseException as exc:
        if isinstance(exc, RunInterrupted):
            exc.run_id = run_id  # what the command tells the user to resume
        if checkpointer.path.is_file():
            tracking.log_checkpoint(checkpointer.path)
        raise
    for key, tensor in algorithm.state_for_logging().items():
        tracking.log_json(tensor.tolist(), f"server/{key}.json")
    for name, state in algorithm.server_models().items():
        tracking.log_state(state, f"server/{name}.safetensors")
    output = "embeddings" if not algorithm.classifier else "probabilities" if prepared.task.classifier else "values"
    tracking.log_client_models(algorithm.ctx.specs, algorithm.personalized_state, algorithm.shared_backbone(),
                               prepared.input_example, output, algorithm.ctx.train_clients)
    if checkpointer.sizes:
        tracking.log_metrics({"checkpoint/mb": checkpointer.sizes[-1] / 2**20,
                              "time/checkpoint": sum(checkpointer.seconds) / len(checkpointer.seconds)})
    seed = algorithm.ctx.seed
    tracking.set_description(run_id, fl_description(cfg.run_name(seed), f"{cfg.describe()}, seed {seed}.",
                                                    tracking.run_metrics(run_id), run_id, tracking.tracking_uri()))
    if cfg.keep_checkpoint:
        tracking.log_checkpoint(checkpointer.path)
    else:
        tracking.delete_logged_checkpoint(run_id)  # logged when an earlier attempt was stopped or failed
        delete_checkpoint(checkpointer.path)


def train_repeats(prepared: Prepared, first: Algorithm | None, extra_callbacks: list[Callback] | None = None,
                  progress: bool = True, stop: Callable[[], int | None] | None = None,
                  parent_run_id: str | None = None, done: dict[int, str] | None = None) -> list[str]:
    """One FL run per repeat (seeds ``seed + k``), nested under the active launch run; returns their ids in seed order.

    Each FL run logs params, its config, the partition's label counts and what :func:`execute_fl_run` logs.

    Args:
        first: the algorithm built for the first seed (built early so its errors come before any run), or ``None``.
        stop: returns a stop signal's number once one arrived (the run then checkpoints and ends KILLED).
        parent_run_id: the launch run, when it is not active in this process (a sweep cell's Ray task;
            :func:`pfl.tracking.fl_run`).
        done: seed -> id of the FL runs this launch run already holds (a resumed command): not run again.
    """
    from pfl import tracking

    cfg = prepared.cfg
    counts = prepared.label_counts
    fl_ids = []
    for seed in range(cfg.seed, cfg.seed + cfg.repeats):
        if done and seed in done:
            fl_ids.append(done[seed])
            continue
        algorithm = first if first is not None and first.ctx.seed == seed else build_algorithm(prepared, seed)
        with tracking.fl_run(cfg.run_name(seed), run_params(prepared, algorithm), parent_run_id) as run_id:
            fl_ids.append(run_id)
            tracking.log_json(cfg.flat_params(), "config.json")  # what head runs and resumes rebuild the run from
            tracking.log_json(counts, LABEL_COUNTS_FILE)
            execute_fl_run(prepared, algorithm, run_id, extra_callbacks, progress, stop)
    return fl_ids


def read_checkpoint(cfg: RunConfig, fl_run_id: str) -> tuple[dict, dict]:
    """FL run ``fl_run_id``'s latest checkpoint: the local one (:func:`checkpoint_path`), else the one logged to the
    run.

    Raises:
        FLRunError: the run has neither, or it is unreadable.
    """
    from pfl import tracking

    path = checkpoint_path(cfg, fl_run_id)
    with tempfile.TemporaryDirectory() as tmp:
        if not path.is_file():
            path = tracking.download_checkpoint(fl_run_id, Path(tmp))
        if path is None:
            raise tracking.FLRunError(f"FL run {fl_run_id} has no checkpoint (neither "
                                      f"{checkpoint_path(cfg, fl_run_id)} nor a logged checkpoint/ "
                                      "artifact); start it again with pfl train")
        try:
            return load_checkpoint(path)
        except ValueError as err:
            raise tracking.FLRunError(f"FL run {fl_run_id}: {err}") from None


def resume_training(fl_run_id: str, progress: bool = True,
                    stop: Callable[[], int | None] | None = None) -> dict[str, list[str] | str]:
    """Continue FL run ``fl_run_id`` from its last checkpoint (:func:`read_checkpoint`): same run id, metrics from the
    next round on; then finish its command as an uninterrupted one would have.

    The FL run is bit-identical on CPU to an uninterrupted one. Its launch run, reopened, ends as the uninterrupted
    command's: when it is a ``pfl train`` launch run (:func:`pfl.tracking.is_train_launch`), the repeats it does not
    hold yet are run, and its seed summary and description logged (:func:`log_launch_summary`); a sweep's or a
    study's run only ends again.

    Returns:
        ``{"launch_run_id": ..., "fl_run_ids": [...]}``: every FL run of a ``pfl train`` launch run in seed order,
        else ``[fl_run_id]``.

    Raises:
        FLRunError: unknown id, not an FL run, FINISHED, still running, or without a checkpoint.
        ConfigError, DatasetNotFoundError, DatasetFormatError: its data is no longer valid.
        RunInterrupted: ``stop`` reported a signal; the runs end KILLED, checkpointed.
    """
    from pfl import tracking

    config, params = tracking.resumable_fl_run(fl_run_id)
    prepared = prepare(RunConfig(**algorithm_fields(config)))
    snapshot = read_checkpoint(prepared.cfg, fl_run_id)
    algorithm = build_algorithm(prepared, int(params["seed"]))
    launch_id = tracking.parent_run_id(fl_run_id)
    fl_ids = [fl_run_id]
    with tracking.reopened_run(launch_id) if launch_id else nullcontext():
        with tracking.reopened_run(fl_run_id):
            execute_fl_run(prepared, algorithm, fl_run_id, None, progress, stop, snapshot,
                           tracking.logged_steps(fl_run_id))
        if launch_id and tracking.is_train_launch(launch_id, config):
            fl_ids = train_repeats(prepared, None, progress=progress, stop=stop,
                                   done=tracking.fl_runs_by_seed(launch_id))
            log_launch_summary(prepared.cfg, launch_id, fl_ids)
    return {"launch_run_id": launch_id, "fl_run_ids": fl_ids}


def evaluate_client_model(run_id: str, client_id: int, data_dir: str | Path | None = None) -> dict[str, float]:
    """A saved client model's metrics on its own test split, as the FL run computed them at its last round.

    Rebuilds the run's data and partition from its config (``data_dir`` replaces the data folder)
    and runs the model the way the engine does, so the result equals the run's
    ``client_metrics.json`` entry: ``acc``, ``nll``, ``ece``, ``brier`` and ``num_test`` (a regression: ``mse``,
    ``orthodromic_deg`` and its per-step values, ``num_test``).

    Raises:
        FLRunError: unknown run, not an FL run, or a bad client id; FileNotFoundError: no such client model.
        ConfigError, DatasetNotFoundError, DatasetFormatError: the run's data is not available.
    """
    from pfl import tracking

    config = tracking.fl_run_config(run_id)
    if data_dir is not None:
        config["data_dir"] = str(data_dir)
    prepared = prepare(RunConfig(**algorithm_fields({**config, "device": "cpu"})))
    model = tracking.load_client_model(run_id, client_id)
    spec = prepared.model_specs[int(client_id)]
    runner = ModelRunner({spec: model}, prepared.device_images(), prepared.cfg.eval_batch_size)
    test = prepared.partition.clients[int(client_id)].test.to(prepared.device)
    outputs, targets = runner.logits(spec, model_state(model), test).float().cpu(), runner.data.targets[test].cpu()
    return {**prepared.task.evaluator().metrics_of(outputs, targets, prepared.cfg.ece_bins), "num_test": len(test)}


def run_training(cfg: RunConfig, extra_callbacks: list[Callback] | None = None, progress: bool = True,
                 stop: Callable[[], int | None] | None = None,
                 launch_tags: dict[str, str] | None = None,
                 open_store: Callable[[], object] | None = None) -> dict[str, list[str] | str]:
    """The main job: validate, then a launch run with one nested FL run per repeat (:func:`train_repeats`).

    Validation runs in this order: data present and valid, partition feasible (:func:`prepare`), then
    (:func:`build_algorithm`) the weights file, the ``init_from`` run's model, the architecture against the input
    size (:func:`check_input_fits`) and the algorithm's hyperparameters.

    ``launch_tags``: extra tags of the launch run (e.g. the PFLlib flags the config was translated from).
    ``open_store``: opens the tracking store (``pfl train``: :func:`pfl.tracking.configure_tracking`), called once
    every check has passed, so bad input leaves no store file behind; with ``init_from``, whose run lives in the
    store, before the model is built (still before any run is created). ``None``: the store is already configured.

    Returns:
        ``{"launch_run_id": ..., "fl_run_ids": [...]}``.

    Raises:
        ConfigError, DatasetNotFoundError, DatasetFormatError: before any run is created.
        Any error of training: the runs it interrupts end FAILED; earlier artifacts stay.
        RunInterrupted: ``stop`` reported a signal; the runs end KILLED, checkpointed.
    """
    from pfl import tracking

    prepared = prepare(cfg)
    if open_store is not None and cfg.init_from is not None:
        open_store()
    first = build_algorithm(prepared, cfg.seed)  # hyperparameter errors surface before any run exists
    if open_store is not None and cfg.init_from is None:
        open_store()
    with tracking.launch_run(cfg.experiment, cfg.launch_name(), prepared.cfg.flat_params(),
                             tags=launch_tags) as launch_id:
        fl_ids = train_repeats(prepared, first, extra_callbacks, progress, stop)
        log_launch_summary(cfg, launch_id, fl_ids)
    return {"launch_run_id": launch_id, "fl_run_ids": fl_ids}


PRETRAIN_FIELDS = {"algo": "fedavg", "partition": "iid", "num_clients": 1, "join_ratio": 1.0, "local_epochs": 1}


def pretrain_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` as centralized training (``pfl pretrain``): FedAvg with one client holding the whole dataset, every
    round taking part, one local epoch per round, so ``global_rounds`` counts epochs over that client's train split
    (75% of the pool, the rest its test split). With one client FedAvg's average is that client's model exactly, so
    this is plain training, checkpointed, resumable and tracked like any run; its client 0 is the pretrained model
    (``init_from=runs:/<FL run id>``). Differences from a usual centralized loop: the optimizer (and AdamW's moments)
    is created afresh every epoch, and evaluation uses the held-out 25%."""
    return RunConfig(**{**cfg.model_dump(exclude={"hparams"}), **PRETRAIN_FIELDS})


def log_launch_summary(cfg: RunConfig, launch_id: str, fl_ids: list[str]) -> None:
    """Log on the launch run the mean and std over its seeds of the FL runs' final and best metrics
    (:func:`pfl.summary.seed_summary`) and its description."""
    from pfl import tracking

    summary = seed_summary([tracking.run_metrics(i) for i in fl_ids])
    tracking.log_metrics(summary)
    names = [cfg.run_name(cfg.seed + k) for k in range(len(fl_ids))]
    tracking.set_description(launch_id, launch_description(cfg.launch_name(), f"{cfg.describe()}.", summary, names))
