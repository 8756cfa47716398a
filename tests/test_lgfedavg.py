"""LG-FedAvg (PFLlib serverlg.py / clientlg.py): the head parameters are averaged, the base and every buffer stay each
client's own; hand-computed on a tiny split model (its round trip and templates: tests/test_fedper.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pfl.algorithms.lgfedavg import LGFedAvg
from pfl.federated.local import FitRes
from pfl.federated.state import model_state
from test_fedper import BASE_PARAMS, BUFFERS, HEAD_PARAMS, context, filled, tiny_split_model


def test_lgfedavg_averages_the_head_and_keeps_bases_and_buffers_per_client():
    model = tiny_split_model()
    init = model_state(model)
    algo = LGFedAvg(context(3, model))
    assert algo.shared_keys == HEAD_PARAMS  # PFLlib's serverlg.py:13 / :91: the global model is the head

    ins = algo.configure_fit(2, rnd=1)
    assert all(torch.equal(ins.state[k], init[k]) for k in init) and list(ins.sent) == HEAD_PARAMS

    # clients 0 (2 samples) and 2 (6 samples) upload; client 1 is not sampled
    s0, s2 = filled(init, 2.0, 4), filled(init, -2.0, 8)
    results = [FitRes(0, s0, 2, torch.tensor(0.0)), FitRes(2, s2, 6, torch.tensor(0.0))]
    assert list(algo.upload(results[1])) == HEAD_PARAMS  # comm/bytes_up: the head only
    algo.aggregate_fit(1, results)

    # head parameters: (2 * 2.0 + 6 * -2.0) / (2 + 6) = (4 - 12) / 8 = -1.0, the same for every client
    for cid in range(3):
        p = algo.personalized_state(cid)
        assert sorted(p) == sorted(init)
        for k in HEAD_PARAMS:
            assert torch.equal(p[k], torch.full_like(init[k], -1.0)), (cid, k)
    # base parameters and buffers are each client's own: 2.0 / 4 and -2.0 / 8; client 1 keeps the initial ones
    for cid, own in ((0, s0), (1, init), (2, s2)):
        p = algo.personalized_state(cid)
        for k in BASE_PARAMS + BUFFERS:
            assert torch.equal(p[k], own[k]), (cid, k)
    # a client that was not sampled starts round 2 from its initial base with the global head
    ins = algo.configure_fit(1, rnd=2)
    assert torch.equal(ins.state["base.0.weight"], init["base.0.weight"])
    assert torch.equal(ins.state["head.bias"], torch.full_like(init["head.bias"], -1.0))
    assert list(ins.sent) == HEAD_PARAMS


def test_lgfedavg_needs_a_head():
    with pytest.raises(ValueError, match="head"):
        LGFedAvg(context(2, nn.Linear(1, 1)))
