"""MocoSFL and its SwAV variant: the shared key queue's order, InfoNCE by hand, the clients' gradient slices, the
vmapped client stems, SGD and the cosine schedule against PyTorch's, Sinkhorn's marginals, the CLI acceptance run
of both CPU templates, exact resumption of the SwAV variant and one-line errors; against the official code
recomputed by hand: a whole MoCo step (symmetric loss, what is enqueued, when the momentum encoders move), the
stems' sync schedule, SwAV's loss (queue, frozen prototypes), its head's BatchNorm over all crops, its color
jitter and queue start, and prototypes drawn from their own generator."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pfl.algorithms.mocosfl import KeyQueue, cosine_lr, infonce, server_backward, sgd_step

ROOT = Path(__file__).resolve().parents[1]


def test_the_queue_overwrites_the_oldest_keys_in_order_and_wraps_around():
    queue = KeyQueue(5, 2, torch.Generator().manual_seed(0))
    first = torch.arange(6.0).view(3, 2)
    queue.enqueue(first)
    assert torch.equal(queue.keys[:3], first) and queue.ptr == 3
    second = 10 + torch.arange(8.0).view(4, 2)
    queue.enqueue(second)  # rows 3, 4, then wraps to 0, 1
    assert torch.equal(queue.keys[3:], second[:2]) and torch.equal(queue.keys[:2], second[2:])
    assert torch.equal(queue.keys[2], first[2]) and queue.ptr == 2


def test_infonce_against_the_formula():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.0, 2.0]])  # normalized: similarity 0 with the query
    queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # similarities 1 and 0
    t = 0.5
    expected = -math.log(math.exp(0 / t) / (math.exp(0 / t) + math.exp(1 / t) + math.exp(0 / t)))
    assert infonce(q, k, queue, t).item() == pytest.approx(expected, rel=1e-6)


def test_gradient_slices_equal_each_clients_own_gradients():
    """Three clients' query activations go through one server trunk and one InfoNCE over the concatenation; the slice
    each client gets back equals the gradient of its own activations in a graph that runs them alone, scaled by
    its share of the batch (the concatenated loss is a mean over all samples)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(12, 8))
    queue = KeyQueue(16, 8, torch.Generator().manual_seed(1)).keys
    acts = [torch.randn(n, 3, 2, 2) for n in (2, 1, 3)]
    keys = [torch.randn(n, 8) for n in (2, 1, 3)]
    all_keys = torch.cat(keys)
    loss, (grad,) = server_backward([torch.cat(acts)], lambda xs: infonce(trunk(xs[0]), all_keys, queue, 0.1))
    total = sum(len(a) for a in acts)
    for a, k, g in zip(acts, keys, grad.split([len(a) for a in acts])):
        own = a.clone().requires_grad_()
        (infonce(trunk(own), k, queue, 0.1) * len(a) / total).backward()
        torch.testing.assert_close(g, own.grad)
    assert loss.ndim == 0 and trunk[1].weight.grad is not None


def test_vmapped_client_stems_give_each_client_its_own_parameter_gradients():
    """MocoSFL runs the cohort's stems as one vmapped call on stacked parameters (C, ...); each client's slice of
    the stacked gradient equals the gradient of its own stem run alone on its own batch."""
    from torch.func import functional_call, vmap

    from pfl.models.resnet_sfl import MocoSFLResNet18, split

    torch.manual_seed(0)
    stem = split(MocoSFLResNet18(width=0.25).double(), 2)[0]  # fp64: the comparison is not of float rounding
    clients = [{k: v.detach() + 0.01 * c * torch.randn_like(v) for k, v in stem.named_parameters()} for c in range(3)]
    stacked = {k: torch.stack([p[k] for p in clients]).requires_grad_() for k in clients[0]}
    x, g = torch.randn(3, 2, 3, 8, 8, dtype=torch.float64), torch.randn(3, 2, 16, 8, 8, dtype=torch.float64)
    out = vmap(lambda p, xb: functional_call(stem, p, (xb,)))(stacked, x)
    out.backward(g)
    for c, params in enumerate(clients):
        own = {k: v.clone().requires_grad_() for k, v in params.items()}
        alone = functional_call(stem, own, (x[c],))
        alone.backward(g[c])
        torch.testing.assert_close(out[c], alone)
        for k in own:
            torch.testing.assert_close(stacked[k].grad[c], own[k].grad)


