"""One client's head rearrangement: build the members, fine-tune them on the frozen base, predict.

With ``perturb_scope="head"`` (the paper's description) the base is shared and frozen,
so its features of the client's train and test samples are computed once, in large
batches, and every training step only runs the S heads as batched matmuls. With
``perturb_scope="model"`` (the official code's behaviour) every member also gets its own
noisy copy of the base parameters (same prior rule, still frozen); those features
differ per member, so each step runs the S bases on the members' batches (slower).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.func import functional_call

from pfl.config import HeadConfig
from pfl.data.loader import DeviceImages
from pfl.heads.members import MemberHeads, aph_members, ensemble_probs, loraph_members, train_members
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
    """

    members: MemberHeads
    lrs: torch.Tensor
    probs_wo: torch.Tensor
    probs: torch.Tensor
    train_loss: list[float]
    seconds: float


def _chunked(fn: Callable[[torch.Tensor], torch.Tensor], idx: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([fn(idx[i:i + chunk]) for i in range(0, len(idx), chunk)])


def build_members(model: SplitModel, s: HeadConfig, gen: torch.Generator) -> MemberHeads:
    """The initial members of ``s.method`` from the model's head (on the host)."""
    if s.method == "aph":
        return aph_members(model.head, s.sampling_num, s.p_lambda, gen)
    return loraph_members(model.head, s.sampling_num, s.rank, s.p_lambda, s.lora_init, gen)


class _Features:
    """Member features of train positions (S, B) -> (S, B, D) and of the test split -> (S or 1, n_test, D)."""

    def __init__(self, model: SplitModel, data: DeviceImages, train: torch.Tensor, s: HeadConfig,
                 gen: torch.Generator):
        self.model, self.data, self.train = model, data, train
        self.chunk = data.inference_batch_size(s.eval_batch_size)
        self.bases = None
        if s.perturb_scope == "model":
            names = [n for n, _ in model.base.named_parameters()]
            noisy = [perturbed(p, s.sampling_num, s.p_lambda, gen).to(p.device) for p in model.base.parameters()]
            self.bases = [dict(zip(names, (t[j] for t in noisy))) for j in range(s.sampling_num)]
        self.cached = None if self.bases else self.of(train)

    @torch.no_grad()
    def of(self, idx: torch.Tensor, member: int | None = None) -> torch.Tensor:
        """Base features (n, D) of pool indices ``idx``, through member ``member``'s base if perturbed."""
        def run(chunk: torch.Tensor) -> torch.Tensor:
            x = self.data.batch(chunk)[0]
            if member is None:
                return self.model.base(x)
            return functional_call(self.model.base, self.bases[member], (x,))
        return _chunked(run, idx, self.chunk)

    def train_batch(self, positions: torch.Tensor) -> torch.Tensor:
        """Features (S, B, D) of train positions (S, B): row j through member j's base (or the shared cache)."""
        if self.cached is not None:
            return self.cached[positions]
        return torch.stack([self.of(self.train[row], j) for j, row in enumerate(positions)])

    def test(self, idx: torch.Tensor) -> torch.Tensor:
        """Features of test indices (n,): shared (n, D), or per member (S, n, D) with perturbed bases."""
        if self.bases is None:
            return self.of(idx)
        return torch.stack([self.of(idx, j) for j in range(len(self.bases))])


def rearrange_client(model: SplitModel, data: DeviceImages, train: torch.Tensor, test: torch.Tensor,
                     s: HeadConfig, client_id: int) -> ClientHeads:
    """APH / LoRAPH for one client's personalized model.

    Args:
        model: the client's personalized model (moved to ``data.device``, put in eval mode).
        data: the device-resident pool.
        train: pool indices (n,) of the client's train split (fine-tuning data).
        test: pool indices (n_test,) of its test split (prediction only).
        s: method settings; member seeds derive from ``(s.seed, client_id)``.
        client_id: the client.

    Returns:
        :class:`ClientHeads`.
    """
    start = time.perf_counter()
    model = model.to(data.device).eval()
    seed = derive_seed(s.seed, client_id)
    gen = torch.Generator().manual_seed(seed)
    members = build_members(model, s, gen).to(data.device)
    lrs = sample_learning_rates(s.sampling_num, s.lower_lr, s.upper_lr, derive_seed(seed, 1))
    features = _Features(model, data, train, s, gen)
    member_seeds = [derive_seed(seed, 2, j) for j in range(s.sampling_num)]
    loss = train_members(members, features.train_batch, data.labels[train], lrs, s.global_epoch, s.batch_size,
                         s.weight_decay, member_seeds)
    probs = ensemble_probs(members, features.test(test)).cpu()
    with torch.no_grad():
        probs_wo = torch.softmax(_chunked(lambda i: model(data.batch(i)[0]), test, features.chunk), 1).cpu()
    return ClientHeads(members.cpu(), lrs, probs_wo, probs, loss, time.perf_counter() - start)
