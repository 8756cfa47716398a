"""LG-FedAvg: local representations, global head (Liang et al., "Think Locally, Act Globally", arXiv:2001.01523, 2020).

Reproduces PFLlib's ``system/flcore/servers/serverlg.py`` / ``system/flcore/clients/clientlg.py`` (TsingZ0/PFLlib at
d832e76): the **head (PFLlib's ``model.fc``, the final Linear: :func:`pfl.federated.partial.personal_layer`) is
averaged, everything below it stays personal** (FedPer's mirror image, :mod:`pfl.algorithms.fedper`; the round:
:mod:`pfl.federated.partial`).

* The global model is the head only (``serverlg.py:13``: a copy of ``args.model.head``).
* Round order (``serverlg.py:27-46``): the server sends the global head to *every* client (``serverbase.py:103-109``,
  ``clientlg.py:45-47``: the received parameters overwrite the client's ``model.head`` parameters), PFLlib evaluates
  there, the selected clients train their whole model (base and head; ``clientlg.py:10-42``, plain SGD on
  cross-entropy), and upload only ``model.head`` (``serverlg.py:91``), which the server averages weighted by the
  clients' training samples (``serverbase.py:138-150``: ``parameters()`` only).
* ``personalized_state(c)`` (what is evaluated and saved as client c's artifact) is client c's own model, the base it
  last trained (the initial base if never sampled), with the latest global head. PFLlib prints "Evaluate global
  model" (``serverlg.py:34``) but its ``evaluate()`` scores each client's own ``model`` after ``send_models``: that
  same personal-base-plus-global-head model. A selected client starts local training from it.
* All clients start from one initial model (``clientbase.py:17-19``), whose head is the first global head.
* A new client (PFLlib's ``-nnc``, ``serverbase.py:324-355``) would get the initial base and the global head, then
  fine-tune all parameters; pfl has no new-client evaluation yet.

Buffer policy (BatchNorm): PFLlib moves ``parameters()`` only, so every buffer stays the client's own; pfl does the
same (the head of pfl's models holds no buffers in any case).

Communication: ``comm/bytes_down`` counts the global head sent to each sampled client, ``comm/bytes_up`` the head
parameters each uploads.

Differences: from PFLlib none in the algorithm (PFLlib sends the head to every client each round; pfl merges the
latest global head in when a client's model is read: identical models). Where PFLlib departs from the paper, pfl
follows PFLlib: the paper leaves the split between local and global layers a per-model choice (several top layers
global) and allows local representations trained with other (e.g. unsupervised) objectives; here the global part is
exactly the model's final Linear (on the CNN, whose pfl head holds two FC layers, the last of them) and the
clients train base and head jointly on the task's loss.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pfl.federated.base import HyperParams, SearchParam
from pfl.federated.partial import PartialSharing, personal_layer, under
from pfl.federated.state import param_keys


class LGFedAvgParams(HyperParams):
    """LG-FedAvg has no knobs of its own (the run's ``lr``, ``local_epochs``, ``batch_size`` drive it)."""


class LGFedAvg(PartialSharing):
    """The final Linear is averaged across the sampled clients; each client keeps everything below it (and every
    buffer)."""

    name = "lgfedavg"
    Params = LGFedAvgParams
    search_space: ClassVar[dict[str, SearchParam]] = {}

    @classmethod
    def shares(cls, model: nn.Module) -> list[str]:
        return under(param_keys(model), personal_layer(model))
