"""Typed, validated run configuration: YAML templates plus ``key=value`` overrides.

Every knob of a federated run lives in :class:`RunConfig`. Invalid input raises
:class:`ConfigError` naming the field and the fix, before any data is loaded or
any MLflow run is started.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
import shlex
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pfl.algorithms import REGISTRY as _ALGORITHM_REGISTRY
from pfl.algorithms.flexifed import check_families
from pfl.data.datasets import CATALOG, DATASET_OPTIONS
from pfl.federated.downlink import Downlink
from pfl.models import ARCHITECTURES, MODEL_OPTIONS, modalities_of
from pfl.seed import derive_seed

ALGORITHMS = tuple(_ALGORITHM_REGISTRY)
DATASETS = tuple(CATALOG)
# PFLlib's classes-per-client defaults for the pathological partition.
DEFAULT_CLASSES_PER_CLIENT = {"cifar10": 2, "cifar100": 10, "tinyimagenet": 20}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200}  # at most, for Tiny-ImageNet
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_INIT_FROM = re.compile(r"runs:/[0-9a-f]{32}(/clients/client_\d+)?")


_CHOICES = {"algo": ("algorithm", ALGORITHMS), "dataset": ("dataset", DATASETS)}
PARTITIONS = ("pathological", "dirichlet", "iid", "exdir", "shards", "pfllib", "natural")
PARTITION_ALIASES = {"pat": "pathological", "dir": "dirichlet"}  # PFLlib's names (its -partition / niid flags)
# Fields of one partition scheme: logged (and shown in run names) only for a run of that scheme.
PARTITION_FIELDS = {"alpha": ("dirichlet", "exdir"), "classes_per_client": ("pathological", "exdir"),
                    "balance": ("pathological",), "partition_name": ("pfllib",), "shards_per_client": ("shards",),
                    "split_by": ("natural",), "num_test_keys": ("natural",), "sample_groups": ("natural",)}
_INPUTS = {"image": "images", "sequence": "sequences", "text": "texts", "audio": "audio clips"}  # modality in messages
# The knobs of one input modality and their defaults: logged only for, and refused (when set) on, other inputs.
MODALITY_FIELDS = {"image": {"image_size": None, "random_crop": 0, "hflip": False},
                   "audio": {"n_mels": 40, "window_ms": 30.0, "hop_ms": 10.0}}  # pfl.data.audio's log-mel front end
# Range rules: field -> (predicate, message naming the fix).
_POSITIVE_INT = (lambda v: v >= 1, "must be a positive integer (>= 1)")
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "alpha": (lambda v: v > 0, "Dirichlet alpha must be > 0 (e.g. alpha=0.1)"),
    "join_ratio": (lambda v: 0 < v <= 1, "join_ratio (participation ratio) must be in (0, 1], e.g. join_ratio=0.2"),
    "lr": (lambda v: v > 0, "learning rate must be > 0, e.g. lr=0.005"),
    "train_ratio": (lambda v: 0 < v < 1, "must be in (0, 1), e.g. train_ratio=0.75"),
    "tuning_val_ratio": (lambda v: 0 < v < 1, "must be in (0, 1), e.g. tuning_val_ratio=0.2"),
    "seed": (lambda v: v >= 0, "must be >= 0"),
    "new_clients": (lambda v: v >= 0, "clients held out of training for new-client evaluation: >= 0 (0: off)"),
    "finetune_epochs": (lambda v: v >= 0, "local epochs a new client adapts for: >= 0 (0: scored as received)"),
    "classes_per_client": (lambda v: v is None or v >= 1, "must be >= 1 (PFLlib default: 2 for cifar10)"),
    "num_partitions": (lambda v: v is None or v >= 1, "the number of shares the data is split into, of which the "
                       "first num_clients take part: a positive integer >= num_clients, or unset (num_clients)"),
    "num_threads": (lambda v: v >= 0, "must be >= 0 (0 means all cores)"),
    "client_state_budget_mb": (lambda v: v >= 0, "must be >= 0 MB (0 keeps all client state in memory)"),
    "checkpoint_every": (lambda v: v >= 0, "rounds between checkpoints: use >= 1, or 0 for every round while a "
                         "checkpoint is under 100 MB, else every 5"),
    "model_width": (lambda v: v > 0, "channel multiplier of the VGG, CIFAR-ResNet, CharCNN and VDCNN families: use "
                    "a value > 0 (1.0 = the paper's widths)"),
    "image_size": (lambda v: v is None or v >= 1, "the model's input side in pixels: a positive integer (e.g. "
                   "image_size=224), or left unset for the dataset's own size"),
    "random_crop": (lambda v: v >= 0, "padding in pixels of the random crop: >= 0 (e.g. random_crop=4; 0: off)"),
    "weight_decay": (lambda v: v is None or v >= 0, "the local optimizer's weight decay: >= 0 (e.g. weight_decay=0), "
                     "or left unset for the optimizer's default (sgd: 0, adamw: 0.01)"),
    "max_grad_norm": (lambda v: v is None or v > 0, "the gradient norm local steps clip to: > 0 (e.g. "
                      "max_grad_norm=1.0, the HF Trainer's), or left unset for no clipping"),
    "eval_batch_size": (lambda v: v is None or v >= 1,
                        "must be a positive integer, or left unset for the device's default"),
    **{name: _POSITIVE_INT for name in ("num_clients", "global_rounds", "local_epochs", "batch_size",
                                         "eval_gap", "repeats", "ece_bins", "shards_per_client", "history",
                                         "horizon", "num_test_keys", "n_mels")},
    **{name: (lambda v: v > 0, "a duration in milliseconds: use a value > 0 (window_ms=30, hop_ms=10: Warden's "
                               "keyword-spotting front end)") for name in ("window_ms", "hop_ms")},
}


# Local-optimizer run fields an algorithm's own optimizer fixes: field -> (the only value it takes, why and the fix).
_OWN_OPTIMIZER: dict[str, dict[str, tuple[Any, str]]] = {
    "flexifed": {"optimizer": ("sgd", "flexifed trains with FlexiFed-IMP's SGD with momentum (its hyperparameters "
                                      "momentum and weight_decay); use optimizer=sgd")},
    "mocosfl": {"optimizer": ("sgd", "mocosfl trains with its own SGD with momentum (sgd_momentum, weight_decay); "
                                     "use optimizer=sgd"),
                "lr_schedule": ("constant", "mocosfl decays lr on its own cosine schedule over the global rounds; "
                                            "drop lr_schedule"),
                "max_grad_norm": (None, "mocosfl's SGD does not clip gradients; drop max_grad_norm")},
}


def num_join_clients(num_clients: int, join_ratio: float) -> int:
    """Clients sampled per round: ``round(join_ratio * num_clients)``, at least 1 (PFLlib: ``int(...)``)."""
    return max(1, round(join_ratio * num_clients))


class ConfigError(ValueError):
    """Invalid run configuration; the message names the field and how to fix it."""


_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_STR_TAG = "tag:yaml.org,2002:str"


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding the same key twice (plain YAML keeps the last) and reads
    the value of a text field (:func:`_text_fields`) as the text written, never as a number."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden by the keys beside it
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable: SafeLoader's own error names it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first + 1}); keep only one of them",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
            if key in _text_fields() and isinstance(value_node, yaml.ScalarNode) and value_node.tag in _NUMBER_TAGS:
                value_node.tag = _STR_TAG  # the text as written: `crops: 0x32` is not YAML 1.1's hex 50
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> tuple[str, str]:
    """``(" line N column C", problem)`` of a YAML error, on one line."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    text = f"{context}: {problem}" if context and "duplicate key" not in problem else problem
    return where, " ".join(text.split())


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8, is malformed or empty, holds the same key twice,
            or is not a mapping of field names; the message names the file (and the line).
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror or err}); check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} line {line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); "
                          "save the file as UTF-8") from None
    try:
        loaded = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as err:
        where, problem = _yaml_problem(err)
        kind = "" if "duplicate key" in problem else "malformed YAML: "
        raise ConfigError(f"config file {path}{where}: {kind}{problem}") from None
    if loaded is None:
        raise ConfigError(f"config file {path} is empty; write one `field: value` per line (e.g. global_rounds: 5), "
                          "or start from a file in configs/")
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value (got a {type(loaded).__name__})")
    bad = [key for key in loaded if not isinstance(key, str)]
    if bad:
        raise ConfigError(f"config file {path}: key {bad[0]!r} is not a field name; keys are names such as "
                          "global_rounds")
    return loaded


