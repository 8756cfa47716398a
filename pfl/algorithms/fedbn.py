"""FedBN (Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch Normalization", ICLR 2021),
with PFLlib's semantics (TsingZ0/PFLlib ``system/flcore/servers/serverbn.py``, ``system/flcore/clients/clientbn.py``;
commit d832e76).

FedAvg whose BatchNorm layers stay with each client. A sampled client trains its model with the run's local update
(``clientbn.py:10-35``, the plain client loop); the server averages the uploaded models' parameters weighted by
training samples (``serverbase.py:138-150``); every client then copies the averaged parameters into its model except
those of BatchNorm layers (``clientbn.py:46-49``, called for every client by ``serverbase.py:103-109``).

What stays personal: every BatchNorm layer's ``weight`` and ``bias`` (any ``torch.nn.modules.batchnorm._BatchNorm``:
``BatchNorm1d/2d/3d``) and every buffer (running mean and variance, ``num_batches_tracked``), since PFLlib's
``set_parameters`` copies ``named_parameters()`` only. Everything else (convolutions, Linears, other norms) is averaged.

``personalized_state(c)``: client c's own last model with the latest averaged parameters outside BatchNorm, the model
PFLlib evaluates after ``send_models`` (``serverbn.py:26-32``). A client never sampled has the initial BatchNorm.

Buffer policy (BatchNorm): each client's own; never averaged nor sent.

Differences from PFLlib: PFLlib picks the personal parameters by name (``'bn' not in name``, ``clientbn.py:48``), which
on its models means the BatchNorm layers except torchvision ResNet's shortcut BatchNorms (``downsample.1``, averaged
there); pfl picks them by module type, so every BatchNorm layer stays personal on every architecture (pfl's VGG names
its BatchNorms ``base.<i>``, which PFLlib's name test would average). The server averages (and the uplink carries) only
the shared parameters: PFLlib averages BatchNorm parameters too, into a global model no client ever reads them from.
On a model without BatchNorm (``model=cnn``) FedBN is FedAvg with parameters-only averaging, as in PFLlib.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pfl.federated.partial import PartialSharing
from pfl.federated.state import param_keys


def batchnorm_prefixes(model: nn.Module) -> list[str]:
    """The module paths (with a trailing dot) of the model's BatchNorm layers, in module order."""
    return [name + "." for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


def shared_keys(model: nn.Module) -> list[str]:
    """The parameters FedBN averages: every parameter outside BatchNorm layers, in ``state_dict`` order."""
    bn = tuple(batchnorm_prefixes(model))
    return [k for k in param_keys(model) if not k.startswith(bn)] if bn else param_keys(model)


class FedBN(PartialSharing):
    """Sample-weighted averaging of every parameter outside BatchNorm; BatchNorm layers and buffers stay per client.

    Raises:
        ValueError: the clients' architectures differ.
    """

    name = "fedbn"

    @classmethod
    def shares(cls, model: nn.Module) -> list[str]:
        return shared_keys(model)
