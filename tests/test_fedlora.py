"""FedLoRA: what travels and changes on the server, FedIT / FFA aggregation against hand-computed averages, personal
heads, artifacts (backbone once, adapters per client), pretrained starts (a file, a `pfl pretrain` run), the adapted
model at initialization, and FedIT's local optimizer (AdamW, weight decay, linear decay per round, clipping) on
hand-computed rounds. Exact resumption (with personal heads): tests/test_resume.py."""

from __future__ import annotations

from dataclasses import replace

import mlflow
import pytest
import torch
from safetensors.torch import load_file, save_file

from pfl import tracking
from pfl.federated.engine import Engine, Schedule
from pfl.algorithms.fedlora import LoraUpdate
from pfl.federated.local import FitRes
from pfl.federated.state import state_bytes
from pfl.cli import main
from pfl.config import load_config
from pfl.models import ModelSpec, build_model
from pfl.models.adapters import LoraSpec, is_adapter_entry
from pfl.models.pretrained import read_weights
from pfl.train import build_algorithm, prepare

SMALL = ("model=vit_cifar", "image_size=16", "batch_size=32")  # 16 tokens of 4x4 patches: fast on a CPU


def _build(cifar10_dir, tmp_path, algo: str = "fedlora", *overrides: str):
    cfg = load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", f"algo={algo}", "num_clients=5",
                             "join_ratio=0.4", "global_rounds=2", "device=cpu", "num_threads=1", *SMALL, *overrides])
    return build_algorithm(prepare(cfg), seed=0), Schedule(2, cfg.num_join_clients)


def _travels(name: str) -> bool:
    return is_adapter_entry(name) or name.startswith("head.")


def test_only_adapter_and_head_entries_travel_and_change_on_the_server(cifar10_dir, tmp_path):
    algo, schedule = _build(cifar10_dir, tmp_path)
    init = {k: v.clone() for k, v in algo.ctx.init_state(0).items()}
    assert set(algo.global_state) == {k for k in init if _travels(k)}
    engine = Engine(algo, schedule)
    metrics = engine.run_round(1)
    changed = {k for k, v in algo.global_state.items() if not torch.equal(v, init[k])}
    assert changed and all(_travels(k) for k in changed)
    assert any(".lora_B." in k for k in changed) and any(".lora_A." in k for k in changed)  # FedIT trains both
    device_model = algo.ctx.model(0).state_dict()  # the frozen backbone is untouched by training
    assert all(torch.equal(device_model[k].cpu(), init[k]) for k in init if not _travels(k))
    per_client = state_bytes(algo.global_state)
    assert metrics["comm/bytes_up"] == metrics["comm/bytes_down"] == 2 * per_client
    num_params = sum(v.numel() for v in init.values())
    assert sum(v.numel() for v in algo.global_state.values()) / num_params < 0.1


def _results(algo, values: tuple[float, float], samples: tuple[int, int]) -> list[FitRes]:
    """Two clients' uploads: every uploaded entry filled with one constant per client."""
    keys = algo.shared_keys
    return [FitRes(cid, {k: torch.full_like(algo.global_state[k], v) for k in keys}, n, torch.zeros(()))
            for cid, v, n in zip((0, 1), values, samples)]


@pytest.mark.parametrize("aggregation", ["fedit", "ffa"])
def test_aggregation_is_the_sample_weighted_mean_of_what_travels(aggregation, cifar10_dir, tmp_path):
    """Clients holding 1 and 3 samples upload all-1 and all-4 entries: every averaged entry is (1 + 3*4) / 4 = 3.25.
    FedIT averages A and B; FFA-LoRA uploads B only and A stays the shared initialization."""
    algo, _ = _build(cifar10_dir, tmp_path, "fedlora", f"lora_aggregation={aggregation}")
    init = algo.ctx.init_state(0)
    a_keys = [k for k in init if ".lora_A." in k]
    assert all((k in algo.shared_keys) == (aggregation == "fedit") for k in a_keys)
    algo.aggregate_fit(1, _results(algo, (1.0, 4.0), (1, 3)))
    assert all(torch.all(v == 3.25) for v in algo.global_state.values())
    assert {k for k in algo.global_state if ".lora_B." in k} == {k for k in init if ".lora_B." in k}
    model = algo.ctx.runner.load(algo.ctx.specs[0], algo.personalized_state(0))
    assert all(torch.equal(model.state_dict()[k], init[k]) for k in a_keys) == (aggregation == "ffa")


