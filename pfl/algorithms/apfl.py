"""APFL (Deng, Kamani & Mahdavi, "Adaptive Personalized Federated Learning", arXiv:2003.13461, 2020), with PFLlib's
semantics (TsingZ0/PFLlib ``system/flcore/servers/serverapfl.py``, ``system/flcore/clients/clientapfl.py``,
``system/main.py``; commit d832e76).

Every client holds its copy w of the global model and a local model v (``clientapfl.py:15``, a copy of the initial
model), plus its own mixing weight alpha (``clientapfl.py:14``, starting at the knob ``alpha_init``). A sampled client's
round (``clientapfl.py:22-63``), for ``local_epochs`` epochs, per minibatch (x, y):

1. w takes one SGD step on the task loss of w(x) (``clientapfl.py:44-48``);
2. v takes one SGD step on the task loss of v(x), the same batch (``clientapfl.py:50-54``): PFLlib trains v on its
   own output, not on the mixture's as the paper does;
3. alpha moves (``clientapfl.py:56,69-78``, after FedTorch's ``flow_utils.py``): with both models already stepped and
   the gradients of this step's two losses,
   ``alpha <- clip(alpha - lr (sum_params <v - w, alpha grad_v + (1 - alpha) grad_w> + 0.02 alpha), 0, 1)``
   (the paper's gradient is taken at the mixture; PFLlib mixes the two models' gradients instead), ``lr`` the run's
   learning rate.

After the last batch v's parameters are overwritten by the mixture ``(1 - alpha) w + alpha v``
(``clientapfl.py:58-59``), so what v carries into the next round is the mixture, not the paper's separate local
model. alpha always adapts (PFLlib has no switch) and stays the client's across rounds. The server averages the
uploaded copies w weighted by training samples (``serverapfl.py:41-44``, ``serverbase.py:114-150``); v and alpha never
travel.

``personalized_state(c)``: client c's v as it was left after its last round, i.e. the mixture of that round (the model
PFLlib scores, ``clientapfl.py:80-109`` ``model_per``, right after ``send_models`` in ``serverapfl.py:26-31``); the
initial model until c is first sampled.

Buffer policy (BatchNorm): v's running statistics and ``num_batches_tracked`` are its own (v's forward passes run in
training mode and the mixture covers parameters only, as PFLlib's ``parameters()`` loop); the global copies' float
buffers are averaged with the parameters, sample-weighted, and integer buffers keep the global model's, as pfl's FedAvg
(:mod:`pfl.algorithms.fedavg`). PFLlib sends and averages parameters only (a deliberate difference).

Knobs: ``alpha_init`` (PFLlib's ``-al``/``--alpha``, default 1.0, ``main.py:464-465``: the mixture starts as v alone and
alpha adapts from there; renamed because ``alpha`` is the run's Dirichlet concentration); PFLlib ships no search range,
pfl searches it in [0, 1]. The 0.02 weight of alpha's own
regularizer and alpha's step size (the run's ``lr``) are PFLlib's constants.

Differences from PFLlib: the buffer policy above; ``train/loss`` is the mean minibatch task loss of w (PFLlib's
``train_metrics`` reports v's loss on the whole train split); with a run's ``max_grad_norm`` the clipped gradients also
enter alpha's step; with the linear learning-rate schedule w and v step at the scheduled rate while alpha steps at the
peak ``lr`` (PFLlib's exponential decay, off by default, likewise leaves alpha's ``self.learning_rate`` alone; pfl does
not offer that decay); a parameter without a gradient (frozen) neither moves nor enters alpha's step (PFLlib assumes
every parameter trains); clients train sequentially even under ``client_parallelism=vectorized``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from pydantic import Field
from torch import nn

from pfl.data.loader import DeviceData
from pfl.federated.base import FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes, SGDUpdate, autocast
from pfl.federated.personal import GlobalAndPersonal
from pfl.federated.state import State, load_state, model_state, with_personal

ALPHA = "apfl/alpha"    # the client's alpha after its round, a 0-d float64 tensor in its result
ALPHA_DECAY = 0.02      # weight of alpha in its own gradient (clientapfl.py:76)


class APFLParams(HyperParams):
    """APFL's knobs."""

    alpha_init: float = Field(1.0, ge=0.0, le=1.0)
    """Every client's initial mixing weight of its local model v (PFLlib's ``-al``/``--alpha``, default 1.0); it
    adapts. Not named ``alpha``, the run's Dirichlet concentration."""


@dataclass
class _Round:
    """One client's round in progress: v's device model, its trained parameters and optimizer, w's trained
    parameters, alpha (0-d float64 on the device), the FitIns, the device, and the current batch."""

    v: nn.Module
    v_params: list[torch.Tensor]
    v_opt: torch.optim.Optimizer | None
    w_params: list[torch.Tensor]
    alpha: torch.Tensor
    ins: FitIns
    device: torch.device
    batch: tuple[torch.Tensor, torch.Tensor] | None = None


