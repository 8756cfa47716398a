"""OOD detection: scores, the AUROC / AUPR wrapper (hand counts and scikit-learn), the OOD pool and its samples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pfl.config import ConfigError, load_head_config
from pfl.data.loader import DeviceData
from pfl.heads.ood import DEFAULT_OOD, OODPool, load_ood_pool, resolve_ood_dataset
from pfl.metrics import detection_auroc_aupr, max_softmax_probability, negative_entropy, ood_detection


def _t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_perfect_separation_gives_one_and_reversed_gives_zero():
    assert detection_auroc_aupr(_t([0.8, 0.9]), _t([0.1, 0.2])) == pytest.approx((1.0, 1.0))
    # Reversed: thresholds 0.9, 0.8 admit only OOD samples (precision 0), 0.2 -> P 1/3 at R 1/2, 0.1 -> P 1/2 at R 1.
    auroc, aupr = detection_auroc_aupr(_t([0.1, 0.2]), _t([0.8, 0.9]))
    assert auroc == pytest.approx(0.0) and aupr == pytest.approx(0.5 * 1 / 3 + 0.5 * 1 / 2)


def test_tied_scores_count_half_by_hand():
    # ID {0.9, 0.5} vs OOD {0.5, 0.1}: of the 4 (ID, OOD) pairs, 3 are ordered right and 1 is tied -> 3.5 / 4.
    # AUPR: threshold 0.9 -> P 1 at R 1/2; 0.5 -> P 2/3 at R 1 (the tie enters at once) -> 1/2 + 1/2 * 2/3.
    auroc, aupr = detection_auroc_aupr(_t([0.9, 0.5]), _t([0.5, 0.1]))
    assert auroc == pytest.approx(0.875) and aupr == pytest.approx(5 / 6)
    assert detection_auroc_aupr(_t([0.3, 0.3]), _t([0.3])) == pytest.approx((0.5, 2 / 3))  # all tied


def test_wrapper_matches_sklearn_on_scores_outside_the_unit_interval():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    id_scores = -torch.rand(300, generator=gen, dtype=torch.float64) * 3  # negative entropies in [-3, 0]
    ood_scores = -torch.rand(250, generator=gen, dtype=torch.float64) * 4
    id_scores[:20] = ood_scores[:20]  # some ties across the sets
    target = [1] * 300 + [0] * 250
    scores = torch.cat([id_scores, ood_scores]).numpy()
    auroc, aupr = detection_auroc_aupr(id_scores, ood_scores)
    assert auroc == pytest.approx(metrics.roc_auc_score(target, scores), abs=1e-6)  # float32 result
    assert aupr == pytest.approx(metrics.average_precision_score(target, scores), abs=1e-6)


def test_empty_sets_are_rejected():
    with pytest.raises(ValueError, match="0 OOD"):
        detection_auroc_aupr(_t([0.5]), _t([]))


def test_scores_msp_and_negative_entropy():
    probs = _t([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]])
    assert max_softmax_probability(probs).tolist() == [1.0, 0.25, 0.5]
    assert negative_entropy(probs).tolist() == pytest.approx([0.0, -math.log(4), -math.log(2)])


def test_ood_detection_reports_both_scores():
    confident = _t([[0.9, 0.1], [0.95, 0.05]])
    unsure = _t([[0.5, 0.5], [0.6, 0.4]])
    out = ood_detection(confident, unsure)
    assert out == pytest.approx({"auroc_msp": 1.0, "aupr_msp": 1.0, "auroc_entropy": 1.0, "aupr_entropy": 1.0})


def test_resolve_ood_dataset():
    assert DEFAULT_OOD == {"cifar10": "cifar100", "cifar100": "cifar10", "tinyimagenet": "cifar100"}
    assert resolve_ood_dataset("auto", "tinyimagenet") == "cifar100"
    assert resolve_ood_dataset("none", "cifar10") is None
    assert resolve_ood_dataset("tinyimagenet", "cifar10") == "tinyimagenet"
    with pytest.raises(ConfigError, match="ood_dataset: cifar10 is the FL run's own dataset"):
        resolve_ood_dataset("cifar10", "cifar10")
    with pytest.raises(ConfigError, match="ood_dataset"):
        load_head_config(["ood_dataset=svhn"])
    assert load_head_config(["ood_dataset=none"]).ood_dataset == "none"


def test_pool_batches_are_normalized_like_id_batches_and_resized_on_device(cifar100):
    data = DeviceData(cifar100, torch.device("cpu"))
    idx = torch.tensor([0, 5, 3999])
    same = OODPool("cifar100", data, (32, 32))
    assert torch.equal(same.batch(idx), data.batch(idx)[0])
    up = OODPool("cifar100", data, (64, 64)).batch(idx)  # cifar100 as OOD for Tiny-ImageNet models
    assert up.shape == (3, 3, 64, 64) and up.is_contiguous(memory_format=torch.channels_last)
    # Resizing after normalizing equals normalizing the resized raw images (bilinear weights sum to 1).
    raw = F.interpolate(cifar100.inputs[idx].float(), size=(64, 64), mode="bilinear", align_corners=False)
    assert torch.allclose(up, raw / 127.5 - 1, atol=1e-5)
    down = OODPool("cifar100", data, (16, 16)).batch(idx)
    ref = F.interpolate(data.batch(idx)[0], size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(down, ref)


def test_client_samples_are_seeded_distinct_and_per_client(cifar100):
    pool = OODPool("cifar100", DeviceData(cifar100, torch.device("cpu")), (32, 32))
    a = pool.sample(500, seed=0, client_id=3)
    assert len(a) == 500 and len(a.unique()) == 500 and a.max() < len(cifar100)
    assert torch.equal(a, pool.sample(500, seed=0, client_id=3))
    assert not torch.equal(a, pool.sample(500, seed=0, client_id=4))
    assert not torch.equal(a, pool.sample(500, seed=1, client_id=3))
    with pytest.raises(ValueError, match="needs 4001 OOD samples"):
        pool.sample(4001, seed=0, client_id=0)


def test_missing_ood_folder_names_the_folder_and_the_fix(tmp_path, cifar100_dir):
    with pytest.raises(ConfigError) as err:
        load_ood_pool("cifar100", tmp_path, torch.device("cpu"), (32, 32), 10)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "cifar-100-python") in message and "ood_dataset=none" in message
    with pytest.raises(ConfigError, match="fewer than the 5000 test samples"):
        load_ood_pool("cifar100", cifar100_dir, torch.device("cpu"), (32, 32), 5000)
    pool = load_ood_pool("cifar100", cifar100_dir, torch.device("cpu"), (32, 32), 100)
    assert pool.name == "cifar100" and len(pool) == 4000 and pool.data.inputs.dtype == torch.uint8