def test_personal_heads_stay_with_their_clients(cifar10_dir, tmp_path):
    algo, _ = _build(cifar10_dir, tmp_path, "fedlora", "personal_head=true")
    assert not any(k.startswith("head.") for k in algo.shared_keys)
    head = [k for k in algo.ctx.init_state(0) if k.startswith("head.")]
    results = [FitRes(cid, {k: torch.full_like(algo.ctx.init_state(0)[k], v) for k in [*algo.shared_keys, *head]},
                      1, torch.zeros(())) for cid, v in ((0, 1.0), (1, 3.0))]
    algo.aggregate_fit(1, results)
    assert all(torch.all(v == 2.0) for v in algo.global_state.values())
    for cid, v in ((0, 1.0), (1, 3.0)):
        assert all(torch.all(algo.personalized_state(cid)[k] == v) for k in head)
    assert all(torch.equal(algo.personalized_state(4)[k], algo.ctx.init_state(0)[k]) for k in head)


def test_run_logs_the_backbone_once_and_only_adapters_and_head_per_client(cifar10_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["train", "--no-progress", "--tracking-uri", uri, f"data_dir={cifar10_dir}",
                 f"cache_dir={tmp_path / 'cache'}", "algo=fedlora", "num_clients=5", "join_ratio=0.4",
                 "global_rounds=1", "device=cpu", "experiment=lora", *SMALL]) == 0
    tracking.configure_tracking(uri)
    run = mlflow.search_runs(experiment_names=["lora"], filter_string="tags.`pfl.kind` = 'fl'",
                             output_format="list")[0]
    assert int(run.data.params["trainable_params"]) / int(run.data.params["num_params"]) < 0.1
    assert {"comm/bytes_up", "comm/bytes_down", "memory/peak_mb", "time/round"} <= set(run.data.metrics)
    spec, state = tracking.load_client_state(run.info.run_id, 2)
    assert spec.lora is not None and spec.lora.rank == 8
    client_file = tracking.mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                               artifact_path=tracking.client_weights_path(run.info.run_id, 2),
                                                               dst_path=str(tmp_path / "dl"))
    assert all(_travels(k) for k in load_file(client_file))
    model = tracking.load_client_model(run.info.run_id, 2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_local_safetensors_file_loads_with_the_head_resized(tmp_path):
    """A ViT saved in timm's layout (no base. prefix) for 100 classes at 32x32 starts a 10-class model at 16x16:
    the base is copied, the position embeddings resampled to the 4x4 grid, the head re-initialized."""
    torch.manual_seed(0)
    source = build_model(ModelSpec("vit_cifar", 100, image_size=32))
    timm_layout = {k.removeprefix("base."): v for k, v in source.state_dict().items()}
    save_file(timm_layout, tmp_path / "vit.safetensors")
    torch.save(timm_layout, tmp_path / "vit.pth")
    for name in ("vit.safetensors", "vit.pth"):
        model = build_model(ModelSpec("vit_cifar", 10, image_size=16), read_weights(tmp_path / name), name)
        own = model.state_dict()
        assert own["head.weight"].shape == (10, 128)
        assert own["base.pos_embed"].shape == (1, 1 + 16, 128)
        assert torch.equal(own["base.pos_embed"][:, :1], source.state_dict()["base.pos_embed"][:, :1])  # class token
        same = [k for k in own if k.startswith("base.") and k != "base.pos_embed"]
        assert all(torch.equal(own[k], source.state_dict()[k]) for k in same)


def test_pretrain_run_then_init_from_starts_from_exactly_its_weights(cifar100_dir, cifar10_dir, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["pretrain", "--no-progress", "--tracking-uri", uri, f"data_dir={cifar100_dir}", "dataset=cifar100",
                 f"cache_dir={tmp_path / 'cache'}", "global_rounds=1", "device=cpu", "experiment=pre",
                 "optimizer=adamw", "lr=0.001", *SMALL]) == 0
    run_id = capsys.readouterr().out.split("init_from=runs:/")[1].split()[0]
    assert mlflow.get_run(run_id).info.run_name == "central-cifar100-s0"
    _, pretrained = tracking.load_client_state(run_id, 0)
    algo, _ = _build(cifar10_dir, tmp_path, "fedlora", f"init_from=runs:/{run_id}")
    init = algo.ctx.init_state(0)
    base = {k.replace(".base_layer.", "."): v for k, v in init.items() if k.startswith("base.") and "lora_" not in k}
    assert base.keys() == {k for k in pretrained if k.startswith("base.")}
    assert all(torch.equal(v, pretrained[k]) for k, v in base.items())
    assert pretrained["head.weight"].shape[0] == 100 and init["head.weight"].shape[0] == 10


@pytest.mark.parametrize("bad, message", [
    (["pretrained=/no/such/vit.safetensors"], "does not exist"),
    (["init_from=runs:/abc"], "not a pfl model URI"),
    (["pretrained=timm", "init_from=runs:/" + "0" * 32], "keep one of them"),
    (["model=cnn", "pretrained=timm"], "publishes no weights"),
    (["algo=fedlora", "model=cnn"], "name no linear layer"),
])
def test_bad_initial_weights_are_one_line_errors(bad, message, cifar10_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        _build(cifar10_dir, tmp_path, "fedavg", *bad)


def test_templates_hold_the_researchers_setup_and_fedavg_twins_differ_only_in_the_algorithm():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    lora = load_config(configs / "fedlora_vit_cifar10.yaml")
    assert (lora.model, lora.image_size, lora.pretrained, lora.num_clients, lora.join_ratio, lora.local_epochs,
            lora.batch_size, lora.lr, lora.global_rounds, lora.partition, lora.precision) == \
        ("vit_base_patch16_224", 224, "timm", 100, 0.1, 5, 32, 3e-4, 150, "dirichlet", "bf16")
    for suffix in ("", "_cpu"):
        lora = load_config(configs / f"fedlora_vit_cifar10{suffix}.yaml")
        full = load_config(configs / f"fedavg_vit_cifar10{suffix}.yaml")
        assert lora.algo == "fedlora" and full.algo == "fedavg"
        assert lora.model_dump(exclude={"algo", "hparams"}) == full.model_dump(exclude={"algo", "hparams"})
        # FedIT's local optimizer (fed_utils/client.py: HF Trainer, adamw_torch, warmup 0, its defaults), both arms
        assert (lora.optimizer, lora.weight_decay, lora.lr_schedule, lora.max_grad_norm) == ("adamw", 0, "linear", 1)
    assert load_config(configs / "fedlora_vit_cifar10_cpu.yaml").model == "vit_cifar"


def test_pretrained_timm_offline_fails_before_any_run_naming_the_alternatives(cifar10_dir, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # as a machine without the model hub, without its retries
    db = tmp_path / "mlflow.db"
    out = subprocess.run([sys.executable, "-m", "pfl.cli", "train", "--no-progress", "--tracking-uri", f"sqlite:///{db}",
                          f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", "algo=fedlora",
                          "model=vit_tiny_patch16_224", "pretrained=timm", "num_clients=5", "device=cpu"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("pfl: error:") and "pretrained=<path" in last and "init_from=runs:/" in last
    assert not db.exists() or not mlflow.MlflowClient(f"sqlite:///{db}").search_experiments(filter_string="name='pfl'")


def test_a_torchvision_resnet_checkpoint_loads_into_pfls_resnet18_with_the_head_resized(tmp_path):
    from pfl._torchvision import import_torchvision

    torch.manual_seed(0)
    source = import_torchvision().models.resnet18(num_classes=1000).state_dict()
    torch.save(source, tmp_path / "resnet18.pth")
    model = build_model(ModelSpec("resnet18", 10), read_weights(tmp_path / "resnet18.pth"), "resnet18.pth")
    own = model.state_dict()
    assert torch.equal(own["base.0.weight"], source["conv1.weight"])
    assert torch.equal(own["base.7.1.bn2.running_var"], source["layer4.1.bn2.running_var"])
    assert own["head.weight"].shape == (10, 512)


@pytest.mark.parametrize("freeze_a", [False, True])
def test_a_lora_adapted_model_starts_equal_to_its_backbone(freeze_a, cifar10):
    """B = 0, so W x + (alpha / r) B A x = W x: the adapted model's logits on real images equal the backbone's
    bit for bit; A is not zero (the equality is not vacuous), and once B is set the wrapped qkv layer adds
    exactly (alpha / r) B A x (alpha 16, r 4: a factor 4)."""
    torch.manual_seed(0)
    spec = ModelSpec("vit_cifar", 10, image_size=32)
    backbone = build_model(spec).eval()
    adapted = build_model(replace(spec, lora=LoraSpec(4, 16.0, freeze_a=freeze_a)), backbone.state_dict()).eval()
    adapters = {k: v for k, v in adapted.state_dict().items() if is_adapter_entry(k)}
    assert adapters and all(torch.all(v == 0) for k, v in adapters.items() if ".lora_B." in k)
    assert all(v.abs().sum() > 0 for k, v in adapters.items() if ".lora_A." in k)
    x = (cifar10.inputs[:8].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        assert torch.equal(adapted(x), backbone(x))
        qkv = adapted.base.blocks[0].attn.qkv
        tokens = torch.randn(2, 5, qkv.in_features)
        qkv.lora_B["default"].weight.fill_(0.5)
        expected = qkv.base_layer(tokens) + 4.0 * tokens @ qkv.lora_A["default"].weight.T @ qkv.lora_B["default"].weight.T
        assert torch.allclose(qkv(tokens), expected, atol=1e-5)
        assert not torch.equal(adapted(x), backbone(x))


class _ConstantGradient(LoraUpdate):
    """FedLoRA's local update with the objective ``c * sum(p)`` over the trained parameters, so every gradient
    entry is ``c`` and a round's parameter change is hand-computable (the optimizer path is the real one)."""

    c = 1.0

    def loss(self, model, x, y, ins):
        return self.c * sum(p.sum() for p in model.parameters() if p.requires_grad)


def _round(algo, update: LoraUpdate, n: int = 7) -> tuple[dict, dict]:
    """One round of client 0 on its first ``n`` training samples: (state before, state after) of the trained entries."""
    ins = algo.configure_fit(0, 1)
    model = algo.ctx.runner.load(algo.ctx.specs[0], ins.state)
    before = {k: v.clone() for k, v in ins.state.items()}
    after, _ = update.fit(model, algo.ctx.runner.data, ins, algo.ctx.clients[0].fit[:n], seed=0)
    return before, after


ROUND = ("batch_size=3", "local_epochs=2", "lr=0.1")  # 7 samples: 2 full batches per epoch, T = 4 steps a round


@pytest.mark.parametrize("overrides, factors", [
    # AdamW with a zero gradient moves nothing but its decoupled decay: p <- p (1 - lr_k wd) at every step
    ((), [1 - 0.1 * 0.01] * 4),  # weight_decay unset: torch's 0.01, constant rate
    (("weight_decay=0.5",), [1 - 0.1 * 0.5] * 4),
    (("weight_decay=0", "lr_schedule=linear"), [1.0] * 4),  # FedIT's: no decay at all
    (("weight_decay=0.5", "lr_schedule=linear"), [1 - 0.1 * 0.5 * (4 - k) / 4 for k in range(4)]),
], ids=["default-decay", "decay", "fedit", "decay-linear"])
def test_adamw_weight_decay_and_linear_schedule_come_from_the_config(overrides, factors, cifar10_dir, tmp_path):
    """Through load_config -> build_algorithm: the optimizer's weight decay and step k's rate lr (T - k) / T
    (T = 4: 0.1, 0.075, 0.05, 0.025), recorded at every AdamW step and read off the hand-computed decay."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    algo, _ = _build(cifar10_dir, tmp_path, "fedlora", "optimizer=adamw", *ROUND, *overrides)
    update = _ConstantGradient(**algo.local_update.settings())
    update.c = 0.0
    lrs = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        before, after = _round(algo, update)
    finally:
        handle.remove()
    linear = "lr_schedule=linear" in overrides
    assert lrs == pytest.approx([0.1, 0.075, 0.05, 0.025] if linear else [0.1] * 4, rel=1e-12)
    scale = torch.tensor(factors, dtype=torch.float64).prod().item()
    for k, v in after.items():
        assert torch.allclose(v, before[k] * scale, rtol=1e-6, atol=1e-7), k


@pytest.mark.parametrize("overrides, moved", [
    ((), 4 * 0.1),  # sum of the rates: 4 steps at 0.1
    (("lr_schedule=linear",), 0.1 + 0.075 + 0.05 + 0.025),
], ids=["constant", "linear"])
def test_sgd_steps_at_the_scheduled_rates_and_clips_the_gradient_norm(overrides, moved, cifar10_dir, tmp_path):
    """Plain SGD on gradients of all ones moves every trained entry by -sum_k lr_k; with max_grad_norm=1 the
    gradient (norm sqrt(N) over N trained scalars) is scaled by 1 / (sqrt(N) + 1e-6) first, as torch's
    clip_grad_norm_ and the HF Trainer do."""
    for clip in (None, 1.0):
        algo, _ = _build(cifar10_dir, tmp_path, "fedlora", "optimizer=sgd", *ROUND, *overrides,
                         *([f"max_grad_norm={clip}"] if clip else []))
        before, after = _round(algo, _ConstantGradient(**algo.local_update.settings()))
        n = sum(v.numel() for v in before.values())
        step = moved if clip is None else moved / (n ** 0.5 + 1e-6)
        for k, v in after.items():
            assert torch.allclose(before[k] - v, torch.full_like(v, step), rtol=1e-4, atol=1e-7), (k, clip)
