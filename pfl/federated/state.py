"""Named model state: the currency between algorithms, the engine, client stores, checkpoints and tracking.

A :data:`State` is a model's ``state_dict()`` as detached host tensors, keyed by state-dict
names (``"base.0.weight"``, ``"base.1.running_mean"``, ``"base.1.num_batches_tracked"``).
Floating-point entries (parameters and float buffers such as BatchNorm statistics) are what
algorithms average; integer entries (``num_batches_tracked``) are counters that no algorithm
averages: an aggregate keeps the receiving model's own.

Arithmetic over several states of one architecture goes through a flat fast path:
:func:`flatten` concatenates the chosen entries in order into one vector (P,), so a
weighted average is one matrix-vector product, exactly as the flat-vector core computed
it (pinned bit for bit by ``tests/test_no_regression.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

State = dict[str, torch.Tensor]

PERSONAL = "personal/"
"""Key prefix of a personal model's entries carried beside the trained model in one client result (Ditto, pFedMe,
APFL, FedRoD). State-dict keys join module and attribute names with ``"."`` and never hold ``"/"``, so a prefixed key
cannot collide with a model's own entry."""


def model_state(model: nn.Module) -> State:
    """The model's full state as detached host copies, in ``state_dict`` order."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@torch.no_grad()
def load_state(model: nn.Module, state: State) -> nn.Module:
    """Copy ``state`` into the model's tensors in place (any device); returns the model.

    Entries of the model missing from ``state`` keep their values (a state may carry a subset,
    e.g. an algorithm's float entries only).

    Raises:
        KeyError: ``state`` names an entry the model does not have (wrong architecture).
        ValueError: an entry's shape differs from the model's.
    """
    own = model.state_dict()
    for name, value in state.items():  # check everything first: a rejected state leaves the model untouched
        if name not in own:
            raise KeyError(f"state entry {name!r} is not in the model ({type(model).__name__}); "
                           "was it saved from another architecture?")
        if own[name].shape != value.shape:
            raise ValueError(f"state entry {name!r} has shape {tuple(value.shape)}, the model's is "
                             f"{tuple(own[name].shape)}")
    for name, value in state.items():
        own[name].copy_(value, non_blocking=True)
    return model


def float_keys(state: State) -> list[str]:
    """Names of the floating-point entries (parameters and float buffers), in order."""
    return [k for k, v in state.items() if v.is_floating_point()]


def param_keys(model: nn.Module) -> list[str]:
    """Names of the model's trainable parameters, in ``state_dict`` order."""
    params = {name for name, _ in model.named_parameters()}
    return [k for k in model.state_dict() if k in params]


def flatten(state: State, keys: Sequence[str]) -> torch.Tensor:
    """The entries ``keys`` of ``state`` concatenated in order as one vector (P,)."""
    return torch.cat([state[k].reshape(-1) for k in keys])


def unflatten(vector: torch.Tensor, like: State, keys: Sequence[str]) -> State:
    """Inverse of :func:`flatten`: entries ``keys`` shaped as in ``like``, as views of ``vector`` (P,)."""
    sizes = [like[k].numel() for k in keys]
    if sum(sizes) != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries, the {len(keys)} entries need {sum(sizes)}")
    return {k: part.view(like[k].shape) for k, part in zip(keys, vector.split(sizes))}


def weighted_average(states: Sequence[State], weights: Sequence[float], keys: Sequence[str] | None = None) -> State:
    """``sum_k w_k s_k / sum_k w_k`` of entries ``keys`` (default: the float entries of the first state).

    Computed on the flat fast path (one product of the normalized weights (K,) with the stacked
    vectors (K, P)), bit-identical to averaging flat vectors.

    Returns:
        the averaged entries only (a partial state); merge it into a receiving state to keep that
        state's other entries (e.g. ``{**own, **avg}``).

    Raises:
        ValueError: no states, or weights that do not sum to a positive number.
    """
    if not states:
        raise ValueError("cannot average zero states")
    w = torch.tensor(list(weights), dtype=torch.float64)
    if w.sum() <= 0:
        raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
    keys = float_keys(states[0]) if keys is None else list(keys)
    if not keys:
        return {}
    stacked = torch.stack([flatten(s, keys) for s in states])
    return unflatten((w / w.sum()).to(stacked.dtype) @ stacked, states[0], keys)


def stack_states(states: Sequence[State], keys: Iterable[str], device: torch.device | str) -> State:
    """C states' entries ``keys`` stacked as fresh contiguous tensors (C, *shape) on ``device`` (for ``vmap``)."""
    return {k: torch.stack([s[k].to(device) for s in states]).contiguous() for k in keys}


def state_digest(state: State) -> bytes:
    """SHA-256 over the entries' names and bytes, in name order: equal digests mean bit-identical states."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def state_bytes(state: State) -> int:
    """Bytes held by the state's tensors."""
    return sum(v.numel() * v.element_size() for v in state.values())


def with_personal(state: State, personal: State) -> State:
    """One client result holding both models: ``state``'s entries, then ``personal``'s under :data:`PERSONAL`
    (``{"w": a}, {"w": b}`` -> ``{"w": a, "personal/w": b}``); tensors are shared, not copied."""
    return {**state, **{PERSONAL + k: v for k, v in personal.items()}}


def split_personal(state: State) -> tuple[State, State]:
    """Inverse of :func:`with_personal`: (the entries without the prefix, i.e. what may travel up; the personal
    entries with the prefix removed), each in ``state``'s order."""
    uploaded = {k: v for k, v in state.items() if not k.startswith(PERSONAL)}
    personal = {k[len(PERSONAL):]: v for k, v in state.items() if k.startswith(PERSONAL)}
    return uploaded, personal
