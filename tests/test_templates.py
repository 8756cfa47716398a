"""Every published-setup template's full setting against its paper's and official code's: data and partition
(balance), augmentation, normalization, batching, learning rate, epochs, the algorithm's knobs.

One section per method; each names the reference files the values come from. The templates are read with
:func:`pfl.config.load_config`, as ``pfl train --config`` reads them; partitions are built from the template's own
fields (:func:`pfl.train.partition_spec`) on labels shaped like full CIFAR-10's (50,000 train then 10,000 test).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pfl.config import load_config
from pfl.data.partition import make_partition
from pfl.train import partition_spec
from test_partition import cifar10_shaped_labels

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CIFAR10_TRAIN = 50_000
CIFAR10_NORMALIZATION = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))  # FlexiFed's and MocoSFL's


def template(name: str):
    """The validated :class:`pfl.config.RunConfig` of ``configs/<name>``."""
    return load_config(CONFIGS / name)


def template_partition(cfg):
    """The partition ``cfg``'s fields give on CIFAR-10-shaped labels (official train size 50,000)."""
    return make_partition(cifar10_shaped_labels(), 10, partition_spec(cfg), num_train=CIFAR10_TRAIN)


def fields(cfg, names: tuple[str, ...]) -> dict:
    """``{name: value}``: the algorithm's hyperparameter of that name, else the run field (a name that is both, such
    as ``weight_decay``, sets the hyperparameter)."""
    return {n: cfg.hparams[n] if n in cfg.hparams else getattr(cfg, n) for n in names}


# ---------------------------------------------------------------- FlexiFed
# fio1982/FlexiFed (the authors' code): utils.py get_dataset (RandomCrop(32, padding=4), RandomHorizontalFlip,
# Normalize with CIFAR-10's mean / std; cifar_iid(train, 20), cifar_iid(test, 20)), fed_main.py (8 devices, VGG-11/13/
# 16/19 two each, a tenth of the 2,500-image shard per round), utils.py local_train (SGD lr 0.01, momentum 0.9,
# weight decay 5e-4, DataLoader(batch_size=64, shuffle=True): the last partial batch kept, 10 epochs).

# template: (family, global rounds, local epochs, model width)
FLEXIFED = {"flexifed_cifar10_vgg.yaml": ("vgg", 500, 10, 1.0),
            "flexifed_cifar10_resnet.yaml": ("resnet", 500, 10, 1.0),
            "flexifed_cifar10_vgg_cpu.yaml": ("vgg", 3, 2, 0.25),
            "flexifed_cifar10_resnet_cpu.yaml": ("resnet", 3, 2, 0.25)}
FLEXIFED_DEPTHS = {"vgg": ["vgg11", "vgg13", "vgg16", "vgg19"],
                   "resnet": ["resnet20", "resnet32", "resnet44", "resnet56"]}


