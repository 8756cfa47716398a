"""FedPAC (Xu, Tong & Huang, "Personalized Federated Learning with Feature Alignment and Classifier Collaboration",
ICLR 2023), with PFLlib's semantics (TsingZ0/PFLlib ``system/flcore/servers/serverpac.py``,
``system/flcore/clients/clientpac.py``, ``system/main.py``; commit d832e76).

The model is split as PFLlib's ``BaseHeadSplit`` splits it for FedPAC (``main.py:285-289``: ``model.fc`` is the head,
the rest the base): the personal part is the last Linear of pfl's head (:func:`pfl.federated.partial.personal_layer`,
``head.2`` for the CNN) and the features are that layer's input (512-d for the CNN).

Client side, every sampled client's round (:class:`AlignedSGD`):

1. statistics of the received global base on the client's train split (``clientpac.py:105-108`` computes them in
   ``set_parameters``, i.e. at ``send_models``, before training; ``clientpac.py:137-187``): with ``p_k`` the share of
   class k, ``mu_k`` the mean feature of class k and ``n`` the train samples,
   ``V = (sum_k p_k mean_k ||f||^2 - p_k^2 ||mu_k||^2) / n`` and ``h_k = p_k mu_k`` (K, d);
2. one epoch of SGD on the head alone, the base frozen, on the plain task loss (``clientpac.py:32-51``);
3. ``local_epochs`` epochs of SGD on the base alone, the head frozen, on the task loss plus
   ``lamda * MSE(features, c_y)``, ``c_y`` the latest global centroid of the sample's label; a sample whose label
   has no centroid contributes zero to the MSE but still counts in its mean over the batch's B x d entries; no
   alignment term before the first centroids exist (``clientpac.py:53-86``);
4. the trained model's class centroids: the mean feature per class on the train split (``clientpac.py:114-134``).

Server side (``serverpac.py:34-72``): the global base is the sample-weighted average of the uploaded bases'
parameters (``serverbase.py:138-150``); the global centroids become the unweighted mean, over this round's clients that
hold the class, of their centroids (``serverpac.py:178-193``), replacing the previous ones (classes no client of this
round holds get none) and sent to every client; for each uploaded client i the server solves the QP
(``serverpac.py:197-248``)

    min_a a^T P_i a  s.t.  sum a = 1, a >= 0,   P_i = diag(V) + D_i,   D_i[j, l] = sum_k (h_ik - h_jk) . (h_ik - h_lk)

over the round's clients j, l (``P_i`` is first replaced by its eigen-expansion over eigenvalues >= 0.01 when it has
a negative one), zeroes weights <= 1e-3 without renormalizing (``serverpac.py:242``), and sets client i's head to
``sum_j a_j head_j`` of the uploaded (trained) heads (``serverpac.py:152-174``). The QP is solved with cvxpy and its
OSQP solver, as PFLlib's ``prob.solve()`` picks by default (cvxpy 1.9.3, pinned in ``constraints.txt``).

``personalized_state(c)``: the latest global base (parameters) with client c's own buffers and its combined head from
the last round it took part in (the trained model's other entries; the initial model until it is first sampled): the
model PFLlib evaluates after ``send_models`` (``serverpac.py:37-49``).

Buffer policy (BatchNorm): running statistics and ``num_batches_tracked`` stay each client's own, never averaged nor
sent (PFLlib's ``set_parameters`` and aggregation touch parameters only); both training phases run in training mode
so the statistics move in both; the statistics and centroids are computed in evaluation mode.

Knob: ``lamda`` (PFLlib's ``-lam``, default 1.0, ``main.py:447``), searched over [0.01, 10] (log; PFLlib ships no
range).

Differences from PFLlib, deliberate:

* PFLlib's ``receive_models`` (``serverpac.py:129-150``) lists the uploads in a random order (``random.sample``)
  while ``V`` and ``h`` stay in selection order (``serverpac.py:40-44``), so the QP's weights, computed for the i-th
  selected client, are applied to the i-th upload's heads and given to the i-th uploaded client; here every
  client's weights, statistics and head are matched by client id.
* PFLlib's ``set_head`` writes each new head into the live head that later clients' combinations read
  (``uploaded_heads`` holds the client models' heads, ``serverpac.py:148,164``), so later clients combine partly
  combined heads; here every combination reads the heads as uploaded.
* When the QP has no solution PFLlib gives client i ``uploaded_heads[cid]`` (indexing a list by client id,
  ``serverpac.py:162``); here the client keeps its own trained head. With the eigenvalue clean-up in float64
  (``numpy.linalg.eigh``) the QP is convex, so this happens only if the solver fails.
* Statistics and centroids cover the client's whole train split in evaluation mode; PFLlib's read a shuffled
  ``DataLoader(drop_last=True)`` (a random last partial batch left out, and the class shares of ``V`` and ``h`` from
  another pass than the features, ``clientpac.py:140-173``), in whatever mode the model was left.
* The two training phases draw their batch orders from two seeded generators (PFLlib's one shuffling DataLoader
  continues); the round's ``train/loss`` is the mean minibatch loss over both phases, the alignment term included.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from torch import nn

from pfl.algorithms.fedrep import RepresentationSGD
from pfl.data.loader import DeviceData
from pfl.federated.base import FederatedContext, HyperParams, SearchParam
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.federated.partial import PartialSharing, outside_personal_layer, personal_layer, personal_layer_inputs, under
from pfl.federated.state import State, param_keys

STATS = "fedpac/"  # prefix of the client's statistics and centroids in its result ("/" never occurs in state keys)
EPS = 1e-3  # weights at most this are zeroed (serverpac.py:235,242)
MIN_EIGENVALUE = 0.01  # eigenvalues kept by the clean-up of a non-PSD P (serverpac.py:229)
FEATURE_CHUNK = 1024  # samples per forward pass of the statistics (any size gives the same values up to rounding)


class FedPACParams(HyperParams):
    """FedPAC's knobs."""

    lamda: float = Field(1.0, ge=0)
    """Weight of the feature-alignment MSE (PFLlib's ``-lam``, default 1.0); 0 turns the alignment off."""


