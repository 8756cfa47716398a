"""Per-client flat parameter vectors kept in host memory.

Only clients that were written hold their own vector; the others share the
default (e.g. the initial model), so memory grows with the clients touched,
never with the accelerator.
"""

from __future__ import annotations

import torch


class ClientStore:
    """Map client id -> flat float32 vector (P,) on the host, with a shared default.

    Args:
        default: vector returned for clients never written.
    """

    def __init__(self, default: torch.Tensor):
        self.default = default.detach().cpu()
        self._vectors: dict[int, torch.Tensor] = {}

    def __getitem__(self, client_id: int) -> torch.Tensor:
        return self._vectors.get(client_id, self.default)

    def __setitem__(self, client_id: int, vector: torch.Tensor) -> None:
        if vector.shape != self.default.shape:
            raise ValueError(f"client {client_id}: vector shape {tuple(vector.shape)} != {tuple(self.default.shape)}")
        self._vectors[client_id] = vector.detach().to("cpu", copy=True)

    def __len__(self) -> int:
        return len(self._vectors)