def test_sgd_step_and_cosine_schedule_equal_pytorchs():
    torch.manual_seed(0)
    ours = torch.randn(4)
    theirs = nn.Parameter(ours.clone())
    frozen = nn.Parameter(torch.randn(2))  # no gradient: untouched, as PyTorch leaves it
    opt = torch.optim.SGD([theirs, frozen], lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
    buffers, frozen_ours = [torch.zeros(4), torch.zeros(2)], frozen.detach().clone()
    for rnd in range(1, 6):
        grad = torch.randn(4)
        assert cosine_lr(0.1, rnd, 5) == pytest.approx(opt.param_groups[0]["lr"])
        theirs.grad = grad.clone()
        opt.step()
        sgd_step([ours, frozen_ours], [grad, None], buffers, cosine_lr(0.1, rnd, 5), 0.9, 5e-4)
        sched.step()
        torch.testing.assert_close(ours, theirs.detach())
    assert torch.equal(frozen_ours, frozen.detach())


def test_sinkhorn_codes_have_the_prescribed_marginals():
    """SwAV's codes as pfl computes them (lightly's Sinkhorn-Knopp on cosine scores): every sample's code is a
    distribution over the prototypes, and the prototypes share the batch equally (B / K each)."""
    from pfl._torchvision import import_torchvision

    import_torchvision()
    from lightly.loss.swav_loss import sinkhorn

    gen = torch.Generator().manual_seed(0)
    z = nn.functional.normalize(torch.randn(64, 16, generator=gen), dim=1)
    prototypes = nn.functional.normalize(torch.randn(8, 16, generator=gen), dim=1)
    codes = sinkhorn(z @ prototypes.T, iterations=50, epsilon=0.05)
    torch.testing.assert_close(codes.sum(1), torch.ones(64))
    torch.testing.assert_close(codes.sum(0), torch.full((8,), 64 / 8), rtol=0, atol=1e-3)
    # unnormalized features overflow exp(score / epsilon) in fp32: NaN codes (one reason a SwAV run cannot learn)
    assert torch.isnan(sinkhorn(10 * (z @ prototypes.T), iterations=3, epsilon=0.05)).any()


def _template(name: str, data_dir, tmp_path, *extra: str) -> list[str]:
    return ["train", "--config", str(ROOT / "configs" / f"{name}_cifar10_cpu.yaml"), "--no-progress",
            "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", f"data_dir={data_dir}", f"cache_dir={tmp_path}",
            "num_clients=5", "global_rounds=1", "steps_per_round=2", "batch_size=4", "queue_size=64",
            "linear_epochs=1", "num_threads=1", *extra]


@pytest.mark.parametrize("template", ["mocosfl", "swavsfl"])
def test_cpu_template_logs_knn_and_linear_accuracy_stems_and_the_trunk(template, cifar10_dir, tmp_path, capsys):
    """The acceptance run (on a slice of CIFAR-10, shortened): ``test/knn_acc`` and ``test/linear_acc`` (mean and
    std over clients), each client's file holds its stem only, the server's trunk is logged once, and
    ``load_client_model`` composes them into the evaluated model."""
    import mlflow
    from safetensors.torch import load_file

    from pfl import tracking
    from pfl.cli import main
    from pfl.data.transforms import ImageTransform
    from pfl.models import input_normalization
    from pfl.models.resnet_sfl import client_entries

    assert main(_template(template, cifar10_dir, tmp_path)) == 0
    run = next(r for r in mlflow.search_runs(experiment_names=["pfl"], output_format="list")
               if r.data.tags.get("pfl.kind") == "fl")
    metrics = run.data.metrics
    for name in ("test/knn_acc", "test/knn_acc_std", "test/linear_acc", "test/linear_acc_std", "comm/bytes_up",
                 "memory/client_param_bytes", "memory/client_activation_bytes"):
        assert name in metrics, name
    assert 0 <= metrics["test/knn_acc"] <= 1 and 0 <= metrics["test/linear_acc"] <= 1
    assert run.info.run_name.startswith(template)
    files = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "art"))
    trunk = load_file(f"{files}/server/backbone.safetensors")
    stem = load_file(f"{files}/clients/client_003/artifacts/model.safetensors")
    assert list(stem) == client_entries(list(stem) + list(trunk), 1) and stem and trunk
    assert not set(stem) & set(trunk)
    model = tracking.load_client_model(run.info.run_id, 3)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in {**trunk, **stem}.items()) and len(state) == len(stem) + len(trunk)
    # its MLflow model joins stem and the run's trunk too, and returns the projection's embeddings
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    embeddings = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/clients/client_003").predict(images.numpy())
    with torch.no_grad():
        spec, _ = tracking.load_client_state(run.info.run_id, 3)
        expected = model(ImageTransform(32, *input_normalization(spec.name))(images)).numpy()
    assert embeddings.shape == expected.shape and embeddings.shape[0] == 3
    assert np.allclose(embeddings, expected, atol=1e-6)
    capsys.readouterr()
    heads = ["heads", "--run-id", run.info.run_id, "--method", "aph",
             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert main(heads) != 0  # head methods need a classifier: a one-line error, no head run
    assert "self-supervised" in capsys.readouterr().err


def test_swav_variant_resumes_exactly(cifar10_dir, tmp_path):
    from conftest import check_exact_resumption

    check_exact_resumption(cifar10_dir, tmp_path, "mocosfl", "loss=swav", "model=resnet18_sfl", "model_width=0.125",
                           "batch_size=4", "steps_per_round=2", "queue_size=16", "queue_start_round=1",
                           "num_prototypes=10", "linear_epochs=1", "crops=2x32,2x16")


@pytest.mark.parametrize(("override", "field"), [
    (["model=cnn"], "model=cnn"), (["crops=3x32"], "crops='3x32'"), (["crops=2x32,lots"], "crops="),
    (["batch_size=5000"], "batch_size=5000"), (["clients_per_step=9"], "clients_per_step=9"),
    (["queue_size=0"], "queue_size=0")])
def test_bad_settings_are_one_line_errors_before_any_run(override, field, cifar10_dir, tmp_path, capsys):
    from pfl.cli import main

    args = _template("mocosfl", cifar10_dir, tmp_path, *override)
    assert main(args) != 0
    err = capsys.readouterr().err.strip()
    assert field in err and "\n" not in err, err
    if (tmp_path / "mlflow.db").exists():  # nothing was started
        import mlflow

        assert not mlflow.search_runs(search_all_experiments=True, output_format="list")


def test_embedding_spread_is_zero_for_collapsed_embeddings_and_near_one_for_spread_ones():
    from pfl.algorithms.mocosfl import embedding_spread

    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, 64, generator=gen)
    collapsed = torch.randn(1, 64, generator=gen).expand(4096, 64) * torch.rand(4096, 1, generator=gen)
    assert embedding_spread(collapsed).item() == pytest.approx(0, abs=1e-6)
    assert embedding_spread(spread).item() == pytest.approx(1, abs=0.02)


