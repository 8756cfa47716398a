"""Federated algorithms (one module each) and their registry: adding an algorithm is one module plus one line here."""

from pfl.federated.base import Algorithm, FederatedContext, HyperParams
from pfl.algorithms.apfl import APFL
from pfl.algorithms.ditto import Ditto
from pfl.algorithms.fedala import FedALA
from pfl.algorithms.fedavg import FedAvg
from pfl.algorithms.fedbabu import FedBABU
from pfl.algorithms.fedbn import FedBN
from pfl.algorithms.fedfomo import FedFomo
from pfl.algorithms.fedgen import FedGen
from pfl.algorithms.fedlora import FedLoRA
from pfl.algorithms.fedpac import FedPAC
from pfl.algorithms.fedper import FedPer
from pfl.algorithms.fedprox import FedProx
from pfl.algorithms.fedproto import FedProto
from pfl.algorithms.fedrep import FedRep
from pfl.algorithms.fedrod import FedRoD
from pfl.algorithms.flexifed import FlexiFed
from pfl.algorithms.lgfedavg import LGFedAvg
from pfl.algorithms.local import Local
from pfl.federated.local import FitIns, FitRes
from pfl.algorithms.mocosfl import MocoSFL
from pfl.algorithms.moon import MOON
from pfl.algorithms.perfedavg import PerFedAvg
from pfl.algorithms.pfedme import PFedMe
from pfl.algorithms.scaffold import Scaffold

REGISTRY: dict[str, type[Algorithm]] = {cls.name: cls for cls in (FedAvg, FedFomo, FedALA, FlexiFed, FedGen, FedLoRA,
                                                                   MocoSFL, Local, FedPer, LGFedAvg, FedRep, FedBN,
                                                                   FedProx, Ditto, MOON, FedProto, FedPAC, FedBABU,
                                                                   FedRoD, PFedMe, Scaffold, APFL, PerFedAvg)}

__all__ = ["REGISTRY", "Algorithm", "FederatedContext", "FitIns", "FitRes", "HyperParams", "FedALA", "FedAvg",
           "FedFomo", "FedGen", "FedLoRA", "FlexiFed", "Local", "MocoSFL", "FedPer", "LGFedAvg", "FedRep", "FedBN",
           "FedProx", "Ditto", "MOON", "FedProto", "FedPAC", "FedBABU", "FedRoD", "PFedMe", "Scaffold",
           "APFL", "PerFedAvg"]
