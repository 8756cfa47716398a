"""FedPer: federated learning with personalization layers (Arivazhagan et al., arXiv:1912.00818, 2019).

Reproduces PFLlib's ``system/flcore/servers/serverper.py`` / ``system/flcore/clients/clientper.py`` (TsingZ0/PFLlib
at d832e76): the **head (PFLlib's ``model.fc``, the final Linear: :func:`pfl.federated.partial.personal_layer`) stays personal,
everything below it is averaged** (the round: :mod:`pfl.federated.partial`).

* Round order (``serverper.py:26-45``): the server sends the global base to *every* client (``serverbase.py:103-109``,
  ``clientper.py:45-47``: the received parameters overwrite the client's ``model.base`` parameters), PFLlib evaluates
  there, the selected clients train their whole model (base and head; ``clientper.py:10-35``, plain SGD on
  cross-entropy), and upload only ``model.base`` (everything but ``fc``) (``serverper.py:85``), which the server averages weighted by the
  clients' training samples (``serverbase.py:138-150``: ``parameters()`` only).
* ``personalized_state(c)`` (what is evaluated and saved as client c's artifact) is client c's own model, the head it
  last trained (the initial head if never sampled), with the latest global base: the model PFLlib's ``evaluate()``
  scores right after ``send_models``. A selected client starts local training from that same model.
* All clients start from one initial model (``clientbase.py:17-19``: each client deep-copies ``args.model``), which
  is also the first global model.
* A new client (one that never trained; PFLlib's ``-nnc``, ``serverbase.py:324-355``) would get the global base and
  the initial head, then fine-tune all parameters; pfl has no new-client evaluation yet.

Buffer policy (BatchNorm): PFLlib moves ``parameters()`` only, so every buffer (running statistics and
``num_batches_tracked``, in the base too) stays the client's own; pfl does the same.

Communication: ``comm/bytes_down`` counts the global part sent to each sampled client, ``comm/bytes_up`` the shared
parameters each uploads.

Differences from PFLlib: none in the algorithm. PFLlib sends the base to every client each round while pfl merges the
latest global base in when a client's model is read (identical models). As in the paper, the split point is the
final Linear, as PFLlib's ``BaseHeadSplit`` (``trainmodel/models.py:9-20``) splits ``model.fc`` off; on the CNN
pfl's own head holds two FC layers (for the head methods), of which only the last is FedPer's head.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from pfl.federated.base import HyperParams, SearchParam
from pfl.federated.partial import PartialSharing, outside_personal_layer


class FedPerParams(HyperParams):
    """FedPer has no knobs of its own (the run's ``lr``, ``local_epochs``, ``batch_size`` drive it)."""


class FedPer(PartialSharing):
    """Every parameter below the final Linear is averaged across the sampled clients; each client keeps its own
    final Linear (and every buffer)."""

    name = "fedper"
    Params = FedPerParams
    search_space: ClassVar[dict[str, SearchParam]] = {}

    @classmethod
    def shares(cls, model: nn.Module) -> list[str]:
        return outside_personal_layer(model)