# -- the algorithm's semantics against the official code, on tiny instances -------------------------------------


def _algorithm(cifar10_dir, tmp_path, *overrides: str):
    """A MocoSFL instance on the CIFAR-10 slice: 2 clients, all pooled, batches of 2, the 1/8-width network."""
    from pfl.config import load_config
    from pfl.train import build_algorithm, prepare

    cfg = load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", "algo=mocosfl", "model=resnet18_sfl",
                             "model_width=0.125", "num_clients=2", "partition=iid", "join_ratio=1.0", "global_rounds=4",
                             "batch_size=2", "device=cpu", "num_threads=1", "linear_epochs=0", *overrides])
    return build_algorithm(prepare(cfg), seed=0)


def _nudge(tensors, gen: torch.Generator) -> None:
    """Move each tensor by small Gaussian noise, in place (so that momentum copies differ from their online ones)."""
    with torch.no_grad():
        for t in tensors:
            t.add_(0.05 * torch.randn(t.shape, generator=gen))


def _official_contrastive_loss(server, target, query, pkey, queue, temperature):
    """The official ``contrastive_loss`` (sflmoco_functions.py): the online server on ``query``, the momentum server on
    ``pkey`` without gradient, positives first, the queue (K, D) as negatives; returns (loss, normalized keys)."""
    query_out = F.normalize(server(query), dim=1)
    with torch.no_grad():
        pkey_out = F.normalize(target(pkey), dim=1)
    logits = torch.cat([(query_out * pkey_out).sum(1, keepdim=True), query_out @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long)), pkey_out


