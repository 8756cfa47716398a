"""Display names for tables, captions and figure titles, and the ASCII stems of file names.

Algorithms, datasets and models by their papers' spelling (``fedfomo`` -> FedFomo, ``cifar10`` ->
CIFAR-10, ``vp_lstm`` -> LSTM), model families and FlexiFed's sharing schemes as FlexiFed's Table 1 prints them (``vgg``
-> VGG, ``max_common`` -> Max-Common), architectures as family-depth (``vgg16`` -> VGG-16); ids without an entry are
shown unchanged. A partition setting reads ``Dir(α=0.1)``,
``Pat(2 classes/client)``, ``ExDir(α=0.1, 2 classes/client)``, ``IID`` or ``PFLlib(<name>)``; its
file stem ``dir0.1``, ``pat2``, ``exdir0.1c2``, ``iid`` or the import's name (as in FL run names).
Numbers print in shortest form (``0.1``, ``1``); a parameter not logged (NaN) is left out.
"""

from __future__ import annotations

import math
import re

# in the row order of the tables: FedAvg, the other global-model baselines, then the personalized algorithms
# (local training keeps its id as its label, the researchers' arm name: reports.regression.ARM_ORDER)
ALGORITHMS = {"fedavg": "FedAvg", "fedprox": "FedProx", "scaffold": "SCAFFOLD", "moon": "MOON", "local": "local",
              "fedfomo": "FedFomo", "fedala": "FedALA", "fedper": "FedPer", "lgfedavg": "LG-FedAvg", "fedrep": "FedRep",
              "fedbabu": "FedBABU", "fedbn": "FedBN", "fedrod": "FedRoD", "ditto": "Ditto", "apfl": "APFL",
              "perfedavg": "Per-FedAvg", "pfedme": "pFedMe", "fedpac": "FedPAC", "fedproto": "FedProto",
              "fedgen": "FedGen", "flexifed": "FlexiFed", "fedlora": "FedLoRA", "mocosfl": "MocoSFL"}
DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tinyimagenet": "Tiny-ImageNet", "david": "David MMSys'18",
            "cinic10": "CINIC-10", "agnews": "AG News", "speech_commands": "Speech Commands"}
MODELS = {"vp_lstm": "LSTM", "vp_transformer": "Transformer"}  # in table column order
FAMILIES = {"vgg": "VGG", "resnet": "ResNet", "charcnn": "CharCNN", "vdcnn": "VDCNN"}  # keys of pfl.models.FAMILIES
SCHEMES = {"standalone": "Standalone", "clustered_fl": "Clustered-FL", "basic_common": "Basic-Common",
           "clustered_common": "Clustered-Common", "max_common": "Max-Common"}  # FlexiFed's, in its Table 1's order
_FAMILY_DEPTH = re.compile(r"([a-z]+)(\d+)")


def algo_name(algo: str) -> str:
    """``fedavg`` -> ``FedAvg``, ``fedfomo`` -> ``FedFomo``, ``fedala`` -> ``FedALA``, ``flexifed`` -> ``FlexiFed``."""
    return ALGORITHMS.get(algo, str(algo))


def algo_order(algos) -> list[str]:
    """Algorithm ids in table row order: FedAvg, the other global-model baselines, then the personalized
    algorithms (the order of :data:`ALGORITHMS`, the researchers' tables' FedAvg-first order); ids without an entry
    last, alphabetically."""
    rank = {a: k for k, a in enumerate(ALGORITHMS)}
    return sorted(algos, key=lambda a: (rank.get(a, len(rank)), str(a)))


def dataset_name(dataset: str) -> str:
    """``cifar10`` -> ``CIFAR-10``, ``cifar100`` -> ``CIFAR-100``, ``tinyimagenet`` -> ``Tiny-ImageNet``, ``david`` ->
    ``David MMSys'18``, ``cinic10`` -> ``CINIC-10``, ``agnews`` -> ``AG News``, ``speech_commands`` ->
    ``Speech Commands``."""
    return DATASETS.get(dataset, str(dataset))


def family_name(family: str) -> str:
    """``vgg`` -> ``VGG``, ``resnet`` -> ``ResNet``, ``charcnn`` -> ``CharCNN``, ``vdcnn`` -> ``VDCNN``."""
    return FAMILIES.get(family, str(family))


def scheme_name(scheme: str) -> str:
    """FlexiFed's sharing schemes: ``standalone`` -> ``Standalone``, ``clustered_fl`` -> ``Clustered-FL``,
    ``basic_common`` -> ``Basic-Common``, ``clustered_common`` -> ``Clustered-Common``, ``max_common`` ->
    ``Max-Common``."""
    return SCHEMES.get(scheme, str(scheme))


def architecture_name(architecture: str) -> str:
    """``<family><depth>`` of a family of :data:`FAMILIES` as ``<Family>-<depth>``: ``vgg16`` -> ``VGG-16``,
    ``resnet20`` -> ``ResNet-20``, ``vdcnn29`` -> ``VDCNN-29``; other names (``charcnn_v1``) unchanged."""
    match = _FAMILY_DEPTH.fullmatch(str(architecture))
    return f"{FAMILIES[match[1]]}-{match[2]}" if match and match[1] in FAMILIES else str(architecture)


def model_name(model: str) -> str:
    """``vp_lstm`` -> ``LSTM`` (TRACK's position-only baseline), ``vp_transformer`` -> ``Transformer``."""
    return MODELS.get(model, str(model))


def given(value) -> bool:
    """Whether a param was logged: not None, not NaN."""
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def number(value: float) -> str:
    """Shortest form of a number: ``0.1``, ``1`` (for 1.0), ``20``."""
    return f"{float(value):g}"


def _classes(count) -> str:
    return f"{number(count)} class{'' if float(count) == 1 else 'es'}/client"


def partition_name(partition: str, alpha: float = math.nan, classes_per_client: float = math.nan,
                   name: str | None = None) -> str:
    """``Dir(α=0.1)``, ``Pat(2 classes/client)``, ``ExDir(α=0.1, 2 classes/client)``, ``IID``, ``PFLlib(name)``.

    Args:
        partition: the ``partition`` param (``dirichlet``, ``pathological``, ``exdir``, ``iid``, ``pfllib``);
            another value is shown unchanged.
        alpha, classes_per_client, name: that partition's params (NaN / None where not logged).
    """
    parts = [f"α={number(alpha)}" if given(alpha) else "", _classes(classes_per_client)
             if given(classes_per_client) else ""]
    inner = ", ".join(p for p in parts if p)
    label = {"dirichlet": "Dir", "pathological": "Pat", "exdir": "ExDir"}.get(partition)
    if label is not None:
        return f"{label}({inner})" if inner else label
    if partition == "pfllib":
        return f"PFLlib({name})" if given(name) else "PFLlib"
    return "IID" if partition == "iid" else str(partition)


def partition_stem(partition: str, alpha: float = math.nan, classes_per_client: float = math.nan,
                   name: str | None = None) -> str:
    """File-name stem of a partition setting: ``dir0.1``, ``pat2``, ``exdir0.1c2``, ``iid``, the PFLlib import's name.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``.
    """
    alpha_part = number(alpha) if given(alpha) else ""
    classes_part = number(classes_per_client) if given(classes_per_client) else ""
    stem = {"dirichlet": f"dir{alpha_part}", "pathological": f"pat{classes_part}",
            "exdir": f"exdir{alpha_part}c{classes_part}"}.get(partition, str(partition))
    if partition == "pfllib" and given(name):
        stem = str(name)
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem)