def class_features(model: nn.Module, data: DeviceData, indices: torch.Tensor,
                   num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class feature sums of ``model`` on ``indices`` (evaluation mode, no augmentation), the features being the
    input of its final Linear (:func:`pfl.federated.partial.personal_layer_inputs`).

    Returns:
        ``(counts, sums, sq)``: samples per class (K,) float32, feature sums (K, d) and sums of squared feature
        norms (K,).
    """
    model.eval()
    with torch.no_grad(), personal_layer_inputs(model) as captured:
        for i in range(0, len(indices), FEATURE_CHUNK):
            model(data.batch(indices[i:i + FEATURE_CHUNK])[0])
    feats = torch.cat(captured).float()
    labels = data.targets[indices]
    counts = torch.zeros(num_classes, device=feats.device).index_add_(0, labels, torch.ones_like(labels,
                                                                                                 dtype=torch.float32))
    sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, labels, feats)
    sq = torch.zeros(num_classes, device=feats.device).index_add_(0, labels, (feats * feats).sum(1))
    return counts, sums, sq


def statistics(counts: torch.Tensor, sums: torch.Tensor, sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PFLlib's ``statistics_extraction`` (``clientpac.py:169-187``) from per-class sums: ``(V, h)``, ``V`` a 0-d
    tensor (the feature variance term divided by the train samples), ``h`` (K, d) the class shares times the class
    means."""
    n = counts.sum()
    present = counts > 0
    safe = counts.clamp(min=1)
    py = counts / n
    mu = sums / safe[:, None]
    v = torch.where(present, py * sq / safe - py * py * (mu * mu).sum(1), torch.zeros_like(py)).sum()
    h = py[:, None] * mu  # zero rows for absent classes
    return v / n, h


def head_weights(v: np.ndarray, h: np.ndarray, i: int) -> np.ndarray | None:
    """Client i's combination weights of the round's m heads (``serverpac.py:197-248``): the QP of the module docstring
    for statistics ``v`` (m,) and ``h`` (m, K, d), in float64; ``None`` when the solver finds no optimum."""
    m = len(v)
    if m == 1:
        return np.ones(1)  # the only feasible point
    diffs = (h[i][None] - h).reshape(m, -1)  # (m, K d): h_i - h_j, flattened
    p = np.diag(v) + diffs @ diffs.T  # D[j, l] = sum_k (h_ik - h_jk) . (h_ik - h_lk): trace of the outer products
    p = (p + p.T) / 2
    evals, evecs = np.linalg.eigh(p)
    if evals.min() < 0:  # serverpac.py:223-231: keep the eigenpairs with eigenvalue >= 0.01
        keep = evals >= MIN_EIGENVALUE
        p = (evecs[:, keep] * evals[keep]) @ evecs[:, keep].T
        p = (p + p.T) / 2
    import cvxpy as cvx  # imported here: only FedPAC's server needs it

    alpha = cvx.Variable(m)
    problem = cvx.Problem(cvx.Minimize(cvx.quad_form(alpha, cvx.psd_wrap(p))), [cvx.sum(alpha) == 1.0, alpha >= 0])
    problem.solve(solver=cvx.OSQP)
    if problem.status not in ("optimal", "optimal_inaccurate") or alpha.value is None:
        return None
    a = np.asarray(alpha.value, dtype=np.float64)
    return np.where(a > EPS, a, 0.0)


class AlignedSGD(RepresentationSGD):
    """FedPAC's local update (module docstring, steps 1-4): the statistics of the received model, FedRep's two phases
    (one head epoch, then ``local_epochs`` of the base) with the alignment term added to the base phase's loss, then the
    trained model's centroids.

    Returns the trained state plus, under the prefix ``"fedpac/"``: ``V`` (0-d), ``h`` (K, d), ``protos`` (K, d)
    and ``counts`` (K,) (centroids of classes with a zero count are zero).

    Args:
        base: the run's local update.
        personal: module path of the personal layer.
        lamda: weight of the alignment MSE.
        num_classes: K.
    """

    def __init__(self, base: SGDUpdate, personal: str, lamda: float, num_classes: int):
        super().__init__(base, 1, personal)  # clientpac.py:37-51: one pass over the data for the head
        self.lamda = lamda
        self.num_classes = num_classes
        self._rep: torch.Tensor | None = None  # the input of the personal layer in the latest forward pass
        self._centroids: tuple[torch.Tensor, torch.Tensor] | None = None  # the round's (protos, has) on the device

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ins: FitIns) -> torch.Tensor:
        """Task loss, plus ``lamda`` times the MSE of the features against the centroids of their labels
        (``clientpac.py:68-78``); only the base phase runs this (the head phase is a plain :class:`SGDUpdate`)."""
        out = model(x)
        loss = self.loss_fn(out, y)
        if self._centroids is None:  # no centroid yet (clientpac.py:72: global_protos is None)
            return loss
        protos, has = self._centroids
        rep = self._rep.flatten(1)
        target = torch.where(has[y][:, None], protos[y], rep.detach())  # no centroid: the feature itself
        return loss + nn.functional.mse_loss(target, rep) * self.lamda

    def fit(self, model: nn.Module, data: DeviceData, ins: FitIns, indices: torch.Tensor,
            seed: int) -> tuple[State, torch.Tensor]:
        layer = model.get_submodule(self.personal)
        v, h = statistics(*class_features(model, data, indices, self.num_classes))
        protos, has = ins.extras.get("protos"), ins.extras.get("has")
        if protos is not None and bool(has.any()):
            self._centroids = (protos.to(data.device), has.to(data.device))
        hook = layer.register_forward_pre_hook(lambda _m, args: setattr(self, "_rep", args[0]))
        try:
            trained, loss = super().fit(model, data, ins, indices, seed)
        finally:
            hook.remove()
            self._rep = self._centroids = None
        counts, sums, _ = class_features(model, data, indices, self.num_classes)
        protos = sums / counts.clamp(min=1)[:, None]
        extra = {"V": v, "h": h, "protos": protos, "counts": counts}
        return {**trained, **{STATS + k: t.detach().cpu() for k, t in extra.items()}}, loss