def test_a_moco_step_equals_the_official_symmetric_compute_enqueue_and_momentum_updates(cifar10_dir, tmp_path):
    """One MoCo step of two clients against a plain-module re-computation of the official step (run_sflmoco.py's loop,
    ``create_sflmococlient_instance.forward`` and ``create_sflmocoserver_instance.compute``):

    * each client's momentum stem moves towards its online stem after the query forward and before the keys;
    * the server's momentum trunk moves before either key is computed, once per step;
    * the loss is ``L(S(q), T(k)) + L(S(k), T(q))`` against the pre-step queue, and the clients' gradient is the
      first term's (the second reads q through the momentum trunk only);
    * ``[T(q), T(k)]`` are enqueued in that order at the pointer, wrapping around the end;
    * clients and server then take one SGD step each.
    """
    from pfl.algorithms.mocosfl import _PoolStems, _Traffic

    m, lr, wd, t = 0.9, 0.1, 0.01, 0.2
    algo = _algorithm(cifar10_dir, tmp_path, "queue_size=10", f"momentum={m}", f"weight_decay={wd}",
                      f"temperature={t}")
    gen = torch.Generator().manual_seed(0)
    _nudge(algo.target_trunk.parameters(), gen)  # momentum copies that differ from the online ones
    for cid in (0, 1):
        stem = {k: v.clone() for k, v in algo.momentum_stems[cid].items()}
        _nudge(stem.values(), gen)
        algo.momentum_stems[cid] = stem
    algo.queue.ptr = 6  # the step's 2 x 4 keys fill rows 6..9, then wrap to 0..3
    pool, cohort = [0, 1], torch.arange(2)
    images = algo.ctx.runner.data.inputs[algo._batch_orders(1, pool, 1)[cohort, 0].flatten()]
    v1, v2 = (v.view(2, 2, *v.shape[1:]) for v in algo._draw_views(images, 1, 0))

    # the reference, on copies of the modules as they are before the step
    stem_module, trunk, target = (copy.deepcopy(x) for x in (algo.stem_module, algo.trunk, algo.target_trunk))
    online = [copy.deepcopy(stem_module) for _ in pool]
    momentum = [copy.deepcopy(stem_module) for _ in pool]
    for cid in pool:
        momentum[cid].load_state_dict({k.removeprefix("base."): v for k, v in algo.momentum_stems[cid].items()})
    queue_before = algo.queue.keys.clone()
    hidden_q, hidden_k = [], []
    for cid in pool:  # the client's forward: online output, then its momentum update, then the target's keys
        hidden_q.append(online[cid](v1[cid]))
        with torch.no_grad():
            for mo, on in zip(momentum[cid].parameters(), online[cid].parameters()):
                mo.copy_(m * mo + (1 - m) * on)
            hidden_k.append(momentum[cid](v2[cid]))
    query = torch.cat(hidden_q).detach().requires_grad_()
    pkey = torch.cat(hidden_k)
    with torch.no_grad():  # the server's momentum update, first thing in compute
        for tp, sp in zip(target.parameters(), trunk.parameters()):
            tp.copy_(m * tp + (1 - m) * sp)
    loss12, k2 = _official_contrastive_loss(trunk, target, query, pkey, queue_before, t)
    loss21, k1 = _official_contrastive_loss(trunk, target, pkey, query, queue_before, t)
    expected_queue = queue_before.clone()
    for i, key in enumerate(torch.cat([k1, k2])):  # the official _dequeue_and_enqueue, row by row
        expected_queue[(6 + i) % 10] = key
    server_opt = torch.optim.SGD(trunk.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    (loss12 + loss21).backward()
    server_opt.step()
    for cid, hidden, grad in zip(pool, hidden_q, query.grad.split(2)):
        hidden.backward(grad)
        torch.optim.SGD(online[cid].parameters(), lr=lr, momentum=0.9, weight_decay=wd).step()

    clients = _PoolStems(algo, pool)
    loss = algo._step(clients, cohort, [v1.flatten(0, 1), v2.flatten(0, 1)], lr, 1, _Traffic())

    close = dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, (loss12 + loss21).detach(), **close)
    torch.testing.assert_close(algo.queue.keys, expected_queue, **close)
    assert algo.queue.ptr == 4
    for name, p in target.named_parameters():
        torch.testing.assert_close(dict(algo.target_trunk.named_parameters())[name], p, **close)
    for name, p in trunk.named_parameters():
        torch.testing.assert_close(dict(algo.trunk.named_parameters())[name], p, **close)
    for cid in pool:
        for name, p in momentum[cid].named_parameters():
            torch.testing.assert_close(clients.momentum[name][cid], p, **close)
        for name, p in online[cid].named_parameters():
            torch.testing.assert_close(clients.online[name][cid], p, **close)


