"""FedAvg (McMahan et al., AISTATS 2017, Algorithm 1): sample-weighted parameter averaging.

Every client's personalized model is the global model (FedAvg does not personalize).
"""

from __future__ import annotations

import torch

from pfl.algorithms.base import Algorithm, ClientUpdate, FederatedContext


def weighted_average(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_k w_k v_k / sum_k w_k`` over flat vectors (P,) each; returns (P,).

    Raises:
        ValueError: no vectors, or weights that do not sum to a positive number.
    """
    if not vectors:
        raise ValueError("cannot average zero vectors")
    w = torch.tensor(weights, dtype=torch.float64)
    if w.sum() <= 0:
        raise ValueError(f"weights must sum to a positive number, got {weights}")
    w = (w / w.sum()).to(vectors[0].dtype)
    return w @ torch.stack(vectors)


class FedAvg(Algorithm):
    """The server model is the average of the sampled clients' models weighted by their training samples."""

    name = "fedavg"

    def __init__(self, ctx: FederatedContext):
        super().__init__(ctx)
        self.global_params = ctx.init_params.clone()

    def configure_fit(self, client_id: int, rnd: int) -> torch.Tensor:
        return self.global_params

    def aggregate_fit(self, rnd: int, updates: list[ClientUpdate]) -> None:
        self.global_params = weighted_average([u.params for u in updates], [u.num_samples for u in updates])

    def personalized_model(self, client_id: int) -> torch.Tensor:
        return self.global_params
