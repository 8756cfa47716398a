"""FedGen for viewport prediction: the heatmap, the regression teacher loss and client regularizers against hand
computations, unregularized clients equal to FedAvg bit for bit (with each downlink), exact resumption, the CLI run
and the templates, all on the real David MMSys'18 traces."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
from torch import nn

from conftest import check_exact_resumption
from pfl.algorithms.fedgen import FedGenUpdate, PositionGenerator, position_teacher_loss
from pfl.cli import main
from pfl.config import ConfigError, load_config
from pfl.data import heatmap
from pfl.federated.engine import Engine, Schedule
from pfl.federated.local import FitIns, SGDUpdate
from pfl.federated.state import state_digest
from pfl.models.split import SplitModel
from pfl.models.viewport import from_normalized_eulerian

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["num_clients=3", "global_rounds=2", "device=cpu", "num_threads=1", "server_epochs=2"]


def _at(yaw: float, pitch: float) -> list[float]:
    """The unit vector at normalized Eulerian (yaw, pitch)."""
    return from_normalized_eulerian(torch.tensor([yaw, pitch], dtype=torch.float64)).tolist()


def test_positions_are_binned_by_longitude_and_latitude():
    """A 2 x 4 grid (grain 2): rows of 90 degrees of latitude from the north pole, columns of 90 of longitude."""
    positions = torch.tensor([_at(0.1, 0.2), _at(0.1, 0.3), _at(0.4, 0.7), _at(0.9, 0.95), [0.0, 0.0, 1.0]])
    assert heatmap.cell_index(positions, 2).tolist() == [0, 0, 5, 7, 0]
    assert heatmap.counts(positions, 2).tolist() == [[3, 0, 0, 0], [0, 1, 0, 1]]


def test_the_blur_wraps_in_longitude_and_reflects_at_the_poles():
    """sigma = 1/3 cell: kernel radius ceil(1) = 1, weights (e^-4.5, 1, e^-4.5) / (1 + 2 e^-4.5) = (a, b, a). One
    count in the north-west cell (row 0, column 0): in latitude row -1 folds back onto row 0 (a + b) and row 1 gets
    a; in longitude column -1 wraps to column 3: (b, a, 0, a)."""
    grid = torch.zeros(2, 4, dtype=torch.float64)
    grid[0, 0] = 1
    a = math.exp(-4.5) / (1 + 2 * math.exp(-4.5))
    b = 1 / (1 + 2 * math.exp(-4.5))
    expected = torch.tensor([[(a + b) * b, (a + b) * a, 0.0, (a + b) * a], [a * b, a * a, 0.0, a * a]],
                            dtype=torch.float64)
    assert torch.allclose(heatmap.blur(grid, 1 / 3), expected, rtol=1e-12, atol=0)
    wide = heatmap.heatmap(torch.tensor([_at(0.1, 0.2), _at(0.6, 0.9)]), 3, 2.5)  # radius 8 > the grid: folds twice
    assert wide.sum().item() == pytest.approx(2.0, rel=1e-12) and (wide > 0).all()
    assert torch.equal(heatmap.blur(grid, 0), grid)


def test_draws_fall_in_cells_with_mass_and_shares_split_each_cell():
    grid = torch.zeros(2, 4, dtype=torch.float64)
    grid[0, 1], grid[1, 3] = 1.0, 3.0
    drawn = heatmap.sample(grid, 400, torch.Generator().manual_seed(0))
    cells = heatmap.cell_index(drawn, 2)
    assert set(cells.tolist()) == {1, 7} and 0.65 < (cells == 7).double().mean() < 0.85  # 3 : 1
    assert torch.allclose(drawn.double().norm(dim=1), torch.ones(400, dtype=torch.float64))
    assert torch.equal(drawn, heatmap.sample(grid, 400, torch.Generator().manual_seed(0)))
    other = torch.zeros(2, 4, dtype=torch.float64)
    other[0, 1] = 3.0
    shares = heatmap.shares(torch.stack([grid, other]))  # (8 cells, 2 clients)
    assert shares[1].tolist() == [0.25, 0.75] and shares[7].tolist() == [1.0, 0.0] and shares[0].tolist() == [0, 0]
    with pytest.raises(ValueError, match="empty heatmap"):
        heatmap.sample(torch.zeros(2, 4), 1, torch.Generator())


def test_the_teacher_loss_weights_each_clients_squared_error_by_its_share_of_the_target_cell():
    """Targets y0 = e3 = (0, 0, 1) (cell 0) and y1 in cell 5 (row 1, column 1) of the 2 x 4 grid. Client 0 predicts
    y0 for sample 0 and e3 for sample 1; client 1 predicts (0, 0, 0) for both (the outputs' first step is ignored:
    only the last position counts). Per-sample errors |D_u(z)_last - y|^2 / 3: client 0 (0, e = |y1 - e3|^2 / 3),
    client 1 (1/3, 1/3). Shares: cell 0 (0.5, 0.5), cell 5 (0.25, 0.75). per_sample: sum_u mean_i(w_u[i] l_u[i]);
    official: sum_u mean_i(w_u) mean_i(l_u)."""
    y1 = torch.tensor(_at(0.3, 0.55), dtype=torch.float32)
    targets = torch.stack([torch.tensor([0.0, 0.0, 1.0]), y1])
    e3 = torch.tensor([0.0, 0.0, 1.0])
    outputs = [torch.stack([torch.cat([torch.ones(3), targets[0]]), torch.cat([torch.ones(3), e3])]),
               torch.zeros(2, 6)]
    shares = torch.zeros(8, 2, dtype=torch.float64)
    shares[0] = torch.tensor([0.5, 0.5])
    shares[5] = torch.tensor([0.25, 0.75])
    err = (y1 - e3).pow(2).sum().item() / 3
    per_sample = position_teacher_loss(outputs, targets, shares, grain=2, form="per_sample")
    assert per_sample.item() == pytest.approx((0.5 * 0 + 0.25 * err) / 2 + (0.5 / 3 + 0.75 / 3) / 2, rel=1e-6)
    official = position_teacher_loss(outputs, targets, shares, grain=2, form="official")
    assert official.item() == pytest.approx((0.5 + 0.25) / 2 * err / 2 + (0.5 + 0.75) / 2 * (1 / 3), rel=1e-6)


def _doubling_generator() -> PositionGenerator:
    """G(y, eps) = 2 y: ignores its noise."""
    generator = PositionGenerator(noise_dim=2, hidden=(), feature_dim=3)
    with torch.no_grad():
        generator.net[0].weight.copy_(torch.cat([torch.zeros(3, 2), 2 * torch.eye(3)], dim=1))
        generator.net[0].bias.zero_()
    return generator.eval()


@pytest.mark.parametrize(("alpha", "beta"), [(9.604, 0.0), (0.0, 9.604), (9.604, 9.604)])
def test_client_regularizers_match_a_hand_computation(alpha, beta):
    """An identity model (outputs = x), real x = (e1, e2), targets y = (e3, e2): MSE(x, y) = (1 + 1) / 6 = 1/3.
    beta term: the head on G(y) = 2 y against x, MSE((e1 - 2 e3, -e2)) = (1 + 4 + 1) / 6 = 1. alpha term: G(y') = 2 y'
    for any drawn unit vector y', so the head's squared error is |y'|^2 / 3 = 1/3, times gen_ratio 4 / 2."""
    model = SplitModel(nn.Identity(), nn.Linear(3, 3))
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(3))
        model.head.bias.zero_()
    update = FedGenUpdate(SGDUpdate(batch_size=2, lr=0.1, local_epochs=1, loss_fn=nn.MSELoss()), _doubling_generator())
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    grid = torch.ones(3, 6, dtype=torch.float64)
    extras = {"generator": {}, "alpha": alpha, "beta": beta, "labels": grid, "rng": torch.Generator().manual_seed(0),
              "gen_batch": 4, "gen_ratio": 4 / 2, "gen_train": False}
    got = update.loss(model, x, y, FitIns({}, extras=extras))
    assert got.item() == pytest.approx(1 / 3 + beta * 1.0 + 2 * alpha / 3, rel=1e-6)
    assert update.loss(model, x, y, FitIns({})).item() == pytest.approx(1 / 3, rel=1e-6)  # no generator: MSE only


