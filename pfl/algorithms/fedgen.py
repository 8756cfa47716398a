"""FedGen: data-free knowledge distillation with a server-side generator (Zhu, Hong, Zhou, ICML 2021).

The server keeps a conditional generator ``G(y, eps) -> z`` (:class:`Generator`) whose output lives in the
space the *distilled layers* D read (:func:`distilled_layer`): the whole classifier head ``model.head`` in the
official variant, the head's last Linear (PFLlib's ``model.fc``) in PFLlib's. Round r (1-based):

1. each sampled client starts from the global model and trains with cross-entropy plus, from round 2
   (the generator is untrained before) and after ``generator_warmup_rounds``, the regularizers of the
   official ``userpFedGen.py`` (paper Sec. 3.2, Eq. 5), both decayed by ``max(1e-4, c * decay**(r-1))``
   (its ``exp_lr_scheduler``):

   * ``generative_alpha * (gen_batch_size / batch_size) * CE(D(G(y', eps)), y')`` on ``gen_batch_size``
     generated features, ``y'`` uniform over the labels present in the federation (``available_labels``);
   * ``generative_beta * KL(p || softmax(model(x)))``, p = ``softmax(D(G(y, eps)))`` (detached, generator in
     eval mode) for the real batch's labels y (``nn.KLDivLoss(reduction="batchmean")``);

2. the server trains G for ``server_epochs`` Adam steps on the round's uploaded distilled layers (teachers, eval
   mode) (paper Eq. 4, ``serverpFedGen.train_generator``): labels uniform over the labels some sampled client
   holds, ``loss = teacher + diversity_weight * diversity``. The teacher loss (:func:`teacher_loss`) weights
   client u's cross-entropy by u's share of the label among the sampled clients (``get_label_weights``);
   ``teacher_loss=official`` (default) computes it as the official code does: its ``(B,)`` losses times a
   ``(B, 1)`` weight tensor broadcast to ``(B, B)`` before the mean, so each client contributes
   ``mean(weights) * mean(losses)``; ``teacher_loss=per_sample`` takes each sample's loss times its own label's
   weight, the per-sample weighted mean. The diversity loss is :func:`diversity_loss`. The generator's learning
   rate decays by ``gen_lr_decay`` per round (``ExponentialLR(gamma=0.98)``) and Adam's moments persist across
   rounds;
3. the global model is FedAvg of the uploads (sample-weighted; float buffers averaged, counters kept).

Evaluation scores the global model (as FL-bench and PFLlib do); ``eval_personalized`` also scores each
client's latest upload, its locally fine-tuned model, as ``finetuned/*``.

``variant="pfllib"`` follows PFLlib's ``servergen.py`` / ``clientgen.py`` instead. PFLlib splits its models
into ``base`` and ``head = model.fc`` (``main.py``), so D is the head's last Linear and G outputs that Linear's
input (for the CNN: the 512 features of fc1 + ReLU). The client adds ``generative_alpha * CE(D(G(y', eps)), y')``
(PFLlib: coefficient 1, no decay, from round 1, no KL term, ``batch_size`` generated samples) with ``y'`` drawn
from all clients' pooled train labels; the server's teacher loss is the cross-entropy of the sample-weighted
mean of the uploaded last Linears' logits (:func:`ensemble_teacher_loss`), labels from the same pool, no
diversity loss, Adam lr 0.005 without weight decay or decay. With ``localize_feature_extractor`` only that last
Linear is averaged and sent, as PFLlib shares ``model.head`` alone; each client keeps the rest of its model
(for the CNN the conv layers and fc1).

Deliberate differences from the official code: in the official variant G outputs the head's input (pfl's
base/head split: for the CNN the 1600 flattened conv features read by a 2-layer head), where the official model
feeds G's output to its last Linear only (``latent_layer_idx=-1``); label weights use each client's train-split
label counts (the official code counts labels of the batches a client drew in the round, starting from 1 per
label); the student (adversarial) loss is left out (``ensemble_beta=0`` in every official config); the
``early_stop`` of 20 local epochs is not applied; the official code has no CIFAR-10 run config, so the
coefficients and the generator's optimizer follow its MNIST config. Both references draw the noise
``eps ~ U[0, 1)`` (their comments say Gaussian): so does pfl. In the PFLlib variant the clients' generator copy
runs in train mode (PFLlib shares the server's generator object, so its batch-norm statistics also move during
client training; here they do not). Also different from the official code: the clients' learning rate is
constant (it decays by 0.99 per round, ``userbase.py`` ``lr_scheduler``); a round is ``local_epochs`` passes over
the client's split (it is 20 steps on a batch iterator carried across rounds, ``local_epochs=20, K=1``), so the
regularizers' total weight grows with a client's size; a coefficient set to 0 stays 0 (its ``exp_lr_scheduler``
floors even 0 at 1e-4). The generator sent to every client is not counted in ``comm/bytes_down`` (only model
states are); with ``localize_feature_extractor`` the ``comm/bytes_*`` still count whole models, the client's own
layers included (pfl keeps them in its server-side store).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.func import functional_call

from pfl.federated.base import Algorithm, FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import State, float_keys, load_state, model_state, weighted_average
from pfl.data.loader import DeviceData
from pfl.seed import derive_seed

COEFFICIENT_FLOOR = 1e-4  # the official exp_lr_scheduler's lower bound of a decayed coefficient
EVAL_PER_CLASS = 100  # generated features per class scored by the global head each round

# Per-variant defaults of the fields left unset (None). official: utils/model_config.py (GENERATORCONFIGS
# ['cifar'] hidden 512, noise 64; RUNCONFIGS['mnist'] ensemble_lr 3e-4, weight_decay 1e-2, ensemble_epochs 50,
# ensemble_eta 1, generative_alpha 10, generative_beta 10), main.py (--gen_batch_size 32), serverpFedGen.py
# (ExponentialLR gamma 0.98; its teacher loss's broadcast, teacher_loss="official"), userpFedGen.py
# (exp_lr_scheduler decay 0.98). pfllib: system/main.py (noise_dim 512, hidden_dim 512, generator_learning_rate
# 0.005, server_epochs 1000, learning_rate_decay False); its teacher loss is ensemble_teacher_loss (no teacher_loss).
VARIANT_DEFAULTS: dict[str, dict[str, Any]] = {
    "official": {"gen_hidden": (512,), "noise_dim": 64, "server_epochs": 50, "gen_lr": 3e-4, "gen_weight_decay": 1e-2,
                 "gen_lr_decay": 0.98, "gen_batch_size": 32, "generative_alpha": 10.0, "generative_beta": 10.0,
                 "decay": 0.98, "diversity_weight": 1.0, "teacher_loss": "official"},
    "pfllib": {"gen_hidden": (512,), "noise_dim": 512, "server_epochs": 1000, "gen_lr": 5e-3, "gen_weight_decay": 0.0,
               "gen_lr_decay": 1.0, "gen_batch_size": None, "generative_alpha": 1.0, "generative_beta": 0.0,
               "decay": 1.0, "diversity_weight": 0.0, "teacher_loss": None},
}


class FedGenParams(HyperParams):
    """FedGen's hyperparameters; a field left unset takes its variant's default (:data:`VARIANT_DEFAULTS`).

    Attributes:
        variant: ``official`` (zhuangdizhu/FedGen) or ``pfllib`` (PFLlib's FedGen).
        gen_hidden: hidden widths of the generator's MLP (each Linear + BatchNorm1d + ReLU).
        noise_dim: dimension of the noise eps.
        server_epochs: generator Adam steps per round (official: ensemble_epochs // n_teacher_iters epochs of
            n_teacher_iters steps = 50).
        gen_lr, gen_weight_decay, gen_lr_decay: the generator's Adam learning rate, weight decay, and the
            factor its learning rate is multiplied by after each round.
        gen_batch_size: generated samples per client step (``None``: the run's batch_size).
        generative_alpha: weight of the client's loss on generated features.
        generative_beta: weight of the client's KL term (official variant only).
        decay: per-round decay of both client coefficients.
        diversity_weight: weight of the diversity loss in the generator's objective (0: off).
        teacher_loss: ``official`` (the official code's mean(weights) x mean(losses) per client) or
            ``per_sample`` (each sample's loss times its label's weight) (:func:`teacher_loss`; official variant only).
        localize_feature_extractor: only the head's last Linear (PFLlib's ``model.head``) is shared; each client
            keeps the rest of its model (pfllib variant only).
        generator_warmup_rounds: rounds in which clients train without the regularizers while the
            generator already trains (the official code always skips round 1).
        eval_personalized: also evaluate each client's locally fine-tuned model, the model it uploaded after
            its latest local training (the global model while it has not taken part), as ``finetuned/*``.

    Raises:
        ValueError: out-of-range values, ``generative_beta > 0``, ``teacher_loss`` or
            ``localize_feature_extractor`` with a variant that has no such term.
    """

    variant: Literal["official", "pfllib"] = "official"
    gen_hidden: tuple[int, ...] | None = None
    noise_dim: int | None = Field(None, ge=1)
    server_epochs: int | None = Field(None, ge=1)
    gen_lr: float | None = Field(None, gt=0)
    gen_weight_decay: float | None = Field(None, ge=0)
    gen_lr_decay: float | None = Field(None, gt=0, le=1)
    gen_batch_size: int | None = Field(None, ge=1)
    generative_alpha: float | None = Field(None, ge=0)
    generative_beta: float | None = Field(None, ge=0)
    decay: float | None = Field(None, gt=0, le=1)
    diversity_weight: float | None = Field(None, ge=0)
    teacher_loss: Literal["official", "per_sample"] | None = None
    localize_feature_extractor: bool = False
    generator_warmup_rounds: int = Field(0, ge=0)
    eval_personalized: bool = False

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        defaults = VARIANT_DEFAULTS.get(data.get("variant", "official"), {})
        return {**data, **{k: v for k, v in defaults.items() if data.get(k) is None}}

    @model_validator(mode="after")
    def _check_variant(self) -> FedGenParams:
        if self.variant == "pfllib" and self.generative_beta:
            raise ValueError("generative_beta: PFLlib's FedGen has no KL term; use variant=official")
        if self.variant == "pfllib" and self.teacher_loss:
            raise ValueError("teacher_loss: PFLlib's FedGen scores the clients' mean logits without label weights; "
                             "use variant=official")
        if self.variant == "official" and self.localize_feature_extractor:
            raise ValueError("localize_feature_extractor is PFLlib's switch; use variant=pfllib")
        if any(h < 1 for h in self.gen_hidden):
            raise ValueError(f"gen_hidden: widths must be positive, got {self.gen_hidden}")
        return self


class Generator(nn.Module):
    """``G(y, eps) -> z``: an MLP from ``[eps, one_hot(y)]`` to head-input features (``generator.py``'s
    ``Generator`` with ``embedding=False``).

    Args:
        num_classes: K, the one-hot width.
        noise_dim: D_eps.
        hidden: widths of the hidden layers (Linear + BatchNorm1d + ReLU each).
        feature_dim: D_z, the head's input width.
    """

    def __init__(self, num_classes: int, noise_dim: int, hidden: tuple[int, ...], feature_dim: int):
        super().__init__()
        self.num_classes, self.noise_dim = num_classes, noise_dim
        layers: list[nn.Module] = []
        width = noise_dim + num_classes
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU()]
            width = h
        self.net = nn.Sequential(*layers, nn.Linear(width, feature_dim))

    def forward(self, labels: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Features (B, D_z) for int64 labels (B,) and noise eps (B, D_eps) on the generator's device."""
        onehot = F.one_hot(labels, self.num_classes).to(eps.dtype)
        return self.net(torch.cat([eps, onehot], dim=1))

    def draw(self, pool: torch.Tensor, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` labels drawn uniformly from the host tensor ``pool`` (repeats set the distribution) and noise
        eps ~ U[0, 1) (n, D_eps), drawn on the host from ``rng`` and moved to the generator's device."""
        device = next(self.parameters()).device
        labels = pool[torch.randint(len(pool), (n,), generator=rng)]
        return labels.to(device), torch.rand((n, self.noise_dim), generator=rng).to(device)


def diversity_loss(eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``exp(-mean_ij d2(eps_i, eps_j) * d1(z_i, z_j))``, d2 the mean squared and d1 the mean absolute
    difference over dimensions (``generator.py``'s ``DiversityLoss(metric='l1')``; paper Sec. 3.3).

    Args:
        eps: noise (B, D_eps); z: generated features (B, D_z).

    Returns:
        a 0-d tensor in (0, 1]: small when distinct noises give distinct features.
    """
    noise_dist = (eps.unsqueeze(0) - eps.unsqueeze(1)).pow(2).mean(dim=2)
    feature_dist = (z.unsqueeze(0) - z.unsqueeze(1)).abs().mean(dim=2)
    return torch.exp(-(noise_dist * feature_dist).mean())


def label_weights(counts: torch.Tensor) -> torch.Tensor:
    """Each client's share of each label among the round's clients: float64 (K, U) from int counts (U, K)
    (official ``serverpFedGen.get_label_weights``); a label no client holds gets weight 0."""
    counts = counts.double().T
    return counts / counts.sum(dim=1, keepdim=True).clamp(min=1)


def teacher_loss(logits: list[torch.Tensor], labels: torch.Tensor, weights: torch.Tensor,
                 form: Literal["official", "per_sample"] = "official") -> torch.Tensor:
    """The generator's teacher loss (nats): each client u's cross-entropy ``CE_u`` (B,) on the generated features,
    weighted by u's label shares ``w_u[i] = W[y_i, u]``, summed over the clients (the paper's Eq. 4 with the
    label-share weights of ``serverpFedGen.py`` ``train_generator``).

    ``form="official"``: ``sum_u mean_i(w_u) * mean_i(CE_u)``, what the official code computes: it multiplies
    the ``(B,)`` losses of ``NLLLoss(reduce=False)`` by a ``(B, 1)`` weight tensor, which broadcasts to ``(B, B)``
    (entry ``[i, j] = w_u[i] * CE_u[j]``), and takes the mean. ``form="per_sample"``: ``sum_u mean_i(w_u[i] *
    CE_u[i])``, each sample's loss times its own label's weight.

    Args:
        logits: each client u's distilled layers on the generated features, (B, K) each.
        labels: the generated labels (B,).
        weights: :func:`label_weights` (K, U) on the logits' device.
        form: ``official`` or ``per_sample``.
    """
    w = weights[labels].to(logits[0].dtype)  # (B, U)
    total = torch.zeros((), device=labels.device)
    for u, z in enumerate(logits):
        ce = F.cross_entropy(z, labels, reduction="none")
        total = total + (w[:, u].mean() * ce.mean() if form == "official" else (w[:, u] * ce).mean())
    return total


def ensemble_teacher_loss(logits: list[torch.Tensor], labels: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``CE(sum_u w_u logits_u, y)`` (nats), PFLlib's teacher loss (``servergen.py`` ``train_generator``);
    ``weights``: each client's training-sample share, (B, K) logits each, labels (B,)."""
    return F.cross_entropy(sum(w * z for w, z in zip(weights, logits)), labels)


def head_input_dim(head: nn.Module) -> int:
    """The width of the features ``head`` reads: its first Linear's ``in_features``.

    Raises:
        ValueError: the head has no Linear layer.
    """
    linear = next((m for m in head.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        raise ValueError(f"FedGen needs a head that starts with a Linear layer, got {type(head).__name__}")
    return linear.in_features


def distilled_layer(model: nn.Module, variant: str) -> str:
    """The module path of the layers G feeds: ``"head"`` (official variant, pfl's whole head), or the head's
    last Linear (pfllib variant: PFLlib's ``head`` is ``model.fc``, ``system/main.py``), ``"head"`` itself when
    the head is one Linear, else ``"head.<i>"`` for the last entry of a Sequential head (``"head.2"`` for the CNN).

    Raises:
        ValueError: a pfllib run whose head neither is nor ends with a Linear layer.
    """
    head = model.head
    if variant == "official" or isinstance(head, nn.Linear):
        return "head"
    if isinstance(head, nn.Sequential) and len(head) and isinstance(head[-1], nn.Linear):
        return f"head.{len(head) - 1}"
    raise ValueError(f"FedGen variant=pfllib distills into the head's last Linear (PFLlib's model.fc); "
                     f"{type(model).__name__}'s head does not end with one: use variant=official")


def layer_params(state: State, layer: str, device: torch.device) -> State:
    """The entries of a model state under module path ``layer``, renamed relative to it, on ``device``."""
    prefix = f"{layer}."
    return {k[len(prefix):]: v.to(device) for k, v in state.items() if k.startswith(prefix)}


class FedGenUpdate(SGDUpdate):
    """Local SGD plus FedGen's client regularizers (``userpFedGen.py`` ``train``), read from ``FitIns.extras``
    (module docstring).

    With ``D`` the model's distilled layers (``layer``), real batch ``(x, y)`` of B samples and this round's
    ``alpha``, ``beta``, the minibatch loss is ``CE(model(x), y) + beta * KL(softmax(D(G(y, eps))) ||
    softmax(model(x))) + gen_ratio * alpha * CE(D(G(y', eps')), y')`` with the KL summed over classes and
    averaged over the B samples, ``y'`` ``gen_batch`` labels drawn from the ``labels`` pool (nats).

    A :class:`FitIns` without a ``"generator"`` extra trains exactly as :class:`SGDUpdate` (warm-up, round 1,
    zero coefficients). The extras: ``generator`` (its state), ``alpha``, ``beta`` (this round's coefficients),
    ``labels`` (host label pool for y'), ``rng`` (a host ``torch.Generator``), ``gen_batch`` (generated samples
    per step), ``gen_ratio`` (the official gen_batch_size / batch_size) and ``gen_train`` (generator in train mode).

    Args:
        base: the run's local SGD (batch size, lr, epochs).
        generator: the device generator the payload's state is loaded into (not trained here).
        layer: module path of the distilled layers in the clients' models (:func:`distilled_layer`).
    """

    def __init__(self, base: SGDUpdate, generator: Generator, layer: str = "head"):
        super().__init__(**base.settings())
        self.generator = generator.requires_grad_(False)
        self.layer = layer

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        if "generator" in ins.extras:
            load_state(self.generator, ins.extras["generator"]).train(ins.extras["gen_train"])
        return super().fit(model, data, ins, indices, seed)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ins: FitIns) -> torch.Tensor:
        """Cross-entropy of ``model(x)`` (B, K) against ``y`` (B,) plus the extras' regularizers."""
        logits = model(x)
        loss = self.loss_fn(logits, y)
        extra = ins.extras
        if "generator" not in extra:
            return loss
        if extra["beta"]:
            loss = loss + extra["beta"] * self._latent_loss(model, logits, y, extra["rng"])
        if extra["alpha"]:
            labels, eps = self.generator.draw(extra["labels"], extra["gen_batch"], extra["rng"])
            with torch.no_grad():
                z = self.generator(labels, eps)
            loss = loss + extra["gen_ratio"] * extra["alpha"] * self.loss_fn(self.distilled(model)(z), labels)
        return loss

    def distilled(self, model: nn.Module) -> nn.Module:
        """The distilled layers D of ``model`` (its submodule at ``layer``)."""
        return model.get_submodule(self.layer)

    def _latent_loss(self, model: nn.Module, logits: torch.Tensor, y: torch.Tensor,
                     rng: torch.Generator) -> torch.Tensor:
        """``KL(p || softmax(logits))`` (nats, batch mean), p the distilled layers' detached softmax on G(y, eps)."""
        eps = torch.rand((len(y), self.generator.noise_dim), generator=rng).to(y.device)
        with torch.no_grad():
            target = F.softmax(self.distilled(model)(self.generator(y, eps)), dim=1)
        return F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")


class FedGen(Algorithm):
    """FedGen (module docstring): FedAvg plus a server-trained generator that regularizes the clients.

    Raises:
        ValueError: the clients' architectures differ, or the distilled layers do not start with a Linear layer
            (:func:`distilled_layer`).
    """

    name = "fedgen"
    Params = FedGenParams
    search_space = {"generative_alpha": SearchParam("float", 0.1, 30.0, log=True),
                    "generative_beta": SearchParam("float", 0.1, 30.0, log=True),
                    "server_epochs": SearchParam("int", 10, 1000, log=True),
                    "diversity_weight": SearchParam("float", 0.0, 2.0)}
    state_attributes = ("global_state", "bases", "finetuned", "generator_state", "generator_opt", "generator_lr")

    @classmethod
    def run_label(cls, hparams: dict[str, Any]) -> str:
        """``fedgen`` for the official variant, ``fedgen-pfllib`` for PFLlib's."""
        return cls.name if hparams["variant"] == "official" else f"{cls.name}-{hparams['variant']}"

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        spec = ctx.single_spec(self.name)
        self.global_state = ctx.init_states[spec]
        self.bases = ctx.new_store()  # localize_feature_extractor: each client's own model (its base is kept)
        self.finetuned = ctx.new_store(self.personalized_state)  # eval_personalized: uploads
        model = ctx.runner.models[spec]
        self.layer = distilled_layer(model, self.hp.variant)
        self.distilled = model.get_submodule(self.layer)
        self.device = ctx.runner.data.device
        self.generator = self._new_generator(spec.num_classes)
        self.generator_state = model_state(self.generator)
        self.generator_opt: State = {}  # Adam's moments and steps, "<param index>.<name>"
        self.generator_lr = self.hp.gen_lr
        self.update = FedGenUpdate(ctx.update, self._new_generator(spec.num_classes), self.layer)
        labels = ctx.runner.data.targets
        self.label_counts = torch.stack([torch.bincount(labels[c.fit], minlength=spec.num_classes).cpu()
                                         for c in ctx.clients])  # (N, K) train-split label counts
        pooled = self.label_counts.sum(dim=0)
        self.available = torch.nonzero(pooled).flatten()  # labels present in the federation
        self.pooled = torch.repeat_interleave(torch.arange(spec.num_classes), pooled)  # PFLlib's qualified_labels
        self.metrics: dict[str, float] = {}

    def _new_generator(self, num_classes: int) -> Generator:
        return Generator(num_classes, self.hp.noise_dim, self.hp.gen_hidden,
                         head_input_dim(self.distilled)).to(self.device)

    @property
    def local_update(self) -> FedGenUpdate:
        return self.update

    def coefficients(self, rnd: int) -> tuple[float, float]:
        """The clients' ``(alpha, beta)`` in round ``rnd``: 0 in round 1 (official variant) and during the
        warm-up, else ``max(1e-4, c * decay**(rnd - 1))`` for a positive coefficient c."""
        first = 1 if self.hp.variant == "official" else 0
        if rnd <= max(first, self.hp.generator_warmup_rounds):
            return 0.0, 0.0
        scale = self.hp.decay ** (rnd - 1)
        alpha, beta = (max(COEFFICIENT_FLOOR, c * scale) if c else 0.0
                       for c in (self.hp.generative_alpha, self.hp.generative_beta))
        return alpha, beta

    def _shared_keys(self) -> list[str]:
        """The entries the server averages and sends: the float entries, or with ``localize_feature_extractor``
        only the distilled layer's (PFLlib's ``model.head``, the last Linear)."""
        keys = float_keys(self.global_state)
        if self.hp.localize_feature_extractor:
            return [k for k in keys if k.startswith(f"{self.layer}.")]
        return keys

    def personalized_state(self, client_id: int) -> State:
        if not self.hp.localize_feature_extractor:
            return self.global_state
        return {**self.bases[client_id], **{k: self.global_state[k] for k in self._shared_keys()}}

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        start = self.personalized_state(client_id)
        alpha, beta = self.coefficients(rnd)
        if not (alpha or beta):
            return FitIns(start)
        official = self.hp.variant == "official"
        gen_batch = self.hp.gen_batch_size or self.update.batch_size
        extras = {"generator": self.generator_state, "alpha": alpha, "beta": beta,
                  "labels": self.available if official else self.pooled,
                  "rng": torch.Generator().manual_seed(derive_seed(self.ctx.seed, "fedgen_client", rnd, client_id)),
                  "gen_batch": gen_batch, "gen_ratio": gen_batch / self.update.batch_size if official else 1.0,
                  "gen_train": not official}
        return FitIns(start, extras=extras)

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        rng = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "fedgen_server", rnd))
        self.metrics = self.train_generator(results, rng)
        avg = weighted_average([r.state for r in results], [r.num_samples for r in results], self._shared_keys())
        self.global_state = {**self.global_state, **avg}
        for r in results:
            if self.hp.localize_feature_extractor:
                self.bases[r.client_id] = r.state
            if self.hp.eval_personalized:
                self.finetuned[r.client_id] = r.state
        self.metrics.update(self.generated_accuracy(rng))

    def train_generator(self, results: list[FitRes], rng: torch.Generator) -> dict[str, float]:
        """``server_epochs`` Adam steps of the generator against the uploaded heads (module docstring, step 2).

        Returns:
            ``server/generator_teacher_loss`` and ``server/generator_diversity_loss`` (nats, unweighted), means
            over the steps.
        """
        gen = load_state(self.generator, self.generator_state).train().requires_grad_(True)
        opt = self._optimizer()
        teachers = [layer_params(r.state, self.layer, self.device) for r in results]
        self.distilled.eval()
        counts = self.label_counts[[r.client_id for r in results]]
        if self.hp.variant == "official":
            weights = label_weights(counts).to(self.device)
            pool = torch.nonzero(counts.max(dim=0).values).flatten()
            loss_fn = partial(teacher_loss, weights=weights, form=self.hp.teacher_loss)
        else:
            total = sum(r.num_samples for r in results)
            pool = self.pooled
            loss_fn = partial(ensemble_teacher_loss, weights=[r.num_samples / total for r in results])
        sums = torch.zeros(2, device=self.device)
        for _ in range(self.hp.server_epochs):
            labels, eps = gen.draw(pool, self.update.batch_size, rng)
            z = gen(labels, eps)
            teacher = loss_fn([functional_call(self.distilled, p, (z,)) for p in teachers], labels)
            diversity = diversity_loss(eps, z)
            loss = teacher + self.hp.diversity_weight * diversity if self.hp.diversity_weight else teacher
            opt.zero_grad()
            loss.backward()
            opt.step()
            sums += torch.stack([teacher.detach(), diversity.detach()])
        self._save_generator(opt)
        teacher_mean, diversity_mean = (sums / self.hp.server_epochs).tolist()
        return {"server/generator_teacher_loss": teacher_mean, "server/generator_diversity_loss": diversity_mean}

    def _optimizer(self) -> torch.optim.Adam:
        """The generator's Adam at this round's learning rate, holding the moments of earlier rounds."""
        opt = torch.optim.Adam(self.generator.parameters(), lr=self.generator_lr, betas=(0.9, 0.999), eps=1e-8,
                               weight_decay=self.hp.gen_weight_decay)
        if self.generator_opt:
            state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in self.generator_opt.items():
                index, name = key.split(".")
                state.setdefault(int(index), {})[name] = value.clone()
            opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        return opt

    def _save_generator(self, opt: torch.optim.Adam) -> None:
        """Keep the trained generator, Adam's state and the next round's learning rate (``ExponentialLR``)."""
        self.generator.requires_grad_(False)
        self.generator_state = model_state(self.generator)
        self.generator_opt = {f"{i}.{name}": v.detach().to("cpu", copy=True)
                              for i, entry in opt.state_dict()["state"].items() for name, v in entry.items()}
        self.generator_lr = self.generator_lr * self.hp.gen_lr_decay

    @torch.no_grad()
    def generated_accuracy(self, rng: torch.Generator) -> dict[str, float]:
        """The global distilled layers' accuracy (fraction) on :data:`EVAL_PER_CLASS` generated features per class
        (generator in eval mode): ``server/generated_acc_c<k>`` per class and their mean ``server/generated_acc``.
        pfl's own sanity signal (issue 16); neither reference computes it."""
        gen = self.generator.eval()
        k = gen.num_classes
        labels = torch.arange(k).repeat_interleave(EVAL_PER_CLASS).to(self.device)
        eps = torch.rand((len(labels), gen.noise_dim), generator=rng).to(self.device)
        logits = functional_call(self.distilled.eval(), layer_params(self.global_state, self.layer, self.device),
                                 (gen(labels, eps),))
        per_class = (logits.argmax(dim=1) == labels).double().view(k, EVAL_PER_CLASS).mean(dim=1).tolist()
        return {"server/generated_acc": sum(per_class) / k,
                **{f"server/generated_acc_c{c}": acc for c, acc in enumerate(per_class)}}

    def round_metrics(self) -> dict[str, float]:
        return self.metrics

    def extra_models(self) -> dict[str, Callable[[int], State]]:
        """``finetuned``: each client's locally fine-tuned model, with ``eval_personalized`` (FedGen itself is
        scored on the global model, as FL-bench and PFLlib do)."""
        return {"finetuned": self.finetuned.__getitem__} if self.hp.eval_personalized else {}

    def server_models(self) -> dict[str, State]:
        return {"generator": self.generator_state}
