"""FedLoRA: federated fine-tuning of a pretrained model through LoRA adapters; the backbone stays frozen.

Every client's model is the shared pretrained backbone with peft's LoRA adapters in its base
(:mod:`pfl.models.adapters`: ``rank``, ``lora_alpha``, ``target_modules``, ``lora_dropout``) and a
trainable head. A client trains the adapters and the head (:class:`LoraUpdate`) and uploads only
them; the server averages them weighted by training samples, as FedAvg does, and sends them back.
The frozen backbone never travels: ``comm/bytes_up`` and ``comm/bytes_down`` count adapters + head.

``lora_aggregation`` chooses what is averaged:

* ``fedit``: FedIT (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
  ICASSP 2024): each client trains A and B; the server averages A and B separately. This is biased:
  the global update is mean(B) mean(A), not the mean of the clients' updates mean(B A)
  (e.g. B = (1, 0), A = (0, 1) averaged with B = (0, 1), A = (1, 0) gives 1/4 where the clients' products
  average to 0).
* ``ffa``: FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024,
  Sec. 3): A stays frozen at its random initialization, which every client shares (one seed), and
  only B (and the head) trains; then B A is linear in B and averaging B averages the updates exactly.
  A is part of the frozen backbone and never travels.

``personal_head=true`` keeps each client's head local (only the adapters are averaged), so the
personalized model is the global adapters plus the client's own head; otherwise every client's
model is the global one. Evaluation scores each client's personalized model on its own test split.

Artifacts: every client's file holds only its adapters and head; the frozen backbone (with FFA's A)
is logged once as ``server/backbone.safetensors`` (:meth:`FedLoRA.shared_backbone`).

Local training is the run's (:class:`~pfl.federated.local.SGDUpdate`). FedIT's official code
(JayZhang42/FederatedGPT-Shepherd, ``fed_utils/client.py`` ``build_local_trainer``) builds a fresh HF
``Trainer`` per client and round with ``optim="adamw_torch"``, ``warmup_steps=0`` and the Trainer's defaults
``weight_decay=0``, ``lr_scheduler_type="linear"`` and ``max_grad_norm=1.0``: AdamW whose rate decays linearly
to 0 over the client's optimizer steps of the round, gradients clipped to norm 1. The ViT templates set exactly
that (``optimizer=adamw weight_decay=0 lr_schedule=linear max_grad_norm=1``), and so does their full fine-tuning
arm (``configs/fedavg_vit_cifar10*.yaml``), so the two arms differ only in what trains.

Which layers: FedIT adapts LLaMA's separate ``q_proj`` only (``main.py``'s default
``lora_target_modules=["q_proj"]``; its README's example adds ``k_proj``, ``v_proj``, ``o_proj``). timm's ViT
computes Q, K and V with one fused linear layer ``qkv`` (d -> 3d), so LoRA on ``qkv`` is one update
B A with B (3d, r) and A (r, d): Q, K and V are adapted together in one rank-r subspace (they share A, and
their joint update has rank at most r), not by a rank-r adapter each; the default targets also adapt the MLP
(``fc1``, ``fc2``).

Deliberate differences from FedIT: the model, data and loss (a ViT classifying images, not an LLM on
instructions); bf16 autocast (FedIT: fp16 on an 8-bit base); one batch per step (FedIT: micro-batches with
gradient accumulation); the adapted layers (above); the templates' LoRA r=8, alpha 16, no dropout (FedIT's
defaults: r=16, alpha 16, dropout 0.05). peft's LoRA initialization is kept (A Kaiming-uniform, B zero);
FFA-LoRA's paper draws A from a Gaussian and scales its ``alpha``, which is left to ``lora_alpha``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import Field
from torch import nn

from pfl.federated.base import Algorithm, FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.state import State, weighted_average
from pfl.models.adapters import TIMM_VIT_LORA_TARGETS, LoraSpec
from pfl.models.split import ModelSpec


class FedLoRAParams(HyperParams):
    """FedLoRA's hyperparameters."""

    rank: int = Field(8, ge=1)
    """LoRA rank r."""
    lora_alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator (the update is scaled by ``lora_alpha / rank``)."""
    target_modules: tuple[str, ...] = Field(TIMM_VIT_LORA_TARGETS, min_length=1)
    """The base's linear layers that get adapters (timm ViT: ``qkv``, ``fc1``, ``fc2``; the fused ``qkv`` adapts Q, K
    and V in one rank-r subspace, module docstring)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the adapters' input."""
    lora_aggregation: Literal["fedit", "ffa"] = "fedit"
    """``fedit`` (average A and B) or ``ffa`` (A frozen, average B)."""
    personal_head: bool = False
    """Keep each client's head local."""


