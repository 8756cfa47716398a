"""New-client evaluation (PFLlib's ``-nnc`` / ``-ften``): ``new_clients=K`` holds the same K clients out of training for
every algorithm and seed; each evaluation adapts them by the algorithm's rule (FedAvg: everything; FedPer: the head;
Ditto: its personal model pulled toward the global one) and logs ``new/*``; the algorithm's state is untouched."""

from __future__ import annotations

import mlflow
import pytest
import torch

from pfl import tracking
from pfl.config import ConfigError, load_config
from pfl.federated.engine import Engine
from pfl.federated.local import FitIns
from pfl.federated.partial import personal_layer
from pfl.federated.state import state_digest
from pfl.train import build_algorithm, prepare, run_training, schedule_of
from reports.plots import NEW_CLIENTS
from reports.query import aggregate, results
from reports.table import build_table

NUM_CLIENTS = 6


def _cfg(cifar10_dir, tmp_path, *overrides: str):
    return load_config(None, [f"data_dir={cifar10_dir}", f"cache_dir={tmp_path}", f"num_clients={NUM_CLIENTS}",
                              "join_ratio=0.5", "partition=dirichlet", "alpha=0.5", "global_rounds=2", "device=cpu",
                              "num_threads=1", "new_clients=2", "finetune_epochs=1", *overrides])


def test_the_same_clients_are_held_out_for_every_algorithm_and_seed(cifar10_dir, tmp_path):
    held = {_cfg(cifar10_dir, tmp_path, f"algo={a}", f"seed={s}").new_client_ids
            for a in ("fedavg", "fedper", "ditto", "fedfomo") for s in (0, 1, 7)}
    assert len(held) == 1
    (ids,) = held
    assert len(ids) == 2 and list(ids) == sorted(ids) and all(0 <= c < NUM_CLIENTS for c in ids)
    cfg = _cfg(cifar10_dir, tmp_path)
    assert cfg.train_client_ids == [c for c in range(NUM_CLIENTS) if c not in ids]
    assert cfg.num_join_clients == 2  # round(0.5 * 4 training clients)
    assert load_config(None, ["num_clients=6"]).new_client_ids == ()  # off by default
    assert {"new_clients", "finetune_epochs"} <= set(cfg.flat_params())
    assert "finetune_epochs" not in load_config(None, []).flat_params()  # logged only when clients are held out
    with pytest.raises(ConfigError, match=r"new_clients=6 holds out every one of the 6 clients; keep at least one"):
        _cfg(cifar10_dir, tmp_path, "new_clients=6")


@pytest.mark.parametrize("algo", ["fedavg", "fedper", "ditto"])
def test_held_out_clients_never_train_and_adapt_by_the_algorithms_rule(cifar10_dir, tmp_path, algo):
    cfg = _cfg(cifar10_dir, tmp_path, f"algo={algo}", *(["mu=0.1"] if algo == "ditto" else []))
    algorithm = build_algorithm(prepare(cfg), seed=0)
    ctx, held = algorithm.ctx, set(cfg.new_client_ids)
    engine = Engine(algorithm, schedule_of(cfg))
    assert all(not held & set(engine.sample_clients(r)) for r in range(1, 50))
    engine.run_round(1)
    before = {c: state_digest(algorithm.personalized_state(c)) for c in range(NUM_CLIENTS)}
    evaluation = engine.evaluate(1)
    assert 0 <= evaluation.metrics["new/acc"] <= 1 and "new/f_ece" in evaluation.metrics
    assert [r["client"] for r in evaluation.per_client] == cfg.train_client_ids  # the held-out are not scored
    assert before == {c: state_digest(algorithm.personalized_state(c)) for c in range(NUM_CLIENTS)}  # untouched

    cid = min(held)
    start = algorithm.new_client_state(cid)
    adapted = algorithm.adapt(cid, 1, seed=5)
    assert algorithm.adapt(cid, 1, seed=5).keys() == adapted.keys()
    assert all(torch.equal(a, b) for a, b in zip(algorithm.adapt(cid, 1, seed=5).values(), adapted.values()))
    assert state_digest(algorithm.adapt(cid, 0, seed=5)) == state_digest(start)  # no epoch: scored as received
    moved = {k for k in start if not torch.equal(start[k], adapted[k]) and start[k].is_floating_point()}
    model = ctx.model(cid)
    head = personal_layer(model) + "."
    if algo == "fedavg":  # PFLlib: the global model, every parameter fine-tuned with the run's SGD
        assert all(torch.equal(start[k], algorithm.global_state[k]) for k in start)
        expected, _ = ctx.update.with_epochs(1).fit(ctx.runner.load(ctx.specs[cid], start), ctx.runner.data,
                                                    FitIns(start), ctx.clients[cid].fit, 5)
        assert all(torch.equal(adapted[k], expected[k]) for k in expected)
        assert any(k.startswith("base.") for k in moved) and any(k.startswith(head) for k in moved)
    elif algo == "fedper":  # the global base as received, only the head (PFLlib's model.fc) fine-tuned
        assert moved and all(k.startswith(head) for k in moved)
        assert all(torch.equal(adapted[k], algorithm.global_state[k]) for k in algorithm.shared_keys)
    else:  # Ditto: the initial personal model, trained with the pull mu (w - g) toward the current global model
        assert all(torch.equal(start[k], ctx.init_state(cid)[k]) for k in start)
        assert any(k.startswith("base.") for k in moved)
        plain = ctx.finetune(cid, start, ctx.update.with_epochs(1), 5)
        assert any(not torch.equal(plain[k], adapted[k]) for k in moved)  # the pull changed the steps


