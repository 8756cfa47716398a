"""FedPAC (PFLlib semantics): the client's statistics, the aligned local update, the server's QP head combination,
the averaged base and the unweighted class centroids, against hand-computed cases."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from _tiny import PERSONAL_LAYER_APART, aggregation_context, as_fedavg, deep_head_model, template_and_fedavg, uniform
from pfl.algorithms import REGISTRY
from pfl.algorithms.fedpac import STATS, AlignedSGD, FedPAC, class_features, head_weights, statistics
from pfl.federated.local import FitIns, FitRes, SGDUpdate
from pfl.models.split import SplitModel


class _Data(SimpleNamespace):
    def batch(self, idx, gen=None):
        return self.x[idx], self.targets[idx]


def _algo(num_clients: int = 3) -> FedPAC:
    return FedPAC(aggregation_context(deep_head_model(), num_clients))


def test_statistics_are_pfllibs_v_and_h():
    # features are the inputs (identity base): class 0: (1, 0), (3, 0); class 1: (0, 2); n = 3
    model = SplitModel(nn.Identity(), nn.Linear(2, 2))
    data = _Data(x=torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]), targets=torch.tensor([0, 1, 0]))
    counts, sums, sq = class_features(model, data, torch.arange(3), 2)
    assert counts.tolist() == [2.0, 1.0] and sums.tolist() == [[4.0, 0.0], [0.0, 2.0]] and sq.tolist() == [10.0, 4.0]
    v, h = statistics(counts, sums, sq)
    # p = (2/3, 1/3), mu = ((2, 0), (0, 2)), mean ||f||^2 = (5, 4):
    # V = (2/3 * 5 - 4/9 * 4 + 1/3 * 4 - 1/9 * 4) / 3 = (22/9) / 3 = 22/27; h = p_k mu_k
    assert v.item() == pytest.approx(22 / 27)
    assert torch.allclose(h, torch.tensor([[4 / 3, 0.0], [0.0, 2 / 3]]))
    # an absent class has a zero row and adds nothing
    v3, h3 = statistics(torch.cat([counts, torch.zeros(1)]), torch.cat([sums, torch.zeros(1, 2)]),
                        torch.cat([sq, torch.zeros(1)]))
    assert v3.item() == pytest.approx(22 / 27) and h3[2].tolist() == [0.0, 0.0]


def test_head_weights_solve_pfllibs_quadratic_program():
    # two clients, V = (1, 1), ||h_0 - h_1||^2 = 2: for client 0, P = diag(1, 1 + 2), and
    # min a^2 + 3 (1 - a)^2 gives a = 3/4; client 1 symmetrically (1/4, 3/4)
    v = np.array([1.0, 1.0])
    h = np.array([[[1.0], [0.0]], [[0.0], [1.0]]])
    assert head_weights(v, h, 0) == pytest.approx([0.75, 0.25], abs=1e-4)
    assert head_weights(v, h, 1) == pytest.approx([0.25, 0.75], abs=1e-4)
    # equal h: P = diag(V), a proportional to 1 / V; the third weight (about 5e-7) is zeroed, not renormalized
    a = head_weights(np.array([1.0, 1.0, 1e6]), np.zeros((3, 2, 1)), 0)
    assert a == pytest.approx([0.5, 0.5, 0.0], abs=1e-4) and a[2] == 0.0
    assert head_weights(np.array([5.0]), np.zeros((1, 2, 1)), 0).tolist() == [1.0]  # alone: its own head


def _result(algo, cid, value, n, v, h, protos, counts):
    state = uniform(algo.ctx.init_state(0), value, PERSONAL_LAYER_APART)
    state |= {STATS + "V": torch.tensor(v), STATS + "h": torch.tensor(h), STATS + "protos": torch.tensor(protos),
              STATS + "counts": torch.tensor(counts)}
    return FitRes(cid, state, n, torch.tensor(0.0))


def test_aggregate_averages_base_combines_heads_and_averages_centroids():
    algo = _algo()
    like = algo.ctx.init_state(0)
    assert algo.personal == "head.2" and algo.head_keys == ["head.2.weight", "head.2.bias"]
    assert algo.shared_keys == ["base.0.weight", "base.0.bias", "base.1.weight", "base.1.bias",
                                "head.0.weight", "head.0.bias"]
    assert algo.configure_fit(0, 1).extras["has"].tolist() == [False, False]  # no centroid before round 1
    r0 = _result(algo, 0, 1.0, 1, 1.0, [[1.0], [0.0]], [[2.0], [0.0]], [3.0, 0.0])
    r2 = _result(algo, 2, 4.0, 3, 1.0, [[0.0], [1.0]], [[4.0], [6.0]], [1.0, 2.0])
    algo.aggregate_fit(1, [r0, r2])
    base = (1.0 * 1 + 4.0 * 3) / 4  # 3.25: sample-weighted
    # heads: client 0 gets 3/4 * 1.5 + 1/4 * 4.5 = 2.25; client 2 gets 1/4 * 1.5 + 3/4 * 4.5 = 3.75 (QP above)
    for cid, own, head in ((0, 1.0, 2.25), (2, 4.0, 3.75)):
        p = algo.personalized_state(cid)
        assert list(p) == list(like)
        for k in algo.shared_keys:
            assert torch.equal(p[k], torch.full_like(like[k], base)), (cid, k)
        for k in algo.head_keys:
            assert torch.allclose(p[k], torch.full_like(like[k], head), atol=1e-3), (cid, k)
        for k in ("base.1.running_mean", "base.1.running_var"):  # buffers: the client's own
            assert torch.equal(p[k], torch.full_like(like[k], own)), (cid, k)
        assert not any(k.startswith(STATS) for k in p)
    p1 = algo.personalized_state(1)  # never sampled: initial head, the new base
    assert all(torch.equal(p1[k], like[k]) for k in algo.head_keys)
    # centroids: the unweighted mean over the clients holding the class: class 0 (2 + 4) / 2, class 1 client 2's
    assert algo.centroids["protos"].tolist() == [[3.0], [6.0]] and algo.centroids["has"].tolist() == [True, True]
    ins = algo.configure_fit(1, 2)
    assert ins.extras["protos"].tolist() == [[3.0], [6.0]] and set(ins.sent) == set(algo.shared_keys)
    up = algo.upload(r0)
    assert set(up) == set(algo.shared_keys + algo.head_keys) | {STATS + "V", STATS + "h", STATS + "protos"}
    assert up[STATS + "protos"].tolist() == [[2.0]]  # only the classes it holds
    # a later round whose clients hold only class 1: class 0 has no centroid any more (replaced, serverpac.py:60)
    algo.aggregate_fit(2, [_result(algo, 1, 2.0, 2, 1.0, [[0.0], [1.0]], [[0.0], [8.0]], [0.0, 2.0])])
    assert algo.centroids["has"].tolist() == [False, True] and algo.centroids["protos"][1].item() == 8.0


def test_local_update_trains_head_then_base_with_alignment():
    """One sample x = 1 of label 0, batch 1, lr 1, squared task loss, f(x) = w2 * (w1 * x), features w1 * x."""
    model = SplitModel(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False))
    data = _Data(x=torch.tensor([[1.0]]), targets=torch.tensor([0]), device=torch.device("cpu"))
    run = SGDUpdate(batch_size=1, lr=1.0, local_epochs=1, loss_fn=lambda out, y: 0.5 * ((out - y) ** 2).sum())
    update = AlignedSGD(run, "head", lamda=1.0, num_classes=1)

    def fit(protos, has):
        with torch.no_grad():
            model.base.weight.fill_(2.0)
            model.head.weight.fill_(3.0)
        ins = FitIns({}, extras={"protos": torch.tensor([[protos]]), "has": torch.tensor([has])})
        return update.fit(model, data, ins, torch.tensor([0]), seed=0)

    state, loss = fit(5.0, True)
    # statistics of the received model: feature 2, one class: V = (4 - 4) / 1 = 0, h = 1 * 2
    assert state[STATS + "V"].item() == 0.0 and state[STATS + "h"].tolist() == [[2.0]]
    # head phase (plain loss): out = 6, dL/dw2 = 6 * 2 = 12 -> w2 = -9, loss 18
    # base phase: out = -18, loss 162 + (5 - 2)^2 = 171, dL/dw1 = 162 - 2 (5 - 2) = 156 -> w1 = -154
    assert state["head.weight"].item() == -9.0 and state["base.weight"].item() == -154.0
    assert loss.item() == pytest.approx((18 + 171) / 2)
    # centroid of the trained model: -154; count 1
    assert state[STATS + "protos"].tolist() == [[-154.0]] and state[STATS + "counts"].tolist() == [1.0]
    assert all(p.requires_grad for p in model.parameters())
    state, loss = fit(5.0, False)  # no centroid for the label: FedRep's update, w1 = 2 - 162
    assert state["base.weight"].item() == -160.0 and loss.item() == pytest.approx((18 + 162) / 2)


def test_knobs_default_to_pfllibs():
    assert FedPAC.Params().lamda == 1.0  # main.py:447 -lam 1.0
    with pytest.raises(ValueError):
        FedPAC.Params(lamda=-1.0)
    assert set(FedPAC.search_space) == {"lamda"}


@pytest.mark.parametrize("name", ["fedpac_cifar10_pr0.2.yaml", "fedpac_cifar10_cpu.yaml"])
def test_fedpac_templates_are_the_fedavg_setting(name):
    cfg, fedavg = template_and_fedavg(name)
    assert cfg.algo == "fedpac" and REGISTRY[cfg.algo] is FedPAC and cfg.hparams == {"lamda": 1.0}
    assert as_fedavg(cfg) == fedavg