def test_stems_sync_on_the_official_schedule_and_momentum_stems_are_never_averaged(cifar10_dir, tmp_path,
                                                                                   monkeypatch):
    """A round of 5 steps with ``sync_every=2`` averages the stems after steps 2, 4 and 5, as the official loop's
    ``batch % (num_batch // avg_freq) == num_batch // avg_freq - 1 or batch == num_batch - 1``; a FedAvg sets every
    pooled online stem to the pool's mean and leaves momentum stems and SGD buffers as they were."""
    from pfl.algorithms.mocosfl import MocoSFL, _PoolStems

    algo = _algorithm(cifar10_dir, tmp_path, "queue_size=64", "steps_per_round=5", "sync_every=2")
    events: list[str] = []
    step, fedavg = MocoSFL._step, _PoolStems.fedavg

    def recorded_step(self, *args):
        events.append("step")
        return step(self, *args)

    def recorded_fedavg(self):
        events.append("sync")
        before = {k: v.clone() for k, v in {**self.momentum, **{f"b/{n}": b for n, b in self.buffers.items()}}.items()}
        mean = {k: v.mean(0) for k, v in self.online.items()}
        fedavg(self)
        for k, v in self.online.items():
            assert all(torch.equal(v[i], mean[k]) for i in range(len(v))), k
        after = {**self.momentum, **{f"b/{n}": b for n, b in self.buffers.items()}}
        assert all(torch.equal(after[k], v) for k, v in before.items())

    monkeypatch.setattr(MocoSFL, "_step", recorded_step)
    monkeypatch.setattr(_PoolStems, "fedavg", recorded_fedavg)
    algo.run_round(1, [0, 1], fit=None)
    num_batch, avg_every = 5, 2
    official = []
    for batch in range(num_batch):
        official.append("step")
        if batch == num_batch - 1 or batch % avg_every == avg_every - 1:
            official.append("sync")
    assert events == official == ["step", "step", "sync", "step", "step", "sync", "step", "sync"]
    # each client's momentum stem is its own (never averaged): the two differ after the round
    m0, m1 = algo.momentum_stems[0], algo.momentum_stems[1]
    assert any(not torch.equal(m0[k], m1[k]) for k in m0)


