"""FedALA: adaptive local aggregation for personalized FL (Zhang et al., AAAI 2023).

Reproduces PFLlib's ``serverala.py`` / ``clientala.py`` / ``utils/ALA.py``:

* The server aggregates the uploaded models like FedAvg (sample-weighted mean).
* Right after each aggregation *every* client (PFLlib's ``send_models`` reaches all
  clients, selected or not) initializes its local model by Adaptive Local Aggregation
  (paper Sec. "Adaptive Local Aggregation", Eq. 4-6) toward the new global model:

  - lower layers take the global parameters;
  - the top ``layer_idx`` parameter tensors become
    ``theta_l + (theta_g - theta_l) * W`` with element-wise weights W in [0, 1]
    (all ones the first time);
  - W is learned by SGD on the cross-entropy of that blended model over a contiguous
    ``rand_percent``% slice of the client's training data starting at a random
    position (batches of ``batch_size`` in order, last partial batch kept):
    ``W <- clip(W - eta * dL/dW, 0, 1)`` with ``dL/dW = dL/dtheta * (theta_g - theta_l)`` (Eq. 6);
  - the first time a client runs ALA it repeats passes until the population std of the
    last ``num_pre_loss`` pass losses (each the pass's last batch loss) falls below
    ``threshold``; afterwards one pass per round;
  - W persists per client across rounds, in host memory;
  - ALA is skipped while the client's model equals the global model in its first
    parameter tensor (round 1, when every model is the initial one).

* The next round's selected clients train from their ALA-initialized models and upload.
  Each client's personalized model is its ALA-initialized local model: PFLlib's loop is
  ``send_models`` (ALA) -> ``evaluate`` -> train -> aggregate, so what it scores (and what
  pfl scores and saves after round r) is every client's ALA of its local model toward the
  global model aggregated in round r, which is also where round r + 1 starts. ALA after
  round r draws its slice from the stream of round r + 1, the round it initializes.

Buffer policy (BatchNorm): FedAvg-style aggregation averages parameters and float buffers
(sample-weighted); ALA gives the lower layers' parameters and every float buffer the
global values and blends only the top ``layer_idx`` parameter tensors.

Documented departures from PFLlib: float buffers (BatchNorm statistics) follow the
lower layers and take the global values (PFLlib keeps the local ones, and its FedAvg
never averages them); the first-round loop stops after at most :data:`MAX_START_EPOCHS`
passes (PFLlib's has no bound).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from pfl.federated.base import Algorithm, FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes
from pfl.federated.state import State, flatten, load_state, param_keys, unflatten, weighted_average
from pfl.seed import derive_seed

MAX_START_EPOCHS = 500


def blend(local_top: torch.Tensor, global_top: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ALA's element-wise blend ``theta_l + (theta_g - theta_l) * W`` (Zhang et al., Eq. 5); all shapes (T,)."""
    return local_top + (global_top - local_top) * weights


def learn_weights(batch_loss: Callable[[torch.Tensor, int], torch.Tensor], num_batches: int,
                  local_top: torch.Tensor, global_top: torch.Tensor, weights: torch.Tensor, eta: float,
                  until_converged: bool, threshold: float, num_pre_loss: int,
                  max_epochs: int = MAX_START_EPOCHS) -> tuple[torch.Tensor, int]:
    """Learn ALA's weights W by SGD (Zhang et al., Eq. 6), as PFLlib's ``adaptive_local_aggregation``.

    Args:
        batch_loss: ``(blended top parameters (T,), batch number) -> scalar loss``.
        num_batches: batches per pass.
        local_top, global_top, weights: the client's and the global top parameters and the
            current weights, each (T,) on one device.
        eta: weight learning rate.
        until_converged: repeat passes until the std of the last ``num_pre_loss`` pass losses
            is below ``threshold`` (a client's first ALA); otherwise one pass.
        max_epochs: bound on the passes of the converging loop.

    Returns:
        ``(weights, passes)``: the new weights (T,) in [0, 1] and the number of passes run.
    """
    w = weights.detach().clone()
    losses: list[float] = []
    for epoch in range(1, max_epochs + 1):
        for b in range(num_batches):
            w.requires_grad_(True)
            loss = batch_loss(blend(local_top, global_top, w), b)
            (grad,) = torch.autograd.grad(loss, w)
            w = (w.detach() - eta * grad).clamp_(0.0, 1.0)
        losses.append(loss.item())
        if not until_converged:
            break
        if len(losses) > num_pre_loss and np.std(losses[-num_pre_loss:]) < threshold:
            break
    return w, epoch