class APFLUpdate(SGDUpdate):
    """An APFL client's round (module docstring): the run's SGD steps w (``ins.state``), then v
    (``ins.extras["personal"]``) on the same batch, then alpha (``ins.extras["alpha"]``); finally v becomes the mixture.

    Returns w's trained entries, v's under the prefix ``"personal/"`` and alpha under ``"apfl/alpha"``; the loss is
    w's mean minibatch loss.

    Args:
        base: the run's local update (its batch size, lr, optimizer, task loss).
    """

    def __init__(self, base: SGDUpdate):
        super().__init__(**base.settings())
        self._twins: dict[int, nn.Module] = {}  # the run's device model -> a second instance of it, holding v
        self._round: _Round | None = None

    def _twin(self, model: nn.Module) -> nn.Module:
        twin = self._twins.get(id(model))
        if twin is None:
            twin = self._twins[id(model)] = copy.deepcopy(model)
        return twin

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        v = load_state(self._twin(model), ins.extras["personal"]).train()
        v_params = [p for p in v.parameters() if p.requires_grad]
        w_params = [p for p in model.parameters() if p.requires_grad]
        alpha = ins.extras["alpha"].to(data.device, torch.float64)
        self._round = _Round(v, v_params, self.optimizer(v_params), w_params, alpha, ins, data.device)
        try:
            trained, loss = super().fit(model, data, ins, indices, seed)
            alpha = self._round.alpha
            with torch.no_grad():  # clientapfl.py:58-59: v <- (1 - alpha) w + alpha v, parameters only
                for vp, wp in zip(v.parameters(), model.parameters()):
                    vp.copy_((1 - alpha) * wp + alpha * vp)
            personal = model_state(v)
        finally:
            self._round = None
        return {**with_personal(trained, personal), ALPHA: alpha.cpu()}, loss

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ins: FitIns) -> torch.Tensor:
        self._round.batch = (x, y)  # v steps on the same batch (clientapfl.py:50)
        return super().loss(model, x, y, ins)

    def _step(self, opt: torch.optim.Optimizer | None, params: list[torch.Tensor], lr: float) -> None:
        """w's step, then v's on the same batch, then alpha's (clientapfl.py:46-56)."""
        super()._step(opt, params, lr)
        r = self._round
        x, y = r.batch
        with autocast(r.device, self.autocast):
            loss_v = super().loss(r.v, x, y, r.ins)
        for p in r.v_params:
            p.grad = None
        loss_v.backward()
        super()._step(r.v_opt, r.v_params, lr)
        self._alpha_step(r)

    @torch.no_grad()
    def _alpha_step(self, r: _Round) -> None:
        """clientapfl.py:69-78, in its order of operations and precisions: float32 products and sums, alpha as
        PFLlib's Python float (a float64 0-d tensor here, so no host sync per step)."""
        grad_alpha = None
        for w, v in zip(r.w_params, r.v_params):
            if w.grad is None or v.grad is None:
                continue
            dif = v - w
            grad = r.alpha * v.grad + (1 - r.alpha) * w.grad
            term = dif.reshape(-1).dot(grad.reshape(-1))
            grad_alpha = term if grad_alpha is None else grad_alpha + term
        if grad_alpha is None:
            return
        grad_alpha = grad_alpha + (ALPHA_DECAY * r.alpha).float()
        r.alpha = (r.alpha.float() - self.lr * grad_alpha).clamp(0.0, 1.0).double()


class APFL(GlobalAndPersonal):
    """FedAvg on the clients' copies w; each client's local model v and its mixing weight alpha stay on the client
    (:class:`APFLUpdate`), and the mixture left in v is what the client is scored with (the round:
    :class:`pfl.federated.personal.GlobalAndPersonal`, v the personal model; alpha rides beside it).

    Raises:
        ValueError: the clients' architectures differ.
    """

    name = "apfl"
    Params = APFLParams
    search_space = {"alpha_init": SearchParam("float", 0.0, 1.0)}
    state_attributes = ("global_state", "personal", "alphas")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.alphas = torch.full((ctx.num_clients,), self.hp.alpha_init, dtype=torch.float64)  # clientapfl.py:14

    def make_update(self, base: SGDUpdate) -> APFLUpdate:
        return APFLUpdate(base)

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        # v and alpha stay on the client: only the global model travels (FitIns.state)
        return FitIns(self.global_state, extras={"personal": self.personal[client_id],
                                                 "alpha": self.alphas[client_id].clone()})

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        for r in results:
            self.alphas[r.client_id] = r.state[ALPHA]
        super().aggregate_fit(rnd, results)

    def upload(self, result: FitRes) -> State:
        """The trained copy w (v and alpha never travel)."""
        return {k: v for k, v in super().upload(result).items() if k != ALPHA}

    def new_client_state(self, client_id: int) -> State:
        """A new client starts from the global model (PFLlib's ``fine_tuning_new_clients``), fine-tuned whole."""
        return self.global_state
