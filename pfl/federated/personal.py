"""A personal model beside the global model: the server side that Ditto, pFedMe and APFL share (TsingZ0/PFLlib
``system/flcore/clients/clientditto.py``, ``clientpFedMe.py``, ``clientapfl.py``; commit d832e76: each client keeps a
personal model, ``model_per`` or ``personalized_params``, beside the copy of the global model it trains and uploads).

Every client holds a copy of the global model, which it trains and uploads, and a personal model, which never travels
and is what the client is scored with. The round:

* ``configure_fit`` (each algorithm's own): the global model goes down (``FitIns.state``), with whatever of the
  client's personal state its local update reads (``FitIns.extras``);
* the local update returns the trained global copy with the personal model beside it under the key prefix
  :data:`pfl.federated.state.PERSONAL` (:func:`pfl.federated.state.with_personal`);
* ``aggregate_fit``: each sampled client's personal part becomes its own personal model; the uploads (the results
  without their personal entries) are averaged sample-weighted (``serverbase.py:138-150``), passed through
  :meth:`GlobalAndPersonal.server_mix` (the identity; pFedMe mixes in the previous global model,
  ``serverpFedMe.py:88-91``) and merged into the global state, whose other entries (integer counters) stay;
* ``personalized_state(c)``: client c's personal model, the initial model until c is first sampled
  (``clientditto.py:19``, ``clientpFedMe.py:19``, ``clientapfl.py:15``).

FedRoD (:mod:`pfl.algorithms.fedrod`) carries a personal head the same way but shares its model partially, so it uses
the packing alone (:func:`pfl.federated.state.with_personal`, :func:`pfl.federated.state.split_personal`).
"""

from __future__ import annotations

from pfl.federated.base import Algorithm, FederatedContext
from pfl.federated.local import FitRes, SGDUpdate
from pfl.federated.state import State, split_personal, weighted_average


class GlobalAndPersonal(Algorithm):
    """One global model averaged over the sampled clients' uploads and one personal model per client (module
    docstring): :class:`pfl.algorithms.ditto.Ditto`, :class:`pfl.algorithms.pfedme.PFedMe`,
    :class:`pfl.algorithms.apfl.APFL`. Subclasses define :meth:`make_update` and ``configure_fit``.

    Raises:
        ValueError: the clients' architectures differ.
    """

    tasks = ("classification", "viewport")
    state_attributes = ("global_state", "personal")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        self.global_state: State = ctx.init_states[ctx.single_spec(self.name)]
        self.personal = ctx.new_store()  # each client's personal model, from the initial model
        self.update = self.make_update(ctx.update) if ctx.update else None

    def make_update(self, base: SGDUpdate) -> SGDUpdate:
        """The clients' local update built on the run's ``base``: it returns the trained global copy with the personal
        model under :data:`pfl.federated.state.PERSONAL`."""
        raise NotImplementedError

    @property
    def local_update(self) -> SGDUpdate:
        return self.update

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        for r in results:
            self.personal[r.client_id] = split_personal(r.state)[1]
        avg = weighted_average([self.upload(r) for r in results], [r.num_samples for r in results])
        self.global_state = {**self.global_state, **self.server_mix(avg)}

    def server_mix(self, avg: State) -> State:
        """The new global entries from the uploads' average ``avg`` (its float entries; default: ``avg`` itself)."""
        return avg

    def upload(self, result: FitRes) -> State:
        """The trained global copy: the result without its personal entries (the personal model never travels)."""
        return split_personal(result.state)[0]

    def personalized_state(self, client_id: int) -> State:
        return self.personal[client_id]