class _TopForward:
    """Logits of the model with its top parameter tensors replaced by given values.

    When all top tensors live in the head, the frozen base runs once per slice under
    ``no_grad`` with large batches and the weight learning only runs the head (the
    same function, far fewer FLOPs); otherwise every step runs the whole model.
    """

    def __init__(self, model: nn.Module, top: list[str], like: State):
        self.model = model
        self.head_only = all(name.startswith("head.") for name in top)
        self.module = model.head if self.head_only else model
        self.names = [name.removeprefix("head.") if self.head_only else name for name in top]
        self.shapes = [like[name].shape for name in top]
        self.sizes = [like[name].numel() for name in top]

    def inputs(self, images: torch.Tensor, chunk: int) -> torch.Tensor:
        """What :meth:`logits` consumes for images (n, C, H, W): base features (n, D) or the images."""
        if not self.head_only:
            return images
        with torch.no_grad():
            return torch.cat([self.model.base(images[i:i + chunk]) for i in range(0, len(images), chunk)])

    def logits(self, top: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) with the top tensors taken from the flat vector ``top`` (T,)."""
        views = [t.view(s) for t, s in zip(torch.split(top, self.sizes), self.shapes)]
        return functional_call(self.module, dict(zip(self.names, views)), (x,))


class FedALAParams(HyperParams):
    """FedALA's hyperparameters (defaults from PFLlib's ``main.py`` (eta, rand_percent, layer_idx) and
    ``utils/ALA.py`` (threshold, num_pre_loss)).
    """

    eta: float = Field(1.0, gt=0)
    """ALA weight learning rate."""
    rand_percent: int = Field(80, ge=1, le=100)
    """Percent of local training data ALA learns on."""
    layer_idx: int = Field(2, ge=1)
    """Number of top parameter tensors ALA blends (2: the last layer's weight and bias)."""
    threshold: float = Field(0.1, gt=0)
    """Loss-std threshold of the first-round convergence loop."""
    num_pre_loss: int = Field(10, ge=1)
    """Pass losses the std is taken over."""


class FedALA(Algorithm):
    """FedALA with PFLlib's semantics; see the module docstring and :class:`FedALAParams`.

    Raises:
        ValueError: ``layer_idx`` exceeds the model's number of parameter tensors, or the clients'
            architectures differ.
    """

    name = "fedala"
    Params = FedALAParams
    search_space = {"eta": SearchParam("float", 0.1, 10.0, log=True),
                    "rand_percent": SearchParam("int", 5, 100),
                    "layer_idx": SearchParam("int", 1, 4)}
    state_attributes = ("global_state", "models", "weights", "started", "start_passes")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        hp = self.hp
        self.spec = ctx.single_spec(self.name)
        model = ctx.runner.models[self.spec]
        params = param_keys(model)
        if not 1 <= hp.layer_idx <= len(params):
            raise ValueError(f"layer_idx={hp.layer_idx}: the model has {len(params)} parameter tensors; "
                             f"use 1..{len(params)}")
        self.eta, self.rand_percent, self.threshold, self.num_pre_loss = (hp.eta, hp.rand_percent, hp.threshold,
                                                                          hp.num_pre_loss)
        self.global_state = ctx.init_states[self.spec]
        self.first = params[0]
        self.top = params[-hp.layer_idx:]
        self.forward = _TopForward(model, self.top, self.global_state)
        self.models = ctx.new_store()
        self.weights = ctx.new_store({"ala_weights": torch.ones(len(flatten(self.global_state, self.top)))})
        self.started: set[int] = set()
        self.start_passes: dict[int, int] = {}

    def sample_slice(self, client_id: int, rnd: int) -> torch.Tensor:
        """The contiguous ``rand_percent``% of the client's training indices ALA uses in round ``rnd``."""
        train = self.ctx.clients[client_id].fit
        num = int(self.rand_percent / 100 * len(train))
        rng = np.random.default_rng(derive_seed(self.ctx.seed, "ala_slice", rnd, client_id))
        start = int(rng.integers(0, len(train) - num + 1))
        return train[start:start + num]

    def local_aggregation(self, client_id: int, rnd: int) -> None:
        """Replace the client's model by its ALA initialization from the global model (module docstring)."""
        local = self.models[client_id]
        if torch.equal(local[self.first], self.global_state[self.first]):
            return
        runner, update = self.ctx.runner, self.local_update
        local_top, global_top = flatten(local, self.top), flatten(self.global_state, self.top)
        idx = self.sample_slice(client_id, rnd)
        if len(idx) > 0:
            images, labels = runner.data.batch(idx)
            x = self.forward.inputs(images, runner.eval_batch_size)
            bs = update.batch_size

            def batch_loss(top: torch.Tensor, b: int) -> torch.Tensor:
                sl = slice(b * bs, (b + 1) * bs)
                return update.loss_fn(self.forward.logits(top, x[sl]), labels[sl])

            device = runner.data.device
            w, passes = learn_weights(
                batch_loss, -(-len(idx) // bs), local_top.to(device), global_top.to(device),
                self.weights[client_id]["ala_weights"].to(device), self.eta,
                client_id not in self.started, self.threshold, self.num_pre_loss)
            if client_id not in self.started:
                self.start_passes[client_id] = passes
            self.weights[client_id] = {"ala_weights": w}
        self.started.add(client_id)
        mixed = blend(local_top, global_top, self.weights[client_id]["ala_weights"])
        self.models[client_id] = {**self.global_state, **unflatten(mixed, self.global_state, self.top)}

    def initialize_clients(self, rnd: int) -> None:
        """ALA toward the global model for every client, selected or not (PFLlib's ``send_models``), as the
        start of round ``rnd``."""
        # lower layers of every blended forward are the global ones
        load_state(self.ctx.runner.models[self.spec], self.global_state).eval()
        for cid in self.ctx.train_clients:  # (clients held out for new-client evaluation take no part)
            self.local_aggregation(cid, rnd)

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        return FitIns(self.models[client_id])

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        """FedAvg of the uploads, which become their clients' local models; then ALA for every client."""
        for r in results:
            self.models[r.client_id] = r.state
        avg = weighted_average([r.state for r in results], [r.num_samples for r in results])
        self.global_state = {**self.global_state, **avg}
        self.initialize_clients(rnd + 1)

    def personalized_state(self, client_id: int) -> State:
        return self.models[client_id]

    def new_client_state(self, client_id: int) -> State:
        """A new client starts from the global model (PFLlib's ``fine_tuning_new_clients``)."""
        return self.global_state

    def state_for_logging(self) -> dict[str, torch.Tensor]:
        passes = [self.start_passes.get(c, 0) for c in range(self.ctx.num_clients)]
        return {"ala_start_passes": torch.tensor(passes)}
