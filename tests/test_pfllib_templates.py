"""The PFLlib-style templates (``configs/{fedfomo,fedala}_*_pr0.2.yaml``, ``configs/fedavg_cifar10_pr0.2.yaml``) and
the CPU pretraining template (``configs/pretrain_vit_tinyimagenet_cpu.yaml``), field by field against their
references. No training and no dataset load: the templates are read with :func:`pfl.config.load_config`, as
``pfl train --config`` reads them, and partitions are built from their fields on labels shaped like the datasets'.

References, at the commits read (``fetch``):

* TsingZ0/PFLlib d832e76f: ``system/main.py`` (flag defaults), ``system/flcore/clients/clientbase.py`` (loss,
  optimizer, batching), ``clients/clientfomo.py``, ``servers/serverbase.py``, ``servers/serverfomo.py``,
  ``system/utils/ALA.py``, ``dataset/utils/dataset_utils.py`` (``separate_data``, ``split_data``), ``dataset/
  generate_{Cifar10,Cifar100,TinyImagenet}.py`` and ``README.md`` (the generators' command lines).
* TsingZ0/FedALA a7a9b213 (Zhang et al., AAAI 2023, official code): ``system/main.py``, ``system/run_me.sh``,
  ``system/utils/ALA.py``, ``dataset/mnist-0.1-npz/config.json``.
* NVlabs/FedFomo fe04f664 (Zhang et al., ICLR 2021, official code): ``README.md``'s command lines.
* The researchers' runs (README "The six template runs"; issue 3, item 5): join ratio 0.2, Dirichlet alpha 0.05
  on CIFAR-100 and Tiny-ImageNet, 100 global rounds on CIFAR and 20 on Tiny-ImageNet. These three differ from
  PFLlib's defaults (``-jr 1.0``, ``-gr 2000``, the generator's alpha 0.1); the templates' comments say so.

Stated, not pinned here (it needs the data): PFLlib's ``generate_TinyImagenet.py`` (lines 74-85) partitions the
100,000 train images only; pfl's ``tinyimagenet`` pool adds val's 10,000.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pfl.config import PARTITION_FIELDS, load_config
from pfl.data.partition import least_samples, make_partition
from pfl.models import CNN, input_normalization
from pfl.pfllib_args import translate
from pfl.train import partition_spec, pretrain_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def template(name: str, *overrides: str):
    """The validated :class:`pfl.config.RunConfig` of ``configs/<name>`` (with ``key=value`` overrides)."""
    return load_config(CONFIGS / name, list(overrides))


def pooled_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """int64 (num_classes * per_class,): every class ``per_class`` times, shuffled (a pooled dataset's labels)."""
    return torch.from_numpy(np.random.default_rng(2024).permutation(np.repeat(np.arange(num_classes), per_class)))


# ---------------------------------------------------------------- the PFLlib templates

# PFLlib's training defaults, the same in every template.
PFLLIB_TRAINING = {
    "model": "cnn",              # PFLlib system/main.py:398 (-m CNN: FedAvgCNN)
    "model_width": 1.0,
    "pretrained": "none",        # PFLlib trains from random initialization
    "init_from": None,
    "num_clients": 20,           # main.py:414 (-nc 20); dataset/generate_Cifar10.py:13 (num_clients = 20)
    "local_epochs": 1,           # main.py:407 (-ls 1); FedALA main.py:82 (-ls 1 pass over the data)
    "batch_size": 10,            # main.py:399 (-lbs 10); FedALA main.py:78
    "lr": 0.005,                 # main.py:400 (-lr 0.005); FedALA main.py:79
    "optimizer": "sgd",          # flcore/clients/clientbase.py:47: SGD(parameters, lr), no momentum (FedALA
                                 # clientALA.py:28 the same)
    "weight_decay": None,        # clientbase.py:47: no weight decay (None: SGD's 0)
    "lr_schedule": "constant",   # main.py:402 (-ld False)
    "max_grad_norm": None,       # clientbase.py, clientfomo.py:38-51, clientala.py:31-44: no clipping
    "drop_last": True,           # clientbase.py:59: DataLoader(train_data, batch_size, drop_last=True, shuffle=True)
    "eval_gap": 1,               # main.py:420 (-eg 1)
    "repeats": 1,                # main.py:418 (-t 1)
    "train_ratio": 0.75,         # dataset/utils/dataset_utils.py:11, split_data (:216-217)
    "official_split": False,     # generate_Cifar10.py:51-54: the train and test sets pooled, then partitioned
    "num_partitions": None,      # every generated client takes part
    "random_crop": 0,            # generate_Cifar10.py:31-32 (and Cifar100 :31-32, TinyImagenet :71-72):
    "hflip": False,              # ToTensor and Normalize only, no augmentation
    "image_size": None,          # the stored size (32, or Tiny-ImageNet's 64), as PFLlib's CNN takes it
    "precision": "fp32",
}
PFLLIB_DIRICHLET = {"partition": "dirichlet", "alpha": 0.05}  # the researchers' alpha (dataset_utils.py:12: 0.1)
# generate_Cifar10.py:67 (class_per_client=2), run as README.md:203 `noniid - pat` ("pathological noniid and
# unbalanced"): balance false, as the FedALA repo's generated dataset/mnist-0.1-npz/config.json records
PFLLIB_PATHOLOGICAL = {"partition": "pathological", "classes_per_client": 2, "balance": False}
# algo -> its hyperparameters
PFLLIB_HPARAMS = {
    "fedavg": {},
    # main.py:455 (-M 5); clientfomo.py:20 (self.val_ratio = 0.2); epsilon 0: PFLlib's top-M selection
    # (serverfomo.py:77-78, no exploration); epsilon_decay, used only with epsilon > 0, is NVlabs/FedFomo
    # README.md:47's --client_weight_epsilon_decay 0.05
    "fedfomo": {"M": 5, "val_ratio": 0.2, "epsilon": 0.0, "epsilon_decay": 0.05},
    # PFLlib main.py:484-486 (-et 1.0, -s 80, -p 2) = FedALA main.py:97-99 and run_me.sh:1 (-et 1 -p 2 -s 80);
    # threshold and num_pre_loss: PFLlib system/utils/ALA.py:19-20 = FedALA system/utils/ALA.py:19-20
    "fedala": {"eta": 1.0, "rand_percent": 80, "layer_idx": 2, "threshold": 0.1, "num_pre_loss": 10},
}
# template -> (algo, dataset, partition fields, global rounds: the researchers' 100 on CIFAR, 20 on Tiny-ImageNet)
PFLLIB_TEMPLATES = {
    "fedavg_cifar10_pr0.2.yaml": ("fedavg", "cifar10", PFLLIB_PATHOLOGICAL, 100),
    "fedfomo_cifar10_pr0.2.yaml": ("fedfomo", "cifar10", PFLLIB_PATHOLOGICAL, 100),
    "fedfomo_cifar100_pr0.2.yaml": ("fedfomo", "cifar100", PFLLIB_DIRICHLET, 100),
    "fedfomo_tinyimagenet_pr0.2.yaml": ("fedfomo", "tinyimagenet", PFLLIB_DIRICHLET, 20),
    "fedala_cifar10_pr0.2.yaml": ("fedala", "cifar10", PFLLIB_PATHOLOGICAL, 100),
    "fedala_cifar100_pr0.2.yaml": ("fedala", "cifar100", PFLLIB_DIRICHLET, 100),
    "fedala_tinyimagenet_pr0.2.yaml": ("fedala", "tinyimagenet", PFLLIB_DIRICHLET, 20),
}
# The same runs as PFLlib commands: main.py's flags, every default spelled out but -jr and -gr (the researchers'),
# -ncl as PFLlib needs it for 100 / 200 classes (main.py:397 defaults to 10); and the partition the generator wrote
# into the dataset folder (generate_<DATA>.py noniid - pat|dir, README.md:201-205).
PFLLIB_FLAGS = "-m CNN -nc 20 -jr 0.2 -ls 1 -lbs 10 -lr 0.005 -eg 1 -t 1"
PFLLIB_DATA = {"cifar10": ("-data Cifar10 -gr 100", {"partition": "pat", "classes_per_client": 2}),
               "cifar100": ("-data Cifar100 -ncl 100 -gr 100", {"partition": "dir", "alpha": 0.05}),
               "tinyimagenet": ("-data TinyImagenet -ncl 200 -gr 20", {"partition": "dir", "alpha": 0.05})}
PFLLIB_ALGO_FLAGS = {"fedavg": "-algo FedAvg", "fedfomo": "-algo FedFomo -M 5",
                     "fedala": "-algo FedALA -et 1 -s 80 -p 2"}


@pytest.mark.parametrize("name", PFLLIB_TEMPLATES)
def test_pfllib_template_holds_pfllibs_training_setting(name):
    algo, dataset, partition, rounds = PFLLIB_TEMPLATES[name]
    cfg = template(name)
    assert {k: getattr(cfg, k) for k in PFLLIB_TRAINING} == PFLLIB_TRAINING
    assert (cfg.algo, cfg.dataset, cfg.global_rounds) == (algo, dataset, rounds)
    assert {k: getattr(cfg, k) for k in partition} == partition
    assert cfg.hparams == PFLLIB_HPARAMS[algo]                       # every knob, none left to another default
    # join ratio 0.2 (the researchers'; main.py:410's default is 1.0): PFLlib samples int(20 * 0.2) = 4 clients
    # a round (serverbase.py:27), and FedFomo sends min(M, 4) = 4 models (serverfomo.py:22)
    assert cfg.join_ratio == 0.2 and cfg.num_join_clients == int(20 * 0.2) == 4
    # inputs normalized as PFLlib's generators do: Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) (generate_*.py)
    assert input_normalization(cfg.model) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@pytest.mark.parametrize("name", PFLLIB_TEMPLATES)
def test_pfllib_template_is_its_pfllib_command_line(name):
    # `pfl train --pfllib-args "<PFLlib's command>"` plus the generated partition's settings is the template, field
    # for field
    algo, dataset, _, _ = PFLLIB_TEMPLATES[name]
    flags, partition = PFLLIB_DATA[dataset]
    command = f"{PFLLIB_ALGO_FLAGS[algo]} {flags} {PFLLIB_FLAGS}"
    assert load_config(values_over_file={**translate(command), **partition}) == template(name)


@pytest.mark.parametrize("dataset, stored, features", [("cifar10", 32, 1600), ("cifar100", 32, 1600),
                                                        ("tinyimagenet", 64, 10816)])
def test_pfllib_cnn_has_pfllibs_feature_size(dataset, stored, features):
    # main.py:94-95 FedAvgCNN(in_features=3, dim=1600) for "Cifar10" (and "Cifar100", which contains it);
    # main.py:101-102 dim=10816 otherwise (Tiny-ImageNet's 64x64)
    num_classes = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200}[dataset]
    model = CNN(num_classes, in_channels=3, image_size=stored)
    assert (model.head[0].in_features, model.head[-1].out_features) == (features, num_classes)


