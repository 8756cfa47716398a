"""FlexiFed's Table 1 beyond CIFAR-10: the CINIC-10, AG News and Speech Commands templates, a tracked text run and a
tracked speech run whose saved client models (4 depths) reproduce their logged accuracy and carry APH head runs,
exact resume of both, and what a text or audio model cannot mean refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pfl import tracking
from pfl.config import ConfigError, load_config, load_head_config
from pfl.heads.run import run_heads
from pfl.metrics import accuracy
from pfl.train import prepare, run_training
from conftest import check_exact_resumption

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAMILY_MODELS = {"vgg": "vgg11,vgg13,vgg16,vgg19", "resnet": "resnet20,resnet32,resnet44,resnet56",
                 "charcnn": "charcnn3,charcnn4,charcnn5,charcnn6", "vdcnn": "vdcnn9,vdcnn17,vdcnn29,vdcnn49"}
PAIRS = [("cinic10", "vgg"), ("cinic10", "resnet"), ("agnews", "charcnn"), ("agnews", "vdcnn"),
         ("speech_commands", "vgg"), ("speech_commands", "resnet")]
# A tiny run per modality: 4 clients of the 4 depths of a family at a small width, one round of max_common.
RUNS = {"text": ("agnews", "charcnn", "model_width=0.0625"), "audio": ("speech_commands", "vgg", "model_width=0.0625")}


@pytest.mark.parametrize("dataset, family", PAIRS)
def test_templates_hold_the_paper_setting(dataset, family):
    cfg = load_config(CONFIGS / f"flexifed_{dataset}_{family}.yaml")
    assert (cfg.algo, cfg.dataset, cfg.model, cfg.num_clients, cfg.partition, cfg.join_ratio) == \
        ("flexifed", dataset, FAMILY_MODELS[family], 8, "iid", 1.0)
    assert (cfg.official_split, cfg.num_partitions, cfg.global_rounds, cfg.local_epochs, cfg.batch_size, cfg.lr) == \
        (True, 20, 500, 10, 64, 0.01)
    assert cfg.hparams["sample_fraction"] == 0.1 and cfg.hparams["scheme"] == "max_common"
    assert (cfg.random_crop, cfg.hflip) == ((4, True) if dataset == "cinic10" else (0, False))
    assert cfg.train_on_valid is (dataset != "cinic10")  # FlexiFed's get_dataset('cinic-10') leaves valid out
    cpu = load_config(CONFIGS / f"flexifed_{dataset}_{family}_cpu.yaml")
    assert (cpu.model, cpu.num_clients, cpu.global_rounds) == (FAMILY_MODELS[family], 8, 3)
    assert cpu.official_split is (dataset != "speech_commands")  # the shared test-set release has no train split


def _data_dir(modality: str, request) -> Path:
    return request.getfixturevalue("agnews_dir" if modality == "text" else "speech_commands_dir")


@pytest.fixture(scope="module", params=sorted(RUNS))
def table1_run(request, tmp_path_factory):
    """A tracked FlexiFed max_common run of 4 clients, one per depth: (modality, config, FL run id, store dir)."""
    modality = request.param
    dataset, family, width = RUNS[modality]
    tmp_path = tmp_path_factory.mktemp(modality)
    tracking.configure_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = load_config(None, ["algo=flexifed", f"dataset={dataset}", f"model={FAMILY_MODELS[family]}", width,
                             f"data_dir={_data_dir(modality, request)}", f"cache_dir={tmp_path / 'cache'}",
                             "num_clients=4", "num_partitions=40", "partition=iid", "join_ratio=1", "global_rounds=1",
                             "batch_size=16", "sample_fraction=0.2", "device=cpu", "experiment=t1",
                             "scheme=max_common"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        (fl_id,) = run_training(cfg, progress=False)["fl_run_ids"]
    return modality, cfg, fl_id, tmp_path


def test_each_depth_is_saved_and_reproduces_its_logged_accuracy(table1_run, tmp_path):
    modality, cfg, fl_id, store = table1_run
    tracking.configure_tracking(f"sqlite:///{store / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(fl_id)
    assert {f"test/acc_{m}" for m in cfg.models} | {"test/acc"} <= set(run.data.metrics)
    logged = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=fl_id, artifact_path="client_metrics.json",
                                                                 dst_path=str(tmp_path / "m"))).read_text())
    prepared = prepare(cfg)
    data = prepared.device_images()  # the run's input path: character ids as they are, or log-mel spectrograms
    for cid, name in enumerate(cfg.models):
        model = tracking.load_client_model(fl_id, cid)
        x, y = data.batch(prepared.partition.clients[cid].test)
        with torch.no_grad():
            acc = accuracy(torch.softmax(model(x), 1), y)
        assert logged["clients"][cid]["architecture"] == name
        assert acc == pytest.approx(logged["clients"][cid]["acc"], abs=1e-9)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{fl_id}/clients/client_003")  # the stored inputs, as served
    stored = prepared.dataset.inputs[prepared.partition.clients[3].test[:4]].numpy()
    with torch.no_grad():
        expected = torch.softmax(tracking.load_client_model(fl_id, 3)(data.batch(
            prepared.partition.clients[3].test[:4])[0]), 1).numpy()
    np.testing.assert_allclose(pyfunc.predict(stored), expected, atol=1e-6)
    refusals = {"text": ("character ids: shape (4, 100), expected (N, 1024) integers 0..72", 100),
                "audio": ("waveforms: 8000 samples give spectrograms (1, 40, 48), the model takes (1, 40, 98)", 8000)}
    refusal, length = refusals[modality]
    with pytest.raises(mlflow.exceptions.MlflowException) as err:  # the loaded model's own InputError class
        pyfunc.predict(stored[:, :length])
    assert refusal in str(err.value)
    with pytest.raises(mlflow.exceptions.MlflowException, match="outside|dtype"):
        pyfunc.predict(stored.astype(np.float32) * 1e6)


def test_aph_heads_train_on_every_client(table1_run):
    modality, cfg, fl_id, store = table1_run
    tracking.configure_tracking(f"sqlite:///{store / 'mlflow.db'}")
    hc = load_head_config(["global_epoch=1", "sampling_num=2", "ood_dataset=none", "device=cpu"])
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(store)
        head_id = run_heads(fl_id, hc, progress=False)
    run = mlflow.MlflowClient().get_run(head_id)
    assert run.info.status == "FINISHED" and {"test/acc", "wo/acc"} <= set(run.data.metrics)


@pytest.mark.parametrize("modality", sorted(RUNS))
def test_resume_is_bit_identical(modality, request, tmp_path):
    dataset, family, width = RUNS[modality]
    check_exact_resumption(_data_dir(modality, request), tmp_path, "flexifed", f"dataset={dataset}",
                           f"model={FAMILY_MODELS[family]}", width.replace("0.0625", "0.03125"), "partition=iid",
                           "num_partitions=40", "batch_size=8", "scheme=max_common")


@pytest.mark.parametrize("overrides, message", [
    (["dataset=cifar10", "model=charcnn6"], "model=charcnn6 takes texts, cifar10's inputs are images; use model="),
    (["dataset=agnews", "model=vgg11"], "model=vgg11 takes images or audio clips, agnews's inputs are texts"),
    (["dataset=agnews", "model=charcnn6", "n_mels=64"], "n_mels=64 is an audio knob and agnews's inputs are texts"),
    (["dataset=speech_commands", "model=vgg11", "hflip=true"], "hflip=True is an image knob and speech_commands's "
                                                                "inputs are audio clips"),
    (["dataset=speech_commands", "model=vgg11", "n_mels=400"], "n_mels=400 leaves"),
])
def test_what_a_model_cannot_take_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["algo=fedavg", "partition=iid", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["charcnn3", "vdcnn9", "vgg11", "resnet20"])
def test_the_dry_forward_pass_takes_each_modalitys_inputs(name):
    """The check every run makes before training feeds int64 character ids to a text model (VDCNN's embedding takes
    nothing else) and a spectrogram's shape to VGG and the CIFAR ResNets; a spectrogram VGG cannot pool refuses."""
    from pfl.models import ModelSpec, build_model
    from pfl.train import check_input_fits

    text = name.startswith(("charcnn", "vdcnn"))
    spec = ModelSpec(name, 4, width=0.0625, modality="text" if text else "audio",
                     input_shape=(1024,) if text else (1, 40, 98))
    check_input_fits(build_model(spec), spec, torch.device("cpu"))
    if name == "vgg11":  # its five poolings need 32 x 32 (the CIFAR ResNets' global pool takes any size)
        with pytest.raises(ValueError, match="VGG inputs must be at least 32 x 32, got 16 x 98"):
            build_model(ModelSpec(name, 4, modality="audio", input_shape=(1, 16, 98)))
