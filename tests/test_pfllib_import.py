"""`pfl data import-pfllib`: PFLlib dataset folders built from real CIFAR-10 images, imported and trained on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pfl import cli
from pfl.config import ConfigError, load_config
from pfl.data import pfllib
from pfl.data.datasets import DatasetNotFoundError
from pfl.data.pfllib import PfllibFormatError, PfllibImportError, import_pfllib, load_imported
from pfl.train import prepare, run_federated

# (train, test) samples per client; clients take consecutive slices of the real CIFAR-10 pool.
SIZES = [(30, 10), (24, 8), (36, 12)]


def _normalize(images: torch.Tensor) -> np.ndarray:
    """PFLlib's ToTensor() + Normalize((0.5,)*3, (0.5,)*3) as float32: (x / 255 - 0.5) / 0.5."""
    return (images.numpy().astype(np.float32) / 255 - 0.5) / 0.5


def _save(path: Path, x, y) -> None:
    np.savez_compressed(path, data={"x": x, "y": y})


@pytest.fixture
def originals(cifar10):
    """Per client, ``{"train": (uint8 images, labels), "test": (...)}`` from the real CIFAR-10 slice."""
    out, start = [], 0
    for n_train, n_test in SIZES:
        client = {}
        for split, n in (("train", n_train), ("test", n_test)):
            client[split] = (cifar10.inputs[start:start + n], cifar10.targets[start:start + n])
            start += n
        out.append(client)
    return out


@pytest.fixture
def src(tmp_path, originals) -> Path:
    """A PFLlib-format folder (config.json, train/{i}.npz, test/{i}.npz) of 3 CIFAR-10 clients."""
    root = tmp_path / "Cifar10"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
    for i, client in enumerate(originals):
        for split, (images, labels) in client.items():
            _save(root / split / f"{i}.npz", _normalize(images), labels.numpy().astype(np.int64))
    config = {"num_clients": len(SIZES), "num_classes": 10, "non_iid": True, "balance": False,
              "partition": "dir", "alpha": 0.1, "batch_size": 10,
              "Size of samples for labels in clients": [[[0, 3]], [[1, 2]], [[4, 5]]]}
    (root / "config.json").write_text(json.dumps(config))
    return root


def _cfg(data_dir: Path, tmp_path: Path, **overrides) -> object:
    values = {"partition": "pfllib", "partition_name": "c10", "dataset": "cifar10", "num_clients": len(SIZES),
              "data_dir": data_dir, "cache_dir": tmp_path / "cache", "device": "cpu", "num_threads": 1,
              **overrides}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def test_round_trip_keeps_every_clients_images_and_labels(src, tmp_path, originals):
    data_dir = tmp_path / "data"
    path = import_pfllib(src, data_dir, progress=False)
    assert path == data_dir / "pfllib" / "Cifar10"
    dataset, partition = load_imported(data_dir, "Cifar10")
    assert dataset.name == "cifar10" and dataset.num_classes == 10 and dataset.class_names[9] == "9"
    assert dataset.inputs.dtype == torch.uint8 and dataset.inputs.shape == (sum(map(sum, SIZES)), 3, 32, 32)
    assert partition.spec.num_clients == 3 and partition.spec.scheme == "pfllib:Cifar10"
    for split_idx, client in zip(partition.clients, originals):
        for split in ("train", "test"):
            idx = getattr(split_idx, split)
            assert idx.dtype == torch.int64
            images, labels = client[split]
            assert torch.equal(dataset.inputs[idx], images)
            assert torch.equal(dataset.targets[idx], labels)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["image_shape"] == [3, 32, 32] and meta["source"] == str(src.resolve())
    assert meta["pfllib_config"]["alpha"] == 0.1
    assert (path / "pool.safetensors").stat().st_mode == (path / "meta.json").stat().st_mode  # not 0600


# Each breaker damages the folder and returns the phrases the error message must contain (file first).
def _break_missing_config(src: Path, originals) -> tuple[str, ...]:
    (src / "config.json").unlink()
    return "config.json", "not found"


def _break_missing_test_file(src: Path, originals) -> tuple[str, ...]:
    (src / "test" / "1.npz").unlink()
    return "missing test/1.npz", "num_clients=3"