def test_a_sequence_is_conditioned_on_its_last_position():
    generator = _doubling_generator()
    targets = torch.arange(12.0).view(2, 6)
    assert generator.condition(targets).tolist() == [[3, 4, 5], [9, 10, 11]]


def _vp(david_dir, tmp_path, algo: str, *overrides: str):
    """A builder of ``algo`` on 3 viewers of David (a tiny LSTM), and the schedule (all viewers, 2 rounds)."""
    from pfl.train import build_algorithm, prepare

    cfg = load_config(CONFIGS / "vp_david_fedavg_lstm_cpu.yaml",
                      [f"data_dir={david_dir}", f"cache_dir={tmp_path}", f"algo={algo}", *TINY[:-1],
                       *(("server_epochs=2",) if algo == "fedgen" else ()), *overrides])
    prepared = prepare(cfg)
    return lambda: build_algorithm(prepared, seed=0), Schedule(2, cfg.num_join_clients)


UNREGULARIZED = ("generative_alpha=0", "generative_beta=0")


@pytest.mark.parametrize(("unused", "downlink"), [
    (UNREGULARIZED, ()), (UNREGULARIZED, ("downlink=head_layers:2", "downlink_blend=0.5")),
    (UNREGULARIZED, ("downlink=none",)), (("generator_warmup_rounds=2",), ("downlink=head_layers:2",))])
