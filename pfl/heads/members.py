"""Head ensembles trained together: S members as stacked tensors and batched matmuls.

A client's head (``nn.Linear``, or ``Linear, ReLU, Linear, ...``) becomes
:class:`MemberHeads`: member j maps features (B, D) to logits (B, K) with its own
weights, and all S members run as one batched computation on (S, B, D) inputs.

* APH (Chen et al., AAAI 2024, Sec. 4): every member holds full weights, started
  from the client's head plus prior noise (:mod:`pfl.heads.prior`).
* LoRAPH (low-rank variant): member j's layer is ``W0 + B_j A_j`` with the client's
  W0 frozen and shared, rank ``r = min(rank, out, in)``, and its own bias (trained and
  prior-perturbed as in APH). Deliberate choices, made so that APH's per-member learning
  rates (tuned for full weights, plain SGD) mean the same thing here:

  - A_j ~ N(0, c/r), so E[A_j^T A_j] = c I. One SGD step on B_j moves the product by
    ``-lr G x^T A_j^T A_j`` (G: the output gradient): the logits of any x' move by
    ``-lr G (A_j x).(A_j x')``, c times APH's ``-lr G x.x'`` in expectation, and the step's
    spectral norm is about ``c sqrt(in/r)`` times APH's.
  - Output layer: c = 1, the same function-space learning rate as APH, so the logit scale
    (what calibration depends on) adapts as fast as APH's.
  - Hidden layers: c = sqrt(r/in), the same spectral norm per step as APH (the function
    moves sqrt(r/in) as fast: 1/14 on the CNN's 1600 -> 512 layer). With c = 1 there, a
    step's spectral norm is sqrt(in/r) times APH's, the growing features feed back
    through the layers above, and on FedFomo, CIFAR-10 Dir(0.1), 8 rounds, 9 of the 200
    members blew up (|B_j A_j| > 100, train loss up to 17) at learning rates >= 0.046.
  - Not LoRA's N(0, 1/in) (c = r/in): with plain SGD the product then learns r/in times
    slower than APH (1/200 and 1/64 on the CNN head), LoRAPH degenerates to bias-only
    tuning, and its members stay as unconfident as the FL model (F-ECE 11.3% against
    APH's 7.8% and w/o 8.1% on the run above).
  - A_j is frozen (a per-member buffer): only B_j and the bias train (as LoRA-FA, Zhang
    et al. 2023). With A_j trainable the product is bilinear: A's path adds
    ``|B_j|^2 |x|^2`` to the step's curvature, which grows with the update; at the same
    settings with c = 1 everywhere, members of 4 of the 20 clients diverged to NaN. Frozen,
    each member is linear in its parameters like APH, its own random subspace adds to
    the ensemble's diversity, and the A gradient is not computed.
  - ``prior`` init draws B_j ~ N(0, sigma^2 / c) with sigma the APH noise std of W0, so
    B_j A_j has entries of std sigma (var = r (sigma^2/c) (c/r)), APH's perturbation scale
    but low-rank; ``standard`` init sets B_j = 0 (plain LoRA: member j starts at the head).
  - No LoRA ``alpha / r`` multiplier: with SGD it only rescales the learning rate on the
    product, which c already sets.

Training (:func:`train_members`) is plain SGD with per-member learning rates and weight
decay, each member drawing its own batch order, so training S members together equals
training each alone with the same seeds (tested).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

from pfl.heads.prior import noise_std, perturbed


def linear_layers(head: nn.Module) -> list[nn.Linear]:
    """The linear layers of a head made of ``nn.Linear`` layers with ``nn.ReLU`` between them; ``nn.Dropout`` layers
    (the CharCNN's) are left out: the members train and predict without dropout (a deliberate difference from
    training the head itself).

    Raises:
        ValueError: any other head structure.
    """
    if isinstance(head, nn.Linear):
        return [head]
    mods = [m for m in head if not isinstance(m, nn.Dropout)] if isinstance(head, nn.Sequential) else []
    shape_ok = bool(mods) and len(mods) % 2 == 1 and all(
        isinstance(m, nn.Linear if i % 2 == 0 else nn.ReLU) for i, m in enumerate(mods))
    if not shape_ok:
        raise ValueError(f"head methods need a head of Linear layers with ReLU between, got {head}")
    return mods[::2]


def _bias(layer: nn.Linear) -> torch.Tensor:
    return layer.bias.detach().cpu() if layer.bias is not None else torch.zeros(layer.out_features)


class DenseLayer(nn.Module):
    """S full linear layers: x (S, B, in) -> (S, B, out).

    Weights are stored transposed, ``weight_t`` (S, in, out) = ``weight.T`` of each member, so
    the batched matmul and its gradient are contiguous; ``bias`` (S, out).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight_t = nn.Parameter(weight.transpose(1, 2).contiguous())
        self.bias = nn.Parameter(bias.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight_t)


