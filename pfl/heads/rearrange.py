"""One client's head rearrangement: build the members, fine-tune them on the frozen base, predict.

The scopes differ in training only. With ``perturb_scope="head"`` (the paper's description)
the base is shared and frozen, so its features of the client's train samples are computed
once, in large batches, and every training step only runs the S heads as batched matmuls.
With ``perturb_scope="model"`` (the official code, J1nqianChen/APH) every member also gets its
own noisy copy of the base parameters (same prior rule, still frozen) to train on; those
features differ per member, so each step runs the S bases on the members' batches (slower).

Prediction is the same in both scopes: every member's head runs on the clean base's features
(n, D), computed once, and the ensemble is the mean of the members' softmaxes. The official
code also predicts through the clean base (the noisy bases exist only while training).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call

from pfl.config import HeadConfig
from pfl.data.loader import DeviceData
from pfl.heads.members import MemberHeads, aph_members, ensemble_probs, loraph_members, train_members
from pfl.heads.ood import OODPool
from pfl.heads.prior import perturbed, sample_learning_rates
from pfl.models.split import SplitModel
from pfl.seed import derive_seed


@dataclass
class ClientHeads:
    """Result for one client.

    Attributes:
        members: the trained members (on the host).
        lrs: their learning rates (S,).
        probs_wo: test probabilities (n_test, K) of the unmodified personalized model.
        probs: test probabilities (n_test, K) of the ensemble (mean of member softmaxes).
        train_loss: mean member training loss per epoch (nats).
        seconds: wall time of building, training and predicting.
        ood_probs_wo: probabilities (n_test, K) of the unmodified model on the client's OOD
            sample (``None`` without an OOD pool).
        ood_probs: the ensemble's probabilities (n_test, K) on that sample (``None`` without one).
    """

    members: MemberHeads
    lrs: torch.Tensor
    probs_wo: torch.Tensor
    probs: torch.Tensor
    train_loss: list[float]
    seconds: float
    ood_probs_wo: torch.Tensor | None = None
    ood_probs: torch.Tensor | None = None


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([fn(idx[i:i + chunk]) for i in range(0, len(idx), chunk)])


def _images(data: DeviceData) -> Callable[[torch.Tensor], torch.Tensor]:
    """Pool indices (B,) -> normalized images (B, C, H, W) (labels dropped)."""
    return lambda idx: data.batch(idx)[0]


def build_members(model: SplitModel, s: HeadConfig, gen: torch.Generator) -> MemberHeads:
    """The initial members of ``s.method`` from the model's head (on the host)."""
    if s.method == "aph":
        return aph_members(model.head, s.sampling_num, s.p_lambda, gen)
    return loraph_members(model.head, s.sampling_num, s.rank, s.p_lambda, s.lora_init, gen)


class _Features:
    """Training features of train positions (S, B) -> (S, B, D): the clean base's (cached) or member j's noisy base."""

    def __init__(self, model: SplitModel, data: DeviceData, train: torch.Tensor, s: HeadConfig,
                 gen: torch.Generator):
        self.model, self.data, self.train = model, data, train
        self.chunk = data.inference_batch_size(s.eval_batch_size)
        self.bases = None
        if s.perturb_scope == "model":
            names = [n for n, _ in model.base.named_parameters()]
            noisy = [perturbed(p, s.sampling_num, s.p_lambda, gen).to(p.device) for p in model.base.parameters()]
            self.bases = [dict(zip(names, (t[j] for t in noisy))) for j in range(s.sampling_num)]
        self.cached = None if self.bases else base_features(model, _images(data), train, self.chunk)

    @torch.no_grad()
    def _noisy(self, idx: torch.Tensor, member: int) -> torch.Tensor:
        """Features (n, D) of pool indices ``idx`` through member ``member``'s noisy base."""
        def run(chunk: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model.base, self.bases[member], (self.data.batch(chunk)[0],))
        return _chunked(run, idx, self.chunk)

    def train_batch(self, positions: torch.Tensor) -> torch.Tensor:
        """Features (S, B, D) of train positions (S, B): row j through member j's base (or the shared cache)."""
        if self.cached is not None:
            return self.cached[positions]
        return torch.stack([self._noisy(self.train[row], j) for j, row in enumerate(positions)])


@torch.no_grad()
def base_features(model: SplitModel, images: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor,
                  chunk: int) -> torch.Tensor:
    """The clean base's features (n, D) of indices ``idx`` (n,), in chunks of ``chunk`` samples.

    ``images`` maps a chunk of indices (B,) to normalized inputs (B, C, H, W) on the model's device.
    """
    return _chunked(lambda i: model.base(images(i)), idx, chunk)


@torch.no_grad()
def predict(model: SplitModel, members: MemberHeads, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Host probabilities (n, K) of the unmodified model and of the ensemble on clean base features (n, D)."""
    probs_wo = torch.softmax(model.head(features), dim=1)
    return probs_wo.cpu(), ensemble_probs(members, features).cpu()


def rearrange_client(model: SplitModel, data: DeviceData, train: torch.Tensor, test: torch.Tensor,
                     s: HeadConfig, client_id: int, ood: OODPool | None = None) -> ClientHeads:
    """APH / LoRAPH for one client's personalized model.

    Args:
        model: the client's personalized model (moved to ``data.device``, put in eval mode).
        data: the device-resident pool.
        train: pool indices (n,) of the client's train split (fine-tuning data).
        test: pool indices (n_test,) of its test split (prediction only).
        s: method settings; every random stream derives from ``(s.seed, client_id)``.
        client_id: the client.
        ood: an OOD pool; when given, both models also predict on the client's sample of
            ``n_test`` OOD images (:meth:`pfl.heads.ood.OODPool.sample`).

    Returns:
        :class:`ClientHeads`; all probabilities come from the clean base's features.
    """
    start = time.perf_counter()
    model = model.to(data.device).eval()
    gen = torch.Generator().manual_seed(derive_seed(s.seed, "head_members", client_id))
    members = build_members(model, s, gen).to(data.device)
    lrs = sample_learning_rates(s.sampling_num, s.lower_lr, s.upper_lr, derive_seed(s.seed, "head_lrs", client_id))
    features = _Features(model, data, train, s, gen)
    member_seeds = [derive_seed(s.seed, "head_batches", client_id, j) for j in range(s.sampling_num)]
    loss = train_members(members, features.train_batch, data.targets[train], lrs, s.global_epoch, s.batch_size,
                         s.weight_decay, member_seeds)
    probs_wo, probs = predict(model, members, base_features(model, _images(data), test, features.chunk))
    ood_probs_wo = ood_probs = None
    if ood is not None:
        sample = ood.sample(len(test), s.seed, client_id)
        ood_probs_wo, ood_probs = predict(model, members, base_features(model, ood.batch, sample, features.chunk))
    return ClientHeads(members.cpu(), lrs, probs_wo, probs, loss, time.perf_counter() - start, ood_probs_wo, ood_probs)
