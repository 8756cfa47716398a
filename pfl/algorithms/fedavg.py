"""FedAvg (McMahan et al., AISTATS 2017, Algorithm 1): sample-weighted averaging of the uploaded models.

Every client's personalized model is the global model (FedAvg does not personalize), unless the run's downlink
(:mod:`pfl.federated.downlink`) sends only the top layers (``downlink=head_layers:K``), nothing (``none``), or
blends (``downlink_blend``): then each client keeps its own model, merges the downlink into it before training,
and its personalized model is its own with the latest downlink merged in.

Buffer policy (BatchNorm): float buffers (running statistics) are averaged with the parameters,
sample-weighted; integer buffers (``num_batches_tracked``) are not averaged (the global model
keeps its own). PFLlib's FedAvg averages ``model.parameters()`` only and leaves the global
model's buffers at their initial values, a deliberate difference.
"""

from __future__ import annotations

from pfl.federated.base import Algorithm, FederatedContext
from pfl.federated.local import FitIns, FitRes
from pfl.federated.state import State, weighted_average


class FedAvg(Algorithm):
    """The server model is the average of the sampled clients' models weighted by their training samples.

    Raises:
        ValueError: the clients' architectures differ.
    """

    name = "fedavg"
    tasks = ("classification", "viewport")
    takes_downlink = True
    state_attributes = ("global_state", "own")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.global_state = ctx.init_states[ctx.single_spec(self.name)]
        self.own = ctx.new_store()  # each client's own model; written only when the downlink merges into it

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        downlink = self.ctx.downlink
        if downlink.full:
            return FitIns(self.global_state)
        return FitIns(self.personalized_state(client_id), sent=downlink.payload(self.global_state))

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        downlink = self.ctx.downlink
        if not downlink.full:
            for r in results:
                self.own[r.client_id] = r.state
        avg = weighted_average([downlink.upload(r.state) for r in results], [r.num_samples for r in results])
        self.global_state = {**self.global_state, **avg}

    def personalized_state(self, client_id: int) -> State:
        downlink = self.ctx.downlink
        return self.global_state if downlink.full else downlink.merge(self.own[client_id], self.global_state)