def _is_numeric(annotation: Any) -> bool:
    """Whether a field's annotation is ``int`` or ``float`` (possibly ``| None``), where ``bool`` is no number."""
    if annotation in (int, float):
        return True
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_numeric(a) for a in typing.get_args(annotation))
    return False


def _no_bool(value: Any, numeric: bool) -> Any:
    """``value`` unchanged, unless it is a boolean given for a numeric field (YAML reads ``yes``/``on`` as true)."""
    if numeric and isinstance(value, bool):
        raise ValueError("must be a number, not a boolean (YAML reads yes/no/on/off/true/false as booleans)")
    return value


def _check_device(value: str) -> str:
    if not isinstance(value, str) or not _DEVICE.fullmatch(value.strip()):
        raise ValueError(f"unknown device {value!r}; choose one of {', '.join(DEVICES)} (e.g. device=cuda:0)")
    return value.strip()


class _Checked(BaseModel):
    """Checks shared by the run and head configs: no booleans for numbers, a known ``device``."""

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, v: Any, info: ValidationInfo) -> Any:
        return _no_bool(v, _is_numeric(cls.model_fields[info.field_name].annotation))

    @field_validator("device", check_fields=False)
    @classmethod
    def _known_device(cls, v: str) -> str:
        return _check_device(v)


