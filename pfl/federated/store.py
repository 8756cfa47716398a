"""Per-client named states kept in host memory, spilling to disk past a budget.

Only clients that were written hold their own state; the others share a default (e.g.
the initial model of their architecture), so memory grows with the clients touched,
never with the accelerator. With a ``budget_bytes``, states written once the in-memory
ones fill the budget go to ``spill_dir`` as safetensors files (exact round trip, nothing
pickled) and are read back on access; states already in memory stay there.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from safetensors.torch import load_file, save_file

from pfl.federated.state import State, state_bytes


class ClientStore:
    """Map client id -> named :data:`~pfl.federated.state.State` on the host, with defaults and a memory budget.

    Args:
        default: the state of a client never written, as a function of the client id (each client's
            architecture may differ), or one state shared by every client.
        budget_bytes: bytes of client states kept in memory (``None``: no limit).
        spill_dir: folder for states past the budget (default: a fresh temporary folder,
            removed with the store).
    """

    def __init__(self, default: State | Callable[[int], State], budget_bytes: int | None = None,
                 spill_dir: str | Path | None = None):
        self.default = default if callable(default) else (lambda _cid, d=_host(default): d)
        self.budget_bytes = budget_bytes
        self._states: dict[int, State] = {}
        self._spilled: set[int] = set()
        self._tmp = None
        if budget_bytes is not None and spill_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pfl-client-store-")
            spill_dir = self._tmp.name
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None

    def _path(self, client_id: int) -> Path:
        return self.spill_dir / f"client_{client_id}.safetensors"

    def __getitem__(self, client_id: int) -> State:
        if client_id in self._spilled:  # safetensors sorts entries by name: restore the state_dict order
            loaded = load_file(self._path(client_id))
            return {k: loaded[k] for k in self.default(client_id)}
        state = self._states.get(client_id)
        return self.default(client_id) if state is None else state

    def __setitem__(self, client_id: int, state: State) -> None:
        """Store a copy of ``state``.

        The entries are kept in the order of the client's default state (the architecture's
        ``state_dict`` order), whatever order ``state`` lists them in.

        Raises:
            ValueError: its entries' names or shapes differ from the client's default state.
        """
        default = self.default(client_id)
        if {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in default.items()}:
            raise ValueError(f"client {client_id}: state entries differ from its architecture's "
                             f"({sorted(set(state) ^ set(default))[:3]} or shapes)")
        state = _host({k: state[k] for k in default})  # kept in the architecture's (forward) order
        if client_id in self._states or not self._over_budget(state):
            self._states[client_id] = state
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, self._path(client_id))
        self._spilled.add(client_id)

    def _over_budget(self, state: State) -> bool:
        return self.budget_bytes is not None and self.bytes_in_memory + state_bytes(state) > self.budget_bytes

    def written(self) -> list[int]:
        """Ids of the clients holding their own state, sorted."""
        return sorted([*self._states, *self._spilled])

    def items(self) -> Iterator[tuple[int, State]]:
        """``(client id, state)`` of every written client, in id order (spilled states read one at a time)."""
        for cid in self.written():
            yield cid, self[cid]

    def clear(self) -> None:
        """Forget every written state (clients fall back to their defaults)."""
        for cid in self._spilled:
            self._path(cid).unlink(missing_ok=True)
        self._states.clear()
        self._spilled.clear()

    def __len__(self) -> int:
        return len(self._states) + len(self._spilled)

    @property
    def bytes_in_memory(self) -> int:
        """Bytes of the client states held in memory (the defaults excluded)."""
        return sum(state_bytes(s) for s in self._states.values())


def _host(state: State) -> State:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
