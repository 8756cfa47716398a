"""FedFomo: first-order model optimization for personalized FL (Zhang et al., ICLR 2021).

Reproduces PFLlib's ``serverfomo.py`` / ``clientfomo.py`` when ``epsilon = 0``:

* The server keeps the latest uploaded model of every client (initially the global
  initial model) and an affinity matrix P (num_clients x num_clients, starts at the
  identity).
* A sampled client receives the top-``M'`` models by its row of P, with
  ``M' = min(M, clients sampled per round, clients that uploaded last round)``
  (ties broken by lower client id).
* It scores each received model n on its validation split (the last ``val_ratio``
  of its train split) against its anchor model theta_old, the model it held after
  its previous aggregation (PFLlib's ``old_model``; paper Eq. 6):
  ``w_n = (L(theta_old) - L(theta_n)) / (||theta_n - theta_old||_2 + 1e-5)``, where L is
  PFLlib's ``recalculate_loss``: the mean of the batch-mean losses over consecutive batches
  of ``batch_size`` (the last partial batch dropped for models with BatchNorm, as PFLlib's
  ``drop_last=has_BatchNorm``).
  Negative weights are clipped to 0 and the rest normalized; if none is positive
  the client keeps its current model. The aggregate becomes the new anchor and the
  start of local training.
* The server adds the raw (unclipped) weights to the client's row of P.

Buffer policy (BatchNorm): the distance ``||theta_n - theta_old||`` and the weighted blend
cover trainable parameters only, as PFLlib's ``weight_cal`` / ``add_parameters`` iterate
``model.parameters()``. Float buffers (``running_mean`` / ``running_var``) stay local: the
blended start keeps the client's own buffers, and each received model is scored with its
own. Integer buffers (``num_batches_tracked``) stay local too.

``epsilon > 0`` switches to the official implementation's epsilon-greedy selection
(NVlabs/FedFomo, ``client.py``, ``Client.get_federating_clients`` with ``e_greedy``; see
:meth:`FedFomo.select`): the client always receives its own model, plus ``M'`` other
clients chosen slot by slot, each slot exploring (the next client of a random shuffle)
when a uniform draw is below ``epsilon - (round - 1) * epsilon_decay`` (linear decay;
NVlabs counts rounds from 0) and otherwise exploiting (the next client by affinity).
``epsilon = 0`` (the default) is PFLlib's top-``M'``, which has no exploration.

State, and so a checkpoint, holds two models per client that took part: its latest model (``models``: the
personalized model and what the server sends others) and its anchor (``anchors``: PFLlib's ``old_model``, kept
across rounds by ``clientfomo.py``). Neither can be rebuilt from the other, and an exact resume needs both: the
anchor's loss and distances score the models the client receives at its next round.

Deliberate differences from PFLlib: losses are computed with every model in eval mode
(PFLlib's ``recalculate_loss`` runs the models in whatever mode they are in, train mode
for the anchor, so BatchNorm models there use batch statistics); ``M'`` also caps at the
clients that uploaded last round (PFLlib's guard for dropped clients, always equal here); the local update
reshuffles the client's fit split every epoch, where ``clientfomo.py``'s ``load_train_data`` reads it in a fixed
order (``DataLoader(..., shuffle=False)``), so PFLlib's FedFomo clients see the same batches every round.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from pfl.federated.base import Algorithm, FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes
from pfl.federated.state import State, flatten, param_keys, unflatten
from pfl.seed import derive_seed

_DIST_EPS = 1e-5  # PFLlib's denominator guard


def fomo_weights(loss_old: float, losses: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Raw FedFomo weights ``(L_old - L_n) / (||theta_n - theta_old|| + 1e-5)`` (Zhang et al., Eq. 6).

    Args:
        loss_old: validation loss of the client's anchor model (nats).
        losses: validation losses of the M received models, shape (M,).
        distances: L2 distances from the anchor to each received model, shape (M,).

    Returns:
        float64 tensor (M,), possibly negative.
    """
    return (loss_old - losses.double()) / (distances.double() + _DIST_EPS)


def normalize_weights(raw: torch.Tensor) -> torch.Tensor | None:
    """Clip raw weights (M,) at 0 and normalize to sum 1; ``None`` when no weight is positive."""
    clipped = raw.clamp_min(0)
    total = clipped.sum()
    return clipped / total if total > 0 else None


class FedFomoParams(HyperParams):
    """FedFomo's hyperparameters (PFLlib defaults; NVlabs' for the epsilon-greedy pair)."""

    M: int = Field(5, ge=1)
    """Models each client receives per round (capped at the clients sampled per round)."""
    val_ratio: float = Field(0.2, gt=0, lt=1)
    """The last fraction of each client's train split held out to score received models."""
    epsilon: float = Field(0.0, ge=0, le=1)
    """Initial exploration probability of NVlabs' epsilon-greedy selection (0 = PFLlib's top-M selection, no
    exploration)."""
    epsilon_decay: float = Field(0.05, ge=0, le=1)
    """Linear decay of ``epsilon`` per round: threshold ``epsilon - (round - 1) * epsilon_decay``."""


