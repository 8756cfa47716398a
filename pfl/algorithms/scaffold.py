"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", ICML 2020), with PFLlib's semantics (TsingZ0/PFLlib ``system/flcore/servers/serverscaffold.py``,
``system/flcore/clients/clientscaffold.py``, ``system/flcore/optimizers/fedoptimizer.py``, ``system/main.py``; commit
d832e76).

The server holds the global model x and the server control variate c; every client i holds its control variate c_i.
All start at zero (``serverscaffold.py:25-27``, ``clientscaffold.py:18-20``).

Client round (``clientscaffold.py:24-84``): starting from the received x (``set_parameters``, ``:62-67``), every
minibatch step is

    y <- y - lr (grad + c - c_i)

(``SCAFFOLDOptimizer.step``, ``fedoptimizer.py:27-30``). After the round's K steps (K = batches per epoch x
``local_epochs``, ``clientscaffold.py:51-52``), the control variate follows the paper's option II
(``update_yc``, ``:69-73``):

    c_i <- c_i - c + (x - y) / (K lr)

and the client reports ``delta_y = y - x`` and ``delta_c = -c + (x - y) / (K lr)`` (``delta_yc``, ``:75-84``; equal
to the change of c_i). Server (``serverscaffold.py:115-133``), sequentially over the uploading clients:

    x <- x + eta_g delta_y / m;     c <- c + delta_c / N

with m the clients sampled this round (PFLlib's ``num_join_clients``), N all clients and eta_g
``server_learning_rate`` (PFLlib's ``-slr``, default 1.0, ``main.py:482``). The paper's global step size is the same
eta_g; its server control update is the same ``|S| / N`` mean of the deltas.

What :class:`ScaffoldSGD` returns: the trained model y, plus c_i's new value under ``"control/"`` and delta_c under
``"control_delta/"`` (``"/"`` never occurs in state keys). What travels up (``comm/bytes_up``): y's entries and
delta_c; down: x and c (c goes in :attr:`FitIns.extras`; ``comm/bytes_down`` counts x only, as for every algorithm
whose extras are its own). The control variates are checkpointed: c as ``global_c`` (a named state), every c_i in the
``client_c`` store (zeros until the client is first sampled), so a run resumes bit for bit.

``personalized_state(c)``: the global model for every client (SCAFFOLD does not personalize; PFLlib scores the global
model it has just sent, ``serverscaffold.py:34-39``). A held-out new client starts from the global model, fine-tuned
with plain SGD by the default adaptation (``serverscaffold.py:136-154``: c plays no part).

Buffer policy (BatchNorm): control variates and the corrected step cover parameters only, as PFLlib's (its
``parameters()`` lists). Float buffers (running statistics) are FedAvg's: averaged over the uploads, sample-weighted
(:mod:`pfl.algorithms.fedavg`); integer buffers keep the global model's. PFLlib leaves the global model's buffers at
their initial values (a deliberate difference).

Differences from PFLlib: the buffers above; the server divides by the number of clients that trained this round
(PFLlib divides by ``num_join_clients`` even if some were dropped; pfl drops none, so the two agree); the c_i update
uses the run's ``lr`` (with ``lr_schedule=linear`` the steps decay but the update still divides by the peak ``lr``, as
PFLlib's ``self.learning_rate`` ignores its decay scheduler); with the run's ``weight_decay``, ``adamw`` or
``max_grad_norm``, the correction is added to the (clipped) gradient before that optimizer's step (PFLlib knows only
plain SGD); clients train sequentially under ``client_parallelism=vectorized``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from pfl.data.loader import DeviceData
from pfl.federated.base import Algorithm, FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import State, param_keys, weighted_average

CONTROL = "control/"  # prefix of the client's new control variate c_i in its result
DELTA = "control_delta/"  # prefix of delta_c, what the server adds (divided by N) to c


class ScaffoldParams(HyperParams):
    """SCAFFOLD's knobs."""

    server_learning_rate: float = Field(1.0, gt=0)
    """The global step size eta_g (PFLlib's ``-slr``, default 1.0)."""


