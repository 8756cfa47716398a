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

Evaluation scores the global model (as FL-bench and PFLlib do; with a downlink other than ``full``, each client's
own model with the latest downlink merged in, below); ``eval_personalized`` also scores each client's latest upload,
its locally fine-tuned model, as ``finetuned/*``.

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

The global model reaches the clients through the run's downlink (:mod:`pfl.federated.downlink`), as FedAvg's does:
``downlink=full`` (default) is the above; ``head_layers:K`` sends and averages only the last K layers and
``downlink_blend`` blends the download into each client's own model (its personalized model is its own with the
latest downlink merged in); ``downlink=none`` sends no model, only the generator: the official code's local mode
(``serverpFedGen.py``: ``self.local`` skips ``send_parameters``), the viewport researchers' ``localFedGen``. The
server always receives each sampled client's distilled layers (its teachers; counted in ``comm/bytes_up``).

**Viewport prediction** (a regression on 3-D unit vectors, :mod:`pfl.tasks.viewport`; the official variant only),
after the viewport researchers' notes (no code of theirs is public). The generator :class:`PositionGenerator` is
conditioned on a position ``y`` (a unit vector, (B, 3)) instead of a one-hot class: for ``predict=point`` the
window's target, for ``predict=sequence`` the horizon's last position (the targets' last 3 values; chosen here). Each
client's label distribution is a heatmap (:mod:`pfl.data.heatmap`): its train split's conditioning positions, binned
on an equirectangular grid of ``heatmap_grain`` x ``2 heatmap_grain`` cells and Gaussian-blurred with
``heatmap_sigma`` cells, uploaded once before training (positions without time order: no trajectory leaves the
client). With a head output ``D(z)`` (B, 3 S), ``D(z)_last`` its last 3 values (the position it predicts ``horizon``
steps ahead):

* server (:func:`position_teacher_loss`): targets drawn from the union (sum) of the round's clients' heatmaps (a cell
  by its mass, a point uniform in the cell), each client u's loss the per-sample MSE ``|D_u(z)_last - y|^2 / 3``
  weighted by u's share of the heatmap mass in the target's cell (:func:`pfl.data.heatmap.shares`, the analogue of
  the label shares), combined by ``teacher_loss`` as in classification (``official``: ``mean(w_u) * mean(loss_u)``
  per client; ``per_sample``: ``mean(w_u * loss_u)``), plus ``diversity_weight`` x the diversity loss;
* client: ``alpha`` x MSE of ``D(G(y', eps))_last`` against ``y'`` (``y'`` drawn from the union of all clients'
  heatmaps, the analogue of ``available_labels``), times ``gen_ratio``; ``beta`` x MSE between the model's output on
  the real batch ``model(x)`` and the head's output on generated features ``D(G(y_last, eps))`` (detached), ``y_last``
  the batch's conditioning positions (the regression analogue of the KL term); decayed as in classification;
* per round the global head's error on :data:`EVAL_SAMPLES` generated features (targets from the federation's
  heatmap): ``server/generated_mse`` and ``server/generated_orthodromic_deg`` (the great-circle error of
  ``D(z)_last`` in degrees); pfl's own signal of whether the generator is any good.

Deliberate differences of the regression from the official classification code, besides the conditioning: targets
are drawn in proportion to the heatmap mass (the official labels are uniform over the labels some client holds; with
a blurred heatmap every cell holds some mass, so uniform draws would ignore the distribution); the density weights
are shares of blurred counts on the cells (label counts in classification); a client's heatmap is built from its
train split once (the official label counts come from the round's batches; the researchers upload the targets of
the training batches, in effect the same positions). Not stated in the researchers' notes and chosen here: the grid
(``heatmap_grain=18``: 10-degree cells), the blur (``heatmap_sigma=1`` cell), the draw within a cell, and what
conditions a sequence prediction. The researchers' two-phase pretraining is ``generator_warmup_rounds``; their
``localFedGen`` is ``downlink=none``.
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
from pfl.data import heatmap
from pfl.data.loader import DeviceData
from pfl.metrics import regression_metrics
from pfl.seed import derive_seed

COEFFICIENT_FLOOR = 1e-4  # the official exp_lr_scheduler's lower bound of a decayed coefficient
EVAL_PER_CLASS = 100  # generated features per class scored by the global head each round
EVAL_SAMPLES = 1000  # generated features scored by the global head each round (viewport prediction)
POSITION = 3  # a conditioning position's width: a 3-D unit vector

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

    Raises:
        ValueError: out-of-range values, ``generative_beta > 0``, ``teacher_loss`` or
            ``localize_feature_extractor`` with a variant that has no such term.
    """

    variant: Literal["official", "pfllib"] = "official"
    """``official`` (zhuangdizhu/FedGen) or ``pfllib`` (PFLlib's FedGen)."""
    gen_hidden: tuple[int, ...] | None = None
    """Hidden widths of the generator's MLP (each Linear + BatchNorm1d + ReLU)."""
    noise_dim: int | None = Field(None, ge=1)
    """Dimension of the noise eps."""
    server_epochs: int | None = Field(None, ge=1)
    """Generator Adam steps per round (official: ensemble_epochs // n_teacher_iters epochs of n_teacher_iters steps =
    50)."""
    gen_lr: float | None = Field(None, gt=0)
    """The generator's Adam learning rate."""
    gen_weight_decay: float | None = Field(None, ge=0)
    """The generator's Adam weight decay."""
    gen_lr_decay: float | None = Field(None, gt=0, le=1)
    """The factor the generator's learning rate is multiplied by after each round."""
    gen_batch_size: int | None = Field(None, ge=1)
    """Generated samples per client step (``None``: the run's batch_size)."""
    generative_alpha: float | None = Field(None, ge=0)
    """Weight of the client's loss on generated features."""
    generative_beta: float | None = Field(None, ge=0)
    """Weight of the client's KL term (official variant only)."""
    decay: float | None = Field(None, gt=0, le=1)
    """Per-round decay of both client coefficients."""
    diversity_weight: float | None = Field(None, ge=0)
    """Weight of the diversity loss in the generator's objective (0: off)."""
    teacher_loss: Literal["official", "per_sample"] | None = None
    """``official`` (the official code's mean(weights) x mean(losses) per client) or ``per_sample`` (each sample's
    loss times its label's weight) (:func:`teacher_loss`; official variant only)."""
    localize_feature_extractor: bool = False
    """Only the head's last Linear (PFLlib's ``model.head``) is shared; each client keeps the rest of its model
    (pfllib variant only)."""
    generator_warmup_rounds: int = Field(0, ge=0)
    """Rounds in which clients train without the regularizers while the generator already trains (the official code
    always skips round 1)."""
    eval_personalized: bool = False
    """Also evaluate each client's locally fine-tuned model, the model it uploaded after its latest local training
    (the global model while it has not taken part), as ``finetuned/*``."""
    heatmap_grain: int = Field(18, ge=1)
    """Viewport prediction: rows of latitude of the heatmaps' equirectangular grid (columns: twice as many; 18: cells
    of 10 degrees) (:mod:`pfl.data.heatmap`)."""
    heatmap_sigma: float = Field(1.0, ge=0)
    """Viewport prediction: the heatmaps' Gaussian blur in cells (0: none)."""

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

    def condition(self, targets: torch.Tensor) -> torch.Tensor:
        """What of a real batch's targets conditions G: the labels (B,) themselves."""
        return targets

    def condition_loss(self, outputs: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """A head's loss on generated features against their conditions: the mean cross-entropy (nats) of logits
        (B, K) against labels (B,)."""
        return F.cross_entropy(outputs, conditions)

    def output_distance(self, outputs: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """The client's beta term: ``KL(softmax(generated) || softmax(outputs))`` (nats), summed over the K classes
        and averaged over the B samples (``nn.KLDivLoss(reduction="batchmean")``), for logits (B, K) each."""
        return F.kl_div(F.log_softmax(outputs, dim=1), F.softmax(generated, dim=1), reduction="batchmean")


def position_errors(outputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error of the last predicted position of outputs (B, 3 S) against positions (B, 3),
    averaged over the 3 coordinates: (B,)."""
    return (outputs[:, -POSITION:] - positions).pow(2).mean(dim=1)


class PositionGenerator(Generator):
    """``G(y, eps) -> z`` conditioned on a position: an MLP from ``[eps, y]``, y a unit vector (B, 3), to head-input
    features (viewport prediction; module docstring). Its targets and losses read the last position of a head's
    output (B, 3 S), S predicted steps.

    Args:
        noise_dim: D_eps.
        hidden: widths of the hidden layers (Linear + BatchNorm1d + ReLU each).
        feature_dim: D_z, the head's input width.
    """

    def __init__(self, noise_dim: int, hidden: tuple[int, ...], feature_dim: int):
        super().__init__(POSITION, noise_dim, hidden, feature_dim)

    def forward(self, positions: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Features (B, D_z) for positions (B, 3) and noise eps (B, D_eps) on the generator's device."""
        return self.net(torch.cat([eps, positions.to(eps.dtype)], dim=1))

    def draw(self, grid: torch.Tensor, n: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` positions drawn from the heatmap ``grid`` (:func:`pfl.data.heatmap.sample`) and noise eps ~ U[0, 1)
        (n, D_eps), drawn on the host from ``rng`` (positions first) and moved to the generator's device."""
        device = next(self.parameters()).device
        positions = heatmap.sample(grid, n, rng)
        return positions.to(device), torch.rand((n, self.noise_dim), generator=rng).to(device)

    def condition(self, targets: torch.Tensor) -> torch.Tensor:
        """The conditioning positions (B, 3) of targets (B, 3 S): the last position (the horizon's end)."""
        return targets[:, -POSITION:]

    def condition_loss(self, outputs: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        """The MSE of the outputs' last position (B, 3 S) against the positions (B, 3): :func:`position_errors`'
        mean."""
        return position_errors(outputs, conditions).mean()

    def output_distance(self, outputs: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """The client's beta term: the MSE between outputs (B, 3 S) on real and on generated features."""
        return F.mse_loss(outputs, generated)


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
    losses = [F.cross_entropy(z, labels, reduction="none") for z in logits]
    return weighted_teacher_loss(losses, weights[labels].to(logits[0].dtype), form)


def weighted_teacher_loss(losses: list[torch.Tensor], weights: torch.Tensor,
                          form: Literal["official", "per_sample"] = "official") -> torch.Tensor:
    """``sum_u mean_i(w_u) * mean_i(l_u)`` (``official``) or ``sum_u mean_i(w_u[i] * l_u[i])`` (``per_sample``) of
    each client u's per-sample losses ``l_u`` (B,) and weights ``weights`` (B, U) (:func:`teacher_loss`)."""
    total = torch.zeros((), device=weights.device)
    for u, loss in enumerate(losses):
        total = total + (weights[:, u].mean() * loss.mean() if form == "official" else (weights[:, u] * loss).mean())
    return total


def position_teacher_loss(outputs: list[torch.Tensor], positions: torch.Tensor, shares: torch.Tensor, grain: int,
                          form: Literal["official", "per_sample"] = "official") -> torch.Tensor:
    """The generator's teacher loss on viewport prediction (module docstring): each client u's per-sample squared
    error of its head's last predicted position on the generated features, ``|D_u(z)_last - y|^2 / 3``, weighted by
    u's share of the heatmap mass in the cell of the target y, combined as :func:`weighted_teacher_loss`.

    Args:
        outputs: each client u's head on the generated features, (B, 3 S) each.
        positions: the targets y the features were generated for, unit vectors (B, 3).
        shares: :func:`pfl.data.heatmap.shares` of the round's heatmaps, (cells, U), on the outputs' device.
        grain: the heatmaps' rows (:func:`pfl.data.heatmap.cell_index`).
        form: ``official`` or ``per_sample``.
    """
    losses = [position_errors(o, positions) for o in outputs]
    weights = shares[heatmap.cell_index(positions, grain)].to(outputs[0].dtype)  # (B, U)
    return weighted_teacher_loss(losses, weights, form)


def ensemble_teacher_loss(logits: list[torch.Tensor], labels: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """``CE(sum_u w_u logits_u, y)`` (nats), PFLlib's teacher loss (``servergen.py`` ``train_generator``);
    ``weights``: each client's training-sample share, (B, K) logits each, labels (B,)."""
    return F.cross_entropy(sum(w * z for w, z in zip(weights, logits)), labels)


def head_input_dim(head: nn.Module) -> int:
    """The width of the features ``head`` reads: its own ``in_features`` when it declares one (a Linear, or the
    viewport heads, :mod:`pfl.models.viewport`, whose features are wider than their Linears' inputs), else its first
    Linear's ``in_features``.

    Raises:
        ValueError: the head has no Linear layer.
    """
    if isinstance(getattr(head, "in_features", None), int):
        return head.in_features
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
    ``alpha``, ``beta``, the minibatch loss is ``task_loss(model(x), y) + beta * distance(model(x), D(G(c(y), eps)))
    + gen_ratio * alpha * loss(D(G(y', eps')), y')``, ``y'`` ``gen_batch`` conditions drawn from ``labels``; the
    generator's class sets ``c``, the distance and the loss (:class:`Generator`: labels, the KL summed over classes
    and averaged over the B samples, cross-entropy, in nats; :class:`PositionGenerator`: the last target position,
    MSE, MSE of the last predicted position).

    A :class:`FitIns` without a ``"generator"`` extra trains exactly as :class:`SGDUpdate` (warm-up, round 1,
    zero coefficients). The extras: ``generator`` (its state), ``alpha``, ``beta`` (this round's coefficients),
    ``labels`` (what ``y'`` is drawn from: the host label pool, or the federation's heatmap), ``rng`` (a host
    ``torch.Generator``), ``gen_batch`` (generated samples per step), ``gen_ratio`` (the official gen_batch_size /
    batch_size) and ``gen_train`` (generator in train mode).

    Args:
        base: the run's local SGD (batch size, lr, epochs, the task's loss).
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
        """The task loss of ``model(x)`` (B, D) against ``y`` plus the extras' regularizers."""
        outputs = model(x)
        loss = self.loss_fn(outputs, y)
        extra = ins.extras
        if "generator" not in extra:
            return loss
        if extra["beta"]:
            loss = loss + extra["beta"] * self._latent_loss(model, outputs, y, extra["rng"])
        if extra["alpha"]:
            conditions, eps = self.generator.draw(extra["labels"], extra["gen_batch"], extra["rng"])
            with torch.no_grad():
                z = self.generator(conditions, eps)
            generated = self.generator.condition_loss(self.distilled(model)(z), conditions)
            loss = loss + extra["gen_ratio"] * extra["alpha"] * generated
        return loss

    def distilled(self, model: nn.Module) -> nn.Module:
        """The distilled layers D of ``model`` (its submodule at ``layer``)."""
        return model.get_submodule(self.layer)

    def _latent_loss(self, model: nn.Module, outputs: torch.Tensor, y: torch.Tensor,
                     rng: torch.Generator) -> torch.Tensor:
        """The generator's distance between ``outputs`` and the distilled layers' detached output on
        ``G(c(y), eps)`` (classification: ``KL(p || softmax(outputs))``, nats, batch mean)."""
        eps = torch.rand((len(y), self.generator.noise_dim), generator=rng).to(y.device)
        with torch.no_grad():
            generated = self.distilled(model)(self.generator(self.generator.condition(y), eps))
        return self.generator.output_distance(outputs, generated)


class FedGen(Algorithm):
    """FedGen (module docstring): FedAvg plus a server-trained generator that regularizes the clients; on viewport
    prediction conditioned on positions.

    Raises:
        ValueError: the clients' architectures differ, the distilled layers do not start with a Linear layer
            (:func:`distilled_layer`), ``variant=pfllib`` on viewport prediction, or ``localize_feature_extractor``
            with a downlink other than ``full``.
    """

    name = "fedgen"
    Params = FedGenParams
    tasks = ("classification", "viewport")
    takes_downlink = True
    search_space = {"generative_alpha": SearchParam("float", 0.1, 30.0, log=True),
                    "generative_beta": SearchParam("float", 0.1, 30.0, log=True),
                    "server_epochs": SearchParam("int", 10, 1000, log=True),
                    "diversity_weight": SearchParam("float", 0.0, 2.0)}
    state_attributes = ("global_state", "own", "finetuned", "generator_state", "generator_opt", "generator_lr")

    @classmethod
    def run_label(cls, hparams: dict[str, Any]) -> str:
        """``fedgen`` for the official variant, ``fedgen-pfllib`` for PFLlib's; ``-warmup<R>`` with
        ``generator_warmup_rounds=R``, ``-nodiv`` for the official variant without its diversity loss."""
        label = cls.name if hparams["variant"] == "official" else f"{cls.name}-{hparams['variant']}"
        if hparams.get("generator_warmup_rounds"):
            label += f"-warmup{hparams['generator_warmup_rounds']}"
        if hparams["variant"] == "official" and hparams.get("diversity_weight") == 0:
            label += "-nodiv"
        return label

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        spec = ctx.single_spec(self.name)
        self.regression = not ctx.task.classifier
        if self.regression and self.hp.variant != "official":
            raise ValueError(f"variant={self.hp.variant}: PFLlib's FedGen classifies; {ctx.task.title} runs the "
                             "official variant (variant=official)")
        if self.hp.localize_feature_extractor and not ctx.downlink.full:
            raise ValueError("localize_feature_extractor is PFLlib's own sharing rule; drop it, or the downlink knobs")
        self.global_state = ctx.init_states[spec]
        self.own = ctx.new_store()  # each client's own model: localize_feature_extractor, or a downlink not full
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
        self.metrics: dict[str, float] = {}
        targets = ctx.runner.data.targets
        if self.regression:
            self.heatmaps = torch.stack([  # (N, grain, 2 grain): each client's train positions, blurred
                heatmap.heatmap(self.generator.condition(targets[c.fit]), self.hp.heatmap_grain, self.hp.heatmap_sigma)
                for c in ctx.clients])
            self.federation = self.heatmaps.sum(dim=0)  # what the clients' generated positions are drawn from
            return
        self.label_counts = torch.stack([torch.bincount(targets[c.fit], minlength=spec.num_classes).cpu()
                                         for c in ctx.clients])  # (N, K) train-split label counts
        pooled = self.label_counts.sum(dim=0)
        self.available = torch.nonzero(pooled).flatten()  # labels present in the federation
        self.pooled = torch.repeat_interleave(torch.arange(spec.num_classes), pooled)  # PFLlib's qualified_labels

    def _new_generator(self, num_classes: int) -> Generator:
        feature_dim = head_input_dim(self.distilled)
        if self.regression:
            return PositionGenerator(self.hp.noise_dim, self.hp.gen_hidden, feature_dim).to(self.device)
        return Generator(num_classes, self.hp.noise_dim, self.hp.gen_hidden, feature_dim).to(self.device)

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
        """The entries the server averages: the float entries that go up (:meth:`Downlink.upload`: all, or with
        ``head_layers:K`` the top K layers'), or with ``localize_feature_extractor`` only the distilled layer's
        (PFLlib's ``model.head``, the last Linear)."""
        uploaded = self.ctx.downlink.upload(self.global_state)
        keys = [k for k in float_keys(self.global_state) if k in uploaded]
        if self.hp.localize_feature_extractor:
            return [k for k in keys if k.startswith(f"{self.layer}.")]
        return keys

    def _keeps_own(self) -> bool:
        """Whether each client keeps a model of its own on the server side (the download does not replace it)."""
        return self.hp.localize_feature_extractor or not self.ctx.downlink.full

    def personalized_state(self, client_id: int) -> State:
        if self.hp.localize_feature_extractor:
            return {**self.own[client_id], **{k: self.global_state[k] for k in self._shared_keys()}}
        downlink = self.ctx.downlink
        return self.global_state if downlink.full else downlink.merge(self.own[client_id], self.global_state)

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        start = self.personalized_state(client_id)
        downlink = self.ctx.downlink
        sent = None if downlink.full or self.hp.localize_feature_extractor else downlink.payload(self.global_state)
        alpha, beta = self.coefficients(rnd)
        if not (alpha or beta):
            return FitIns(start, sent=sent)
        official = self.hp.variant == "official"
        gen_batch = self.hp.gen_batch_size or self.update.batch_size
        pool = self.federation if self.regression else self.available if official else self.pooled
        extras = {"generator": self.generator_state, "alpha": alpha, "beta": beta, "labels": pool,
                  "rng": torch.Generator().manual_seed(derive_seed(self.ctx.seed, "fedgen_client", rnd, client_id)),
                  "gen_batch": gen_batch, "gen_ratio": gen_batch / self.update.batch_size if official else 1.0,
                  "gen_train": not official}
        return FitIns(start, extras=extras, sent=sent)

    def upload(self, result: FitRes) -> State:
        """What went up: what the downlink sends up, plus the distilled layers (the generator's teachers)."""
        sent = self.ctx.downlink.upload(result.state)
        prefix = f"{self.layer}."
        return {**sent, **{k: v for k, v in result.state.items() if k.startswith(prefix)}}

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        rng = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "fedgen_server", rnd))
        self.metrics = self.train_generator(results, rng)
        avg = weighted_average([r.state for r in results], [r.num_samples for r in results], self._shared_keys())
        self.global_state = {**self.global_state, **avg}
        for r in results:
            if self._keeps_own():
                self.own[r.client_id] = r.state
            if self.hp.eval_personalized:
                self.finetuned[r.client_id] = r.state
        self.metrics.update(self.generated_error(rng) if self.regression else self.generated_accuracy(rng))

    def _teacher(self, results: list[FitRes]) -> tuple[torch.Tensor, Callable[..., torch.Tensor]]:
        """What the generator's conditions are drawn from this round and the teacher loss of the round's clients
        (module docstring, step 2; viewport prediction: :func:`position_teacher_loss`)."""
        ids = [r.client_id for r in results]
        if self.regression:
            grids = self.heatmaps[ids]
            return grids.sum(dim=0), partial(position_teacher_loss, shares=heatmap.shares(grids).to(self.device),
                                             grain=self.hp.heatmap_grain, form=self.hp.teacher_loss)
        counts = self.label_counts[ids]
        if self.hp.variant == "official":
            weights = label_weights(counts).to(self.device)
            pool = torch.nonzero(counts.max(dim=0).values).flatten()
            return pool, partial(teacher_loss, weights=weights, form=self.hp.teacher_loss)
        total = sum(r.num_samples for r in results)
        return self.pooled, partial(ensemble_teacher_loss, weights=[r.num_samples / total for r in results])

    def train_generator(self, results: list[FitRes], rng: torch.Generator) -> dict[str, float]:
        """``server_epochs`` Adam steps of the generator against the uploaded heads (module docstring, step 2).

        Returns:
            ``server/generator_teacher_loss`` (nats; viewport prediction: squared error) and
            ``server/generator_diversity_loss`` (unweighted), means over the steps.
        """
        gen = load_state(self.generator, self.generator_state).train().requires_grad_(True)
        opt = self._optimizer()
        teachers = [layer_params(r.state, self.layer, self.device) for r in results]
        self.distilled.eval()
        pool, loss_fn = self._teacher(results)
        sums = torch.zeros(2, device=self.device)
        for _ in range(self.hp.server_epochs):
            conditions, eps = gen.draw(pool, self.update.batch_size, rng)
            z = gen(conditions, eps)
            teacher = loss_fn([functional_call(self.distilled, p, (z,)) for p in teachers], conditions)
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

    @torch.no_grad()
    def generated_error(self, rng: torch.Generator) -> dict[str, float]:
        """The global head's error on :data:`EVAL_SAMPLES` generated features (generator in eval mode, positions
        drawn from the federation's heatmap): ``server/generated_mse``, the MSE of its last predicted position, and
        ``server/generated_orthodromic_deg``, that position's mean great-circle error in degrees. pfl's own signal
        of whether the generator is any good; the researchers' notes name none."""
        gen = self.generator.eval()
        positions, eps = gen.draw(self.federation, EVAL_SAMPLES, rng)
        outputs = functional_call(self.distilled.eval(), layer_params(self.global_state, self.layer, self.device),
                                  (gen(positions, eps),))
        error = regression_metrics(outputs[:, -POSITION:].detach().cpu(), positions.cpu(), positions=True)
        return {"server/generated_mse": error["mse"], "server/generated_orthodromic_deg": error["orthodromic_deg"]}

    def round_metrics(self) -> dict[str, float]:
        return self.metrics

    def extra_models(self) -> dict[str, Callable[[int], State]]:
        """``finetuned``: each client's locally fine-tuned model, with ``eval_personalized`` (FedGen itself is
        scored on the global model, as FL-bench and PFLlib do)."""
        return {"finetuned": self.finetuned.__getitem__} if self.hp.eval_personalized else {}

    def server_models(self) -> dict[str, State]:
        return {"generator": self.generator_state}
