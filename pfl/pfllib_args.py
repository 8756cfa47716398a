"""PFLlib's command line in pfl's terms: ``pfl train --pfllib-args "-algo FedFomo -data Cifar10 -jr 0.2 ..."``.

:func:`translate` reads the flags of PFLlib's ``system/main.py`` (its ``argparse`` parser: the same
short and long option names, types and abbreviation rules, so a string means what it means to PFLlib)
and returns the pfl config values they set. Only the flags given are translated: a flag left out
keeps pfl's value (the config file's or pfl's default), not PFLlib's argparse default (PFLlib runs
``-gr 2000``, ``-jr 1.0`` and MNIST unless told otherwise).

A flag pfl does not model is ignored only where its value leaves PFLlib's run as pfl runs it (its
default, an output name, another algorithm's knob); any other value is a :class:`ConfigError` naming
the flag and why. PFLlib's ``type=bool`` flags read every non-empty value as true, ``-ld False``
included, and are read here the same way. PFLlib's partition is not on its command line (its
``generate_*.py`` scripts write it into the dataset folder), so ``-data`` never sets the partition.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from pfl.config import NUM_CLASSES, ConfigError, num_join_clients

ALGORITHMS = {"FedAvg": "fedavg", "FedFomo": "fedfomo", "FedALA": "fedala", "Local": "local", "FedPer": "fedper",
              "LG-FedAvg": "lgfedavg", "FedRep": "fedrep", "FedBABU": "fedbabu", "FedBN": "fedbn", "FedROD": "fedrod",
              "Ditto": "ditto", "APFL": "apfl", "PerAvg": "perfedavg", "pFedMe": "pfedme", "FedPAC": "fedpac",
              "FedProx": "fedprox", "SCAFFOLD": "scaffold", "MOON": "moon", "FedProto": "fedproto"}  # main.py's names
DATASETS = {"Cifar10": "cifar10", "Cifar100": "cifar100", "TinyImagenet": "tinyimagenet"}  # PFLlib folder names
MODELS = {"CNN": "cnn", "ResNet18": "resnet18"}
_PFLLIB_NAMES = {"algorithm": ALGORITHMS, "dataset": DATASETS, "model": MODELS}
_MIN_TIME_THRESHOLD = 10000.0  # PFLlib's default -tth (seconds): no client is that slow, so none is dropped
_OTHER_ALGORITHMS = "a knob of PFLlib algorithms pfl does not have; none of pfl's algorithms reads it"


@dataclass(frozen=True)
class _Flag:
    """One PFLlib flag: option strings, argparse type, and what pfl does with it.

    ``key``: the pfl config key it sets (an algorithm hyperparameter when ``owners`` names the algorithms reading it).
    ``neutral``: for a flag pfl does not model, the values that leave PFLlib's run as pfl runs it; other
    values are refused with ``why``. Neither ``key`` nor ``neutral``: always ignored, because ``why``.
    A flag with none of the three is translated by :func:`parse_pfllib_args` itself.
    """

    short: str
    long: str
    type: Callable[[str], Any] = str
    key: str | None = None
    owners: tuple[str, ...] = ()
    neutral: Callable[[Any], bool] | None = None
    why: str = ""

    @property
    def dest(self) -> str:
        return self.long.removeprefix("--")

    @property
    def name(self) -> str:
        return f"{self.short}/{self.long}"


def _is_false(value: Any) -> bool:
    return not value


def _is_zero(value: Any) -> bool:
    return value == 0


_FLAGS = (
    # translated by parse_pfllib_args
    _Flag("-algo", "--algorithm"), _Flag("-data", "--dataset"), _Flag("-m", "--model"),
    _Flag("-dev", "--device"), _Flag("-did", "--device_id"), _Flag("-ncl", "--num_classes", int),
    # run fields
    _Flag("-nc", "--num_clients", int, "num_clients"), _Flag("-jr", "--join_ratio", float, "join_ratio"),
    _Flag("-lbs", "--batch_size", int, "batch_size"), _Flag("-lr", "--local_learning_rate", float, "lr"),
    _Flag("-gr", "--global_rounds", int, "global_rounds"), _Flag("-ls", "--local_epochs", int, "local_epochs"),
    _Flag("-eg", "--eval_gap", int, "eval_gap"), _Flag("-t", "--times", int, "repeats"),
    # algorithm hyperparameters
    _Flag("-M", "--M", int, "M", ("fedfomo",)),
    _Flag("-et", "--eta", float, "eta", ("fedala",)), _Flag("-s", "--rand_percent", int, "rand_percent", ("fedala",)),
    _Flag("-p", "--layer_idx", int, "layer_idx", ("fedala",)),
    _Flag("-mu", "--mu", float, "mu", ("fedprox", "ditto", "moon")), _Flag("-tau", "--tau", float, "tau", ("moon",)),
    _Flag("-lam", "--lamda", float, "lamda", ("pfedme", "fedpac", "fedproto")),
    _Flag("-K", "--K", int, "K", ("pfedme",)), _Flag("-lrp", "--p_learning_rate", float, "personal_learning_rate",
                                                     ("pfedme",)),
    _Flag("-bt", "--beta", float, "beta", ("pfedme",)),  # PFLlib's PerAvg ignores -bt (its beta is the lr)
    _Flag("-al", "--alpha", float, "alpha_init", ("apfl",)),
    _Flag("-pls", "--plocal_epochs", int, "plocal_epochs", ("fedrep", "ditto")),
    _Flag("-fte", "--fine_tuning_epochs", int, "fine_tuning_epochs", ("fedbabu",)),
    _Flag("-slr", "--server_learning_rate", float, "server_learning_rate", ("scaffold",)),
    _Flag("-nnc", "--num_new_clients", int, "new_clients"),
    _Flag("-ften", "--fine_tuning_epoch_new", int, "finetune_epochs"),
    # not modelled: accepted at the values that change nothing
    _Flag("-ld", "--learning_rate_decay", bool, neutral=_is_false, why="pfl has no learning-rate decay"),
    _Flag("-rjr", "--random_join_ratio", bool, neutral=_is_false,
          why="pfl samples the same number of clients every round"),
    _Flag("-ab", "--auto_break", bool, neutral=_is_false, why="pfl has no early stop; set -gr"),
    _Flag("-dlg", "--dlg_eval", bool, neutral=_is_false, why="pfl has no DLG privacy evaluation"),
    _Flag("-ts", "--time_select", bool, neutral=_is_false, why="pfl does not simulate client time costs"),
    _Flag("-pv", "--prev", int, neutral=_is_zero,
          why="pfl has no run offset; -t sets the number of runs (seeds seed .. seed + repeats - 1)"),
    _Flag("-fs", "--few_shot", int, neutral=_is_zero, why="pfl trains on all of a client's train split"),
    _Flag("-cdr", "--client_drop_rate", float, neutral=_is_zero, why="pfl has no client drop-out"),
    _Flag("-tsr", "--train_slow_rate", float, neutral=_is_zero, why="pfl has no slow clients"),
    _Flag("-ssr", "--send_slow_rate", float, neutral=_is_zero, why="pfl has no slow clients"),
    _Flag("-tth", "--time_threthold", float, neutral=lambda v: v >= _MIN_TIME_THRESHOLD,
          why=f"pfl never drops slow clients (values >= {_MIN_TIME_THRESHOLD:g} s, PFLlib's default, drop none)"),
    # no effect on the runs pfl can express
    _Flag("-go", "--goal", why="names PFLlib's result files only"),
    _Flag("-sfn", "--save_folder_name", why="names PFLlib's output folder only"),
    _Flag("-ldg", "--learning_rate_decay_gamma", float, why="used only with -ld"),
    _Flag("-tc", "--top_cnt", int, why="used only with -ab"),
    _Flag("-dlgg", "--dlg_gap", int, why="used only with -dlg"),
    _Flag("-bnpc", "--batch_num_per_client", int, why="used only with -dlg"),
    *(_Flag(s, lng, t, why="read only by PFLlib's text models and other algorithms") for s, lng, t in (
        ("-fd", "--feature_dim", int), ("-vs", "--vocab_size", int), ("-ml", "--max_len", int))),
    *(_Flag(s, lng, t, why=_OTHER_ALGORITHMS) for s, lng, t in (
        ("-itk", "--itk", int), ("-alk", "--alphaK", float), ("-sg", "--sigma", float),
        ("-dlr", "--dr_learning_rate", float),
        ("-L", "--L", float), ("-nd", "--noise_dim", int), ("-glr", "--generator_learning_rate", float),
        ("-hd", "--hidden_dim", int), ("-se", "--server_epochs", int), ("-lf", "--localize_feature_extractor", bool),
        ("-mlr", "--mentee_learning_rate", float),
        ("-Ts", "--T_start", float), ("-Te", "--T_end", float), ("-mo", "--momentum", float),
        ("-klw", "--kl_weight", float), ("-fsb", "--first_stage_bound", int), ("-ca", "--fedcross_alpha", float),
        ("-cmss", "--collaberative_model_select_strategy", int))),
)
_BY_DEST = {f.dest: f for f in _FLAGS}


class _Parser(argparse.ArgumentParser):
    """``argparse`` whose errors (unknown flag, missing or ill-typed value) raise :class:`ConfigError`."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"--pfllib-args: {message} (pfl reads the flags of PFLlib's system/main.py)")


def _parser() -> _Parser:
    """PFLlib's option set with ``SUPPRESS`` defaults, so the namespace holds the flags given and only them."""
    parser = _Parser(prog="--pfllib-args", add_help=False, argument_default=argparse.SUPPRESS)
    parser.add_argument("-h", "--help", action="store_true")  # PFLlib's too: "-h" must not abbreviate "-hd"
    for flag in _FLAGS:
        choices = ("cpu", "cuda") if flag.dest == "device" else None
        parser.add_argument(flag.short, flag.long, type=flag.type, choices=choices)
    return parser


@dataclass(frozen=True)
class Translation:
    """What a PFLlib command line means to pfl.

    Attributes:
        values: pfl config keys (run fields and hyperparameters by bare name) -> values.
        sources: pfl config key -> the PFLlib flag(s) that set it, as ``-lr 0.005``.
        ignored: PFLlib flag as ``-go test`` -> why it changes nothing in pfl.
    """

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    ignored: dict[str, str] = field(default_factory=dict)

    def describe(self) -> list[str]:
        """One line per translated key (``-lr 0.005 -> lr=0.005``) and per ignored flag, for the log."""
        return ([f"{self.sources[k]} -> {k}={v}" for k, v in self.values.items()]
                + [f"{given}: ignored ({why})" for given, why in self.ignored.items()])

    def _set(self, key: str, value: Any, source: str) -> None:
        self.values[key] = value
        self.sources[key] = source


def _pfl_name(what: str, given: str) -> str:
    """pfl's name for PFLlib's algorithm / dataset folder / model name ``given`` (exact spelling).

    Raises:
        ConfigError: ``given`` is not one pfl has.
    """
    names = _PFLLIB_NAMES[what]
    if given not in names:
        flag = _BY_DEST[what]
        raise ConfigError(f"--pfllib-args: {flag.name} {given}: pfl has the {what}s {', '.join(names)} of PFLlib "
                          f"(pfl's {', '.join(names.values())})")
    return names[given]


def _device(args: dict[str, Any]) -> tuple[str, str] | None:
    """``(device, source)`` from ``-dev`` / ``-did``, or None when neither is given.

    PFLlib exports ``-did`` as ``CUDA_VISIBLE_DEVICES`` (default "0") and then uses ``cuda``, i.e. the first
    listed GPU: ``-did 2`` -> ``cuda:2``. ``-did`` with ``-dev cpu`` changes nothing. (PFLlib falls back to
    the CPU when CUDA is missing; pfl's ``cuda`` stops with an error instead.)

    Raises:
        ConfigError: ``-did`` is not a GPU index (or comma-separated list of them).
    """
    dev, did = args.get("device"), args.get("device_id")
    if did is None or dev == "cpu":
        return None if dev is None else (dev, f"-dev {dev}")
    first = did.split(",")[0].strip()
    if not first.isdigit():
        raise ConfigError(f"--pfllib-args: -did/--device_id {did}: give a GPU index, e.g. -did 0")
    source = f"-dev {dev} -did {did}" if dev else f"-did {did}"
    return f"cuda:{int(first)}", source


def _check_join_ratio(num_clients: int, join_ratio: float) -> None:
    """PFLlib samples ``int(num_clients * join_ratio)`` clients a round, pfl ``max(1, round(...))``
    (``RunConfig.num_join_clients``).

    Raises:
        ConfigError: the two counts differ.
    """
    pfllib, pfl = int(num_clients * join_ratio), num_join_clients(num_clients, join_ratio)
    if pfllib != pfl:
        raise ConfigError(f"--pfllib-args: -nc {num_clients} -jr {join_ratio}: PFLlib samples int({num_clients} * "
                          f"{join_ratio}) = {pfllib} clients per round, pfl would sample {pfl}; choose -jr so "
                          "that -nc * -jr is a whole number")


def parse_pfllib_args(args: str) -> Translation:
    """Translate a PFLlib ``system/main.py`` command line (flags only, shell quoting) into pfl config values.

    Source: PFLlib ``system/main.py`` (its ``argparse`` flags; ``run``'s model and algorithm names) and
    ``system/flcore/servers/serverbase.py`` (which flags a run reads). Only the flags given are translated.

    Raises:
        ConfigError: one line naming the flag: unbalanced quotes, an unknown or ambiguous flag, a value of the
            wrong type, an algorithm, dataset or model pfl does not have, ``-ncl`` without ``-data`` or unequal
            to its class count, ``-nc``/``-jr`` sampling another number of clients than PFLlib, or a flag pfl
            does not model set to a value that would change PFLlib's run.
    """
    try:
        tokens = shlex.split(args)
    except ValueError as err:
        raise ConfigError(f"--pfllib-args: {err} in {args!r}") from None
    given = vars(_parser().parse_args(tokens))
    if given.pop("help", False):
        raise ConfigError("--pfllib-args: -h/--help prints PFLlib's usage; give run flags only")
    out = Translation()
    algo = given.get("algorithm")
    for what, key in (("algorithm", "algo"), ("dataset", "dataset"), ("model", "model")):
        if what in given:
            out._set(key, _pfl_name(what, given[what]), f"{_BY_DEST[what].short} {given[what]}")
    device = _device(given)
    if device is not None:
        out._set("device", *device)
    if given.get("device") == "cpu" and "device_id" in given:
        out.ignored[f"-did {given['device_id']}"] = "PFLlib exports it as CUDA_VISIBLE_DEVICES and runs on the CPU"
    if "num_classes" in given:
        if "dataset" not in out.values:
            raise ConfigError("--pfllib-args: -ncl/--num_classes needs -data beside it (pfl takes the class count "
                              "from the dataset)")
        classes = NUM_CLASSES[out.values["dataset"]]
        if given["num_classes"] != classes:
            raise ConfigError(f"--pfllib-args: -ncl {given['num_classes']}: {given['dataset']} has {classes} classes "
                              f"(pfl takes the count from the dataset); give -ncl {classes} or leave it out")
    for dest, value in given.items():
        flag = _BY_DEST[dest]
        as_given = f"{flag.short} {value}"
        if flag.owners and algo is not None and ALGORITHMS[algo] not in flag.owners:
            out.ignored[as_given] = f"a knob of {', '.join(flag.owners)}, and PFLlib's {algo} never reads it"
        elif flag.key is not None:
            out._set(flag.key, value, as_given)
        elif flag.neutral is not None and not flag.neutral(value):
            bool_note = "; PFLlib reads any non-empty value as true, even False or 0" if flag.type is bool else ""
            raise ConfigError(f"--pfllib-args: {flag.name} {value}: {flag.why}{bool_note}; leave the flag out")
        elif flag.why:
            out.ignored[as_given] = flag.why if flag.neutral is None else f"changes nothing at this value; {flag.why}"
    if "num_clients" in out.values and "join_ratio" in out.values:
        _check_join_ratio(out.values["num_clients"], out.values["join_ratio"])
    return out


def translate(args: str) -> dict[str, Any]:
    """pfl config values (run fields and hyperparameters by bare name) of a PFLlib command line.

    See :func:`parse_pfllib_args`, which also says which flag set which key and which flags were ignored.

    Raises:
        ConfigError: as :func:`parse_pfllib_args`.
    """
    return parse_pfllib_args(args).values