@pytest.mark.parametrize("name", FLEXIFED)
def test_flexifed_templates_run_the_official_setting(name):
    family, rounds, epochs, width = FLEXIFED[name]
    cfg = template(name)
    assert fields(cfg, ("algo", "dataset", "partition", "official_split", "num_partitions", "num_clients",
                        "join_ratio", "batch_size", "drop_last", "lr", "optimizer", "random_crop", "hflip")) == {
        "algo": "flexifed", "dataset": "cifar10", "partition": "iid", "official_split": True, "num_partitions": 20,
        "num_clients": 8, "join_ratio": 1.0, "batch_size": 64, "drop_last": False, "lr": 0.01, "optimizer": "sgd",
        "random_crop": 4, "hflip": True}
    assert fields(cfg, ("scheme", "sample_fraction", "momentum", "weight_decay")) == {
        "scheme": "max_common", "sample_fraction": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    assert (cfg.global_rounds, cfg.local_epochs, cfg.model_width) == (rounds, epochs, width)
    # two clients of each depth (pfl: depth k mod 4; the official code: clients 0-1, 2-3, ...)
    assert sorted(cfg.models[k % len(cfg.models)] for k in range(cfg.num_clients)) == sorted(
        FLEXIFED_DEPTHS[family] * 2)


@pytest.mark.parametrize("name", FLEXIFED)
def test_flexifed_template_partition_is_the_official_one(name):
    # cifar_iid of CIFAR-10's own train and test sets into 20 shares, 8 used: 2,500 train and 500 test a client
    cfg = template(name)
    part = template_partition(cfg)
    assert [(len(c.train), len(c.test)) for c in part.clients] == [(2500, 500)] * 8
    assert all(int(c.train.max()) < CIFAR10_TRAIN <= int(c.test.min()) for c in part.clients)
    # and trains on 250 of them a round (fed_main.py: localData_length = len(user_groups[0]) / 10)
    assert round(cfg.hparams["sample_fraction"] * 2500) == 250


def test_flexifed_inputs_are_normalized_with_cifar10_statistics():
    from pfl.models import input_normalization

    for depths in FLEXIFED_DEPTHS.values():
        assert {input_normalization(m) for m in depths} == {CIFAR10_NORMALIZATION}


def test_flexifed_template_keeps_the_last_partial_batch(cifar10):
    # 250 images in batches of 64, as DataLoader(batch_size=64) gives them: 64, 64, 64 and 58 (PFLlib's
    # drop_last=True would train on 192); FlexiFed's momentum SGD takes the run's batching
    from pfl.algorithms.flexifed import MomentumSGD
    from pfl.federated.local import FitIns, SGDUpdate
    from pfl.federated.state import model_state
    from pfl.data.loader import DeviceData
    from pfl.data.transforms import ImageTransform
    from pfl.models import ModelSpec, build_model, input_normalization

    class Recorded(SGDUpdate):
        """The run's SGD, recording each minibatch's size."""

        sizes: list[int] = []

        def loss(self, model, x, y, ins):
            self.sizes.append(len(x))
            return super().loss(model, x, y, ins)

    cfg = template("flexifed_cifar10_vgg_cpu.yaml")
    data = DeviceData(cifar10, torch.device("cpu"),
                        ImageTransform(None, *input_normalization("vgg11"), cfg.random_crop, cfg.hflip))
    model = build_model(ModelSpec("vgg11", 10, width=0.125))
    update = Recorded(cfg.batch_size, cfg.lr, 1, drop_last=cfg.drop_last)
    update.fit(model, data, FitIns(model_state(model)), torch.arange(250), seed=0)
    assert update.sizes == [64, 64, 64, 58]
    assert MomentumSGD(update, 0.9, 5e-4).drop_last is False
    dropped = Recorded(cfg.batch_size, cfg.lr, 1)                      # the default: PFLlib's drop_last=True
    dropped.sizes = []
    dropped.fit(model, data, FitIns(model_state(model)), torch.arange(250), seed=0)
    assert dropped.sizes == [64, 64, 64]


# ---------------------------------------------------------------- MocoSFL and SwAV-SFL
# SonyResearch/MocoSFL: configs/__init__.py (--auto_adjust: batch 1 and avg_freq = 1000 // num_client for 100
# clients, client_sample_ratio 0.1 for 1,000), scripts/table3/run_sflmoco_cross_client.sh (lr 0.06, 200 epochs,
# noniid_ratio 0.2, cut layer 1), utils.py noniid_alllabel (2 random shards of label-sorted images a client),
# functions/sflmoco_functions.py (MoCo tau 0.99, K 6,000, T 0.1; SGD momentum 0.9, weight decay 5e-4; kNN k 200, t 0.1).

MOCOSFL_SHARED = {"algo": "mocosfl", "dataset": "cifar10", "model": "resnet18_sfl", "partition": "shards",
                  "shards_per_client": 2, "official_split": True, "lr": 0.06, "random_crop": 0, "hflip": False,
                  "cut_layer": 1, "clients_per_step": 0, "sgd_momentum": 0.9, "weight_decay": 5e-4,
                  "temperature": 0.1}
MOCOSFL_GPU = {"num_clients": 100, "join_ratio": 1.0, "batch_size": 1, "global_rounds": 200, "precision": "bf16",
               "steps_per_round": 0, "sync_every": 50, "knn_k": 200, "knn_temperature": 0.1, "linear_epochs": 100}
MOCOSFL = {
    "mocosfl_cifar10.yaml": {**MOCOSFL_GPU, "loss": "moco", "momentum": 0.99, "queue_size": 6000},
    "swavsfl_cifar10.yaml": {**MOCOSFL_GPU, "loss": "swav", "crops": "2x32,6x16", "num_prototypes": 512,
                             "sinkhorn_iters": 3, "epsilon": 0.05, "freeze_prototypes_rounds": 1},
    "mocosfl_cifar10_1000clients.yaml": {**MOCOSFL_GPU, "num_clients": 1000, "join_ratio": 0.1, "global_rounds": 2000,
                                         "steps_per_round": 50, "sync_every": 50, "loss": "moco", "momentum": 0.99,
                                         "queue_size": 6000},
    "mocosfl_cifar10_cpu.yaml": {"num_clients": 10, "join_ratio": 1.0, "batch_size": 10, "global_rounds": 3,
                                 "model_width": 0.125, "loss": "moco", "steps_per_round": 20, "sync_every": 10},
    "swavsfl_cifar10_cpu.yaml": {"num_clients": 10, "join_ratio": 1.0, "batch_size": 10, "global_rounds": 3,
                                 "model_width": 0.125, "loss": "swav", "steps_per_round": 20, "sync_every": 10},
}
# (train, test) images a client: CIFAR-10's 50,000 / 10,000 in 2 x num_clients label-sorted shards, 2 a client
MOCOSFL_SIZES = {100: (500, 100), 1000: (50, 10), 10: (5000, 1000)}


@pytest.mark.parametrize("name", MOCOSFL)
def test_mocosfl_templates_run_the_official_setting(name):
    expected = {**MOCOSFL_SHARED, **MOCOSFL[name]}
    cfg = template(name)
    assert fields(cfg, tuple(expected)) == expected
    assert cfg.num_join_clients * cfg.batch_size == 100             # the server's concatenated batch of 100


@pytest.mark.parametrize("name", MOCOSFL)
def test_mocosfl_template_partition_is_noniid_alllabel(name):
    cfg = template(name)
    part = template_partition(cfg)
    assert {(len(c.train), len(c.test)) for c in part.clients} == {MOCOSFL_SIZES[cfg.num_clients]}
    labels = cifar10_shaped_labels()
    pairs = [frozenset(labels[c.train].tolist()) for c in part.clients]
    assert max(map(len, pairs)) <= 2
    # random pairs: with 10 clients at least 4 distinct ones, with 100 or 1,000 far more than the 5 of an in-order deal
    assert len(set(pairs)) >= (4 if cfg.num_clients == 10 else 30)


def test_mocosfl_100_client_schedule_is_auto_adjust():
    # --auto_adjust with 100 clients: 500 steps an epoch (client 0's 500 images in batches of 1) and avg_freq
    # 1000 // 100 = 10 FedAvgs an epoch, one every 50 steps
    cfg = template("mocosfl_cifar10.yaml")
    train_size, _ = MOCOSFL_SIZES[cfg.num_clients]
    steps = train_size // cfg.batch_size                           # steps_per_round=0: the mean split // batch
    assert steps == 500 and steps // cfg.hparams["sync_every"] == 1000 // cfg.num_clients


def test_mocosfl_inputs_are_normalized_with_cifar10_statistics():
    from pfl.models import input_normalization

    assert input_normalization("resnet18_sfl") == CIFAR10_NORMALIZATION


# ---------------------------------------------------------------- FedGen, FedLoRA (add their sections here)
# Each section: the reference files in a comment, a table of the templates' expected fields, and tests that assert
# them (``fields``) and the partition the template's fields give (``template_partition``).