class FedPAC(PartialSharing):
    """Averaged base with feature alignment to global class centroids; each client's head is the QP-optimal
    combination of the round's trained heads (module docstring).

    Raises:
        ValueError: the clients' architectures differ, or the head does not end with a Linear.
    """

    name = "fedpac"
    Params = FedPACParams
    search_space = {"lamda": SearchParam("float", 0.01, 10.0, log=True)}
    tasks = ("classification",)
    state_attributes = ("global_state", "own", "centroids")

    def __init__(self, ctx: FederatedContext, **hparams):
        super().__init__(ctx, **hparams)
        model = ctx.runner.models[ctx.single_spec(self.name)]
        self.personal = personal_layer(model)
        self.head_keys = under(param_keys(model), self.personal)
        num_classes = ctx.single_spec(self.name).num_classes
        dim = model.get_submodule(self.personal).in_features
        # the latest global centroids (K, d) and which classes have one (none before the first round)
        self.centroids: State = {"protos": torch.zeros(num_classes, dim),
                                 "has": torch.zeros(num_classes, dtype=torch.bool)}
        self.update = AlignedSGD(ctx.update, self.personal, self.hp.lamda, num_classes) if ctx.update else None

    @classmethod
    def shares(cls, model: nn.Module) -> list[str]:
        """The base: every parameter outside the personal layer (buffers never travel)."""
        return outside_personal_layer(model)

    @property
    def local_update(self) -> AlignedSGD:
        return self.update

    def configure_fit(self, client_id: int, rnd: int) -> FitIns:
        ins = super().configure_fit(client_id, rnd)
        ins.extras = {"protos": self.centroids["protos"], "has": self.centroids["has"]}
        return ins

    def aggregate_fit(self, rnd: int, results: list[FitRes]) -> None:
        models = [FitRes(r.client_id, {k: t for k, t in r.state.items() if not k.startswith(STATS)}, r.num_samples,
                         r.loss) for r in results]
        stats = [{k[len(STATS):]: t for k, t in r.state.items() if k.startswith(STATS)} for r in results]
        super().aggregate_fit(rnd, models)  # each client's trained model as its own; the base averaged
        self.centroids = self._aggregate_centroids(stats)
        v = np.array([s["V"].double().item() for s in stats])
        h = np.stack([s["h"].double().numpy() for s in stats])
        heads = [{k: m.state[k] for k in self.head_keys} for m in models]  # as uploaded, before any is replaced
        for i, m in enumerate(models):
            a = head_weights(v, h, i)
            if a is None:
                continue  # the client keeps its own trained head
            combined = {k: sum(float(w) * head[k] for w, head in zip(a, heads)) for k in self.head_keys}
            self.own[m.client_id] = {**m.state, **{k: t.to(m.state[k].dtype) for k, t in combined.items()}}

    def _aggregate_centroids(self, stats: list[State]) -> State:
        """The unweighted mean over clients holding each class of their centroids (``serverpac.py:178-193``)."""
        protos = torch.zeros_like(self.centroids["protos"])
        holders = torch.zeros(len(protos))
        for s in stats:
            present = s["counts"] > 0
            protos[present] += s["protos"][present]
            holders += present.float()
        has = holders > 0
        protos[has] /= holders[has][:, None]
        return {"protos": protos, "has": has}

    def upload(self, result: FitRes) -> State:
        """The base's parameters, the trained head, the statistics and the centroids of the classes the client
        holds."""
        s = result.state
        present = s[STATS + "counts"] > 0
        return {**{k: s[k] for k in self.shared_keys + self.head_keys}, STATS + "V": s[STATS + "V"],
                STATS + "h": s[STATS + "h"], STATS + "protos": s[STATS + "protos"][present]}