def test_a_tracked_run_logs_new_metrics_and_models_of_its_training_clients(cifar10_dir, tmp_path):
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.create_experiment("new", artifact_location=(tmp_path / "artifacts").as_uri())
    cfg = _cfg(cifar10_dir, tmp_path, "algo=fedper", "experiment=new", "new_client_eval=final",
               "eval_batch_size=500", "global_rounds=2")
    (fl_id,) = run_training(cfg, progress=False)["fl_run_ids"]
    client = mlflow.MlflowClient()
    history = client.get_metric_history(fl_id, "new/acc")
    assert [m.step for m in history] == [2]  # new_client_eval=final: after the last round only
    assert client.get_metric_history(fl_id, "test/acc")[-1].step == 2
    saved = sorted(a.path for a in client.list_artifacts(fl_id, "clients"))
    assert saved == [f"clients/client_{c:03d}" for c in cfg.train_client_ids]
    assert tracking.fl_run_inputs(fl_id).num_clients == NUM_CLIENTS - 2
    run = client.get_run(fl_id)
    assert run.data.params["new_clients"] == "2" and run.data.params["finetune_epochs"] == "1"
    table = build_table(aggregate(results(["new"])))  # the report's new-clients column group
    assert table.mean.at["fedper", ("cifar10", NEW_CLIENTS, "acc")] == pytest.approx(history[0].value)


RULES = ["local", "fedfomo", "fedala", "fedper", "lgfedavg", "fedrep", "fedbabu", "fedbn", "fedrod", "ditto", "apfl",
         "perfedavg", "pfedme", "fedpac", "fedprox", "scaffold", "moon", "fedproto"]


@pytest.mark.parametrize("algo", RULES)
def test_every_pfllib_baseline_adapts_held_out_clients_and_keeps_its_state(cifar10_dir, tmp_path, algo):
    cfg = _cfg(cifar10_dir, tmp_path, f"algo={algo}", "num_clients=5", "new_clients=1", "global_rounds=1")
    algorithm = build_algorithm(prepare(cfg), seed=0)
    (cid,) = cfg.new_client_ids
    final = Engine(algorithm, schedule_of(cfg)).run()
    assert 0 <= final.metrics["new/acc"] <= 1
    before = {c: state_digest(algorithm.personalized_state(c)) for c in range(5)}
    tensors, meta = algorithm.state_dict()
    adapted = algorithm.adapt(cid, 1, seed=3)
    assert set(adapted) == set(algorithm.new_client_state(cid))
    assert before == {c: state_digest(algorithm.personalized_state(c)) for c in range(5)}
    after, meta_after = algorithm.state_dict()
    assert meta_after == meta and all(torch.equal(after[k], tensors[k]) for k in tensors)
    if algo == "fedrod":  # the personal head alone moves, on the frozen generic model
        start = algorithm.new_client_state(cid)
        moved = {k for k in start if not torch.equal(start[k], adapted[k])}
        assert moved == {"head.2.weight", "head.2.bias"}
