"""The downlink: what of a server's global model goes down to a client, and how the client merges it into its own.

A knob of the downlink, not an algorithm: any algorithm with one global model that clients start from (FedAvg;
:attr:`pfl.federated.base.Algorithm.takes_downlink`) applies it to every client it configures, and its personalized
model of a client is that client's own model with the downlink merged in (what it would start its next round from).

* ``downlink=full`` (default): the whole global model goes down and replaces the client's (FedAvg).
* ``downlink=head_layers:K``: only the last K layers go down, and only they go up and are averaged (LG-FedAvg's
  sharing rule, Liang et al. 2020, applied to the top layers; the researchers' ``partialFedAvg`` is K=2). A *layer*
  is a module that owns state entries directly (an ``nn.Linear``, a whole ``nn.LSTM``, a Transformer block's
  attention projection), in state-dict order.
* ``downlink=none``: nothing goes down; every client keeps training its own model (with FedGen, the researchers'
  ``localFedGen``).
* ``downlink_blend=beta``: the client's new model is ``beta * global + (1 - beta) * own`` on the entries that go down
  (float entries; integer buffers take the global value). beta = 1 is FedAvg's replacement; the researchers use 0.5.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pfl.federated.state import State

_HEAD_LAYERS = re.compile(r"head_layers:([1-9]\d*)")


@dataclass(frozen=True)
class Downlink:
    """What goes down and how it merges.

    Attributes:
        layers: ``None``: the whole model; 0: nothing; K: the last K layers.
        blend: weight of the global model in the merge, in (0, 1].
    """

    layers: int | None = None
    blend: float = 1.0

    @classmethod
    def parse(cls, downlink: str, blend: float = 1.0) -> Downlink:
        """The downlink of the run fields ``downlink`` (``full``, ``none`` or ``head_layers:K``) and ``downlink_blend``.

        Raises:
            ValueError: another value of ``downlink``, or ``blend`` outside (0, 1]; the message names the field.
        """
        if not 0 < blend <= 1:
            raise ValueError(f"downlink_blend={blend}: the global model's weight in the client's new model must be in "
                             "(0, 1] (1: replace, as FedAvg; 0.5: half and half)")
        if downlink == "full":
            return cls(None, blend)
        if downlink == "none":
            return cls(0, blend)
        match = _HEAD_LAYERS.fullmatch(downlink)
        if match is None:
            raise ValueError(f"downlink={downlink!r}: use full, none, or head_layers:K (the last K layers, e.g. "
                             "head_layers:2)")
        return cls(int(match.group(1)), blend)

    @property
    def full(self) -> bool:
        """Whether the client's new model is the global model (FedAvg): the whole model, replacing the client's."""
        return self.layers is None and self.blend == 1.0

    @property
    def label(self) -> str:
        """The downlink in run names: ``""`` (full), ``-head2``, ``-nodl``, plus ``-blend0.5`` when blending."""
        layers = {None: "", 0: "-nodl"}.get(self.layers, f"-head{self.layers}")
        return layers + (f"-blend{self.blend:g}" if self.blend != 1.0 else "")

    def shared(self, state: State) -> list[str]:
        """The entries of ``state`` that go down: all, none, or those of its last :attr:`layers` layers."""
        if self.layers is None:
            return list(state)
        owners = list(dict.fromkeys(name.rpartition(".")[0] for name in state))  # layers, in state-dict order
        top = set(owners[max(0, len(owners) - self.layers):]) if self.layers else set()
        return [name for name in state if name.rpartition(".")[0] in top]

    def payload(self, global_state: State) -> State:
        """What travels to a client: the :meth:`shared` entries of the global model."""
        return {name: global_state[name] for name in self.shared(global_state)}

    def upload(self, state: State) -> State:
        """What a client sends up and the server averages: with ``head_layers:K`` the K layers, else everything
        (with ``none`` the server still receives the models, e.g. FedGen's heads)."""
        return self.payload(state) if self.layers else state

    def merge(self, own: State, global_state: State) -> State:
        """The client's new model: ``own`` with the :meth:`shared` entries of ``global_state`` blended in,
        ``blend * global + (1 - blend) * own`` (integer entries take the global value)."""
        merged = dict(own)
        for name in self.shared(global_state):
            g = global_state[name]
            merged[name] = g if self.blend == 1.0 or not g.is_floating_point() else \
                self.blend * g + (1 - self.blend) * own[name]
        return merged