def test_pathological_templates_deal_pfllibs_class_pairs_in_unbalanced_shares():
    # dataset_utils.py:53-85 (pat, balance false) on the pooled 60,000 CIFAR-10 labels: class c goes to the first
    # ceil(20 / 10 * 2) = 4 clients with a class slot left, so clients 4j..4j+3 hold classes {2j, 2j+1}; its 6,000
    # samples are cut into 3 random sizes in [max(6000 / 4 / 10, least / 10), 6000 / 4) and the remainder
    # (dataset_utils.py:75-76); each share split 75/25 by floor (split_data, dataset_utils.py:216-217)
    specs = {partition_spec(template(n)) for n, (_, dataset, _, _) in PFLLIB_TEMPLATES.items() if dataset == "cifar10"}
    assert len(specs) == 1                                   # the three CIFAR-10 templates train the same clients
    labels = pooled_labels(10, 6000)
    part = make_partition(labels, 10, specs.pop())
    assert least_samples(60_000, 20, 0.75) == 40             # int(min(10 / (1 - 0.75), 60000 / 20 / 2)), :45
    counts = torch.stack([torch.bincount(labels[torch.cat([c.train, c.test])], minlength=10) for c in part.clients])
    for k, row in enumerate(counts):
        assert set(torch.nonzero(row).flatten().tolist()) == {2 * (k // 4), 2 * (k // 4) + 1}
    assert counts.sum(0).tolist() == [6000] * 10             # every sample dealt
    for c in range(10):
        shares = counts[4 * (c // 2):4 * (c // 2) + 4, c].tolist()  # class c's 4 owners, in dealing order
        assert all(150 <= s < 1500 for s in shares[:3])        # the 4th owner takes the remainder
    assert len(set(counts.sum(1).tolist())) > 1              # unbalanced (balance would give 3,000 each)
    assert all(len(c.train) == (len(c.train) + len(c.test)) * 3 // 4 for c in part.clients)


@pytest.mark.parametrize("name, num_classes, per_class", [("fedfomo_cifar100_pr0.2.yaml", 100, 600),
                                                          ("fedfomo_tinyimagenet_pr0.2.yaml", 200, 550)])
def test_dirichlet_templates_give_every_client_pfllibs_minimum(name, num_classes, per_class):
    # dataset_utils.py:87-111 (dir) at the templates' alpha 0.05: redrawn until every client holds at least
    # least_samples = int(min(40, N / 20 / 2)) = 40 samples (:45, :94); the partition ignores balance (PFLlib's dir
    # branch reads no balance, and pfl's balance is a pathological field only)
    cfg = template(name)
    assert PARTITION_FIELDS["balance"] == ("pathological",) and "balance" not in cfg.flat_params()
    part = make_partition(pooled_labels(num_classes, per_class), num_classes, partition_spec(cfg))
    sizes = [len(c.train) + len(c.test) for c in part.clients]
    assert sum(sizes) == num_classes * per_class and min(sizes) >= 40
    assert len(set(sizes)) > 1                               # unbalanced


@pytest.mark.parametrize("name, classes", [("fedfomo_cifar100_pr0.2.yaml", 10), ("fedala_tinyimagenet_pr0.2.yaml", 20)])
def test_switching_a_dirichlet_template_to_pathological_takes_pfllibs_classes_per_client(name, classes):
    # generate_Cifar100.py:67 (class_per_client=10), generate_TinyImagenet.py:98 (class_per_client=20)
    assert template(name, "partition=pat").classes_per_client == classes


# ---------------------------------------------------------------- the CPU pretraining template

PRETRAIN = "pretrain_vit_tinyimagenet_cpu.yaml"
# The CPU fine-tuning templates that start from its model (init_from=runs:/<id>; their comments name it).
FINE_TUNING_CPU = ("fedlora_vit_cifar10_cpu.yaml", "fedavg_vit_cifar10_cpu.yaml")


def test_pretrain_template_is_centralized_training_at_its_size_knobs():
    cfg = pretrain_config(template(PRETRAIN))
    # `pfl pretrain` (pfl.train.PRETRAIN_FIELDS): FedAvg with one client holding the pool, split 75 / 25
    assert (cfg.algo, cfg.num_clients, cfg.partition, cfg.join_ratio, cfg.local_epochs, cfg.train_ratio) == (
        "fedavg", 1, "iid", 1.0, 1, 0.75)
    assert cfg.setting_name() == "central-tinyimagenet"
    # size knobs: 10 epochs of batches of 64
    assert (cfg.global_rounds, cfg.batch_size, cfg.drop_last) == (10, 64, True)
    # a plain pretraining recipe: torch's AdamW at its defaults (weight decay 0.01), constant rate, no clipping
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_schedule, cfg.max_grad_norm) == (
        "adamw", 0.001, None, "constant", None)


@pytest.mark.parametrize("name", FINE_TUNING_CPU)
def test_pretrain_template_feeds_its_fine_tuning_templates_the_same_model_and_inputs(name):
    # There is no GPU twin (the GPU templates start from timm's published weights, pretrained=timm). What it shares
    # with the CPU fine-tuning templates is the architecture and the input path: vit_cifar at 32x32 (Tiny-ImageNet's
    # 64x64 resized on the device), the same normalization, random crop setting and flips, and AdamW at the same
    # rate; the head is re-initialized for CIFAR-10's classes. (random_crop pads at the stored size, before the
    # resize: 4 pixels at 64x64 shift half as far, relative to the image, as 4 at CIFAR's 32x32.)
    pre, fine = pretrain_config(template(PRETRAIN)), template(name)
    assert (pre.model, pre.model_width, pre.image_size) == (fine.model, fine.model_width, fine.image_size or 32)
    assert input_normalization(pre.model) == input_normalization(fine.model)
    assert (pre.random_crop, pre.hflip, pre.optimizer, pre.lr) == (fine.random_crop, fine.hflip, "adamw", fine.lr)


def test_pretrain_template_differs_from_the_full_fine_tuning_template_only_in_data_centralization_and_size():
    pre, fine = pretrain_config(template(PRETRAIN)), template("fedavg_vit_cifar10_cpu.yaml")
    differ = {k for k, v in pre.model_dump().items() if getattr(fine, k) != v}
    assert differ == {"experiment", "dataset", "image_size", "classes_per_client",            # the data
                      "partition", "num_clients", "join_ratio",                             # centralized
                      "global_rounds", "batch_size",                                        # size knobs
                      "weight_decay", "lr_schedule", "max_grad_norm"}                       # FedIT's fine-tuning