class RunConfig(_Checked):
    """One federated run (or ``repeats`` runs with consecutive seeds).

    Field names follow the PFL literature and PFLlib's flags (``join_ratio``,
    ``global_rounds``, ``local_epochs``, ``eval_gap``). ``model`` is one architecture, or a
    comma-separated list assigned to clients round-robin (client k gets entry k mod len).
    ``partition=pfllib`` with ``partition_name`` reuses a partition imported from PFLlib.

    The selected algorithm's hyperparameters are declared in its module (its ``Params``) and
    held in ``hparams``. They are set by bare name (``M: 3`` in a file, ``M=3`` on the command
    line) or in a section named after the algorithm (``fedfomo: {M: 3}``); sections of other
    algorithms are ignored, so one template can carry several algorithms' settings. Logged
    MLflow params are flat: the run fields and the hyperparameters by bare name.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    # what to run
    algo: str = "fedfomo"
    """The FL algorithm, a name of the registry (``pfl.algorithms.REGISTRY``; see the algorithm reference)."""
    dataset: str = "cifar10"
    """The dataset, a name of the catalog (``pfl.data.datasets.CATALOG``)."""
    model: str = "cnn"
    """The architecture (``pfl.models.ARCHITECTURES``), or a comma-separated list assigned to clients round-robin
    (client k gets entry k mod len), e.g. ``vgg11,vgg13,vgg16,vgg19``."""
    model_width: float = 1.0
    """Channel multiplier of the VGG, CIFAR-ResNet, CharCNN and VDCNN families (1.0: the paper's widths)."""
    pretrained: str = "none"
    """Initial weights: ``none``, ``timm`` (timm's published weights) or the path of a safetensors weights file."""
    init_from: str | None = None
    """Start from a model a pfl run logged: ``runs:/<run id>`` (its client 0) or
    ``runs:/<run id>/clients/client_NNN``."""
    experiment: str = "pfl"
    """The MLflow experiment the runs are logged to."""
    # data
    data_dir: Path = Field(default_factory=lambda: Path(os.environ.get("PFL_DATA_DIR", "data")))
    """The data folder (default: ``$PFL_DATA_DIR``, else ``./data``)."""
    cache_dir: Path = Field(default_factory=lambda: Path(os.environ.get("PFL_CACHE_DIR", ".pfl_cache")))
    """Where built partitions are cached (default: ``$PFL_CACHE_DIR``, else ``./.pfl_cache``)."""
    download: bool = False
    """Download a missing dataset where it has a downloader (torchvision's CIFAR); false: a missing folder is an
    error naming the path."""
    # partition (PFLlib semantics)
    partition: Literal[PARTITIONS] = "pathological"
    """The partition scheme (PFLlib's names ``pat`` and ``dir`` are accepted too)."""
    partition_name: str | None = None
    """``partition=pfllib``: the name given to ``pfl data import-pfllib``."""
    alpha: float = 0.1
    """Dirichlet alpha (concentration) of ``partition=dirichlet`` and ``exdir``; smaller is more skewed."""
    classes_per_client: int | None = None
    """Classes per client of the pathological and exdir partitions (unset: PFLlib's default for the dataset, 2 for
    CIFAR-10, 10 for CIFAR-100, 20 for Tiny-ImageNet)."""
    balance: bool = False
    """Pathological partition: equal shares of each class among its clients (PFLlib's ``balance``)."""
    shards_per_client: int = 2
    """``partition=shards``: label-sorted shards per client (McMahan et al.; MocoSFL)."""
    num_clients: int = 20
    """Clients in the federation."""
    num_partitions: int | None = None
    """Split the data into this many shares, of which the first ``num_clients`` take part (unset: ``num_clients``)."""
    train_ratio: float = 0.75
    """Each client's train share of its data (PFLlib's 0.75); unused with ``official_split``; ``partition=natural
    split_by=time``: each trace's train part."""
    official_split: bool = False
    """Partition the dataset's own train and test sets separately (false: pool them and split each client's share,
    as PFLlib)."""
    # partition=natural: one client per natural group (viewer); split by time within each trace, or by a key (video)
    split_by: str = "time"
    """``partition=natural``: split each group by ``time`` within each trace, or by a key of the samples (``video``)."""
    num_test_keys: int = 4
    """``split_by=<key>``: how many of the key's values (videos) are every client's test content."""
    sample_groups: bool = False
    """``partition=natural``: a seeded sample of ``num_clients`` groups (false: the first ``num_clients``)."""
    # the dataset's own knobs (pfl.data.datasets.DATASET_OPTIONS), e.g. David MMSys'18's sliding windows
    history: int = 10
    """Viewport prediction: past positions in a window (10 at 5 Hz: 2 s)."""
    horizon: int = 5
    """Viewport prediction: steps ahead predicted (5 at 5 Hz: 1 s)."""
    predict: Literal["point", "sequence"] = "point"
    """Viewport prediction: the position ``horizon`` steps ahead, or all ``horizon`` positions."""
    train_on_valid: bool = True
    """CINIC-10: its valid set joins the official train set (false: left out, as FlexiFed's code)."""
    # a model's own knobs (pfl.models.MODEL_OPTIONS)
    embedding: bool = True
    """``vp_transformer``: a learned input embedding of the positions (false: a linear projection)."""
    # the downlink of algorithms with one global model (pfl.federated.downlink)
    downlink: str = "full"
    """What of the global model a client takes: ``full``, ``none`` or ``head_layers:K`` (the last K head layers)."""
    downlink_blend: float = 1.0
    """The client's new model: ``blend * global + (1 - blend) * own``."""
    # federated schedule
    join_ratio: float = 0.2
    """Fraction of the clients sampled each round (PFLlib's ``-jr``)."""
    global_rounds: int = 100
    """Global rounds (PFLlib's ``-gr``)."""
    local_epochs: int = 1
    """Local epochs per round (PFLlib's ``-ls``)."""
    batch_size: int = 10
    """Local batch size (PFLlib's ``-lbs``)."""
    drop_last: bool = True
    """Drop each epoch's last partial batch (PFLlib); false keeps it (torch DataLoader's default)."""
    lr: float = 0.005
    """Local learning rate (PFLlib's ``-lr``)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """The local optimizer, a fresh one per client and round (``sgd``: PFLlib's plain SGD)."""
    weight_decay: float | None = None
    """The local optimizer's weight decay (unset: the optimizer's default, sgd 0, adamw 0.01)."""
    lr_schedule: Literal["constant", "linear"] = "constant"
    """``linear``: lr decays to 0 over every client's round (FedIT's HF Trainer)."""
    max_grad_norm: float | None = None
    """Clip each local step's gradient norm to this (HF Trainer: 1.0); unset: no clipping."""
    eval_gap: int = 1
    """Rounds between evaluations (PFLlib's ``-eg``); the last round is always evaluated."""
    # new-client evaluation (PFLlib's -nnc / -ften): clients held out of training, adapted and scored (new/*)
    new_clients: int = 0
    """Clients held out of training for new-client evaluation, the same ones for every algorithm and seed (0: off)."""
    finetune_epochs: int = 0
    """Local epochs each new client adapts for (PFLlib's ``-ften``; 0: scored as received)."""
    new_client_eval: Literal["every", "final"] = "every"
    """Evaluate the new clients at every evaluation, or after the last round only (PFLlib)."""
    seed: int = 0
    """The run's seed; every random stream derives from it (``pfl.seed``)."""
    repeats: int = 1
    """Runs with seeds ``seed .. seed + repeats - 1``."""
    hparams: dict[str, Any] = Field(default_factory=dict)
    """The selected algorithm's hyperparameters, validated by its ``Params`` (set by bare name or in a section named
    after the algorithm; see the algorithm reference)."""
    # hyperparameter search
    tuning_val_ratio: float = 0.2
    """Hyperparameter search: every trial scores on the last ``tuning_val_ratio`` of each client's train split."""
    # on-device input path (pfl.data.transforms): resizing to the model's input, training augmentation
    image_size: int | None = None
    """The model's input side in pixels (unset: the dataset's own size)."""
    random_crop: int = 0
    """Zero padding (pixels) of a random crop at the stored size; 0: off."""
    hflip: bool = False
    """Random horizontal flips in training."""
    # audio front end (pfl.data.audio): log-mel spectrograms of each clip, computed on the device
    n_mels: int = 40
    """Mel bins of the log-mel spectrogram."""
    window_ms: float = 30.0
    """STFT window in milliseconds (30 ms: 480 samples at 16 kHz)."""
    hop_ms: float = 10.0
    """STFT hop in milliseconds (10 ms: 160 samples)."""
    # evaluation and runtime
    ece_bins: int = 20
    """Equal-mass bins of each client's ECE (F-ECE)."""
    eval_batch_size: int | None = None
    """Inference batch size (unset: the device's default, ``pfl.data.loader.inference_batch_size``)."""
    device: str = "auto"
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    num_threads: int = 0
    """torch CPU threads (0: all cores)."""
    client_parallelism: Literal["sequential", "vectorized"] = "sequential"
    """``vectorized``: a round's clients train together (``vmap`` over stacked parameters; for GPUs)."""
    client_state_budget_mb: int = 0
    """Per-client state each store holds in memory, in MB; beyond it, on disk (0: no limit)."""
    checkpoint_every: int = 0
    """Rounds between checkpoints (0: every round while a checkpoint is under 100 MB, else every 5)."""
    keep_checkpoint: bool = False
    """A FINISHED run keeps its last checkpoint (local and logged); default: deleted."""
    deterministic: bool = False
    """GPU: ``torch.use_deterministic_algorithms`` (CPU runs are deterministic already)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16``: autocast on GPUs (CPU runs stay fp32)."""

    @model_validator(mode="before")
    @classmethod
    def _gather_hparams(cls, data: Any) -> Any:
        """Move the selected algorithm's hyperparameters (bare names and its section) into ``hparams``. A name
        that is both a run field and one of its hyperparameters (``weight_decay`` of FlexiFed's and MocoSFL's own
        optimizers) sets the hyperparameter: one name, one knob."""
        if not isinstance(data, dict) or data.get("algo", "fedfomo") not in _ALGORITHM_REGISTRY:
            return data
        data = dict(data)
        algo = data.get("algo", "fedfomo")
        fields = _ALGORITHM_REGISTRY[algo].Params.model_fields
        hparams = data.pop("hparams", None) or {}
        if not isinstance(hparams, dict):
            raise ValueError(f"hparams must be a mapping of {algo}'s hyperparameters, e.g. {{M: 3}} "
                             f"(got {_short(hparams)})")
        hparams = dict(hparams)
        for name in _ALGORITHM_REGISTRY:
            section = data.pop(name, None)
            if section is not None and not isinstance(section, dict):
                raise ValueError(f"{name}: a section of {name}'s hyperparameters must be a mapping, e.g. "
                                 f"`{name}: {{name: value}}` (got {_short(section)})")
            if name == algo and section:
                hparams.update(section)
        for key in [k for k in data if k in fields]:
            if key in cls.model_fields and data[key] is None:  # the run field left unset (a config's dump holds both)
                continue
            hparams[key] = data.pop(key)
        data["hparams"] = hparams
        return data

    @field_validator("hparams")
    @classmethod
    def _check_hparams(cls, v: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        algo = info.data.get("algo")
        if algo not in _ALGORITHM_REGISTRY:
            return v
        params = _ALGORITHM_REGISTRY[algo].Params
        fields = params.model_fields
        flagged = {k for k, x in v.items()
                   if k in fields and _is_numeric(fields[k].annotation) and isinstance(x, bool)}
        bad = [f"{k}: must be a number, not a boolean (got {v[k]!r})" for k in flagged]
        bad += [f"{k!r}: not a hyperparameter name of {algo}" for k in v if not isinstance(k, str)]
        try:
            values = params(**{k: x for k, x in v.items() if isinstance(k, str)}).model_dump()
        except ValidationError as err:
            bad += [f"{'.'.join(map(str, e['loc']))}: {_did_you_mean(e, list(cls.model_fields), fields)} "
                    f"(got {_short(e.get('input'))})" for e in err.errors()
                    if not (e["loc"] and e["loc"][0] in flagged)]
            values = {}
        bad += [f"{k}: must be a finite number (got {x!r})" for k, x in values.items()
                if isinstance(x, float) and not math.isfinite(x)]
        if bad:
            raise ValueError("; ".join(bad))
        return values

    @field_validator("partition", mode="before")
    @classmethod
    def _pfllib_partition_names(cls, v: Any) -> Any:
        return PARTITION_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("experiment")
    @classmethod
    def _named_experiment(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the MLflow experiment name must not be empty, e.g. experiment=pfl")
        return v

    @field_validator("model")
    @classmethod
    def _known_models(cls, v: str) -> str:
        names = [m.strip() for m in v.split(",")]
        unknown = [m for m in names if m not in ARCHITECTURES]
        if unknown or not v.strip():
            raise ValueError(f"unknown model {', '.join(unknown) or v!r}; choose one of {', '.join(ARCHITECTURES)}, "
                             "or a comma-separated list of them (assigned to clients round-robin)")
        return ",".join(names)

    @field_validator("pretrained")
    @classmethod
    def _pretrained_source(cls, v: str) -> str:
        if v in ("none", "timm"):
            return v
        from pfl.models.pretrained import CHECKPOINT_SUFFIXES

        path = Path(v).expanduser()
        if not path.is_file() or path.suffix not in CHECKPOINT_SUFFIXES:
            what = "does not exist" if not path.is_file() else "is not a weights file"
            raise ValueError(f"{v} {what}; use pretrained=none, pretrained=timm, or the path of a "
                             f"{' / '.join(CHECKPOINT_SUFFIXES)} file")
        return str(path)

    @field_validator("init_from")
    @classmethod
    def _init_from_uri(cls, v: str | None) -> str | None:
        if v is not None and not _INIT_FROM.fullmatch(v):
            raise ValueError(f"{v!r} is not a pfl model URI; use init_from=runs:/<run id> (the run's client 0, e.g. "
                             "a `pfl pretrain` run) or runs:/<run id>/clients/client_003")
        return v

    @field_validator(*_CHOICES)
    @classmethod
    def _known_choice(cls, v: str, info: ValidationInfo) -> str:
        what, choices = _CHOICES[info.field_name]
        if v not in choices:
            raise ValueError(f"unknown {what} {v!r}; choose one of {', '.join(choices)}")
        return v

    @field_validator(*_RULES)
    @classmethod
    def _check_rule(cls, v: Any, info: ValidationInfo) -> Any:
        ok, fix = _RULES[info.field_name]
        if not ok(v):
            raise ValueError(fix)
        return v

    @model_validator(mode="after")
    def _algorithm_takes_the_run(self) -> RunConfig:
        for field, (value, why) in _OWN_OPTIMIZER.get(self.algo, {}).items():
            if getattr(self, field) != value:
                raise ValueError(f"{field}={getattr(self, field)}: {why}")
        if self.algo == "flexifed":
            check_families(self.models)
        algo = _ALGORITHM_REGISTRY[self.algo]
        if (self.downlink, self.downlink_blend) != ("full", 1.0):
            if not algo.takes_downlink:
                takers = ", ".join(n for n, cls in _ALGORITHM_REGISTRY.items() if cls.takes_downlink)
                raise ValueError(f"downlink={self.downlink} downlink_blend={self.downlink_blend:g}: {self.algo} has no "
                                 f"one global model to send down; use algo={takers}, or drop the downlink knobs")
            Downlink.parse(self.downlink, self.downlink_blend)
        return self

    @model_validator(mode="after")
    def _task_takes_the_run(self) -> RunConfig:
        """The dataset's task and modality decide which algorithms, partitions, models and input knobs apply."""
        from pfl.tasks import task_of

        task, modality = CATALOG[self.dataset].task, CATALOG[self.dataset].modality
        what = f"{self.dataset} is {task_of(task).title}"
        algo = _ALGORITHM_REGISTRY[self.algo]
        if task not in algo.tasks:
            takers = ", ".join(n for n, cls in _ALGORITHM_REGISTRY.items() if task in cls.tasks)
            raise ValueError(f"algo={self.algo} trains {' and '.join(algo.tasks)} only; {what}: use algo={takers}")
        if self.partition not in task_of(task).partitions:
            why = "needs class labels" if self.partition != "natural" else "needs natural groups"
            raise ValueError(f"partition={self.partition} {why}; {what}: use partition="
                             f"{' or '.join(task_of(task).partitions)}")
        if self.partition == "natural" and not CATALOG[self.dataset].groups:
            grouped = ", ".join(n for n, info in CATALOG.items() if info.groups)
            raise ValueError(f"partition=natural makes one client per natural group (viewer, speaker), and "
                             f"{self.dataset} has none; use another partition, or dataset={grouped}")
        wrong = [m for m in self.models if modality not in modalities_of(m)]
        if wrong:
            fits = [m for m in ARCHITECTURES if modality in modalities_of(m)]
            takes = " or ".join(_INPUTS[m] for m in modalities_of(wrong[0]))
            raise ValueError(f"model={wrong[0]} takes {takes}, {self.dataset}'s inputs are {_INPUTS[modality]}; use "
                             f"model={' | '.join(fits)}")
        for other, fields in MODALITY_FIELDS.items():
            knobs = [k for k, default in fields.items() if other != modality and getattr(self, k) != default]
            if knobs:
                raise ValueError(f"{knobs[0]}={getattr(self, knobs[0])} is an {other} knob and {self.dataset}'s "
                                 f"inputs are {_INPUTS[modality]}; remove {', '.join(knobs)}")
        if modality == "audio":  # the front end's own ranges (a mel filter without an FFT bin, ...)
            from pfl.data.audio import AudioTransform

            AudioTransform(self.n_mels, self.window_ms, self.hop_ms)
        return self

    @model_validator(mode="after")
    def _fill_dataset_defaults(self) -> RunConfig:
        if self.pretrained != "none" and self.init_from is not None:
            raise ValueError("pretrained and init_from both set the initial weights; keep one of them")
        if (self.partition == "pfllib") != (self.partition_name is not None):
            raise ValueError("partition_name names a partition imported with `pfl data import-pfllib DIR`; "
                             "set it together with partition=pfllib and only then")
        if self.partition == "pfllib" and (self.official_split or self.num_partitions is not None):
            raise ValueError("official_split and num_partitions shape a partition pfl builds; a PFLlib import "
                             "(partition=pfllib) is fixed: remove them")
        if self.new_clients >= self.num_clients:
            raise ValueError(f"new_clients={self.new_clients} holds out every one of the {self.num_clients} clients; "
                             f"keep at least one for training: new_clients <= {self.num_clients - 1}")
        if self.num_partitions is not None and self.num_partitions < self.num_clients:
            raise ValueError(f"num_partitions={self.num_partitions} is below num_clients={self.num_clients}: the "
                             f"first num_clients of num_partitions shares take part; set num_partitions >= "
                             f"{self.num_clients}, or leave it unset")
        if self.dataset not in NUM_CLASSES:  # a regression: no classes to deal
            return self
        if self.classes_per_client is None:
            object.__setattr__(self, "classes_per_client", DEFAULT_CLASSES_PER_CLIENT[self.dataset])
        classes, cpc = NUM_CLASSES[self.dataset], self.classes_per_client
        if self.partition in ("pathological", "exdir") and cpc > classes:
            raise ValueError(f"classes_per_client={cpc} exceeds the {classes} classes of {self.dataset}; "
                             f"use classes_per_client <= {classes}")
        # (Tiny-ImageNet's class count is its wnids.txt's, which may list fewer than 200)
        if self.partition in ("pathological", "exdir") and self.dataset != "tinyimagenet" and \
                self.num_clients * cpc < classes:
            raise ValueError(f"{self.partition} partition: num_clients * classes_per_client = {self.num_clients} * "
                             f"{cpc} leaves some of the {classes} classes of {self.dataset} without a client; raise "
                             f"num_clients or classes_per_client")
        return self

    def flat_params(self) -> dict[str, Any]:
        """Flat, searchable run parameters for tracking: the shared run fields (paths as strings), the
        partition's own fields (:data:`PARTITION_FIELDS`: ``alpha`` only for a Dirichlet partition, ...), the
        dataset's (:data:`pfl.data.datasets.DATASET_OPTIONS`: ``history`` only for David MMSys'18), the models'
        (:data:`pfl.models.MODEL_OPTIONS`: ``embedding`` only with ``vp_transformer``), the downlink knobs only for
        an algorithm that takes them, the new-client knobs only when clients are held out, a modality's knobs
        (:data:`MODALITY_FIELDS`) only for its inputs, and the selected algorithm's hyperparameters by bare name;
        nothing of another algorithm, partition, dataset or model."""
        values = self.model_dump(exclude={"hparams"})
        values = {k: v for k, v in values.items() if self._applies(k)}
        return {**{k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}, **self.hparams}

    def _applies(self, name: str) -> bool:
        """Whether run field ``name`` applies to this run (see :meth:`flat_params`)."""
        if name in PARTITION_FIELDS:
            return self.partition in PARTITION_FIELDS[name]
        if name in DATASET_OPTIONS:
            return self.dataset in DATASET_OPTIONS[name]
        if name in {o for options in MODEL_OPTIONS.values() for o in options} - set(DATASET_OPTIONS):
            return any(name in MODEL_OPTIONS.get(m, ()) for m in self.models)
        if name in ("downlink", "downlink_blend"):
            return _ALGORITHM_REGISTRY[self.algo].takes_downlink
        if name in ("new_clients", "finetune_epochs", "new_client_eval"):
            return self.new_clients > 0
        for modality, fields in MODALITY_FIELDS.items():
            if name in fields:
                return CATALOG[self.dataset].modality == modality
        return True

    @property
    def algo_label(self) -> str:
        """The algorithm in run names (:meth:`pfl.algorithms.Algorithm.run_label`), e.g. ``flexifed-max_common``, with
        the downlink when it is not FedAvg's (:attr:`pfl.federated.downlink.Downlink.label`:
        ``fedavg-head2-blend0.5``)."""
        label = _ALGORITHM_REGISTRY[self.algo].run_label(self.hparams)
        if _ALGORITHM_REGISTRY[self.algo].takes_downlink:
            label += Downlink.parse(self.downlink, self.downlink_blend).label
        return label

    @property
    def partition_label(self) -> str:
        """The partition in run names: ``dir0.1``, ``pat2`` (classes per client), ``exdir0.1c2``, ``iid``,
        ``shards2`` (shards per client), ``natural`` (split by time) or ``natural_video4`` (4 test videos), or the
        PFLlib import's name."""
        if self.partition == "pfllib":
            return str(self.partition_name)
        if self.partition == "natural":
            return "natural" if self.split_by == "time" else f"natural_{self.split_by}{self.num_test_keys}"
        return {"dirichlet": f"dir{self.alpha:g}", "pathological": f"pat{self.classes_per_client}",
                "exdir": f"exdir{self.alpha:g}c{self.classes_per_client}",
                "shards": f"shards{self.shards_per_client}"}.get(self.partition, self.partition)

    def describe(self, alphas: str | None = None, join_ratios: str | None = None) -> str:
        """The setting in words, for run descriptions: algorithm, dataset, partition, clients and participation,
        schedule, model. A sweep passes the swept values as text (``alphas="0.1, 0.5"``) in place of its own."""
        alpha = alphas or f"{self.alpha:g}"
        part = {"dirichlet": f"Dirichlet partition (alpha {alpha})",
                "pathological": f"pathological partition ({self.classes_per_client} classes per client)",
                "exdir": f"extended Dirichlet partition (alpha {alpha}, {self.classes_per_client} classes "
                         "per client)", "iid": "IID partition",
                "shards": f"sort-and-shard partition ({self.shards_per_client} shards per client)",
                "pfllib": f"PFLlib partition {self.partition_name}",
                "natural": "natural partition (one client per " + ("group, split by time within each trace)"
                                                                   if self.split_by == "time" else
                                                                   f"group, {self.num_test_keys} test values of "
                                                                   f"{self.split_by})")}[self.partition]
        if self.official_split:
            part += " of the official train and test sets"
        if self.num_partitions is not None:
            part += f" into {self.num_partitions} shares"
        knobs = ", ".join(f"{k}={v}" for k, v in self.hparams.items())
        return (f"{self.algo}{f' ({knobs})' if knobs else ''} on {self.dataset}, {part}, {self.num_clients} clients, "
                f"join ratio {join_ratios or f'{self.join_ratio:g}'}, {self.global_rounds} global rounds of "
                f"{self.local_epochs} local epoch(s) (batch {self.batch_size}, {self._optimizer_words()}), model "
                f"{self.model}{self._inputs_and_weights()}")

    def _optimizer_words(self) -> str:
        """The local optimizer in words: ``sgd lr 0.005``, and what is set of ``adamw lr 0.0003, weight decay 0,
        linear decay per round, grad norm clipped to 1``."""
        extras = [f"weight decay {self.weight_decay:g}" if self.weight_decay is not None else "",
                  "linear decay per round" if self.lr_schedule == "linear" else "",
                  f"grad norm clipped to {self.max_grad_norm:g}" if self.max_grad_norm is not None else ""]
        return ", ".join([f"{self.optimizer} lr {self.lr:g}", *filter(None, extras)])

    def _inputs_and_weights(self) -> str:
        """`` at 224x224 from init_from=runs:/...`` for a run with resized inputs or initial weights, else empty."""
        size = f" at {self.image_size}x{self.image_size}" if self.image_size else ""
        source = (f" from init_from={self.init_from}" if self.init_from else
                  f" from pretrained={self.pretrained}" if self.pretrained != "none" else "")
        return size + source

    def setting_name(self) -> str:
        """``<algo>-<dataset>-<partition><alpha or classes>-jr<ratio>``, e.g. ``fedfomo-cifar10-dir0.1-jr0.2`` (the
        algorithm's label may add its variant: ``flexifed-max_common``); ``central-<dataset>`` for one client
        holding the whole dataset (centralized training, ``pfl pretrain``)."""
        if self.num_clients == 1:
            return f"central-{self.dataset}"
        return f"{self.algo_label}-{self.dataset}-{self.partition_label}-jr{self.join_ratio:g}"

    def run_name(self, seed: int) -> str:
        """An FL run's name: :meth:`setting_name` and ``-s<seed>``, e.g. ``fedfomo-cifar10-dir0.1-jr0.2-s0``."""
        return f"{self.setting_name()}-s{seed}"

    def launch_name(self) -> str:
        """A launch run's name: the FL runs' setting plus model, global rounds and seeds, e.g.
        ``fedfomo-cifar10-pat2-jr0.2-cnn-r100-s0-2`` for seeds 0, 1, 2."""
        return f"{self.setting_name()}-{self.model}-r{self.global_rounds}-{self.seeds_label}"

    @property
    def seeds_label(self) -> str:
        """The repeats' seeds in run names: ``s0``, or ``s0-2`` for seeds 0, 1, 2."""
        return f"s{self.seed}" + (f"-{self.seed + self.repeats - 1}" if self.repeats > 1 else "")

    @property
    def models(self) -> list[str]:
        """The architecture names of ``model``, in order (client k gets ``models[k % len(models)]``)."""
        return self.model.split(",")

    @property
    def num_join_clients(self) -> int:
        """Clients sampled per round: :func:`num_join_clients` of the clients that train (all but ``new_clients``)."""
        return num_join_clients(self.num_clients - self.new_clients, self.join_ratio)

    @property
    def new_client_ids(self) -> tuple[int, ...]:
        """The clients held out of training for new-client evaluation, ascending: ``new_clients`` of the
        ``num_clients`` drawn without replacement from a stream that depends on ``num_clients`` alone, so every
        algorithm and seed holds out the same ones (PFLlib's new clients are the ids after ``num_clients``, fixed by
        its generated dataset)."""
        if not self.new_clients:
            return ()
        rng = np.random.default_rng(derive_seed(0, "new_clients", self.num_clients))
        return tuple(sorted(rng.choice(self.num_clients, self.new_clients, replace=False).tolist()))

    @property
    def train_client_ids(self) -> list[int]:
        """The clients that take part in training, ascending (all but :attr:`new_client_ids`)."""
        held_out = set(self.new_client_ids)
        return [c for c in range(self.num_clients) if c not in held_out]


METHOD_FIELDS = {"rank": ("loraph",), "lora_init": ("loraph",)}  # head-method fields of one method only


class HeadConfig(_Checked):
    """A head run: APH or LoRAPH on every client of a finished FL run (``pfl heads``).

    Method knobs and defaults follow the user's setup of APH (Chen et al., AAAI 2024,
    "Watch Your Head", Sec. 4 and its official code): ``global_epoch`` epochs of SGD
    (weight decay 1e-5, batch 128) for each of ``sampling_num`` members, learning rates
    log-uniform in [``lower_lr``, ``upper_lr``], prior noise exponent offset ``p_lambda``.
    ``perturb_scope=head`` perturbs the head only (the paper); ``model`` also gives every
    member a noisy frozen copy of the base (the official code). LoRAPH's ``rank`` and
    ``lora_init`` (``prior``: B_j from APH's noise rule; ``standard``: B_j = 0).
    ``data_dir`` (when set) replaces the FL run's data folder. ``ood_dataset`` is the
    out-of-distribution set every client's models are also scored on (:mod:`pfl.heads.ood`):
    ``auto`` picks cifar100 for cifar10 models, cifar10 for cifar100 and cifar100 (resized to
    64x64) for tinyimagenet; ``none`` skips OOD detection.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)

    method: Literal["aph", "loraph"] = "aph"
    """The head method: APH (perturbed heads) or LoRAPH (low-rank perturbed heads)."""
    global_epoch: int = Field(10, ge=1)
    """Epochs of SGD of each ensemble member."""
    sampling_num: int = Field(10, ge=1)
    """Ensemble members per client."""
    upper_lr: float = Field(0.1, gt=0)
    """Upper end of the members' log-uniform learning rates."""
    lower_lr: float = Field(0.01, gt=0)
    """Lower end of the members' log-uniform learning rates."""
    p_lambda: float = 0.1
    """Offset of the prior noise exponent (APH's noise rule)."""
    perturb_scope: Literal["head", "model"] = "head"
    """``head``: perturb the head only (the paper); ``model``: every member also gets a noisy frozen copy of the
    base (the official code)."""
    rank: int = Field(8, ge=1)
    """LoRAPH: rank of each member's low-rank head update."""
    lora_init: Literal["prior", "standard"] = "prior"
    """LoRAPH: ``prior`` draws B_j from APH's noise rule; ``standard`` sets B_j = 0."""
    batch_size: int = Field(128, ge=1)
    """Batch size of the members' SGD."""
    weight_decay: float = Field(1e-5, ge=0)
    """Weight decay of the members' SGD."""
    seed: int = Field(0, ge=0)
    """Seed of the members' draws and batch orders."""
    ece_bins: int = Field(20, ge=1)
    """Equal-mass bins of each client's ECE (F-ECE)."""
    global_ece_bins: int = Field(15, ge=1)
    """Uniform bins of the global ECE (all clients' predictions pooled)."""
    eval_batch_size: int | None = Field(None, ge=1)
    """Inference batch size (unset: the device's default, ``pfl.data.loader``)."""
    data_dir: Path | None = None
    """Replaces the FL run's data folder (unset: the FL run's)."""
    device: str = "auto"
    """``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    num_threads: int = Field(0, ge=0)
    """torch CPU threads (0: all cores)."""
    ood_dataset: Literal["auto", "none", "cifar10", "cifar100", "tinyimagenet"] = "auto"
    """The out-of-distribution set every client's models are also scored on (``auto``: cifar100 for cifar10 models,
    cifar10 for cifar100, cifar100 resized to 64x64 for tinyimagenet; ``none``: no OOD detection)."""

    @model_validator(mode="after")
    def _lr_range(self) -> HeadConfig:
        if self.lower_lr > self.upper_lr:
            raise ValueError(f"lower_lr ({self.lower_lr}) must not exceed upper_lr ({self.upper_lr}); swap them")
        return self

    def flat_params(self) -> dict[str, Any]:
        """Flat params for tracking (paths as strings, unset values as empty strings), without the fields of the
        other method (:data:`METHOD_FIELDS`: LoRAPH's ``rank`` and ``lora_init`` only for LoRAPH)."""
        values = {k: v for k, v in self.model_dump().items() if self.method in METHOD_FIELDS.get(k, (self.method,))}
        return {k: ("" if v is None else str(v) if isinstance(v, Path) else v) for k, v in values.items()}


def format_validation_error(err: ValidationError, model: type[BaseModel] = RunConfig,
                            algo: str | None = None) -> str:
    """One line naming every bad field of ``model`` (``field: what to fix (got value)``, joined by ``; ``), for
    :class:`ConfigError`. ``algo``: the selected algorithm, whose hyperparameters unknown names are compared to."""
    parts = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = " ".join(e["msg"].removeprefix("Value error, ").split())
        if field == "hparams" and e["type"] == "value_error":  # the algorithm's Params already named each field
            parts.extend(msg.split("; "))
            continue
        if not field:  # a check across fields: the message names them
            parts.append(msg)
            continue
        if e["type"] == "extra_forbidden":
            msg = _unknown_field(field, model, algo)
        elif e["type"] == "finite_number":
            msg = "must be a finite number, not nan or inf"
        if model is RunConfig and field in _RULES and e["type"] != "value_error":
            msg = f"{msg}; {_RULES[field][1]}"
        parts.append(f"{field}: {msg} (got {_short(e.get('input'))})")
    return "invalid configuration: " + "; ".join(parts)


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _suggest(name: str, candidates: list[str], sections: tuple[str, ...] = ()) -> str:
    """`` did you mean X?`` for the closest candidate (or algorithm section, which must be closer), or ``""``."""
    close = [c for c in [*candidates, *sections] if c.lower() == name.lower().replace("-", "_")]
    close = close or difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    close = close or difflib.get_close_matches(name, sections, n=1, cutoff=0.8)
    return f" did you mean {close[0]}?" if close else ""


def _did_you_mean(e: Any, run_fields: list[str], hp_fields: dict[str, Any]) -> str:
    """The message of a hyperparameter error; an unknown name gets the closest known one."""
    if e["type"] != "extra_forbidden":
        return " ".join(e["msg"].split())
    name = str(e["loc"][-1])
    return "unknown hyperparameter;" + (_suggest(name, [*hp_fields, *run_fields]) or
                                         f" the hyperparameters are {', '.join(hp_fields) or 'none'}")


def _unknown_field(field: str, model: type[BaseModel], algo: str | None = None) -> str:
    """Why ``field`` is unknown: another algorithm's hyperparameter, or not a field at all (names the closest
    field or hyperparameter of ``algo``, and lists the valid fields)."""
    owners = [name for name, cls in _ALGORITHM_REGISTRY.items() if field in cls.Params.model_fields]
    if model is RunConfig and owners:
        return (f"a hyperparameter of {' and '.join(owners)}, not of the selected algo; set algo={owners[0]}, or "
                f"remove it (or put it under a `{owners[0]}:` section, which other algorithms ignore)")
    fields = [f for f in model.model_fields if f != "hparams"]
    candidates, sections = list(fields), ()
    if model is RunConfig:
        algo = algo if algo in _ALGORITHM_REGISTRY else model.model_fields["algo"].default
        candidates += _ALGORITHM_REGISTRY[algo].Params.model_fields
        sections = tuple(_ALGORITHM_REGISTRY)
    tail = " and the algorithm's hyperparameters" if model is RunConfig else ""
    return f"unknown field;{_suggest(field, candidates, sections)} valid fields are: {', '.join(fields)}{tail}"


def algorithm_fields(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the hyperparameters of algorithms other than ``values["algo"]`` (e.g. an older run's
    ``config.json``, which logged every algorithm's knobs)."""
    algo = values.get("algo", "fedfomo")
    others = {f for name, cls in _ALGORITHM_REGISTRY.items() if name != algo for f in cls.Params.model_fields}
    own = set(_ALGORITHM_REGISTRY[algo].Params.model_fields) if algo in _ALGORITHM_REGISTRY else set()
    return {k: v for k, v in values.items() if k not in others or k in own or k in RunConfig.model_fields}


def _split_pairs(arg: str) -> list[str]:
    """One argument holding several whitespace-separated ``key=value`` pairs (``mlflow run -P overrides="M=3
    epsilon=0.1"`` passes them as one) as its pairs (shell-style quoting); any other argument unchanged."""
    parts = shlex.split(arg) if any(c.isspace() for c in arg) else [arg]
    return parts if len(parts) > 1 and all("=" in p for p in parts) else [arg]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``0.2`` -> float, ``true`` -> bool).

    Empty values (``key=``) are skipped, so launchers can pass unset parameters. An argument holding
    several pairs separated by whitespace (``"M=3 epsilon=0.1"``) counts as those pairs.

    Raises:
        ConfigError: an item has no ``=``.
    """
    parsed: dict[str, Any] = {}
    for item in [part for arg in overrides if arg.strip() for part in _split_pairs(arg)]:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value (e.g. global_rounds=5)")
        if raw.strip() == "":
            continue
        try:
            value = yaml.load(raw, Loader=_StrictLoader)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)[1]}); "
                              "fix it, or quote it to pass text") from None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        parsed[key.strip()] = raw.strip() if number and key.strip() in _text_fields() else value  # as written
    return parsed


@functools.cache
def _text_fields() -> frozenset[str]:
    """The text (``str``) fields of :class:`RunConfig` and of every algorithm's hyperparameters, whose values
    are kept as written where YAML would read a number (``crops=0x32`` is not hex 50, ``experiment=2024`` is
    the name 2024)."""
    models = [RunConfig, *(cls.Params for cls in _ALGORITHM_REGISTRY.values())]
    return frozenset(name for model in models for name, field in model.model_fields.items()
                     if field.annotation in (str, str | None))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                values_over_file: dict[str, Any] | None = None) -> RunConfig:
    """Build a validated :class:`RunConfig` from an optional YAML file and ``key=value`` overrides.

    Overrides win over ``values_over_file`` (e.g. PFLlib flags translated by :mod:`pfl.pfllib_args`), which win
    over the file; the file wins over the defaults. The file is read strictly: a key
    given twice is an error, and so are an empty file, malformed YAML and non-UTF-8 text.

    Raises:
        ConfigError: the file is missing, unreadable, empty, malformed or not a mapping, an override is
            malformed, or a field is unknown or out of range. The message is one line: it names the
            file and line, or every bad field (with "did you mean" for a misspelt name).
    """
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder; pass a YAML file, e.g. "
                              "configs/fedfomo_cifar10_pr0.2.yaml")
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a file from configs/, e.g. "
                              "configs/fedfomo_cifar10_pr0.2.yaml")
        values.update(_read_yaml(path))
    values.update(values_over_file or {})
    values.update(parse_overrides(overrides or []))
    try:
        return RunConfig(**values)
    except ValidationError as err:
        algo = values.get("algo")
        raise ConfigError(format_validation_error(err, algo=algo if isinstance(algo, str) else None)) from None


def load_head_config(overrides: list[str] | None = None, **values: Any) -> HeadConfig:
    """A validated :class:`HeadConfig` from keyword values and ``key=value`` overrides (which win).

    Raises:
        ConfigError: unknown field or bad value (every bad field is listed).
    """
    values.update(parse_overrides(overrides or []))
    try:
        return HeadConfig(**values)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, HeadConfig)) from None


def field_range(model: type[BaseModel], name: str) -> str:
    """The values field ``name`` of ``model`` (:class:`RunConfig`, :class:`HeadConfig` or an algorithm's
    ``Params``) accepts, in words: a ``Literal``'s choices, the bounds of its ``Field`` (``>= 1``), or the fix its
    range rule names (:data:`_RULES`); ``""`` when anything of its type goes. The docs' config and knob references
    are generated from it.

    Raises:
        KeyError: ``model`` has no field ``name``.
    """
    field = model.model_fields[name]
    choices = [typing.get_args(t) for t in (field.annotation, *typing.get_args(field.annotation))
               if typing.get_origin(t) is Literal]
    if choices:
        return "one of " + ", ".join(f"`{c}`" for c in choices[0])
    bounds = [f"{symbol} {getattr(m, attr)}" for m in field.metadata
              for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if hasattr(m, attr)]
    if bounds:
        return ", ".join(bounds)
    if model is RunConfig and name in _RULES:
        return _RULES[name][1]
    return ""
