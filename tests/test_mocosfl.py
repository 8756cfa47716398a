"""MocoSFL and its SwAV variant: the shared key queue's order, InfoNCE by hand, the clients' gradient slices, the
vmapped client stems, SGD and the cosine schedule against PyTorch's, Sinkhorn's marginals, the CLI acceptance run
of both CPU templates, exact resumption of the SwAV variant and one-line errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
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