def test_without_regularizers_fedgen_trains_exactly_as_fedavg(david_dir, tmp_path, unused, downlink):
    """alpha = beta = 0, or the warm-up rounds: every client's model after 2 rounds is FedAvg's (with the same
    downlink) bit for bit, while the generator trains and its error on generated features is logged."""
    fedgen_build, schedule = _vp(david_dir, tmp_path, "fedgen", *unused, *downlink)
    fedavg_build, _ = _vp(david_dir, tmp_path, "fedavg", *downlink)
    fedgen, fedavg = fedgen_build(), fedavg_build()
    initial = state_digest(fedgen.generator_state)
    engines = Engine(fedgen, schedule), Engine(fedavg, schedule)
    for rnd in (1, 2):
        a, b = (e.run_round(rnd) for e in engines)
        assert a["train/loss"] == b["train/loss"] and a["comm/bytes_down"] == b["comm/bytes_down"]
        assert {"server/generator_teacher_loss", "server/generated_mse", "server/generated_orthodromic_deg"} <= set(a)
    for c in range(3):
        assert state_digest(fedgen.personalized_state(c)) == state_digest(fedavg.personalized_state(c))
    assert state_digest(fedgen.generator_state) != initial


def test_the_warm_up_trains_the_generator_while_clients_ignore_it(david_dir, tmp_path):
    build, _ = _vp(david_dir, tmp_path, "fedgen", "generator_warmup_rounds=2")
    fedgen = build()
    assert not fedgen.configure_fit(0, 2).extras
    extras = fedgen.configure_fit(0, 3).extras
    assert extras["alpha"] == pytest.approx(10 * 0.98 ** 2) and extras["labels"].shape == (18, 36)
    # the federation's heatmap: one unit of mass per train window of every client (the blur keeps the mass)
    assert extras["labels"].sum().item() == pytest.approx(sum(len(c.fit) for c in fedgen.ctx.clients), rel=1e-9)
    assert fedgen.heatmaps[0].sum().item() == pytest.approx(len(fedgen.ctx.clients[0].fit), rel=1e-9)


