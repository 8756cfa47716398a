"""Local training (``algo=local``): every client trains only its own model, and nothing travels.

The baseline every PFL paper reports beside FedAvg (PFLlib's ``Local``, FL-bench's ``local``): the same local update
as FedAvg's clients, each client starting a round from its own model of the previous round; no aggregation. A
client's personalized model is its own. ``comm/bytes_down`` and ``comm/bytes_up`` are 0.
"""

from __future__ import annotations

from pfl.federated.base import Algorithm, FederatedContext
from pfl.federated.local import FitIns, FitRes
from pfl.federated.state import State


class Local(Algorithm):
    """Each client's model trains on its own data only; the server does nothing."""

    name = "local"
    tasks = ("classification", "viewport")
    state_attributes = ("own",)

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.own = ctx.new_store()  # each client's model, from its architecture's initial state

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        return FitIns(self.own[client_id], sent={})

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        for r in results:
            self.own[r.client_id] = r.state

    def upload(self, result: FitRes) -> State:
        return {}

    def personalized_state(self, client_id: int) -> State:
        return self.own[client_id]