def _official_sinkhorn(out: torch.Tensor, iterations: int, epsilon: float) -> torch.Tensor:
    """main_swav.py's ``distributed_sinkhorn`` on one process: codes (B, K) of scores (B, K)."""
    q = torch.exp(out / epsilon).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(1, keepdim=True)
        q /= k
        q /= q.sum(0, keepdim=True)
        q /= b
    return (q * b).t()


def _official_swav_loss(body, head, weight, crops, queue, temperature=0.1, iterations=3, epsilon=0.05):
    """main_swav.py's ``train`` loss for ``crops_for_assign = [0, 1]``: the model's ``forward`` (src/resnet50.py: the
    backbone on each run of equal-size crops, then the head once on everything), scores against the normalized
    prototypes ``weight`` (K, D), codes of each full-size crop (after the queue's scores, if any), the mean
    cross-entropy of every other crop against them. Returns (loss, the full-size crops' embeddings)."""
    sizes = [c.shape[-1] for c in crops]
    groups = [[c for c in crops if c.shape[-1] == s] for s in dict.fromkeys(sizes)]
    embedding = F.normalize(head(torch.cat([body(torch.cat(g)) for g in groups])), dim=1)
    output = embedding @ weight.T
    bs, n_crops = len(crops[0]), len(crops)
    loss = 0
    for crop_id in (0, 1):
        with torch.no_grad():
            out = output[bs * crop_id: bs * (crop_id + 1)].detach()
            if queue is not None:
                out = torch.cat((queue @ weight.T, out))
            q = _official_sinkhorn(out, iterations, epsilon)[-bs:]
        subloss = 0
        for v in np.delete(np.arange(n_crops), crop_id):
            subloss -= torch.mean(torch.sum(q * F.log_softmax(output[bs * v: bs * (v + 1)] / temperature, dim=1), 1))
        loss += subloss / (n_crops - 1)
    return loss / 2, embedding[:2 * bs].detach()


def test_swav_loss_assembly_equals_the_official_queue_and_frozen_prototypes(cifar10_dir, tmp_path):
    """SwAV's server loss over two clients' crops (2 full-size, 2 half-size, 2 samples each) against main_swav.py's
    loss recomputed by hand: the crops regrouped per view (the official ``inputs``), the projection head once over
    all crops, the prototypes normalized first, Sinkhorn codes per full-size crop. Round 1: prototypes frozen (no
    gradient), no queue. Round 2 (``queue_start_round=2``): the first step fills the queue but does not read it, the
    next reads it (the previous step's full-size embeddings, scored with the current prototypes). The gradients sent
    back to the clients equal the reference's too."""
    algo = _algorithm(cifar10_dir, tmp_path, "loss=swav", "crops=2x32,2x16", "num_prototypes=5", "queue_size=8",
                      "queue_start_round=2", "freeze_prototypes_rounds=1")
    with torch.no_grad():
        algo.prototypes.heads[0].weight.mul_(3)  # not unit rows: the step normalizes them first
    gen = torch.Generator().manual_seed(0)
    c, b, queue = 2, 2, None
    for call, rnd in enumerate((1, 2, 2)):
        xs = [torch.randn(c * 2 * b, 8, s, s, generator=gen) for s in (32, 16)]  # client-major, 2 views per size
        leaves = [x.clone().requires_grad_() for x in xs]
        crops = [x.view(c, 2, b, *x.shape[1:])[:, j].flatten(0, 1) for x in leaves for j in range(2)]
        body, head = copy.deepcopy(algo.trunk[:-1]), copy.deepcopy(algo.trunk[-1])
        weight = F.normalize(algo.prototypes.heads[0].weight.detach(), dim=1)
        expected, embeddings = _official_swav_loss(body, head, weight, crops, queue)
        expected.backward()
        algo.prototypes.heads[0].weight.grad = None
        loss, grads = server_backward(xs, lambda inputs: algo._swav_server_loss(inputs, c, rnd))
        torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
        for g, leaf in zip(grads, leaves):
            torch.testing.assert_close(g, leaf.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(algo.prototypes.heads[0].weight.norm(dim=1), torch.ones(5))
        assert (algo.prototypes.heads[0].weight.grad is None) == (rnd == 1), call
        assert algo.queue.count == (0 if rnd == 1 else 8), call
        queue = embeddings if rnd == 2 else None  # the next step reads what this one enqueued


def test_the_queue_starts_in_the_round_of_the_official_epoch_queue_starts():
    """main_swav.py starts its queue when the 0-based ``epoch >= epoch_queue_starts`` (15); pfl's rounds are
    1-based, so the default ``queue_start_round`` is 16."""
    from pfl.algorithms.mocosfl import MocoSFLParams

    start = MocoSFLParams().queue_start_round
    assert all((rnd >= start) == (rnd - 1 >= 15) for rnd in range(1, 40))


def test_swav_head_batchnorm_sees_every_crop_of_the_step(cifar10_dir, tmp_path):
    """The projection head's BatchNorm runs once over the concatenation of every crop size's features (official
    resnet50.py ``forward`` then ``forward_head``): its running mean after one step is 0.1 x the mean over all crops,
    and each crop's embedding equals the manual concatenated forward's."""
    algo = _algorithm(cifar10_dir, tmp_path, "loss=swav", "crops=2x32,2x16", "num_prototypes=5")
    head = algo.trunk[-1]
    norm = next(m for m in head.modules() if isinstance(m, nn.BatchNorm1d))
    norm.reset_running_stats()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 8, s, s, generator=gen) for s in (32, 16)]
    with torch.no_grad():
        features = torch.cat([algo.trunk[:-1](x) for x in xs])
        hidden = head.layers[0](features)  # the Linear before the BatchNorm
        manual = F.normalize(copy.deepcopy(head)(features), dim=1)
        embeddings = algo._swav_embeddings(xs)
    torch.testing.assert_close(norm.running_mean, 0.1 * hidden.mean(0))
    torch.testing.assert_close(torch.cat(embeddings), manual)
    assert [len(z) for z in embeddings] == [8, 8]