class LowRankLayer(nn.Module):
    """S low-rank adapted layers ``W0 + B_j A_j``: x (S, B, in) -> (S, B, out).

    Stored transposed for contiguous matmuls: ``base_weight_t`` (in, out) = W0.T (frozen,
    shared buffer), ``a_t`` (S, in, r) = A_j.T (frozen, per-member buffer; module
    docstring), ``b_t`` (S, r, out) = B_j.T, ``bias`` (S, out).
    """

    member_buffers = ("a_t",)  # frozen tensors with a member dimension (sliced by MemberHeads.member)

    def __init__(self, base_weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("base_weight_t", base_weight.T.contiguous())
        self.register_buffer("a_t", a.transpose(1, 2).contiguous())
        self.b_t = nn.Parameter(b.transpose(1, 2).contiguous())
        self.bias = nn.Parameter(bias.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.base_weight_t + torch.bmm(torch.bmm(x, self.a_t), self.b_t) + self.bias.unsqueeze(1)


class MemberHeads(nn.Module):
    """An ensemble of S heads with the client head's layout (ReLU between layers).

    Shapes: features (S, B, D) -> logits (S, B, K).
    """

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(torch.relu(x) if i else x)
        return x

    @property
    def num_members(self) -> int:
        """S, the number of members."""
        return self.layers[0].bias.shape[0]

    def trainable_per_member(self) -> int:
        """Trainable parameters of one member (frozen shared weights excluded)."""
        return sum(p[0].numel() for p in self.parameters())

    def member(self, j: int) -> MemberHeads:
        """A one-member copy holding member ``j`` (frozen tensors copied too, per-member ones sliced)."""
        single = copy.deepcopy(self)
        with torch.no_grad():
            for p_single, p in zip(single.parameters(), self.parameters()):
                p_single.set_(p[j:j + 1].detach().clone())
            for m_single, m in zip(single.modules(), self.modules()):
                for name in getattr(m, "member_buffers", ()):
                    setattr(m_single, name, getattr(m, name)[j:j + 1].detach().clone())
        return single


def aph_members(head: nn.Module, members: int, p_lambda: float, gen: torch.Generator) -> MemberHeads:
    """APH's initial members: every head tensor plus prior noise (std :func:`~pfl.heads.prior.noise_std`)."""
    return MemberHeads([DenseLayer(perturbed(layer.weight, members, p_lambda, gen),
                                   perturbed(_bias(layer), members, p_lambda, gen))
                        for layer in linear_layers(head)])


def loraph_members(head: nn.Module, members: int, rank: int, p_lambda: float, init: str,
                   gen: torch.Generator) -> MemberHeads:
    """LoRAPH's initial members (module docstring); ``init`` is ``"prior"`` or ``"standard"``.

    Raises:
        ValueError: unknown ``init`` or ``rank < 1``.
    """
    if init not in ("prior", "standard") or rank < 1:
        raise ValueError(f"need lora_init in (prior, standard) and rank >= 1, got {init!r}, {rank}")
    layers, linears = [], linear_layers(head)
    for i, layer in enumerate(linears):
        w0 = layer.weight.detach().cpu()
        (out, inp), r = w0.shape, min(rank, *w0.shape)
        c = 1.0 if i == len(linears) - 1 else math.sqrt(r / inp)  # E[A^T A] = c I (module docstring)
        a = torch.randn((members, r, inp), generator=gen) * math.sqrt(c / r)
        if init == "prior":
            b = noise_std(w0, p_lambda) / math.sqrt(c) * torch.randn((members, out, r), generator=gen)  # B A: std sigma
            bias = perturbed(_bias(layer), members, p_lambda, gen)
        else:
            b, bias = torch.zeros(members, out, r), _bias(layer).repeat(members, 1)
        layers.append(LowRankLayer(w0.clone(), a, b, bias))
    return MemberHeads(layers)


def train_members(heads: MemberHeads, features: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                  lrs: torch.Tensor, epochs: int, batch_size: int, weight_decay: float,
                  seeds: list[int]) -> list[float]:
    """Fine-tune all members together by SGD; member j is updated ``p -= lr_j * (grad + wd * p)``.

    Args:
        heads: the members (S), trained in place, on the training device.
        features: maps sample indices (S, B) (row j: member j's batch) to features (S, B, D).
        labels: int64 (n,) labels of the training samples, on the training device.
        lrs: per-member learning rates (S,).
        epochs: passes over the n samples; each member shuffles with its own generator.
        batch_size: samples per step (the last batch of a pass may be smaller).
        weight_decay: L2 coefficient.
        seeds: one seed per member for its batch order.

    Returns:
        the mean (over members and steps) training loss of each epoch, in nats.
    """
    device, n, s = labels.device, len(labels), heads.num_members
    params = list(heads.parameters())
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    lr = lrs.to(device=device, dtype=params[0].dtype)
    decay, step = 1 - lr * weight_decay, -lr  # p <- p * (1 - lr wd) - lr g, in place (no temporaries)
    history = []
    for _ in range(epochs):
        order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)  # (S, n)
        total = torch.zeros((), device=device)
        for start in range(0, n, batch_size):
            idx = order[:, start:start + batch_size]
            logits = heads(features(idx))
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels[idx].flatten(), reduction="none")
            loss = loss.view(s, -1).mean(dim=1).sum()
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    shape = (-1, *[1] * (p.dim() - 1))
                    p.mul_(decay.view(shape)).add_(g.mul_(step.view(shape)))
            total += loss.detach()
        history.append(total.item() / (s * math.ceil(n / batch_size)))
    return history