class ScaffoldSGD(SGDUpdate):
    """The run's local update with SCAFFOLD's corrected step: before every optimizer step each trained parameter's
    gradient becomes ``grad + c - c_i`` (``fedoptimizer.py:30``); after the round, c_i follows option II.

    ``ins.extras`` holds ``"c"`` (the server control) and ``"c_i"`` (the client's), named by parameter.

    Args:
        base: the run's local update.
    """

    def __init__(self, base: SGDUpdate):
        super().__init__(**base.settings())
        self._corrections: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._steps = 0

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        c, c_i = ins.extras["c"], ins.extras["c_i"]
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._corrections = [(p, c[n].to(p.device), c_i[n].to(p.device)) for n, p in named]
        self._steps = 0
        try:
            state, loss = super().fit(model, data, ins, indices, seed)
        finally:
            self._corrections = None
        coef = 1 / self._steps / self.lr  # PFLlib: 1/self.num_batches/max_local_epochs/self.learning_rate
        new_c, delta_c = {}, {}
        for n, _ in named:
            x, y = ins.state[n], state[n]  # the received global model and the trained one, on the host
            new_c[n] = c_i[n] - c[n] + coef * (x - y)  # update_yc, clientscaffold.py:73
            delta_c[n] = - c[n] + coef * (x - y)  # delta_yc, clientscaffold.py:82
        return {**state, **{CONTROL + k: v for k, v in new_c.items()},
                **{DELTA + k: v for k, v in delta_c.items()}}, loss

    @torch.no_grad()
    def correct_gradients(self) -> None:
        """Each trained parameter's gradient plus ``c - c_i`` (after clipping, if any, before the step); counts
        the round's steps."""
        for p, sc, cc in self._corrections:
            if p.grad is not None:  # as the base step, a parameter without a gradient does not move
                p.grad = p.grad + sc - cc  # fedoptimizer.py:30, in its order of operations
        self._steps += 1


class Scaffold(Algorithm):
    """Controlled averaging: clients correct every step by ``c - c_i``; the server moves the global model by the
    mean model change (times ``server_learning_rate``) and the server control by the control changes over N.

    Raises:
        ValueError: the clients' architectures differ.
    """

    name = "scaffold"
    Params = ScaffoldParams
    search_space = {"server_learning_rate": SearchParam("float", 0.1, 2.0, log=True)}
    tasks = ("classification", "viewport")
    state_attributes = ("global_state", "global_c", "client_c")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        spec = ctx.single_spec(self.name)
        self.global_state = ctx.init_states[spec]
        self.param_keys = param_keys(ctx.runner.models[spec])
        zeros = {k: torch.zeros_like(self.global_state[k]) for k in self.param_keys}
        self.global_c: State = dict(zeros)  # serverscaffold.py:25-27
        self.client_c = ctx.new_store(zeros)  # clientscaffold.py:18-20: zeros until the client first trains
        self.update = ScaffoldSGD(ctx.update) if ctx.update else None

    @property
    def local_update(self) -> ScaffoldSGD:
        return self.update

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        return FitIns(self.global_state, extras={"c": self.global_c, "c_i": self.client_c[client_id]})

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        x = self.global_state
        # float buffers: FedAvg's sample-weighted average (parameters are overwritten below)
        avg = weighted_average([self._model(r) for r in results], [r.num_samples for r in results])
        new = {**x, **avg}
        m, n = len(results), self.ctx.num_clients
        eta = self.hp.server_learning_rate
        new_c = {}
        for k in self.param_keys:
            g, c = x[k].clone(), self.global_c[k].clone()
            for r in results:  # serverscaffold.py:126-131, client by client in upload order
                g += (r.state[k] - x[k]) / m * eta
                c += r.state[DELTA + k] / n
            new[k], new_c[k] = g, c
        for r in results:
            self.client_c[r.client_id] = {k: r.state[CONTROL + k] for k in self.param_keys}
        self.global_state, self.global_c = new, new_c

    @staticmethod
    def _model(result: FitRes) -> State:
        return {k: v for k, v in result.state.items() if not k.startswith((CONTROL, DELTA))}

    def upload(self, result: FitRes) -> State:
        """The trained model (as delta_y) and delta_c; the new c_i stays on the client."""
        return {k: v for k, v in result.state.items() if not k.startswith(CONTROL)}

    def personalized_state(self, client_id: int) -> State:
        return self.global_state
