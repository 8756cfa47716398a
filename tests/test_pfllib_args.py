"""PFLlib command lines (system/main.py flags) translated into pfl config values."""

from __future__ import annotations

import pytest

from pfl.algorithms import REGISTRY
from pfl.config import DATASETS, ConfigError, RunConfig
from pfl.models import ARCHITECTURES
from pfl.pfllib_args import _FLAGS, ALGORITHMS, MODELS, parse_pfllib_args, translate
from pfl.pfllib_args import DATASETS as PFLLIB_DATASETS

EXAMPLE = "-algo FedFomo -data Cifar10 -jr 0.2 -nc 20 -lbs 10 -lr 0.005 -gr 100 -ls 1 -eg 1 -t 3 -M 5 -dev cuda -did 1"


def test_example_command_line():
    values = translate(EXAMPLE)
    assert values == {"algo": "fedfomo", "dataset": "cifar10", "device": "cuda:1", "join_ratio": 0.2,
                      "num_clients": 20, "batch_size": 10, "lr": 0.005, "global_rounds": 100, "local_epochs": 1,
                      "eval_gap": 1, "repeats": 3, "M": 5}
    cfg = RunConfig(**values)  # pfl's own names and valid values
    assert (cfg.hparams["M"], cfg.num_join_clients, cfg.device) == (5, 4, "cuda:1")


def test_long_names_abbreviations_and_equals_read_as_pfllib_does():
    assert translate("--algorithm FedALA --global 7 -nc=30 --local_learning_rate 0.01") == {
        "algo": "fedala", "global_rounds": 7, "num_clients": 30, "lr": 0.01}
    assert translate("-m ResNet18 -data TinyImagenet -ncl 200") == {"model": "resnet18", "dataset": "tinyimagenet"}
    assert translate("-data 'Cifar100' -ncl 100") == {"dataset": "cifar100"}
    assert translate("") == {}


def test_sources_and_ignored_flags_for_the_log():
    t = parse_pfllib_args("-algo FedALA -lr 0.01 -et 0.5 -s 60 -p 3 -M 4 -go mine -mu 0.1 -ld '' -tth 20000")
    assert t.values == {"algo": "fedala", "lr": 0.01, "eta": 0.5, "rand_percent": 60, "layer_idx": 3}
    assert t.sources["lr"] == "-lr 0.01" and t.sources["layer_idx"] == "-p 3"
    assert set(t.ignored) == {"-M 4", "-go mine", "-mu 0.1", "-ld False", "-tth 20000.0"}
    assert "FedALA never reads it" in t.ignored["-M 4"]   # FedFomo's knob with another algorithm
    lines = t.describe()
    assert "-et 0.5 -> eta=0.5" in lines and "-go mine: ignored (names PFLlib's result files only)" in lines


def test_knobs_without_algo_keep_pfl_names():
    assert translate("-M 3 -et 2 -s 50") == {"M": 3, "eta": 2.0, "rand_percent": 50}


@pytest.mark.parametrize("args, device", [("-dev cpu", "cpu"), ("-dev cuda", "cuda"), ("-did 2", "cuda:2"),
                                          ("-dev cuda -did 0,1,2,3", "cuda:0"), ("-dev cpu -did 3", "cpu")])
def test_device(args, device):
    assert translate(args) == {"device": device}


@pytest.mark.parametrize("args, named", [
    ("-algo FedFomo -foo 3", "unrecognized arguments: -foo 3"),
    ("-algo FedDyn", "-algo/--algorithm FedDyn: pfl has the algorithms FedAvg, FedFomo, FedALA, Local, FedPer"),
    ("-data MNIST", "-data/--dataset MNIST"),
    ("-m ResNet34", "-m/--model ResNet34"),
    ("-nc x", "-nc/--num_clients: invalid int value"),
    ("-dev tpu", "-dev/--device: invalid choice"),
    ("-did gpu0", "-did/--device_id gpu0"),
    ("-ld False", "-ld/--learning_rate_decay True: pfl has no learning-rate decay; PFLlib reads any non-empty"),
    ("-dlg True", "-dlg/--dlg_eval True"),
    ("-pv 2 -t 5", "-pv/--prev 2: pfl has no run offset"),
    ("-tth 5", "-tth/--time_threthold 5.0"),
    ("-cdr 0.1", "-cdr/--client_drop_rate 0.1"),
    ("-data Cifar10 -ncl 100", "-ncl 100: Cifar10 has 10 classes"),
    ("-ncl 10", "-ncl/--num_classes needs -data"),
    ("-nc 10 -jr 0.35", "PFLlib samples int(10 * 0.35) = 3 clients per round, pfl would sample 4"),
    ("--num 3", "ambiguous option: --num"),
    ("-gr '100", "No closing quotation"),
    ("-h", "-h/--help"),
])
def test_bad_flags_raise_one_line_naming_the_flag(args, named):
    with pytest.raises(ConfigError) as info:
        translate(args)
    message = str(info.value)
    assert message.startswith("--pfllib-args: ") and named in message and "\n" not in message


def test_new_algorithms_knobs_and_new_client_evaluation_translate():
    t = parse_pfllib_args("-algo Ditto -mu 0.1 -pls 2 -nnc 2 -ften 1 -lam 3 -nc 20 -jr 0.2")
    assert t.values == {"algo": "ditto", "mu": 0.1, "plocal_epochs": 2, "new_clients": 2, "finetune_epochs": 1,
                        "num_clients": 20, "join_ratio": 0.2}
    assert "never reads it" in t.ignored["-lam 3.0"]  # pFedMe's, FedPAC's and FedProto's knob, not Ditto's
    assert translate("-algo PerAvg -bt 0.3") == {"algo": "perfedavg"}  # PFLlib's PerAvg reads its lr, not -bt
    assert translate("-algo pFedMe -bt 1 -K 5 -lrp 0.01") == {"algo": "pfedme", "beta": 1.0, "K": 5,
                                                              "personal_learning_rate": 0.01}


def test_table_targets_exist_in_pfl():
    for flag in _FLAGS:
        if flag.owners:
            assert all(flag.key in REGISTRY[owner].Params.model_fields for owner in flag.owners), flag
        elif flag.key is not None:
            assert flag.key in RunConfig.model_fields, flag
        else:
            assert flag.neutral is None or flag.why, flag   # a refused value must say why
    assert set(ALGORITHMS.values()) <= set(REGISTRY)
    # PFLlib's image sets; it has no head traces, and its AG News is word-tokenized (ours: character ids), so
    # neither maps, nor do CINIC-10 and Speech Commands, which it lacks
    assert set(PFLLIB_DATASETS.values()) == {"cifar10", "cifar100", "tinyimagenet"} < set(DATASETS)
    assert set(MODELS.values()) <= set(ARCHITECTURES)
    assert len({f.short for f in _FLAGS}) == len({f.long for f in _FLAGS}) == len(_FLAGS)