def trainable_entries(model: nn.Module) -> list[str]:
    """Names of the model's parameters that train (adapters and head of a LoRA model), in ``state_dict`` order."""
    train = {name for name, p in model.named_parameters() if p.requires_grad}
    return [k for k in model.state_dict() if k in train]


class LoraUpdate(SGDUpdate):
    """The run's local update, uploading only the trained entries (adapters and head) instead of the full state."""

    def result_state(self, model: nn.Module) -> State:
        """Host copies of the trained entries only (the frozen backbone, 99% of a ViT-B, is never copied)."""
        train = set(trainable_entries(model))
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in train}


class FedLoRA(Algorithm):
    """LoRA adapters (and the head) travel and are averaged; the backbone is frozen and shared (module docstring).

    Raises:
        ValueError: the clients' architectures differ, or no layer matches ``target_modules``.
    """

    name = "fedlora"
    Params = FedLoRAParams
    search_space = {"lr": SearchParam("float", 1e-5, 1e-2, log=True), "rank": SearchParam("int", 2, 32, log=True),
                    "lora_alpha": SearchParam("float", 1.0, 64.0, log=True)}
    state_attributes = ("global_state", "heads")

    @classmethod
    def run_label(cls, hparams: dict[str, Any]) -> str:
        """``fedlora`` (FedIT's aggregation), ``fedlora-ffa``; ``-ph`` added with personal heads."""
        label = cls.name if hparams["lora_aggregation"] == "fedit" else f"{cls.name}-{hparams['lora_aggregation']}"
        return f"{label}-ph" if hparams["personal_head"] else label

    @classmethod
    def model_spec(cls, spec: ModelSpec, hp: FedLoRAParams) -> ModelSpec:
        lora = LoraSpec(hp.rank, hp.lora_alpha, tuple(hp.target_modules), hp.lora_dropout,
                        freeze_a=hp.lora_aggregation == "ffa")
        return replace(spec, lora=lora)

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        init = ctx.init_states[ctx.single_spec(self.name)]
        self.trainable = trainable_entries(ctx.model(0))
        head = [k for k in self.trainable if k.startswith("head.")]
        self.shared_keys = [k for k in self.trainable if not (self.hp.personal_head and k in head)]
        self.global_state = {k: init[k] for k in self.shared_keys}
        initial_head = {k: init[k] for k in head}
        self.heads = ctx.new_store(lambda cid: initial_head)  # written only with personal_head
        self.update = LoraUpdate(**ctx.update.settings())

    @property
    def local_update(self) -> LoraUpdate:
        return self.update

    def _own_head(self, client_id: int) -> State:
        return self.heads[client_id] if self.hp.personal_head else {}

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        return FitIns({**self.global_state, **self._own_head(client_id)})

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        self.global_state = weighted_average([r.state for r in results], [r.num_samples for r in results],
                                             self.shared_keys)
        if self.hp.personal_head:
            for r in results:
                self.heads[r.client_id] = {k: v for k, v in r.state.items() if k.startswith("head.")}

    def personalized_state(self, client_id: int) -> State:
        return {**self.global_state, **self._own_head(client_id)}

    def shared_backbone(self) -> State:
        trainable = set(self.trainable)
        return {k: v for k, v in self.ctx.init_state(0).items() if k not in trainable}