def test_fedgen_on_viewport_prediction_resumes_exactly(david_dir, tmp_path):
    """Round 3 after a restore is bit-identical (conftest.check_exact_resumption on 5 viewers), the generator, Adam's
    moments and learning rate and the clients' own models (partial, blended downlink) included."""
    cfg = load_config(CONFIGS / "vp_david_fedgen_partial_blend_lstm_cpu.yaml")
    vp = [f"{k}={getattr(cfg, k)}" for k in ("dataset", "model", "model_width", "history", "horizon", "predict",
                                              "partition", "split_by", "num_test_keys", "downlink", "downlink_blend")]
    original, resumed = check_exact_resumption(david_dir, tmp_path, "fedgen", *vp, "server_epochs=2",
                                               "gen_batch_size=16", "diversity_weight=0")
    assert original.generator_opt and original.generator_lr == resumed.generator_lr
    assert state_digest(original.server_models()["generator"]) == state_digest(resumed.generator_state)


@pytest.mark.parametrize(("override", "message"), [
    ("variant=pfllib", "variant=pfllib: PFLlib's FedGen classifies"),
])
def test_what_does_not_apply_is_refused(david_dir, tmp_path, override, message):
    build, _ = _vp(david_dir, tmp_path, "fedgen", override)
    with pytest.raises(ConfigError, match=message):
        build()


def test_pfllibs_localized_sharing_refuses_the_downlink_knobs(cifar10_dir, tmp_path):
    from pfl.train import build_algorithm, prepare

    cfg = load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", "algo=fedgen", "variant=pfllib",
                             "localize_feature_extractor=true", "downlink=head_layers:1", "num_clients=5",
                             "device=cpu", "num_threads=1"])
    with pytest.raises(ConfigError, match="localize_feature_extractor is PFLlib's own sharing rule"):
        build_algorithm(prepare(cfg), seed=0)


def test_a_cpu_twin_trains_logs_the_generators_error_and_saves_it(david_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    args = ["train", "--no-progress", "--config", str(CONFIGS / "vp_david_fedgen_full_warmup_transformer_cpu.yaml"),
            f"data_dir={david_dir}", f"cache_dir={tmp_path / 'cache'}", *TINY, "generator_warmup_rounds=1"]
    assert main(args) == 0
    (run,) = mlflow.search_runs(experiment_names=["pfl"], output_format="list", filter_string="tags.`pfl.kind` = 'fl'")
    assert run.info.run_name == "fedgen-warmup1-david-natural_video4-jr1-s0"
    assert {"test/mse", "test/orthodromic_deg", "server/generated_mse", "server/generated_orthodromic_deg"} <= \
        set(run.data.metrics)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "server/generated_mse")
    assert [m.step for m in history] == [1, 2]
    assert "server/generator.safetensors" in {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id,
                                                                                                     "server")}


ARMS = {"full": ("full", 1.0), "partial": ("head_layers:2", 1.0), "blend": ("full", 0.5),
        "partial_blend": ("head_layers:2", 0.5), "local": ("none", 1.0)}


@pytest.mark.parametrize(("arm", "warmup"), [*((a, w) for a in ARMS for w in ("", "_warmup")), ("nodiv", "")])
@pytest.mark.parametrize("model", ["lstm", "transformer"])
def test_templates_hold_the_researchers_arms_and_schedule(arm, warmup, model):
    stem = f"vp_david_fedgen_{arm}{warmup}_{model}"
    gpu, cpu = (load_config(CONFIGS / f"{stem}{suffix}.yaml") for suffix in ("", "_cpu"))
    downlink, blend = ARMS.get(arm, ("full", 1.0))
    for cfg in (gpu, cpu):
        assert (cfg.algo, cfg.dataset, cfg.model, cfg.num_clients, cfg.join_ratio, cfg.batch_size, cfg.lr) == \
            ("fedgen", "david", f"vp_{model}", 10, 1.0, 64, 0.01)
        assert (cfg.downlink, cfg.downlink_blend, cfg.hparams["gen_batch_size"]) == (downlink, blend, 256)
        assert cfg.hparams["diversity_weight"] == (0 if arm == "nodiv" else 1)
    assert (gpu.global_rounds, gpu.local_epochs, gpu.model_width, gpu.hparams["generator_warmup_rounds"]) == \
        (300, 10, 1.0, 200 if warmup else 0)
    assert (cpu.global_rounds, cpu.local_epochs, cpu.hparams["generator_warmup_rounds"]) == (20, 1, 10 if warmup else 0)