@torch.no_grad()
def ensemble_probs(heads: MemberHeads, features: torch.Tensor) -> torch.Tensor:
    """Mean over members of softmax(head_j(features_j)): features (S, N, D) or (N, D) shared -> probs (N, K)."""
    if features.dim() == 2:
        features = features.unsqueeze(0).expand(heads.num_members, -1, -1)
    return torch.softmax(heads(features).float(), dim=2).mean(dim=0)


def members_from_state(state: dict[str, torch.Tensor]) -> MemberHeads:
    """The members a saved ``state_dict`` holds (``heads/client_XXX/artifacts/members.safetensors``,
    :func:`pfl.tracking.log_member_heads`): layer i is low-rank (:class:`LowRankLayer`) when it has ``layers.i.b_t``
    (S, r, out), with ``base_weight_t`` (in, out), ``a_t`` (S, in, r) and ``bias`` (S, out); dense
    (:class:`DenseLayer`) otherwise, ``weight_t`` (S, in, out) and ``bias`` (S, out). Extra entries
    (``learning_rates``) are ignored. The result equals the saved members exactly (tensors are taken as stored).

    Raises:
        KeyError: a layer's tensors are missing.
    """
    layers, i = [], 0
    while f"layers.{i}.bias" in state:
        p = f"layers.{i}."
        if p + "b_t" in state:
            layers.append(LowRankLayer(state[p + "base_weight_t"].T, state[p + "a_t"].transpose(1, 2),
                                       state[p + "b_t"].transpose(1, 2), state[p + "bias"]))
        else:
            layers.append(DenseLayer(state[p + "weight_t"].transpose(1, 2), state[p + "bias"]))
        i += 1
    return MemberHeads(layers)