def _break_extra_file(src: Path, originals) -> tuple[str, ...]:
    (src / "train" / "3.npz").write_bytes((src / "train" / "0.npz").read_bytes())
    return "unexpected train/3.npz", "num_clients=3"


def _break_image_shape(src: Path, originals) -> tuple[str, ...]:
    _save(src / "train" / "2.npz", np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64))
    return "train/2.npz", "(1, 28, 28)"


def _break_label_count(src: Path, originals) -> tuple[str, ...]:
    _save(src / "test" / "0.npz", np.zeros((4, 3, 32, 32), np.float32), np.zeros(3, np.int64))
    return "test/0.npz", "len(y) must equal len(x)"


def _break_label_range(src: Path, originals) -> tuple[str, ...]:
    _save(src / "train" / "1.npz", np.zeros((4, 3, 32, 32), np.float32), np.array([0, 1, 10, 2]))
    return "train/1.npz", "outside [0, 10)"


def _break_not_normalized(src: Path, originals) -> tuple[str, ...]:
    images, labels = originals[2]["test"]
    _save(src / "test" / "2.npz", images.numpy().astype(np.float32), labels.numpy())  # raw 0..255 floats
    return "test/2.npz", "not normalized", "mean 0.5"


def _break_empty_client(src: Path, originals) -> tuple[str, ...]:
    _save(src / "test" / "1.npz", np.array([]), np.array([]))
    return "test/1.npz", "no samples"


def _break_not_a_dict(src: Path, originals) -> tuple[str, ...]:
    np.savez_compressed(src / "train" / "0.npz", data=np.zeros((2, 3, 32, 32), np.float32))
    return "train/0.npz", "must hold a dict"


def _break_missing_y(src: Path, originals) -> tuple[str, ...]:
    np.savez_compressed(src / "train" / "0.npz", data={"x": np.zeros((2, 3, 32, 32), np.float32)})
    return "train/0.npz", "'x' and 'y'"


@pytest.mark.parametrize("breaker", [_break_missing_config, _break_missing_test_file, _break_extra_file,
                                     _break_image_shape, _break_label_count, _break_label_range,
                                     _break_not_normalized, _break_empty_client, _break_not_a_dict,
                                     _break_missing_y], ids=lambda f: f.__name__[7:])
def test_malformed_folder_names_the_file_and_leaves_nothing(src, tmp_path, originals, breaker):
    data_dir = tmp_path / "data"
    import_pfllib(src, data_dir, name="good", progress=False)
    phrases = breaker(src, originals)
    with pytest.raises(PfllibFormatError) as info:
        import_pfllib(src, data_dir, name="bad", progress=False)
    for phrase in phrases:
        assert phrase in str(info.value)
    assert [p.name for p in (data_dir / "pfllib").iterdir()] == ["good"]


def test_pickle_with_foreign_objects_is_refused(src, tmp_path):
    np.savez_compressed(src / "train" / "0.npz", data={"x": Path("."), "y": np.zeros(1)})
    with pytest.raises(PfllibFormatError, match="0.npz.*pathlib"):
        import_pfllib(src, tmp_path / "data", progress=False)


class _TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(target)``: a payload planted in a downloaded PFLlib folder."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return Path.touch, (self.target,)


@pytest.mark.parametrize("where", ["x", "whole"])
def test_pickled_payload_is_refused_without_running(src, tmp_path, where):
    target = tmp_path / "pwned"
    crafted = src / "test" / "1.npz"
    payload = _TouchOnUnpickle(target)
    np.savez_compressed(crafted, data={"x": payload, "y": np.zeros(1)} if where == "x" else payload)
    with pytest.raises(PfllibFormatError, match=r"1\.npz: cannot read.*refusing to load pathlib\.Path\.touch"):
        import_pfllib(src, tmp_path / "data", progress=False)
    assert not target.exists()
    assert not (tmp_path / "data" / "pfllib").exists() or not any((tmp_path / "data" / "pfllib").iterdir())
    np.load(crafted, allow_pickle=True)["data"]  # the payload is real: numpy's own pickle loading runs it
    assert target.exists()