def test_views_use_swav_color_jitter_for_swav_and_moco_v2_for_moco(cifar10_dir, tmp_path):
    """``loss=swav`` draws every crop with SwAV's get_color_distortion(s=1.0), ColorJitter(0.8, 0.8, 0.8, 0.2);
    ``loss=moco`` with MoCo v2's (MocoSFL's datasets.py), (0.4, 0.4, 0.4, 0.1)."""
    from pfl.data.views import MOCO_V2_JITTER, SWAV_JITTER

    assert SWAV_JITTER == (0.8, 0.8, 0.8, 0.2) and MOCO_V2_JITTER == (0.4, 0.4, 0.4, 0.1)
    swav = _algorithm(cifar10_dir, tmp_path, "loss=swav", "crops=2x32,2x16", "num_prototypes=5")
    moco = _algorithm(cifar10_dir, tmp_path, "queue_size=64")
    assert [aug.jitter for _, aug in swav.views] == [SWAV_JITTER] * 2
    assert [aug.jitter for _, aug in moco.views] == [MOCO_V2_JITTER]


def test_prototypes_are_pytorchs_linear_initialization_from_their_own_generator():
    """The prototypes are drawn as nn.Linear draws its weight, from a generator of their own: the same seed gives
    the same rows as a Linear built right after seeding torch's CPU generator with it, and torch's global
    generators are neither advanced nor reseeded (no CUDA seeding queued or done)."""
    from test_views import cuda_seeding

    from pfl.algorithms.mocosfl import swav_prototypes

    torch.manual_seed(123)
    cpu, cuda = torch.random.get_rng_state(), cuda_seeding()
    prototypes = swav_prototypes(16, 5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), cpu) and cuda_seeding() == cuda
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(3)
        linear = nn.Linear(16, 5)
    assert list(prototypes.state_dict()) == ["heads.0.weight"]
    assert torch.equal(prototypes.heads[0].weight, linear.weight)
    assert torch.equal(swav_prototypes(16, 5, seed=3).heads[0].weight, linear.weight)
