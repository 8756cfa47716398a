"""Tiny builders shared by the algorithms' tests: hand-checkable models and losses, device pools, contexts for
aggregation or training without a real run, filled states, and the templates' FedAvg twin. Imported as
``from _tiny import ...``, as the tests import ``conftest`` and ``test_fedper`` (``tests/`` is on ``sys.path``)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from pfl.config import RunConfig, load_config
from pfl.data.loader import ClientData
from pfl.federated.base import FederatedContext
from pfl.federated.local import SGDUpdate
from pfl.federated.state import State, load_state, model_state
from pfl.models import ModelSpec
from pfl.models.split import SplitModel

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ONE_OUTPUT = ModelSpec("tiny", num_classes=1)
TWO_CLASSES = ModelSpec("tiny", num_classes=2)


class Pool(SimpleNamespace):
    """A device pool on the CPU whose batch of indices idx is (x[idx], y[idx]), no transform; ``x`` and ``y`` may be
    replaced between fits."""

    def batch(self, idx: torch.Tensor, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[idx], self.y[idx]


def pool(x: torch.Tensor, y: torch.Tensor) -> Pool:
    """The :class:`Pool` of samples ``x`` (N, ...) with targets ``y`` (N, ...)."""
    return Pool(x=x, y=y, device=torch.device("cpu"))


def half_square(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``0.5 sum (out - y)^2``: at y = 0 the gradient of an output m is m."""
    return 0.5 * ((out - y) ** 2).sum()


class LinearLoss(nn.Module):
    """The sum of the outputs: with a bias-free Linear(1, 1) on inputs x, the gradient of w is sum(x), whatever w."""

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out.sum()


def linear(value: float) -> nn.Linear:
    """A bias-free Linear(1, 1) of weight ``value``."""
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def deep_head_model() -> SplitModel:
    """base: Linear(1, 1) + BatchNorm1d(1); head: Linear(1, 1), ReLU, Linear(1, 2) (the personal layer, PFLlib's
    ``model.fc``, is ``head.2``)."""
    return SplitModel(nn.Sequential(nn.Linear(1, 1), nn.BatchNorm1d(1)),
                      nn.Sequential(nn.Linear(1, 1), nn.ReLU(), nn.Linear(1, 2)))


PERSONAL_LAYER_APART = {"head.2.weight": 0.5, "head.2.bias": 0.5}  # :func:`uniform` offsets of its personal layer


def aggregation_context(model: nn.Module, num_clients: int = 3) -> FederatedContext:
    """A context for aggregation only: ``num_clients`` clients of ``model`` (two classes), 2 train and 2 test samples
    each, no update (nothing trains or scores)."""
    idx = torch.arange(4)
    clients = [ClientData(fit=idx[:2], val=idx[2:2], test=idx[2:]) for _ in range(num_clients)]
    return FederatedContext(clients=clients, specs=[TWO_CLASSES] * num_clients,
                            runner=SimpleNamespace(models={TWO_CLASSES: model}), update=None,
                            init_states={TWO_CLASSES: model_state(model)}, num_join_clients=2, seed=0)


def training_context(model: nn.Module, data: Pool, clients: list[ClientData], update: SGDUpdate,
                     **fields) -> FederatedContext:
    """A context whose runner trains ``model`` itself (one output) on ``data``: ``load`` copies a state into it;
    ``fields``: further :class:`FederatedContext` fields (``global_rounds``)."""
    runner = SimpleNamespace(models={ONE_OUTPUT: model}, data=data, load=lambda spec, state: load_state(model, state))
    return FederatedContext(clients=clients, specs=[ONE_OUTPUT] * len(clients), runner=runner, update=update,
                            init_states={ONE_OUTPUT: model_state(model)}, num_join_clients=2, seed=0, **fields)


def with_sgd(ctx: FederatedContext) -> FederatedContext:
    """``ctx`` given a plain SGD update (batch 2, lr 0.01, one epoch), so that an algorithm builds its local update."""
    ctx.update = SGDUpdate(batch_size=2, lr=0.01, local_epochs=1)
    return ctx


def uniform(like: State, v: float, offsets: dict[str, float] | None = None) -> State:
    """``like``'s entries with every float entry filled with ``v`` (plus ``offsets[k]`` for an entry k it names) and
    every integer entry with ``int(v)``."""
    offsets = offsets or {}
    return {k: torch.full_like(t, v + offsets.get(k, 0.0)) if t.is_floating_point() else torch.full_like(t, int(v))
            for k, t in like.items()}


def template_and_fedavg(name: str) -> tuple[RunConfig, RunConfig]:
    """The template ``configs/<name>`` and FedAvg's CIFAR-10 template at that template's rounds (3 for a ``_cpu``
    template, else 100): a baseline's templates are FedAvg's setting but for ``algo`` and ``hparams``
    (compare with :func:`as_fedavg`)."""
    rounds = 3 if name.endswith("_cpu.yaml") else 100
    fedavg = load_config(CONFIGS / "fedavg_cifar10_pr0.2.yaml").model_copy(update={"global_rounds": rounds})
    return load_config(CONFIGS / name), fedavg


def as_fedavg(cfg: RunConfig) -> RunConfig:
    """``cfg`` with FedAvg as its algorithm and no knobs."""
    return cfg.model_copy(update={"algo": "fedavg", "hparams": {}})