class FedFomo(Algorithm):
    """FedFomo with PFLlib's semantics; see the module docstring and :class:`FedFomoParams`.

    Raises:
        ValueError: the clients' architectures differ.
    """

    name = "fedfomo"
    Params = FedFomoParams
    search_space = {"M": SearchParam("int", 1, lambda num_clients: num_clients - 1),
                    "epsilon": SearchParam("float", 0.0, 0.5),
                    "val_ratio": SearchParam("float", 0.1, 0.4)}
    state_attributes = ("models", "anchors", "P", "num_uploaded")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.spec = ctx.single_spec(self.name)
        self.M = min(self.hp.M, ctx.num_join_clients)
        self.epsilon = self.hp.epsilon
        self.epsilon_decay = self.hp.epsilon_decay
        self.params = param_keys(ctx.runner.models[self.spec])  # distances and blend cover parameters only
        self.has_buffers = len(self.params) < sum(v.is_floating_point() for v in ctx.init_state(0).values())
        self.models = ctx.new_store()   # latest model of each client (= personalized model)
        self.anchors = ctx.new_store()  # theta_old of each client
        self.P = torch.eye(ctx.num_clients, dtype=torch.float64)
        self.num_uploaded = 0
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # within a round only

    @classmethod
    def validation_ratio(cls, hp: FedFomoParams) -> float:
        return hp.val_ratio

    def select(self, client_id: int, m: int, rnd: int) -> torch.Tensor:
        """Ids of the models sent to ``client_id`` in round ``rnd`` (1-based).

        ``epsilon = 0``: the top ``m`` of its row of P, ties to the lower id (PFLlib's
        ``torch.topk`` over ``P[client.id]``), shape (m,).

        ``epsilon > 0``: NVlabs' ``e_greedy`` rule, shape (1 + min(m, n - 1),): the client
        itself first, then one slot at a time: draw u ~ U(0, 1); if ``u < epsilon - (rnd - 1) *
        epsilon_decay`` take the next client of a random permutation of the others, else the
        next of the others ranked by P (descending, random tie-breaking); a client already
        chosen is skipped (the slot keeps its decision and takes the next one).
        """
        if self.epsilon == 0:
            order = torch.argsort(self.P[client_id], descending=True, stable=True)
            if self.ctx.new_clients:  # clients held out for new-client evaluation have no model to send
                order = order[torch.isin(order, torch.tensor(self.ctx.train_clients))]
            return order[:m]
        rng = np.random.default_rng(derive_seed(self.ctx.seed, "fomo_exploration", rnd, client_id))
        others = np.array([c for c in self.ctx.train_clients if c != client_id])
        affinity = self.P[client_id, others].numpy()
        top = list(others[np.lexsort((rng.random(len(others)), affinity))[::-1]])
        shuffled = list(rng.permutation(others))
        threshold = self.epsilon - (rnd - 1) * self.epsilon_decay
        chosen = [client_id]
        for _ in range(min(m, len(others))):
            queue = shuffled if rng.uniform(0, 1) < threshold else top
            while (pick := queue.pop(0)) in chosen:
                pass
            chosen.append(int(pick))
        return torch.tensor(chosen)

    def distances(self, anchor: State, received: list[State]) -> torch.Tensor:
        """L2 distances (M,) from the anchor to each received model over trainable parameters only
        (the flat fast path: one vector (P,) of the parameter entries per model)."""
        flat = flatten(anchor, self.params)
        return torch.stack([torch.linalg.vector_norm(flatten(m, self.params) - flat) for m in received])

    def blend(self, own: State, weights: torch.Tensor, received: list[State]) -> State:
        """``sum_n w_n theta_n`` over trainable parameters (weights (M,)); buffers from ``own``."""
        mixed = weights.float() @ torch.stack([flatten(m, self.params) for m in received])
        return {**own, **unflatten(mixed, own, self.params)}

    def score(self, client_id: int, ids: torch.Tensor) -> torch.Tensor:
        """Raw weights (len(ids),) of the received models on the client's validation split."""
        anchor = self.anchors[client_id]
        received = [self.models[int(i)] for i in ids]
        # PFLlib's recalculate_loss: mean of the batch losses over its validation DataLoader (batch_size,
        # drop_last for models with BatchNorm); one batched computation when vectorized
        losses = self.ctx.losses(self.spec, [anchor, *received], self.ctx.clients[client_id].val,
                                 self.local_update.batch_size, drop_last=self.has_buffers)
        return fomo_weights(float(losses[0]), losses[1:], self.distances(anchor, received))

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        start = self.models[client_id]
        m = min(self.M, self.num_uploaded)
        if m > 0:
            ids = self.select(client_id, m, rnd)
            raw = self.score(client_id, ids)
            self._pending[client_id] = (ids, raw)
            weights = normalize_weights(raw)
            if weights is not None:
                start = self.blend(start, weights, [self.models[int(i)] for i in ids])
        self.anchors[client_id] = start
        return FitIns(start)

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        for r in results:
            self.models[r.client_id] = r.state
            if r.client_id in self._pending:
                ids, raw = self._pending.pop(r.client_id)
                self.P[r.client_id].index_add_(0, ids, raw)
        self.num_uploaded = len(results)

    def personalized_state(self, client_id: int) -> State:
        return self.models[client_id]

    def state_for_logging(self) -> dict[str, torch.Tensor]:
        return {"affinity": self.P.clone()}
