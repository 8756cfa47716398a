"""MocoSFL (Li, Lyu, Wang, et al., "MocoSFL: enabling cross-client collaborative self-supervised learning",
ICLR 2023; official code SonyResearch/MocoSFL ``run_sflmoco.py``, ``functions/sflmoco_functions.py``): split
federated MoCo v2, and its SwAV variant (``loss=swav``).

The model is :class:`pfl.models.resnet_sfl.MocoSFLResNet18` cut after layer ``cut_layer``: every client holds
the stem (the first layers), the server holds the rest of the ResNet-18 (the trunk) and the projection MLP.
The algorithm replaces the engine's round with a step-synchronous loop. A round is one official "epoch":
the engine's sampled clients (join ratio) are the round's pool, and the round runs ``steps_per_round`` steps.

One MoCo step (``loss=moco``):

1. each client of the step's cohort (``clients_per_step`` of the pool; 0: all of it) takes its next batch of
   ``batch_size`` images and draws two views on the device (:class:`pfl.data.views.ViewAugmentation`);
2. it runs its online stem on view 1 (the queries, graph kept), updates its momentum stem
   (``t <- momentum t + (1 - momentum) online``, parameters only) and runs it on view 2 (the keys);
3. the server concatenates the activations in cohort order, updates its momentum trunk the same way, and
   computes the symmetric MoCo v2 loss ``InfoNCE(S(q), S_t(k)) + InfoNCE(S(k), S_t(q))`` (:func:`infonce`,
   ``temperature``; official ``compute`` with ``symmetric``) against one queue of ``queue_size`` keys shared by
   all clients (:class:`KeyQueue`); both terms read the queue as it was before the step, then the normalized
   ``[S_t(q), S_t(k)]`` are enqueued, in that order; only the first term reaches the clients (the keys carry no
   gradient);
4. one backward pass; each client gets its own slice of the activations' gradient (:func:`server_backward`),
   finishes its backward pass and steps its SGD; the server steps its SGD;
5. every ``sync_every`` steps and at the round's last step, the pool's online stems are averaged (FedAvg,
   equal weights) and every client, pooled or not, loads the average. Momentum stems and SGD buffers stay
   with their clients.

The SwAV variant (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster
Assignments", NeurIPS 2020; official facebookresearch/swav ``main_swav.py``, ``src/resnet50.py``) keeps the
split and the synchronization and changes the server's loss: every view of ``crops`` (multi-crop, e.g.
``2x32,6x16``, with SwAV's color jitter :data:`pfl.data.views.SWAV_JITTER`) goes through the client's online
stem (no momentum encoders); the server runs its trunk on each crop size's activations and SwAV's projection
head once on all of them concatenated, as the official ``forward`` (:meth:`MocoSFL._swav_embeddings`: the
head's BatchNorm normalizes with every crop of every client of the step, the official's synchronized
BatchNorm over all GPUs), projects each embedding to the unit sphere, scores it against ``num_prototypes``
L2-normalized prototypes (:func:`swav_prototypes`, normalized before every step), and computes lightly's
``SwaVLoss`` (the official loss: swapped prediction, Sinkhorn-Knopp codes of each full-size view with
``sinkhorn_iters`` and ``epsilon``, the cross-entropy at ``temperature`` of every other view against them,
averaged over the other views and the full-size ones) over all clients' embeddings at once: one loss, one
backward pass, a gradient slice per client and view. With ``queue_size`` > 0 (default 0) the codes also see
the last ``queue_size`` full-size embeddings (SwAV's queue, scored with the step's prototypes): it fills from
round ``queue_start_round`` (1-based; default 16, as the official ``epoch_queue_starts=15`` counts epochs from
0) and is read once full, from the step after it fills (the official: once its last row is non-zero).
Measured here, a queue 20 to 40 times the step's batch, started while the representation still moves,
collapses the run (the step's samples crowd onto the prototypes the stale queue leaves free). The prototypes
stay frozen (no gradient, so no SGD step, weight decay or momentum for them) for the first
``freeze_prototypes_rounds`` rounds (the official ``freeze_prototypes_niters``, 313 or 5,005 iterations:
about its first epoch at a batch of 4,096 or 256). Scores reach the Sinkhorn step in fp32. The model ends in
SwAV's projection head (:meth:`MocoSFL.model_spec`: ``resnet18_sfl_swav``, Linear-BatchNorm-ReLU-Linear to
128-d): with MocoSFL's Linear-ReLU-Linear projection the embeddings start nearly collinear (mean cosine 0.95
at initialization), the Sinkhorn codes of a step come out nearly uniform, and SwAV collapses.
``server/embedding_spread`` (:func:`embedding_spread`) logs the collapse monitor per round for both losses.

Clients' SGD and the server's are PyTorch's SGD (``sgd_momentum``, ``weight_decay``, :func:`sgd_step`) at
the run's ``lr`` on a cosine schedule over the global rounds. Evaluation (:class:`KNNEvaluator`):
``test/knn_acc`` every ``eval_gap`` rounds and ``test/linear_acc`` at the last round, per client (the mean and
std over clients are logged).

Deliberate differences from the official code (also in the README):

* per-client batches, ``steps_per_round``: the official ``--auto_adjust`` runs per-client batches of 1 for
  100 clients (a concatenated batch of 100, not the default 128) and ``num_batch`` = client 0's batches per
  epoch; here ``steps_per_round=0`` is the pooled clients' mean ``fit`` size // ``batch_size``, and each
  client's batch order is a fresh permutation per round (the official iterators run on across epochs);
* the clients' cosine schedule is stepped per round, as the server's (the official code steps the
  clients' ``CosineAnnealingLR(T_max=num_epoch)`` at every step, so their rate returns to 0 after
  ``num_epoch`` steps and oscillates with a period of 2 ``num_epoch`` steps: a bug);
* the kNN monitor reads the trunk's 512-d pooled features, not the projection's output, and scores each
  client's stem on its own test split; the linear probe trains at the last round's models (the official
  reloads the best-kNN checkpoint, chosen on the test set), at a constant Adam rate, and reports the last
  epoch's accuracy, not the best over epochs (:class:`pfl.federated.evaluation.KNNEvaluator`);
* the official key batch-shuffle (a no-op without BatchNorm) is left out;
* the FedAvg is the pool's mean; the official ``average_weights(local_list, pool)`` (``base_funtions.py``)
  starts its sum from client 0's stem instead of the pool's first client's, so with client sampling
  (``client_sample_ratio`` < 1) client 0's stem, the last average unless client 0 is pooled, stands in for the
  pool's first client's (a bug; the two agree when every client is pooled);
* ``momentum`` sets the clients' momentum stems and the server's momentum trunk alike (the official client
  hard-codes 0.99; the server's is 0.99 too);
* SwAV uses SGD with momentum as MocoSFL does (the SwAV paper: LARS), and its queue holds both full-size
  views' embeddings in one ring buffer (the paper: one per view).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn
from torch.func import functional_call, vmap

from pfl.federated.base import Algorithm, FederatedContext, HyperParams, SearchParam
from pfl.federated.evaluation import KNNEvaluator
from pfl.federated.local import FitRes, autocast
from pfl.federated.state import State, load_state, model_state, state_bytes
from pfl.data.views import MOCO_V2_JITTER, SWAV_JITTER, ViewAugmentation, parse_crops
from pfl.models.resnet_sfl import MocoSFLResNet18, client_entries, split
from pfl.models.split import ModelSpec
from pfl.seed import derive_seed


class KeyQueue:
    """MoCo's queue of keys, shared by all clients: a ring buffer of ``size`` L2-normalized keys (size, dim).

    Enqueued keys overwrite the oldest ones in order, wrapping around the end (the official code's
    ``_dequeue_and_enqueue``; lightly's ``MemoryBankModule`` instead drops a batch's overflow).

    Args:
        size: K, keys held (official: 6,000).
        dim: key dimension (official MoCo v2: 1,024).
        generator: draws the initial random keys (normalized Gaussian rows).
        device: where the keys live.
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator, device: torch.device | str = "cpu"):
        self.keys = F.normalize(torch.randn(size, dim, generator=generator), dim=1).to(device)
        self.ptr = 0
        self.count = 0  # keys enqueued so far, at most size (SwAV reads its queue once it is full)

    @property
    def full(self) -> bool:
        """Whether every initial random key has been overwritten (``size`` keys enqueued)."""
        return self.count >= len(self.keys)

    def enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` (B, dim), detached, at the pointer (wrapping), and advance it by B modulo ``size``."""
        size = len(self.keys)
        idx = (self.ptr + torch.arange(len(keys))) % size
        self.keys[idx.to(self.keys.device)] = keys.detach().to(self.keys.dtype)
        self.ptr = (self.ptr + len(keys)) % size
        self.count = min(self.count + len(keys), size)


def infonce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE (He et al., CVPR 2020, Algorithm 1): the mean over the batch of cross-entropy with the positive
    first, logits ``[q.k, q.queue] / temperature`` of normalized queries q (B, D), keys k (B, D) and queue (K, D).
    Computed in fp32."""
    q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.float().T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def server_backward(activations: Sequence[torch.Tensor], loss_fn: Callable[[list[torch.Tensor]], torch.Tensor]
                    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The server's one backward pass over the activations it received.

    Args:
        activations: tensors (N_i, ...) as received, each the concatenation of the step's clients in cohort order
            (their graphs stay on the clients).
        loss_fn: the server's loss of detached, gradient-requiring copies of them (runs the server's trunk).

    Returns:
        ``(loss, grads)``: the loss (0-d, detached) and the gradient of each tensor, shaped as it; client c's
        slice of a tensor is its slice of the gradient. The server's own parameters hold their gradients.
    """
    xs = [a.detach().requires_grad_() for a in activations]
    loss = loss_fn(xs)
    loss.backward()
    return loss.detach(), [x.grad for x in xs]


@torch.no_grad()
def sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor | None], buffers: Sequence[torch.Tensor],
             lr: float, momentum: float, weight_decay: float) -> None:
    """``torch.optim.SGD`` (no dampening, no Nesterov) in place: ``g = grad + weight_decay p``,
    ``buf = momentum buf + g`` (zeros before the first step, as PyTorch's first ``buf = g``), ``p -= lr buf``.
    A parameter without gradient (``None``: frozen) is skipped, buffer included, as PyTorch does."""
    for p, g, buf in zip(params, grads, buffers):
        if g is None:
            continue
        buf.mul_(momentum).add_(g + weight_decay * p)
        p.sub_(lr * buf)


@torch.no_grad()
def ema_(target: Sequence[torch.Tensor], online: Sequence[torch.Tensor], momentum: float) -> None:
    """Momentum-encoder update in place: ``t <- momentum t + (1 - momentum) o`` (official ``update_moving_average``)."""
    for t, o in zip(target, online):
        t.mul_(momentum).add_(o, alpha=1 - momentum)


def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: the std over the batch of the L2-normalized embeddings z (N, D), averaged over the D
    dimensions and scaled by sqrt(D) (0-d, detached). Near 1 for embeddings spread over the sphere; 0 when
    every sample maps to one point (collapse; the SimSiam paper's indicator, Chen and He, CVPR 2021, Sec. 4.1)."""
    z = F.normalize(z.detach().float(), dim=1)
    return z.std(0).mean() * z.shape[1] ** 0.5


def swav_prototypes(dim: int, count: int, seed: int) -> nn.Module:
    """SwAV's prototypes, ``count`` vectors of ``dim`` (official ``nn.Linear(feat_dim, nmb_prototypes, bias=False)``,
    ``src/resnet50.py``) as lightly's ``SwaVPrototypes`` without its bias (a bias makes the scores non-cosine);
    weights (count, dim) drawn as PyTorch's ``nn.Linear`` draws them (Kaiming-uniform, a = sqrt(5)) from a
    generator seeded with ``seed``. Built on the meta device and filled on the CPU: torch's global generators are
    neither drawn from nor seeded."""
    from pfl._torchvision import import_torchvision

    import_torchvision()
    from lightly.models.modules import SwaVPrototypes

    with torch.device("meta"):
        prototypes = SwaVPrototypes(dim, count)
    prototypes.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    for layer in prototypes.heads:
        layer.register_parameter("bias", None)
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    return prototypes


def cosine_lr(lr: float, rnd: int, rounds: int) -> float:
    """PyTorch's ``CosineAnnealingLR(T_max=rounds)`` stepped once per round: the rate of round ``rnd`` (1-based),
    ``lr (1 + cos(pi (rnd - 1) / rounds)) / 2``."""
    return lr * (1 + math.cos(math.pi * (rnd - 1) / rounds)) / 2


class MocoSFLParams(HyperParams):
    """MocoSFL's hyperparameters (official defaults; module docstring)."""

    loss: Literal["moco", "swav"] = "moco"
    """The self-supervised loss: MocoSFL's MoCo v2 (InfoNCE against a key queue) or SwAV (swapped prediction)."""
    cut_layer: int = Field(1, ge=1, le=2)
    """Where the model is cut: 1, the client holds the stem; 2, the stem and the first residual block."""
    clients_per_step: int = Field(0, ge=0)
    """Clients whose batches the server concatenates per step (0: every client of the round's pool)."""
    steps_per_round: int = Field(0, ge=0)
    """Split-training steps per round (0: the pooled clients' mean fit size // batch_size)."""
    sync_every: int = Field(50, ge=1)
    """Steps between FedAvgs of the client stems."""
    momentum: float = Field(0.99, ge=0, le=1)
    """Momentum of the momentum encoders (MoCo)."""
    temperature: float = Field(0.1, gt=0)
    """Temperature of InfoNCE (MoCo) or of the swapped prediction (SwAV)."""
    queue_size: int | None = Field(None, ge=0)
    """MoCo's key queue (unset: 6000); SwAV's embedding queue (unset: 0)."""
    sgd_momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum of the SGD optimizer of client stems and server body."""
    weight_decay: float = Field(5e-4, ge=0)
    """Weight decay of that SGD optimizer."""
    crops: str = ""
    """Views per sample, ``<count>x<size>,...`` (empty: MoCo 2 full-size views; SwAV 2 full-size + 6 half-size)."""
    num_prototypes: int = Field(512, ge=2)
    """SwAV: prototypes."""
    sinkhorn_iters: int = Field(3, ge=1)
    """SwAV: Sinkhorn-Knopp iterations."""
    epsilon: float = Field(0.05, gt=0)
    """SwAV: the Sinkhorn entropy weight."""
    freeze_prototypes_rounds: int = Field(1, ge=0)
    """SwAV: rounds during which the prototypes stay frozen."""
    queue_start_round: int = Field(16, ge=1)
    """SwAV: the round its queue starts filling (the official ``epoch_queue_starts=15``, counted from 0)."""
    knn_k: int = Field(200, ge=1)
    """Neighbours of the weighted kNN evaluation (``test/knn_acc``)."""
    knn_temperature: float = Field(0.1, gt=0)
    """Temperature of the kNN evaluation's weights."""
    linear_epochs: int = Field(100, ge=0)
    """Epochs of the linear probe after the last round (``test/linear_acc``; 0: none)."""
    linear_lr: float = Field(1e-3, gt=0)
    """Learning rate of the linear probe."""

    @field_validator("crops")
    @classmethod
    def _crops(cls, value: str) -> str:
        if value:
            parse_crops(value)
        return value


class MocoSFL(Algorithm):
    """Split federated self-supervised learning: MocoSFL's MoCo v2 or its SwAV variant (module docstring).

    Args:
        ctx: the federated context; every client's model must be ``resnet18_sfl``, every client must hold at
            least ``batch_size`` training samples, and the images must be square.
        **hparams: :class:`MocoSFLParams` fields.

    Raises:
        ValueError: another model, a client smaller than one batch, ``clients_per_step`` above the clients
            sampled per round, a MoCo ``crops`` other than two views, or a view larger than the images.
    """

    name = "mocosfl"
    classifier = False  # the head is a projection
    Params = MocoSFLParams
    search_space = {"lr": SearchParam("float", 0.01, 0.3, log=True),
                    "temperature": SearchParam("float", 0.05, 0.5, log=True),
                    "sync_every": SearchParam("int", 1, 100, log=True)}
    state_attributes = ("stem", "server_state", "momentum_stems", "client_buffers", "queue_keys", "queue_position",
                        "rounds_done")

    def __init__(self, ctx: FederatedContext, **hparams: Any):
        super().__init__(ctx, **hparams)
        self.hp: MocoSFLParams
        spec = ctx.single_spec(self.name)
        model = ctx.model(0)
        if not isinstance(model, MocoSFLResNet18):
            raise ValueError(f"model={spec.name}: MocoSFL splits MocoSFL's ResNet-18; set model=resnet18_sfl")
        self._check_clients()
        self.batch_size = ctx.update.batch_size
        self.views = self._views(ctx.runner.data.inputs.shape[-1])
        device = ctx.runner.data.device
        self.online = copy.deepcopy(model).float().to(device)  # stem: the synchronized stem; the rest: the server's
        self.online.train()  # the SwAV head's BatchNorm normalizes with the step's batch
        self.stem_module, self.trunk = split(self.online, self.hp.cut_layer)
        # MoCo's momentum trunk on the server (a whole model whose stem is unused); SwAV has none
        self.target = copy.deepcopy(self.online) if self.hp.loss == "moco" else None
        self.target_trunk = split(self.target, self.hp.cut_layer)[1] if self.target is not None else None
        self.stem_names = client_entries(list(self.online.state_dict()), self.hp.cut_layer)
        self.prototypes = self._prototypes(device)
        self.server_params = [*self.trunk.parameters(), *self.prototypes.parameters()]
        self.server_buffers = [torch.zeros_like(p) for p in self.server_params]
        stem0 = self.stem
        self.stem_bytes = state_bytes(stem0)
        zeros = {k: torch.zeros_like(v) for k, v in stem0.items()}
        self.momentum_stems = ctx.new_store(lambda cid: stem0)
        self.client_buffers = ctx.new_store(lambda cid: zeros)
        dim = model.embedding_dim
        size = self.hp.queue_size if self.hp.queue_size is not None else (6000 if self.hp.loss == "moco" else 0)
        if self.hp.loss == "moco" and not size:
            raise ValueError("queue_size=0: MoCo draws its negatives from the key queue; set queue_size > 0")
        generator = torch.Generator().manual_seed(derive_seed(ctx.seed, "queue"))
        self.queue = KeyQueue(size, dim, generator, device) if size else None
        self.swav_loss = self._swav_loss()
        self.rounds_done = 0
        self._evaluator = KNNEvaluator(self.hp.knn_k, self.hp.knn_temperature, self.hp.linear_epochs,
                                       self.hp.linear_lr, derive_seed(ctx.seed, "linear_probe"))
        self._metrics: dict[str, float] = {}
        self._memory: dict[str, float] = {}  # one client's memory per step: the same every round, measured once
        self._composed: State | None = None  # personalized_state's model, until the model changes
        self._spreads: list[torch.Tensor] = []  # the round's embedding_spread per step

    # -- construction checks and pieces -------------------------------------------------------------------------

    def _check_clients(self) -> None:
        batch = self.ctx.update.batch_size
        small = [cid for cid, c in enumerate(self.ctx.clients) if len(c.fit) < batch]
        if small:
            raise ValueError(f"batch_size={batch}: client {small[0]} holds {len(self.ctx.clients[small[0]].fit)} "
                             "training samples, fewer than one batch; lower batch_size or num_clients")
        if self.hp.clients_per_step > self.ctx.num_join_clients:
            raise ValueError(f"clients_per_step={self.hp.clients_per_step}: only {self.ctx.num_join_clients} clients "
                             "take part per round; lower clients_per_step or raise join_ratio")

    def _views(self, full: int) -> list[tuple[int, ViewAugmentation]]:
        """``(count, augmentation)`` per crop size: MoCo's two full-size views, or SwAV's multi-crop."""
        default = f"2x{full}" if self.hp.loss == "moco" else f"2x{full},6x{max(full // 2, 1)}"
        specs = parse_crops(self.hp.crops or default, full)
        if self.hp.loss == "moco" and [(s.count, s.size) for s in specs] != [(2, full)]:
            raise ValueError(f"crops={self.hp.crops!r}: MoCo compares two full-size views; set crops=2x{full} "
                             "or use loss=swav for multi-crop")
        if max(s.size for s in specs) > full or specs[0].size != full:
            raise ValueError(f"crops={self.hp.crops!r}: the first views must be full-size ({full}) and none larger; "
                             f"e.g. crops=2x{full},6x{max(full // 2, 1)}")
        mean, std = self.ctx.runner.data.transform.mean, self.ctx.runner.data.transform.std
        jitter = MOCO_V2_JITTER if self.hp.loss == "moco" else SWAV_JITTER
        return [(s.count, ViewAugmentation(s.size, s.scale, mean, std, jitter)) for s in specs]

    def _prototypes(self, device: torch.device) -> nn.Module:
        """SwAV's prototypes (:func:`swav_prototypes`) on ``device``; an empty module for MoCo."""
        if self.hp.loss != "swav":
            return nn.Module()
        seed = derive_seed(self.ctx.seed, "prototypes")
        return swav_prototypes(self.online.embedding_dim, self.hp.num_prototypes, seed).to(device)

    def _swav_loss(self) -> nn.Module | None:
        if self.hp.loss != "swav":
            return None
        from lightly.loss import SwaVLoss

        return SwaVLoss(self.hp.temperature, self.hp.sinkhorn_iters, self.hp.epsilon)

    # -- the state --------------------------------------------------------------------------------------------

    def _entries(self, module: nn.Module, stem: bool) -> State:
        """Host copies of ``module``'s stem entries (``stem``) or of the others (the server's)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()
                if (k in self.stem_names) == stem}

    @property
    def stem(self) -> State:
        """The synchronized client stem (full-model entry names), host copies."""
        return self._entries(self.online, stem=True)

    @stem.setter
    def stem(self, state: State) -> None:
        load_state(self.online, state)
        self._composed = None

    @property
    def server_state(self) -> State:
        """The server's trunk, momentum trunk (MoCo), prototypes (SwAV) and SGD buffers."""
        online = self._entries(self.online, stem=False)
        target = {} if self.target is None else \
            {f"target/{k}": v for k, v in self._entries(self.target, stem=False).items()}
        protos = {f"prototypes/{k}": v.detach().cpu().clone() for k, v in self.prototypes.state_dict().items()}
        buffers = {f"buffer/{i}": b.cpu().clone() for i, b in enumerate(self.server_buffers)}
        return {**online, **target, **protos, **buffers}

    @server_state.setter
    def server_state(self, state: State) -> None:
        load_state(self.online, {k: v for k, v in state.items() if "/" not in k})
        self._composed = None
        if self.target is not None:
            load_state(self.target, {k[7:]: v for k, v in state.items() if k.startswith("target/")})
        load_state(self.prototypes, {k[11:]: v for k, v in state.items() if k.startswith("prototypes/")})
        for i, b in enumerate(self.server_buffers):
            b.copy_(state[f"buffer/{i}"])

    @property
    def queue_keys(self) -> torch.Tensor:
        """The queue's keys (K, D) (empty without a queue)."""
        return torch.empty(0) if self.queue is None else self.queue.keys

    @queue_keys.setter
    def queue_keys(self, keys: torch.Tensor) -> None:
        if self.queue is not None:
            self.queue.keys = keys.to(self.queue.keys.device)

    @property
    def queue_position(self) -> list[int]:
        """The queue's pointer and fill count."""
        return [] if self.queue is None else [self.queue.ptr, self.queue.count]

    @queue_position.setter
    def queue_position(self, value: list[int]) -> None:
        if self.queue is not None:
            self.queue.ptr, self.queue.count = value

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: HyperParams) -> ModelSpec:
        """``loss=swav`` trains ``resnet18_sfl_swav``: the same split ResNet-18 ending in SwAV's projection head."""
        if hp.loss == "swav" and spec.name == "resnet18_sfl":
            return replace(spec, name="resnet18_sfl_swav")
        return spec

    @classmethod
    def run_label(cls, hparams: dict[str, Any]) -> str:
        return "swavsfl" if hparams.get("loss") == "swav" else "mocosfl"

    @property
    def evaluator(self) -> KNNEvaluator:
        self._evaluator.final = self.rounds_done == self.ctx.global_rounds
        return self._evaluator

    def personalized_state(self, client_id: int) -> State:
        """The synchronized stem composed with the server's trunk and projection: the same state for every client,
        copied to the host once per model change (read-only)."""
        if self._composed is None:
            self._composed = model_state(self.online)
        return self._composed

    def shared_backbone(self) -> State:
        """The server's trunk and projection, logged once (``server/backbone.safetensors``); client files hold
        the stem."""
        return self._entries(self.online, stem=False)

    def server_models(self) -> dict[str, State]:
        return {"prototypes": dict(self.prototypes.state_dict())} if self.hp.loss == "swav" else {}

    def round_metrics(self) -> dict[str, float]:
        return self._metrics

    # -- the round ------------------------------------------------------------------------------------------

    def run_round(self, rnd: int, selected: list[int], fit: Callable[[list[int], int], list[FitRes]]) -> list[FitRes]:
        """One official epoch over the pool ``selected`` (module docstring); returns one result per pooled client
        (its samples seen, the round's mean loss) and sets the communication and client-memory metrics."""
        steps = self.hp.steps_per_round or max(1, int(np.mean([len(self.ctx.clients[c].fit) for c in selected]))
                                               // self.batch_size)
        lr = cosine_lr(self.ctx.update.lr, rnd, self.ctx.global_rounds)
        clients = _PoolStems(self, selected)
        batches = self._batch_orders(rnd, selected, steps)  # (P, steps, B) pool indices
        losses, traffic = [], _Traffic()
        self._spreads = []
        for step in range(steps):
            cohort = self._cohort(rnd, step, len(selected))
            images = self.ctx.runner.data.inputs[batches[cohort, step].flatten()]
            views = self._draw_views(images, rnd, step)
            loss = self._step(clients, cohort, views, lr, rnd, traffic)
            losses.append(loss)
            if (step + 1) % self.hp.sync_every == 0 or step == steps - 1:
                clients.fedavg()
                traffic.sync(len(selected), self.ctx.num_clients, self.stem_bytes)
        clients.write_back()
        self._composed = None
        self.rounds_done = rnd
        self._memory = self._memory or self._client_memory(views)
        self._metrics = {**traffic.metrics(), **self._memory,
                         "server/embedding_spread": torch.stack(self._spreads).mean().item()}
        mean_loss = torch.stack(losses).mean()
        return [FitRes(cid, {}, steps * self.batch_size, mean_loss) for cid in selected]

    def _batch_orders(self, rnd: int, pool: list[int], steps: int) -> torch.Tensor:
        """Each pooled client's ``steps`` batches (P, steps, B): permutations of its fit split from a seed per round
        and client, chained as needed, each cut to whole batches (the official loader drops the last partial one)."""
        out = []
        for cid in pool:
            idx = self.ctx.clients[cid].fit
            gen = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "ssl_batches", rnd, cid))
            whole = len(idx) // self.batch_size * self.batch_size
            passes = -(-steps * self.batch_size // whole)  # ceil
            perms = [torch.randperm(len(idx), generator=gen)[:whole] for _ in range(passes)]
            out.append(idx[torch.cat(perms)[:steps * self.batch_size].to(idx.device)].view(steps, self.batch_size))
        return torch.stack(out)

    def _cohort(self, rnd: int, step: int, pool: int) -> torch.Tensor:
        """Positions in the pool of the step's clients, sorted (all of them unless ``clients_per_step``)."""
        if not self.hp.clients_per_step or self.hp.clients_per_step == pool:
            return torch.arange(pool)
        rng = np.random.default_rng(derive_seed(self.ctx.seed, "cohort", rnd, step))
        return torch.from_numpy(np.sort(rng.choice(pool, self.hp.clients_per_step, replace=False)))

    def _draw_views(self, images: torch.Tensor, rnd: int, step: int) -> list[torch.Tensor]:
        """Every view of the cohort's images (C*B, ...), in ``crops`` order: a list of (C*B, C_in, s, s), each
        drawn from its own seed."""
        views: list[torch.Tensor] = []
        for count, augment in self.views:
            views += [augment(images, derive_seed(self.ctx.seed, "views", rnd, step, len(views) + j))
                      for j in range(count)]
        return views

    def _stem_fn(self, params: State, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.stem_module, params, (x,))

    def _stems(self, params: State, x: torch.Tensor) -> torch.Tensor:
        """Each client's stem on its own views: params (C, ...) per entry, x (C, n, ...) -> (C, n, ...)."""
        return vmap(self._stem_fn)(params, x)

    def _step(self, clients: _PoolStems, cohort: torch.Tensor, views: list[torch.Tensor], lr: float, rnd: int,
              traffic: _Traffic) -> torch.Tensor:
        """One step of the cohort (positions ``cohort`` in the pool): client forwards, the server's loss and update,
        the clients' backward passes and updates; returns the loss (0-d, on the device)."""
        c = len(cohort)
        online = clients.leaves(cohort)
        per_client = [v.view(c, -1, *v.shape[1:]) for v in views]  # (C, B, ...) per view
        if self.hp.loss == "moco":
            sent = [self._stems(online, per_client[0])]
            clients.momentum_update(cohort, self.hp.momentum)
            with torch.no_grad():
                keys = self._stems(clients.momentum_of(cohort), per_client[1])
            loss, grads = server_backward([sent[0].flatten(0, 1)],
                                          lambda xs: self._moco_loss(xs[0], keys.flatten(0, 1)))
            traffic.step(up=_nbytes(sent[0], keys), down=_nbytes(sent[0]))
        else:
            sent = self._swav_client_forward(online, per_client)
            loss, grads = server_backward([s.flatten(0, 1) for s in sent],
                                          lambda xs: self._swav_server_loss(xs, c, rnd))
            traffic.step(up=_nbytes(*sent), down=_nbytes(*sent))
        sgd_step(self.server_params, [p.grad for p in self.server_params], self.server_buffers, lr,
                 self.hp.sgd_momentum, self.hp.weight_decay)
        for p in self.server_params:
            p.grad = None
        torch.autograd.backward(sent, [g.view_as(s) for g, s in zip(grads, sent)])
        clients.step(cohort, online, lr, self.hp.sgd_momentum, self.hp.weight_decay)
        return loss

    def _server(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.ctx.runner.autocast):
            return module(x).float()

    def _moco_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The symmetric MoCo v2 loss of query activations q (N, ...) and key activations k (N, ...); updates the
        momentum trunk first and enqueues the step's 2N keys after (official ``compute``)."""
        ema_(list(self.target_trunk.parameters()), list(self.trunk.parameters()), self.hp.momentum)
        with torch.no_grad():
            kq, kk = self._server(self.target_trunk, q.detach()), self._server(self.target_trunk, k)
        queue = self.queue.keys.clone()  # the pre-step keys (the backward pass needs them after the enqueue)
        zq = self._server(self.trunk, q)
        self._spreads.append(embedding_spread(zq))
        loss = infonce(zq, kk, queue, self.hp.temperature) + \
            infonce(self._server(self.trunk, k), kq, queue, self.hp.temperature)
        self.queue.enqueue(F.normalize(torch.cat([kq, kk]), dim=1))
        return loss

    def _swav_client_forward(self, online: State, per_client: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each client's online stem on all its views, one call per crop size: a list of (C, count*B, ...)."""
        sent, i = [], 0
        for count, _ in self.views:
            group = torch.cat(per_client[i:i + count], dim=1)  # (C, count*B, ...) view-major within each client
            sent.append(self._stems(online, group))
            i += count
        return sent

    def _swav_embeddings(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """SwAV's multi-resolution forward (official ``src/resnet50.py`` ``forward``): the trunk's layers on each
        crop size's activations xs[g] (N_g, ...), then the projection head once on their concatenation, so its
        BatchNorm normalizes with every crop of the step; L2-normalized embeddings, (N_g, D) per crop size."""
        body, head = self.trunk[:-1], self.trunk[-1]
        features = [self._server(body, x) for x in xs]
        z = F.normalize(self._server(head, torch.cat(features)), dim=1)
        return list(z.split([len(f) for f in features]))

    def _swav_server_loss(self, xs: list[torch.Tensor], c: int, rnd: int) -> torch.Tensor:
        """lightly's SwaVLoss over every client's views: xs[g] (C*count*B, ...) per crop size, client-major."""
        with torch.no_grad():
            self.prototypes.normalize()
        self.prototypes.requires_grad_(rnd > self.hp.freeze_prototypes_rounds)
        scores = []
        for z, (count, _) in zip(self._swav_embeddings(xs), self.views):
            per_view = z.view(c, count, -1, z.shape[-1]).transpose(0, 1).flatten(1, 2)  # (count, C*B, D)
            if not scores:
                high = per_view
                self._spreads.append(embedding_spread(z))
            scores += [self.prototypes(v) for v in per_view]
        n_high = self.views[0][0]
        queue = None
        if self.queue is not None and rnd >= self.hp.queue_start_round:
            if self.queue.full:
                with torch.no_grad():
                    queue = [self.prototypes(self.queue.keys)] * n_high
            self.queue.enqueue(high.flatten(0, 1))
        return self.swav_loss(scores[:n_high], scores[n_high:], queue).squeeze(0)

    def _client_memory(self, views: list[torch.Tensor]) -> dict[str, float]:
        """One client's memory per step: its stem's parameters (with its momentum stem and SGD buffer), and the
        activations of one batch: those its online stem keeps for the backward pass (measured with saved-tensor
        hooks) plus every activation it sends."""
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        params = {k: v.detach().contiguous().requires_grad_() for k, v in self.stem_module.named_parameters()}
        moco = self.hp.loss == "moco"
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = [self._stem_fn(params, v[:self.batch_size]) for v in (views[:1] if moco else views)]
        sent = _nbytes(*outs) * (2 if moco else 1)  # MoCo: the keys, as large
        return {"memory/client_param_bytes": float((3 if moco else 2) * self.stem_bytes),
                "memory/client_activation_bytes": float(saved + sent)}


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Traffic:
    """Bytes on the wire in one round: activations up, gradients down, stems up and down at each FedAvg."""

    def __init__(self) -> None:
        self.up = self.down = 0

    def step(self, up: int, down: int) -> None:
        self.up += up
        self.down += down

    def sync(self, pooled: int, clients: int, stem_bytes: int) -> None:
        self.up += pooled * stem_bytes
        self.down += clients * stem_bytes

    def metrics(self) -> dict[str, float]:
        return {"comm/bytes_up": float(self.up), "comm/bytes_down": float(self.down)}


class _PoolStems:
    """The round's pooled clients' stems as stacked tensors (P, ...) on the device: online stems (each starts
    from the synchronized stem), momentum stems and SGD buffers (from the algorithm's client stores)."""

    def __init__(self, algo: MocoSFL, pool: list[int]):
        self.algo, self.pool = algo, pool
        device = algo.ctx.runner.data.device
        local = {k: v.detach() for k, v in algo.stem_module.named_parameters()}
        # contiguous: vmap's group norm cannot batch channels-last tensors
        self.online = {k: v.expand(len(pool), *v.shape).contiguous() for k, v in local.items()}
        self.names = dict(zip(local, algo.stem_names))  # stem-module name -> full-model name

        def stack(store: Any) -> State:
            states = [store[cid] for cid in pool]
            return {k: torch.stack([s[full].contiguous() for s in states]).to(device) for k, full in self.names.items()}

        self.momentum = stack(algo.momentum_stems) if algo.hp.loss == "moco" else {}
        self.buffers = stack(algo.client_buffers)

    def leaves(self, cohort: torch.Tensor) -> State:
        """The cohort's online stems (C, ...) as fresh leaves that will hold their gradients."""
        return {k: v[cohort].requires_grad_() for k, v in self.online.items()}

    def momentum_of(self, cohort: torch.Tensor) -> State:
        return {k: v[cohort] for k, v in self.momentum.items()}

    @torch.no_grad()
    def momentum_update(self, cohort: torch.Tensor, momentum: float) -> None:
        for k, t in self.momentum.items():
            t[cohort] = momentum * t[cohort] + (1 - momentum) * self.online[k][cohort]

    @torch.no_grad()
    def step(self, cohort: torch.Tensor, leaves: State, lr: float, momentum: float, weight_decay: float) -> None:
        """Each cohort client's SGD step from its own gradient (the leaves' ``grad`` slices)."""
        params = {k: v.detach().clone() for k, v in leaves.items()}
        buffers = {k: v[cohort] for k, v in self.buffers.items()}
        sgd_step(list(params.values()), [leaves[k].grad for k in params], list(buffers.values()), lr, momentum,
                 weight_decay)
        for k in params:
            self.online[k][cohort] = params[k]
            self.buffers[k][cohort] = buffers[k]

    @torch.no_grad()
    def fedavg(self) -> None:
        """Every pooled client loads the mean of the pool's online stems."""
        for v in self.online.values():
            v.copy_(v.mean(0, keepdim=True).expand_as(v))

    def write_back(self) -> None:
        """The synchronized stem to the algorithm; momentum stems and buffers to the client stores."""
        algo = self.algo
        algo.stem = {self.names[k]: v[0].cpu() for k, v in self.online.items()}
        for i, cid in enumerate(self.pool):
            if self.momentum:
                algo.momentum_stems[cid] = {self.names[k]: v[i].cpu() for k, v in self.momentum.items()}
            algo.client_buffers[cid] = {self.names[k]: v[i].cpu() for k, v in self.buffers.items()}
