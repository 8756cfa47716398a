"""Client models as MLflow models (pyfunc from code, nothing pickled), head ensembles, and the Model Registry; the
served model (MLflow's scoring server app, in-process) and the input checks of :mod:`pfl.pyfunc`.

One FedFomo run on the real CIFAR-10 slice and one LoRAPH head run on it, in a real SQLite store.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pfl import tracking
from pfl.cli import main
from pfl.config import load_config, load_head_config
from pfl.data.datasets import load_cifar10
from pfl.data.transforms import ImageTransform
from pfl.heads.members import ensemble_probs, members_from_state
from pfl.heads.run import run_heads
from pfl.train import run_training

NUM_CLIENTS = 5
PICKLE_OPCODES = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")  # PROTO opcode and protocol 2..5


@pytest.fixture(scope="module")
def runs(cifar10_dir, tmp_path_factory):
    """``(tracking URI, FL run id, head run id, launch run id, tmp dir)`` of a FedFomo run and a LoRAPH run on it."""
    tmp = tmp_path_factory.mktemp("mlflow_models")
    uri = tracking.configure_tracking(f"sqlite:///{tmp / 'mlflow.db'}")
    mlflow.create_experiment("models", artifact_location=(tmp / "artifacts").as_uri())
    values = {"data_dir": cifar10_dir, "cache_dir": tmp / "cache", "num_clients": NUM_CLIENTS, "global_rounds": 1,
              "join_ratio": 0.4, "experiment": "models", "eval_batch_size": 500, "algo": "fedfomo"}
    ids = run_training(load_config(None, [f"{k}={v}" for k, v in values.items()]), progress=False)
    hc = load_head_config(["global_epoch=1", "sampling_num=3", "ood_dataset=none", "rank=4"], method="loraph")
    head_id = run_heads(ids["fl_run_ids"][0], hc, progress=False)
    return uri, ids["fl_run_ids"][0], head_id, ids["launch_run_id"], tmp


@pytest.fixture(scope="module")
def images(cifar10_dir) -> torch.Tensor:
    """30 real CIFAR-10 images, uint8 (30, 3, 32, 32)."""
    return load_cifar10(cifar10_dir).inputs[:30]


def _reference_probs(run_id: str, client_id: int, images: torch.Tensor) -> np.ndarray:
    model = tracking.load_client_model(run_id, client_id)
    with torch.no_grad():
        return torch.softmax(model(ImageTransform(32)(images)), dim=1).numpy()


@pytest.mark.parametrize("client_id", [0, 3])
def test_pyfunc_predicts_the_probabilities_of_load_client_model(runs, images, client_id):
    uri, fl_id, *_ = runs
    tracking.configure_tracking(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{fl_id}/clients/client_{client_id:03d}")
    probs = model.predict(images.numpy())
    assert probs.shape == (30, 10) and probs.dtype == np.float32
    np.testing.assert_array_equal(probs, _reference_probs(fl_id, client_id, images))
    # float32 images in [0, 1] give the same (MLflow's signature enforces uint8, so through the Python model)
    as_float = model.unwrap_python_model().predict(None, (images.float() / 255).numpy())
    np.testing.assert_allclose(as_float, probs, atol=1e-6)
    (inputs,), (outputs,) = model.metadata.signature.inputs.inputs, model.metadata.signature.outputs.inputs
    assert (inputs.type, inputs.shape) == (np.dtype("uint8"), (-1, 3, 32, 32))
    assert (outputs.type, outputs.shape) == (np.dtype("float32"), (-1, 10))
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"^images: float values \S+ outside \[0, 1\]; send "
                       r"uint8 pixels 0\.\.255 \(the signature's dtype\)"):
        model.predict(images.float().numpy())  # 0-255 floats: the reason first, no dump of the data


def test_client_model_directory_is_models_from_code_with_safetensors_weights(runs, tmp_path):
    uri, fl_id, *_ = runs
    tracking.configure_tracking(uri)
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{fl_id}/clients/client_001", dst_path=str(tmp_path)))
    assert {p.name for p in folder.iterdir()} >= {"MLmodel", "pyfunc.py", "input_example.json", "requirements.txt",
                                                  "artifacts"}
    flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"  # models from code: no python_model.pkl
    assert flavor["config"] == {"output": "probabilities"}
    meta = tracking.client_file_metadata(str(folder / "artifacts" / tracking.MODEL_WEIGHTS))
    assert meta["client_id"] == 1 and meta["model_spec"]["name"] == "cnn"
    example = mlflow.models.Model.load(str(folder)).load_input_example(str(folder))
    assert example.dtype == np.uint8 and example.shape == (1, 3, 32, 32)


def test_no_artifact_of_the_runs_is_a_pickle(runs, tmp_path):
    uri, fl_id, head_id, launch_id, _ = runs
    tracking.configure_tracking(uri)
    files = []
    for run_id in (launch_id, fl_id, head_id):
        root = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / run_id)))
        files += [p for p in root.rglob("*") if p.is_file()]
    assert len(files) > 4 * NUM_CLIENTS * 2
    pickles = [p for p in files if p.suffix in (".pkl", ".pickle") or p.read_bytes()[:2] in PICKLE_OPCODES]
    assert pickles == []


def test_head_run_logs_its_ensemble_as_an_mlflow_model(runs, images):
    uri, fl_id, head_id, *_ = runs
    tracking.configure_tracking(uri)
    probs = mlflow.pyfunc.load_model(f"runs:/{head_id}/heads/client_002").predict(images.numpy())
    members = members_from_state(load_file(mlflow.artifacts.download_artifacts(
        run_id=head_id, artifact_path="heads/client_002/artifacts/members.safetensors")))
    model = tracking.load_client_model(fl_id, 2)
    with torch.no_grad():
        expected = ensemble_probs(members, model.base(ImageTransform(32)(images))).numpy()
    assert probs.shape == (30, 10)
    np.testing.assert_array_equal(probs, expected)
    assert not np.allclose(probs, _reference_probs(fl_id, 2, images))  # the ensemble, not the FL model


def test_register_one_client_with_alias_and_load_it_by_alias(runs, images, capsys):
    uri, fl_id, *_ = runs
    assert main(["register", "--run-id", fl_id, "--client", "1", "--name", "pfl-client1", "--alias", "champion",
                 "--tracking-uri", uri]) == 0
    assert "models:/pfl-client1@champion" in capsys.readouterr().out
    tracking.configure_tracking(uri)
    by_alias = mlflow.pyfunc.load_model("models:/pfl-client1@champion").predict(images.numpy())
    np.testing.assert_array_equal(by_alias, _reference_probs(fl_id, 1, images))
    version = mlflow.MlflowClient().get_model_version_by_alias("pfl-client1", "champion")
    assert version.run_id == fl_id
    tags = version.tags
    assert tags["algo"] == "fedfomo" and tags["dataset"] == "cifar10" and tags["partition"] == "pathological"
    assert tags["client"] == "1" and tags["fl_run_id"] == fl_id and 0 <= float(tags["acc"]) <= 1 and "nll" in tags


def test_register_all_clients_and_refuse_an_unknown_client(runs, capsys):
    uri, fl_id, *_ = runs
    assert main(["register", "--run-id", fl_id, "--all", "--tracking-uri", uri]) == 0
    tracking.configure_tracking(uri)
    fl_name = mlflow.MlflowClient().get_run(fl_id).info.run_name
    names = {m.name for m in mlflow.MlflowClient().search_registered_models()}
    assert {f"{fl_name}-client_{c:03d}" for c in range(NUM_CLIENTS)} <= names
    capsys.readouterr()
    assert main(["register", "--run-id", fl_id, "--client", "9", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert "no model for client 9" in err and "[0, 1, 2, 3, 4]" in err and len(err.strip().splitlines()) == 1


def _served(model: mlflow.pyfunc.PyFuncModel, payload: object, monkeypatch) -> tuple[int, dict]:
    """``(HTTP status, JSON body)`` of POST /invocations with ``payload`` as JSON, answered in-process by the app
    ``mlflow models serve`` runs (:func:`mlflow.pyfunc.scoring_server.init`)."""
    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server

    monkeypatch.setenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, "false")  # init sets it; put back after the test
    app = scoring_server.init(model)
    scope = {"type": "http", "method": "POST", "path": "/invocations", "raw_path": b"/invocations",
             "query_string": b"", "headers": [(b"content-type", b"application/json")], "http_version": "1.1",
             "scheme": "http", "server": ("testserver", 80), "client": ("testclient", 1), "root_path": ""}
    sent = []

    async def receive() -> dict:
        return {"type": "http.request", "body": json.dumps(payload).encode(), "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return next(m["status"] for m in sent if m["type"] == "http.response.start"), json.loads(body)


def test_served_model_answers_integer_pixels_and_refuses_a_float_payload_with_400(runs, images, monkeypatch):
    uri, fl_id, *_ = runs
    tracking.configure_tracking(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{fl_id}/clients/client_000")

    status, body = _served(model, {"inputs": images[:3].tolist()}, monkeypatch)
    assert status == 200
    np.testing.assert_allclose(body["predictions"], _reference_probs(fl_id, 0, images[:3]), rtol=1e-6)

    status, body = _served(model, {"inputs": (images[:3].float() / 255).tolist()}, monkeypatch)
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"] == ("images: a JSON payload holds floats, expected the signature's dtype uint8: integer "
                               "pixels 0..255; send round(255 * x) for images x in [0, 1]")

    status, body = _served(model, {"inputs": (images[:1].int() + 1).tolist()}, monkeypatch)
    assert (status, body["message"]) == (400, "images: integer pixels 1..256 outside 0..255; send uint8 pixels "
                                              "0..255")
    assert _served(model, {"inputs": []}, monkeypatch) == (200, {"predictions": []})


def test_empty_batch_gives_an_empty_0_by_k_array(runs):
    uri, fl_id, *_ = runs
    tracking.configure_tracking(uri)
    model = mlflow.pyfunc.load_model(f"runs:/{fl_id}/clients/client_002")
    empty = np.zeros((0, 3, 32, 32), dtype=np.uint8)
    for probs in (model.predict(empty), model.unwrap_python_model().predict(None, empty)):
        assert probs.shape == (0, 10) and probs.dtype == np.float32


@pytest.mark.parametrize(("values", "reason"), [
    (np.nan, "images: NaN or infinite values; send uint8 pixels 0..255 (the signature's dtype), or finite floats "
             "in [0, 1]"),
    (np.inf, "images: NaN or infinite values"),
    (200.0, "images: float values 0..200 outside [0, 1]; send uint8 pixels 0..255 (the signature's dtype), or "
            "floats divided by 255"),
    (-0.5, "images: float values -0.5..0 outside [0, 1]"),
])
def test_python_model_refuses_non_finite_and_out_of_range_floats(runs, values, reason):
    uri, fl_id, *_ = runs
    tracking.configure_tracking(uri)
    python_model = mlflow.pyfunc.load_model(f"runs:/{fl_id}/clients/client_001").unwrap_python_model()
    x = np.zeros((2, 3, 32, 32), dtype=np.float32)
    x[1, 0, 5, 7] = values
    with pytest.raises(mlflow.exceptions.MlflowException) as err:  # pfl.pyfunc.InputError, as the model file runs
        python_model.predict(None, x)
    assert str(err.value).startswith(reason) and isinstance(err.value, ValueError)
    assert err.value.get_http_status_code() == 400
