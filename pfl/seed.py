"""One seed for Python, NumPy and torch, and a named random stream for every use (the design's reproducibility rule)."""

from __future__ import annotations

import random

import numpy as np
import torch

# Every random stream derived from a run's seed has its own tag. New streams get a new,
# never reused number, so existing streams (and the runs they reproduce) stay as they are.
STREAMS: dict[str, int] = {
    "client_sampling": 1,    # engine: the clients of a round
    "local_batches": 2,      # engine: a client's batch order in a round
    "fomo_exploration": 3,   # FedFomo: epsilon-greedy draws
    "ala_slice": 4,          # FedALA: the random slice of local data
    "head_members": 5,       # APH / LoRAPH: a client's member initialization
    "head_lrs": 6,           # APH / LoRAPH: a client's member learning rates
    "head_batches": 7,       # APH / LoRAPH: a member's batch order
    "ood_sample": 8,         # head runs: a client's sample of the OOD set
    "local_subsample": 9,    # FlexiFed: the sample_fraction of a client's shard trained on in a round
    "fedgen_client": 10,     # FedGen: a client's generated labels and noise in a round
    "fedgen_server": 11,     # FedGen: the server's generator training and evaluation draws in a round
    "queue": 12,             # MocoSFL: the key queue's initial keys
    "ssl_batches": 13,       # MocoSFL: a client's batch order in a round
    "views": 14,             # MocoSFL: one view of a step's images
    "cohort": 15,            # MocoSFL: a step's clients when clients_per_step is set
    "prototypes": 16,        # MocoSFL, SwAV: the prototypes' initialization
    "linear_probe": 17,      # MocoSFL: the linear probe's initialization and batch order
    "new_clients": 40,       # new-client evaluation: which clients are held out of training
    "new_client_batches": 41,  # new-client evaluation: a new client's batch order when it adapts, per round
}


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's legacy global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(seed: int, stream: str, *parts: int) -> int:
    """A 63-bit seed of the random stream ``stream`` at ``parts`` (e.g. round, client id), derived from ``seed``.

    The entropy is ``(seed, tag of stream, len(parts), *parts)``: NumPy's ``SeedSequence``
    ignores trailing zeros, so the count keeps ``(r,)`` and ``(r, 0)`` apart, and the tag keeps
    streams apart (a round's client sampling never equals client 0's batch order).

    Raises:
        ValueError: ``stream`` is not one of :data:`STREAMS`.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; register it in pfl.seed.STREAMS")
    entropy = [seed, STREAMS[stream], len(parts), *parts]
    return int(np.random.SeedSequence(entropy).generate_state(2, np.uint64)[0] >> np.uint64(1))


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The global generators' states (Python, NumPy's legacy RNG, torch CPU and every CUDA device) as
    named tensors plus JSON, for checkpoints; the engine's own streams are derived per round and need none."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"rng/torch_cpu": torch.get_rng_state(), "rng/numpy_keys": torch.from_numpy(keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = random.getstate()
    meta = {"python": [version, list(internal), gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng/numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