def test_failed_write_leaves_no_temp_folder(src, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pfllib, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        import_pfllib(src, tmp_path / "data", progress=False)
    assert list((tmp_path / "data" / "pfllib").iterdir()) == []


def test_existing_import_is_kept_unless_overwrite(src, tmp_path):
    data_dir = tmp_path / "data"
    import_pfllib(src, data_dir, name="c10", progress=False)
    _save(src / "train" / "0.npz", np.zeros((5, 3, 32, 32), np.float32), np.zeros(5, np.int64))
    with pytest.raises(PfllibImportError, match="'c10'.*overwrite"):
        import_pfllib(src, data_dir, name="c10", progress=False)
    assert len(load_imported(data_dir, "c10")[1].clients[0].train) == SIZES[0][0]
    import_pfllib(src, data_dir, name="c10", overwrite=True, progress=False)
    assert len(load_imported(data_dir, "c10")[1].clients[0].train) == 5
    assert [p.name for p in (data_dir / "pfllib").iterdir()] == ["c10"]


def test_bad_name_and_missing_import(src, tmp_path):
    with pytest.raises(PfllibImportError, match="--name"):
        import_pfllib(src, tmp_path / "data", name="../escape", progress=False)
    with pytest.raises(DatasetNotFoundError, match="pfl data import-pfllib DIR --name nope"):
        load_imported(tmp_path / "data", "nope")


def test_cli_imports_and_reports_errors(src, tmp_path, capsys, monkeypatch):
    data_dir = tmp_path / "data"
    assert cli.main(["data", "import-pfllib", str(src), "--name", "x", "--data-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert str(data_dir / "pfllib" / "x") in out
    assert "partition=pfllib partition_name=x dataset=cifar10 num_clients=3" in out
    assert load_imported(data_dir, "x")[0].name == "cifar10"

    (src / "test" / "1.npz").unlink()
    assert cli.main(["data", "import-pfllib", str(src), "--name", "y", "--data-dir", str(data_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pfl: error: ") and "test/1.npz" in err
    assert cli.main(["data", "import-pfllib", str(src), "--name", "x", "--data-dir", str(data_dir)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    monkeypatch.setenv("PFL_DATA_DIR", str(tmp_path / "env_data"))
    (src / "test" / "1.npz").write_bytes((src / "test" / "0.npz").read_bytes())
    assert cli.main(["data", "import-pfllib", str(src)]) == 0
    assert (tmp_path / "env_data" / "pfllib" / "Cifar10" / "pool.safetensors").is_file()


def test_prepare_uses_the_import_and_checks_dataset_and_clients(src, tmp_path):
    data_dir = tmp_path / "data"
    import_pfllib(src, data_dir, name="c10", progress=False)
    prepared = prepare(_cfg(data_dir, tmp_path))
    dataset, partition = load_imported(data_dir, "c10")
    assert torch.equal(prepared.dataset.inputs, dataset.inputs)
    assert prepared.partition.spec == partition.spec
    for got, want in zip(prepared.partition.clients, partition.clients, strict=True):
        assert torch.equal(got.train, want.train) and torch.equal(got.test, want.test)
    assert not (tmp_path / "cache").exists()  # nothing partitioned or cached

    with pytest.raises(ConfigError, match="dataset: .*set dataset=cifar10"):
        prepare(_cfg(data_dir, tmp_path, dataset="cifar100"))
    with pytest.raises(ConfigError, match="num_clients: .*set num_clients=3"):
        prepare(_cfg(data_dir, tmp_path, num_clients=4))


def test_fedavg_runs_on_the_imported_partition(src, tmp_path):
    data_dir = tmp_path / "data"
    import_pfllib(src, data_dir, name="c10", progress=False)
    cfg = _cfg(data_dir, tmp_path, algo="fedavg", global_rounds=1, batch_size=10, join_ratio=1.0)
    _, evaluation = run_federated(prepare(cfg), seed=0, callbacks=[])
    assert [c["num_test"] for c in evaluation.per_client] == [n_test for _, n_test in SIZES]
    assert 0.0 <= evaluation.metrics["test/acc"] <= 1.0
