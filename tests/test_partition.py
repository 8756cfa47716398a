"""Pathological, Dirichlet, extended Dirichlet (exdir), IID and sort-and-shard partitions of the real CIFAR-10
labels (the ``cifar10`` fixture's slice), pooled or on the dataset's official train / test split, and of
synthetic labels shaped like full CIFAR-10's."""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import pytest
import torch

from pfl.data import partition as partition_module
from pfl.data.datasets import load_cifar10
from pfl.data.partition import (
    Partition,
    PartitionError,
    PartitionSpec,
    exdir,
    least_samples,
    load_or_make_partition,
    make_partition,
    split_validation,
    train_test_sizes,
)

SCHEMES = {
    # PFLlib's CIFAR-10 pathological setting: 20 clients, 2 classes each
    "pathological": PartitionSpec("pathological", num_clients=20, seed=0, classes_per_client=2),
    "dirichlet": PartitionSpec("dirichlet", num_clients=10, seed=0, alpha=0.5),
    "exdir": PartitionSpec("exdir", num_clients=20, seed=0, alpha=1.0, classes_per_client=2),
    # 3,600 samples over 7 clients: shards of 515 (two) and 514 (five)
    "iid": PartitionSpec("iid", num_clients=7, seed=0),
}


@pytest.fixture(scope="module")
def partitions(cifar10) -> dict[str, Partition]:
    return {name: make_partition(cifar10.targets, cifar10.num_classes, spec) for name, spec in SCHEMES.items()}


def _share(client) -> torch.Tensor:
    return torch.cat([client.train, client.test])


def _same(a: Partition, b: Partition) -> bool:
    return len(a.clients) == len(b.clients) and all(
        torch.equal(x.train, y.train) and torch.equal(x.test, y.test) for x, y in zip(a.clients, b.clients))


def test_fixture_holds_real_cifar10(cifar10_dir, cifar10):
    # the partition tests run on real labels: loading the fixture folder gives the same pool
    again = load_cifar10(cifar10_dir)
    assert torch.equal(again.targets, cifar10.targets)
    assert cifar10.num_classes == 10
    assert cifar10.targets.dtype == torch.int64
    assert set(cifar10.targets.unique().tolist()) == set(range(10))


# ---------------------------------------------------------------- properties of every scheme


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_deterministic_for_same_spec_and_seed(cifar10, partitions, scheme):
    again = make_partition(cifar10.targets, cifar10.num_classes, SCHEMES[scheme])
    assert _same(again, partitions[scheme])


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_different_seed_gives_different_partition(cifar10, partitions, scheme):
    spec = SCHEMES[scheme]
    other = make_partition(cifar10.targets, cifar10.num_classes,
                           PartitionSpec(**{**spec.__dict__, "seed": spec.seed + 1}))
    assert not _same(other, partitions[scheme])


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_every_client_has_train_and_test(partitions, scheme):
    p = partitions[scheme]
    assert len(p.clients) == SCHEMES[scheme].num_clients
    for c in p.clients:
        assert len(c.train) > 0 and len(c.test) > 0
        assert c.train.dtype == torch.int64 and c.test.dtype == torch.int64


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_train_test_disjoint_and_shares_disjoint_covering_pool(cifar10, partitions, scheme):
    seen = torch.zeros(len(cifar10), dtype=torch.long)
    for c in partitions[scheme].clients:
        share = _share(c)
        # train and test are disjoint and together are exactly the client's share (no duplicates)
        assert len(set(c.train.tolist()) & set(c.test.tolist())) == 0
        assert len(share.unique()) == len(share)
        seen.index_add_(0, share, torch.ones_like(share))
    # shares are pairwise disjoint (no index counted twice) and every sample of the pool is dealt out
    assert seen.max().item() == 1
    assert seen.min().item() == 1


@pytest.mark.parametrize("train_ratio", [0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.33])
def test_train_test_sizes_match_scikit_learn(train_ratio):
    """PFLlib's split_data calls train_test_split(train_size=train_ratio): sizes must agree at every ratio."""
    from sklearn.model_selection import train_test_split

    for n in range(math.ceil(1 / train_ratio), 2000):  # below, scikit-learn refuses an empty train set
        train, test = train_test_split(np.arange(n), train_size=train_ratio, shuffle=True, random_state=0)
        assert train_test_sizes(n, train_ratio) == (len(train), len(test)), (n, train_ratio)


def test_partition_split_sizes_at_07(cifar10):
    spec = PartitionSpec("dirichlet", num_clients=10, seed=0, alpha=0.5, train_ratio=0.7)
    for c in make_partition(cifar10.targets, cifar10.num_classes, spec).clients:
        n = len(c.train) + len(c.test)
        assert len(c.train) == math.floor(0.7 * n)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_train_ratio_075(partitions, scheme):
    for c in partitions[scheme].clients:
        n = len(c.train) + len(c.test)
        assert len(c.test) == math.ceil(0.25 * n)
        assert len(c.train) / n == pytest.approx(0.75, abs=1 / n + 1e-9)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_label_counts_sums_match(cifar10, partitions, scheme):
    p = partitions[scheme]
    counts = p.label_counts(cifar10.targets, cifar10.num_classes)
    assert counts["spec"]["scheme"] == scheme
    assert len(counts["clients"]) == len(p.clients)
    total = 0
    for i, (entry, c) in enumerate(zip(counts["clients"], p.clients)):
        assert entry["client"] == i
        assert entry["num_train"] == len(c.train) == sum(entry["train"].values())
        assert entry["num_test"] == len(c.test) == sum(entry["test"].values())
        for cls, n in entry["train"].items():
            assert n == int((cifar10.targets[c.train] == int(cls)).sum())
        total += entry["num_train"] + entry["num_test"]
    assert total == len(cifar10)


# ---------------------------------------------------------------- pathological


def test_pathological_two_classes_per_client(cifar10, partitions):
    for c in partitions["pathological"].clients:
        classes = cifar10.targets[_share(c)].unique()
        assert len(classes) == 2


def test_pathological_deals_classes_in_order(cifar10, partitions):
    # ceil(20 / 10 * 2) = 4 clients per class: classes 0 and 1 go to clients 0-3, 2 and 3 to 4-7, ...
    for i, c in enumerate(partitions["pathological"].clients):
        first = 2 * (i // 4)
        assert cifar10.targets[_share(c)].unique().tolist() == [first, first + 1]


def test_pathological_class_chunks_respect_pfllib_lower_bound(cifar10, partitions):
    # PFLlib: a class's chunk has at least int(max(num_per / 10, least_samples / K)) samples
    spec = SCHEMES["pathological"]
    least = least_samples(len(cifar10), spec.num_clients, spec.train_ratio)
    class_sizes = torch.bincount(cifar10.targets, minlength=10)
    for c in partitions["pathological"].clients:
        hist = torch.bincount(cifar10.targets[_share(c)], minlength=10)
        for cls in hist.nonzero().flatten().tolist():
            num_per = class_sizes[cls].item() / 4
            assert hist[cls].item() >= int(max(num_per / 10, least / 10))


def test_pathological_balance_gives_equal_chunks(cifar10):
    spec = PartitionSpec("pathological", num_clients=20, seed=0, classes_per_client=2, balance=True)
    p = make_partition(cifar10.targets, 10, spec)
    class_sizes = torch.bincount(cifar10.targets, minlength=10)
    for i, c in enumerate(p.clients):
        hist = torch.bincount(cifar10.targets[_share(c)], minlength=10)
        for cls in hist.nonzero().flatten().tolist():
            per = class_sizes[cls].item() / 4
            if i % 4 < 3:   # the first 3 owners get int(n_c / 4); the last one the remainder
                assert hist[cls].item() == int(per)
            else:
                assert hist[cls].item() == class_sizes[cls].item() - 3 * int(per)


def test_pathological_infeasible_raises(cifar10):
    # 4 clients * 2 classes = 8 slots < 10 classes
    spec = PartitionSpec("pathological", num_clients=4, seed=0, classes_per_client=2)
    with pytest.raises(PartitionError, match="classes_per_client") as info:
        make_partition(cifar10.targets, 10, spec)
    assert "num_clients" in str(info.value)


def test_pathological_too_many_classes_per_client_raises(cifar10):
    spec = PartitionSpec("pathological", num_clients=20, seed=0, classes_per_client=11)
    with pytest.raises(PartitionError, match="classes_per_client=11"):
        make_partition(cifar10.targets, 10, spec)


def test_unknown_scheme_and_too_many_clients_raise(cifar10):
    with pytest.raises(PartitionError, match="unknown partition"):
        make_partition(cifar10.targets, 10, PartitionSpec("uniform", num_clients=5, seed=0))
    with pytest.raises(PartitionError, match="num_clients"):
        make_partition(cifar10.targets[:10], 10, PartitionSpec("dirichlet", num_clients=11, seed=0))


# ---------------------------------------------------------------- Dirichlet


def _mean_max_class_fraction(cifar10, alpha: float, seeds=(0, 1, 2)) -> float:
    fractions = []
    for seed in seeds:
        p = make_partition(cifar10.targets, 10, PartitionSpec("dirichlet", num_clients=10, seed=seed, alpha=alpha))
        for c in p.clients:
            hist = torch.bincount(cifar10.targets[_share(c)], minlength=10).double()
            fractions.append((hist.max() / hist.sum()).item())
    return float(np.mean(fractions))


def test_dirichlet_skew_decreases_with_alpha(cifar10):
    skew = [_mean_max_class_fraction(cifar10, a) for a in (0.05, 0.5, 5.0)]
    assert skew[0] > skew[1] > skew[2]
    # near-IID at alpha = 5: the largest class is close to 1/10 of a client's data
    assert skew[2] < 0.35
    # strongly non-IID at alpha = 0.05: most of a client's data is one class
    assert skew[0] > 0.5


@pytest.mark.parametrize("alpha", [0.1, 0.5])
def test_dirichlet_pfllib_minimum_samples(cifar10, alpha):
    spec = PartitionSpec("dirichlet", num_clients=20, seed=0, alpha=alpha)
    p = make_partition(cifar10.targets, 10, spec)
    least = least_samples(len(cifar10), 20, 0.75)
    # PFLlib: int(min(10 / (1 - 0.75), N / 20 / 2)) = int(min(40, N / 40))
    assert least == int(min(40, len(cifar10) / 40))
    assert least > 0
    assert min(len(c.train) + len(c.test) for c in p.clients) >= least


def test_least_samples_formula():
    assert least_samples(60000, 20, 0.75) == 40      # min(10 / 0.25 = 40, 60000 / 20 / 2 = 1500)
    assert least_samples(600, 20, 0.75) == 15        # min(40, 600 / 20 / 2 = 15)
    assert least_samples(60000, 20, 0.5) == 20       # min(10 / 0.5 = 20, 1500)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no 0/0 when every open client drew p = 0
def test_dirichlet_infeasible_raises(cifar10):
    # 20 clients from 40 samples: every client needs least_samples(40, 20, .75) = int(min(40, 1)) = 1
    # sample, impossible to guarantee in a draw at alpha = 1e-3 where each class goes to one client
    spec = PartitionSpec("dirichlet", num_clients=20, seed=0, alpha=1e-3)
    with pytest.raises(PartitionError, match="raise alpha"):
        make_partition(cifar10.targets[:40], 10, spec)


# ---------------------------------------------------------------- extended Dirichlet (exdir)


class _ScriptedRng:
    """Stands in for the Generator: scripted class-choice scores and Dirichlet draws; ``shuffle`` keeps the order."""

    def __init__(self, scores, draws, alpha, num_clients):
        self.scores, self.draws = list(scores), list(draws)
        self.alpha, self.num_clients = alpha, num_clients

    def random(self, shape):
        out = np.asarray(self.scores.pop(0), dtype=float)
        assert out.shape == shape
        return out

    def shuffle(self, x):
        pass

    def dirichlet(self, alphas):
        assert alphas.tolist() == [self.alpha] * self.num_clients   # a draw over all clients, owners or not
        return np.asarray(self.draws.pop(0), dtype=float)


def test_exdir_hand_computed_draws():
    # 3 clients, 3 classes of 32, 32 and 16 samples (indices 0-31, 32-63, 64-79), 2 classes per client.
    # Level 1 needs max(2 * 3 // 3 // 2, 1) = 1 owner per class; a client takes its 2 lowest-scored classes.
    labels = np.repeat([0, 1, 2], [32, 32, 16])
    spec = PartitionSpec("exdir", num_clients=3, seed=0, alpha=0.7, classes_per_client=2)
    scores = [[[0, 1, 2]] * 3,                       # deal 1: everyone takes {0, 1}; class 2 unowned -> redeal
              [[0, 1, 2], [2, 0, 1], [0, 2, 1]]]     # deal 2: owners 0: [0, 2], 1: [0, 1], 2: [1, 2]
    draws = [
        # draw 1: class 0 -> client 2 (32); class 1 -> client 1 (32); class 2: client 1 is full (32 >= 80 / 3),
        # client 2 drew 0, no share left -> the whole class to its last owner, client 2. Client 0 has 0 < 10: redraw
        [0, 0, 1], [0, 1, 0], [0, 1, 0],
        # draw 2, class 0: owners 0 and 2 -> [.375, 0, .125] / .5 = [.75, 0, .25] -> cuts at 24, 24 of 32
        [0.375, 0.5, 0.125],
        # class 1: owners 0 and 1 -> [.0625, .4375, 0] / .5 = [.125, .875, 0] -> cuts at 4, 32 of 32
        [0.0625, 0.4375, 0.5],
        # class 2: client 1 (28 >= 80 / 3) is full, client 2 drew 0: no share left -> all 16 to client 2
        [0.5, 0.5, 0.0],
    ]
    rng = _ScriptedRng(scores, draws, alpha=0.7, num_clients=3)
    shares = exdir(labels, 3, spec, rng)
    assert not rng.scores and not rng.draws            # exactly two deals and two draws
    assert [s.tolist() for s in shares] == [
        list(range(0, 24)) + list(range(32, 36)),      # client 0: 24 of class 0, 4 of class 1
        list(range(36, 64)),                           # client 1: 28 of class 1
        list(range(24, 32)) + list(range(64, 80)),     # client 2: 8 of class 0, all 16 of class 2
    ]


def test_exdir_holds_at_most_classes_per_client_and_pfllib_minimum(cifar10, partitions):
    spec = SCHEMES["exdir"]
    sizes = []
    for c in partitions["exdir"].clients:
        share = _share(c)
        assert len(cifar10.targets[share].unique()) <= spec.classes_per_client
        sizes.append(len(share))
    assert min(sizes) >= 10                            # PFLlib's min_require_size
    assert sum(sizes) == len(cifar10)


def test_exdir_alpha_sets_the_skew_within_owners(cifar10):
    # at a large alpha the owners of a class split it near evenly; at a small one a single owner takes most
    def largest_owner_share(alpha):
        spec = PartitionSpec("exdir", num_clients=10, seed=0, alpha=alpha, classes_per_client=5)
        hist = torch.stack([torch.bincount(cifar10.targets[_share(c)], minlength=10)
                            for c in make_partition(cifar10.targets, 10, spec).clients]).double()
        return (hist.max(0).values / hist.sum(0)).mean().item()

    assert largest_owner_share(0.1) > 0.6 > largest_owner_share(100.0)


def test_exdir_key_uses_alpha_and_classes_per_client(cifar10):
    fp, spec = cifar10.fingerprint(), SCHEMES["exdir"]
    for field, value in (("alpha", 0.9), ("classes_per_client", 5)):
        assert spec.key(fp) != PartitionSpec(**{**spec.__dict__, field: value}).key(fp)
    assert spec.key(fp) != PartitionSpec(**{**spec.__dict__, "scheme": "dirichlet"}).key(fp)


@pytest.mark.parametrize("num_clients, cpc, match", [(20, 11, "classes_per_client=11 exceeds"),
                                                     (4, 2, "leaves some of the 10 classes")])
def test_exdir_impossible_class_deal_raises(cifar10, num_clients, cpc, match):
    spec = PartitionSpec("exdir", num_clients=num_clients, seed=0, classes_per_client=cpc)
    with pytest.raises(PartitionError, match=match):
        make_partition(cifar10.targets, 10, spec)


def test_exdir_gives_up_after_bounded_redraws(cifar10, monkeypatch):
    # 10 clients from 90 samples: nobody can reach 10 samples each
    with pytest.raises(PartitionError, match="at least 10 samples; raise alpha"):
        make_partition(cifar10.targets[:90], 10, PartitionSpec("exdir", num_clients=10, seed=0, classes_per_client=2))
    monkeypatch.setattr(partition_module, "_MAX_CLASS_DEALS", 1)
    rng = _ScriptedRng([[[0, 1, 2]] * 3], [], alpha=0.1, num_clients=3)    # class 2 left unowned
    with pytest.raises(PartitionError, match="gave every class 1 owner"):
        exdir(np.repeat([0, 1, 2], 20), 3, PartitionSpec("exdir", num_clients=3, seed=0), rng)


# ---------------------------------------------------------------- cache


def test_disk_cache_round_trip(cifar10, tmp_path):
    spec = SCHEMES["pathological"]
    fp = cifar10.fingerprint()
    first, hit1 = load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path)
    assert hit1 is False
    assert (tmp_path / "partitions" / f"{spec.key(fp)}.npz").is_file()
    second, hit2 = load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path)
    assert hit2 is True
    assert second.spec == spec
    assert _same(first, second)
    for c in second.clients:
        assert c.train.dtype == torch.int64 and c.test.dtype == torch.int64
    # and the cached partition is exactly what make_partition computes
    assert _same(second, make_partition(cifar10.targets, 10, spec))


def test_cache_key_depends_on_spec_and_data(cifar10, tmp_path):
    fp = cifar10.fingerprint()
    base = SCHEMES["pathological"]
    other = PartitionSpec(**{**base.__dict__, "seed": 1})
    assert base.key(fp) != other.key(fp)
    assert base.key(fp) != base.key("0" * 16)
    assert len(base.key(fp)) == 16
    # alpha is unused by the pathological scheme, so it does not change the key
    assert base.key(fp) == PartitionSpec(**{**base.__dict__, "alpha": 0.9}).key(fp)
    # a different spec misses the cache and gets its own file
    load_or_make_partition(cifar10.targets, 10, base, fp, tmp_path)
    part, hit = load_or_make_partition(cifar10.targets, 10, other, fp, tmp_path)
    assert hit is False
    assert len(list((tmp_path / "partitions").glob("*.npz"))) == 2
    assert _same(part, make_partition(cifar10.targets, 10, other))


def _resave(path, **changes) -> None:
    """Rewrite a cache file with some entries replaced (``None`` deletes one)."""
    with np.load(path) as z:
        arrays = dict(z)
    for key, value in changes.items():
        if value is None:
            del arrays[key]
        else:
            arrays[key] = value(arrays[key])
    with path.open("wb") as f:
        np.savez(f, **arrays)


CACHE_DAMAGES = {
    "random_bytes": lambda p: p.write_bytes(np.random.default_rng(0).bytes(1000)),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "missing_client": lambda p: _resave(p, test_3=None),
    "index_out_of_range": lambda p: _resave(p, train_0=lambda a: np.append(a, 10**6)),
    "negative_index": lambda p: _resave(p, test_1=lambda a: -a),
    "float_indices": lambda p: _resave(p, train_2=lambda a: a.astype(np.float64)),
    "2d_indices": lambda p: _resave(p, train_2=lambda a: a[:, None]),
    "pickled_object": lambda p: _resave(p, train_0=lambda a: np.array([{"a": 1}], dtype=object)),
}


@pytest.mark.parametrize("damage", list(CACHE_DAMAGES))
def test_unreadable_cache_file_is_rebuilt_with_a_warning(cifar10, tmp_path, caplog, damage):
    spec, fp = SCHEMES["dirichlet"], cifar10.fingerprint()
    load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path)
    path = tmp_path / "partitions" / f"{spec.key(fp)}.npz"
    CACHE_DAMAGES[damage](path)
    with caplog.at_level(logging.WARNING, logger="pfl.data.partition"):
        rebuilt, hit = load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path)
    assert hit is False
    assert _same(rebuilt, make_partition(cifar10.targets, 10, spec))
    warnings = [r.getMessage() for r in caplog.records if r.name == "pfl.data.partition"]
    assert len(warnings) == 1 and str(path) in warnings[0] and "rebuilding" in warnings[0], warnings
    assert "\n" not in warnings[0]
    again, hit = load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path)  # the rebuilt file is used
    assert hit is True and _same(again, rebuilt)
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_two_writers_do_not_collide(cifar10, tmp_path, monkeypatch):
    # writer A has written its temp file; writer B then runs start to end before A renames its file
    spec, fp = SCHEMES["pathological"], cifar10.fingerprint()
    path = tmp_path / "partitions" / f"{spec.key(fp)}.npz"
    real_replace, renamed = os.replace, []

    def interleaved_replace(src, dst):
        renamed.append(os.fspath(src))
        if len(renamed) == 1:
            assert load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path)[1] is False  # writer B
        real_replace(src, dst)

    monkeypatch.setattr(partition_module.os, "replace", interleaved_replace)
    first, hit = load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path)  # writer A
    monkeypatch.undo()
    assert hit is False and len(renamed) == 2 and renamed[0] != renamed[1]
    assert all(os.path.dirname(t) == str(path.parent) for t in renamed)  # same folder: the rename is atomic
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    cached, hit = load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path)
    assert hit is True and _same(cached, first) and _same(cached, make_partition(cifar10.targets, 10, spec))


@pytest.mark.parametrize("failure", ["disk_full", "folder_in_the_way"])
def test_unwritable_cache_warns_and_leaves_no_temp_file(cifar10, tmp_path, monkeypatch, caplog, failure):
    spec, fp = SCHEMES["iid"], cifar10.fingerprint()
    path = tmp_path / "partitions" / f"{spec.key(fp)}.npz"
    if failure == "disk_full":
        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(partition_module.np, "savez", disk_full)
    else:
        path.mkdir(parents=True)  # the rename onto it fails as on a read-only cache
    with caplog.at_level(logging.WARNING, logger="pfl.data.partition"):
        part, hit = load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path)
    assert hit is False and _same(part, make_partition(cifar10.targets, 10, spec))
    warnings = [r.getMessage() for r in caplog.records if r.name == "pfl.data.partition"]
    assert len(warnings) == 1 and f"cannot write partition cache {path}" in warnings[0] and "\n" not in warnings[0]
    assert [p.name for p in path.parent.iterdir()] == ([path.name] if failure == "folder_in_the_way" else [])


# ---------------------------------------------------------------- validation split


def test_split_validation_takes_last_samples():
    train = torch.arange(10) * 7
    fit, val = split_validation(train, 0.2)
    # int(0.2 * 10) = 2 -> the last two indices
    assert val.tolist() == [56, 63]
    assert fit.tolist() == [0, 7, 14, 21, 28, 35, 42, 49]
    fit, val = split_validation(torch.arange(10), 0.25)   # int(2.5) = 2
    assert val.tolist() == [8, 9] and len(fit) == 8


def test_split_validation_keeps_both_parts_non_empty():
    fit, val = split_validation(torch.arange(3), 0.2)     # int(0.6) = 0 -> at least 1
    assert fit.tolist() == [0, 1] and val.tolist() == [2]
    fit, val = split_validation(torch.arange(2), 0.9)     # int(1.8) = 1, at most n - 1 = 1
    assert fit.tolist() == [0] and val.tolist() == [1]


@pytest.mark.parametrize("n", [0, 1])
def test_split_validation_too_small_raises(n):
    with pytest.raises(PartitionError, match="validation"):
        split_validation(torch.arange(n), 0.2)


# ---------------------------------------------------------------- IID


def test_iid_shards_are_array_split_sizes_in_shuffled_order(cifar10, partitions):
    spec = SCHEMES["iid"]
    sizes = [len(c.train) + len(c.test) for c in partitions["iid"].clients]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == [515, 515, 514, 514, 514, 514, 514]  # numpy.array_split: the larger shards first
    # the shares are the seeded permutation cut in order (then each shard shuffled into test + train)
    perm = np.random.default_rng(spec.seed).permutation(len(cifar10))
    for c, shard in zip(partitions["iid"].clients, np.array_split(perm, spec.num_clients)):
        assert sorted(_share(c).tolist()) == sorted(shard.tolist())


def test_iid_disjoint_cover_and_deterministic(cifar10, partitions):
    shares = [set(_share(c).tolist()) for c in partitions["iid"].clients]
    assert sum(len(s) for s in shares) == len(cifar10)
    assert set().union(*shares) == set(range(len(cifar10)))
    again = make_partition(cifar10.targets, cifar10.num_classes, SCHEMES["iid"])
    assert _same(again, partitions["iid"])


def test_iid_label_histograms_follow_the_pool(cifar10, partitions):
    pool = torch.bincount(cifar10.targets, minlength=10).double()
    pool /= pool.sum()
    for c in partitions["iid"].clients:
        hist = torch.bincount(cifar10.targets[_share(c)], minlength=10).double()
        hist /= hist.sum()
        # ~514 samples: a class fraction's sampling std is about 0.013; every class stays within 0.05
        assert (hist - pool).abs().max().item() < 0.05
        assert 0.5 * (hist - pool).abs().sum().item() < 0.1     # total variation distance
    # against a non-IID scheme, where a client's label mix is far from the pool's
    skewed = partitions["dirichlet"].clients[0]
    hist = torch.bincount(cifar10.targets[_share(skewed)], minlength=10).double()
    assert 0.5 * (hist / hist.sum() - pool).abs().sum().item() > 0.1


def test_iid_cache_key_ignores_alpha_and_classes_per_client(cifar10):
    fp = cifar10.fingerprint()
    spec = SCHEMES["iid"]
    for field, value in (("alpha", 0.9), ("classes_per_client", 5)):
        assert spec.key(fp) == PartitionSpec(**{**spec.__dict__, field: value}).key(fp)
    assert spec.key(fp) != PartitionSpec(**{**spec.__dict__, "scheme": "dirichlet"}).key(fp)
    assert spec.key(fp) != PartitionSpec(**{**spec.__dict__, "num_clients": 8}).key(fp)


def test_iid_is_a_run_config_partition():
    from pfl.config import ConfigError, load_config

    assert load_config(None, ["partition=iid"]).partition == "iid"
    with pytest.raises(ConfigError, match="iid"):   # the error lists the choices
        load_config(None, ["partition=uniform"])


# ---------------------------------------------------------------- shards (sort-and-shard)
# Synthetic labels shaped like full CIFAR-10's: 5,000 train and 1,000 test images per class, in no order.
_CIFAR10_TRAIN, _CIFAR10_TEST = 50_000, 10_000


def cifar10_shaped_labels() -> torch.Tensor:
    """int64 (60,000,): a shuffled train part (5,000 per class) followed by a shuffled test part (1,000 per class)."""
    rng = np.random.default_rng(2024)
    train, test = rng.permutation(np.repeat(np.arange(10), 5000)), rng.permutation(np.repeat(np.arange(10), 1000))
    return torch.from_numpy(np.concatenate([train, test]))


def test_shards_hand_computed_cut():
    # 25 samples of 5 classes (5 each), 4 clients x 2 shards: 8 shards of 25 // 8 = 3 samples cut from the
    # label-sorted order 0 0 0 0 0 1 1 1 1 1 2 ... 4; the last sorted sample (a 4) belongs to no shard.
    labels = np.random.default_rng(7).permutation(np.repeat(np.arange(5), 5))
    shard_labels = [(0, 0, 0), (0, 0, 1), (1, 1, 1), (1, 2, 2), (2, 2, 2), (3, 3, 3), (3, 3, 4), (4, 4, 4)]
    spec = PartitionSpec("shards", num_clients=4, seed=3, shards_per_client=2)
    shares = partition_module.shards(labels, 5, spec, np.random.default_rng(spec.seed))
    used: list[int] = []
    for share in shares:
        assert len(share) == 6
        got = sorted(labels[share].tolist())
        pairs = [(a, b) for a in range(8) for b in range(a + 1, 8)
                 if sorted(shard_labels[a] + shard_labels[b]) == got]
        assert len(pairs) == 1, f"client labels {got}: not exactly one union of two shards"
        used.extend(pairs[0])
    assert sorted(used) == list(range(8))                            # every shard dealt once
    everything = np.concatenate(shares)
    assert len(set(everything.tolist())) == 24                      # disjoint
    assert labels[np.setdiff1d(np.arange(25), everything)].tolist() == [4]  # the left-out sample


def test_shards_are_blocks_of_the_label_sorted_order():
    labels = cifar10_shaped_labels()[:_CIFAR10_TRAIN].numpy()
    spec = PartitionSpec("shards", num_clients=100, seed=0, shards_per_client=2)
    shares = partition_module.shards(labels, 10, spec, np.random.default_rng(0))
    for share in shares:
        assert len(share) == 500
        halves = [share[:250], share[250:]]              # the client's two shards, in draw order
        for shard in halves:
            assert len(set(labels[shard].tolist())) == 1  # 5,000 per class / 250: a shard never straddles classes
    assert len(set(np.concatenate(shares).tolist())) == _CIFAR10_TRAIN  # 200 x 250: every image, once


def test_shards_refuses_more_shards_than_samples():
    with pytest.raises(PartitionError, match="shards_per_client"):
        make_partition(torch.zeros(30, dtype=torch.int64), 1, PartitionSpec("shards", num_clients=10, seed=0,
                                                                            shards_per_client=4))


@pytest.mark.parametrize("num_clients, train, test", [(100, 500, 100), (1000, 50, 10)])
def test_shards_on_the_official_split_match_mocosfl(num_clients, train, test):
    # MocoSFL's noniid_alllabel on CIFAR-10's train set: 2 random shards of 50,000 / (2 num_clients) images a
    # client, so every client the same size, of at most 2 classes, the class pairs random
    labels = cifar10_shaped_labels()
    spec = PartitionSpec("shards", num_clients=num_clients, seed=0, shards_per_client=2, official_split=True)
    part = make_partition(labels, 10, spec, num_train=_CIFAR10_TRAIN)
    assert {(len(c.train), len(c.test)) for c in part.clients} == {(train, test)}
    pairs = [frozenset(labels[c.train].tolist()) for c in part.clients]
    assert max(map(len, pairs)) <= 2
    assert len(set(pairs)) > 30                                     # dealt in order there would be 5
    assert max(len(set(labels[c.test].tolist())) for c in part.clients) <= 2
    train_idx, test_idx = torch.cat([c.train for c in part.clients]), torch.cat([c.test for c in part.clients])
    assert len(train_idx.unique()) == _CIFAR10_TRAIN and int(train_idx.max()) < _CIFAR10_TRAIN
    assert len(test_idx.unique()) == _CIFAR10_TEST and int(test_idx.min()) >= _CIFAR10_TRAIN


def test_shards_key_uses_shards_per_client_only():
    fp = "0" * 16
    spec = PartitionSpec("shards", num_clients=10, seed=0)
    assert spec.key(fp) != PartitionSpec(**{**spec.__dict__, "shards_per_client": 3}).key(fp)
    for field, value in (("alpha", 0.9), ("classes_per_client", 5)):
        assert spec.key(fp) == PartitionSpec(**{**spec.__dict__, field: value}).key(fp)
    iid = PartitionSpec("iid", num_clients=10, seed=0)
    assert iid.key(fp) == PartitionSpec(**{**iid.__dict__, "shards_per_client": 3}).key(fp)


def test_shards_is_a_run_config_partition():
    from pfl.config import ConfigError, load_config

    cfg = load_config(None, ["partition=shards", "shards_per_client=3"])
    assert (cfg.partition, cfg.shards_per_client, cfg.partition_label) == ("shards", 3, "shards3")
    assert cfg.flat_params()["shards_per_client"] == 3
    assert "shards_per_client" not in load_config(None, ["partition=iid"]).flat_params()
    with pytest.raises(ConfigError, match="shards_per_client"):
        load_config(None, ["partition=shards", "shards_per_client=0"])


# ---------------------------------------------------------------- official train / test split, num_partitions

def test_official_split_partitions_train_and_test_sets_apart(cifar10):
    # the fixture's slice: 5 train batches of 600 (3,000 official train images), then 600 test images
    assert cifar10.num_train == 3000
    spec = PartitionSpec("iid", num_clients=8, seed=0, official_split=True, num_partitions=20)
    part = make_partition(cifar10.targets, 10, spec, num_train=cifar10.num_train)
    assert [(len(c.train), len(c.test)) for c in part.clients] == [(150, 30)] * 8
    train_idx, test_idx = torch.cat([c.train for c in part.clients]), torch.cat([c.test for c in part.clients])
    assert int(train_idx.max()) < 3000 <= int(test_idx.min())
    assert len(train_idx.unique()) == len(train_idx) and len(test_idx.unique()) == len(test_idx)


def test_flexifed_iid_shares_of_cifar10_shaped_data():
    # FlexiFed's cifar_iid(train, 20) and cifar_iid(test, 20), 8 of them used: 2,500 train and 500 test a client
    labels = cifar10_shaped_labels()
    spec = PartitionSpec("iid", num_clients=8, seed=0, official_split=True, num_partitions=20)
    part = make_partition(labels, 10, spec, num_train=_CIFAR10_TRAIN)
    assert [(len(c.train), len(c.test)) for c in part.clients] == [(2500, 500)] * 8


@pytest.mark.parametrize("official", [False, True])
def test_num_partitions_keeps_the_first_num_clients_shares(cifar10, official):
    # num_partitions=20 with 8 clients is the 20-client partition's first 8 clients, draw for draw
    base = dict(scheme="iid", seed=1, official_split=official)
    eight = make_partition(cifar10.targets, 10, PartitionSpec(num_clients=8, num_partitions=20, **base), 3000)
    twenty = make_partition(cifar10.targets, 10, PartitionSpec(num_clients=20, **base), 3000)
    assert len(eight.clients) == 8
    assert all(torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
               for a, b in zip(eight.clients, twenty.clients))


def test_official_split_and_num_partitions_refuse_what_they_cannot_mean(cifar10):
    spec = PartitionSpec("iid", num_clients=8, seed=0, official_split=True)
    with pytest.raises(PartitionError, match="official_split"):
        make_partition(cifar10.targets, 10, spec)                      # no official train size known
    with pytest.raises(PartitionError, match="num_partitions=4 is below num_clients=8"):
        make_partition(cifar10.targets, 10, PartitionSpec("iid", num_clients=8, seed=0, num_partitions=4))
    with pytest.raises(PartitionError, match="num_partitions=700 exceeds the 600 samples of the official test set"):
        make_partition(cifar10.targets, 10, PartitionSpec("iid", num_clients=8, seed=0, official_split=True,
                                                         num_partitions=700), cifar10.num_train)


def test_pooled_default_is_unchanged_by_the_new_fields(cifar10):
    # keys of specs without the new fields are those earlier versions computed, so their cache files stay valid
    fp = "0123456789abcdef"
    assert PartitionSpec("iid", 8, 0).key(fp) == "f5d02fb0708ead42"
    assert PartitionSpec("pathological", 20, 0, classes_per_client=2).key(fp) == "d6460fe3d625fdca"
    assert PartitionSpec("dirichlet", 20, 1, alpha=0.5, train_ratio=0.8).key(fp) == "87eaa12d6edbc134"
    assert PartitionSpec("exdir", 10, 0, alpha=0.1, classes_per_client=3, balance=True).key(fp) == "8ce6f0200abeddb7"
    # official_split and num_partitions enter the key when set; train_ratio no longer does under official_split
    spec = PartitionSpec("iid", 8, 0)
    keys = {PartitionSpec(**{**spec.__dict__, **change}).key(fp) for change in (
        {}, {"official_split": True}, {"num_partitions": 20}, {"official_split": True, "num_partitions": 20})}
    assert len(keys) == 4
    official = PartitionSpec("iid", 8, 0, official_split=True)
    assert official.key(fp) == PartitionSpec(**{**official.__dict__, "train_ratio": 0.5}).key(fp)


def test_cached_official_split_is_checked_against_the_boundary(cifar10, tmp_path, caplog):
    spec = PartitionSpec("iid", num_clients=8, seed=0, official_split=True, num_partitions=20)
    fp = cifar10.fingerprint()
    built, hit = load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path, num_train=3000)
    assert hit is False
    again, hit = load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path, num_train=3000)
    assert hit is True and _same(again, built)
    # the same file read with another boundary holds train indices past it: rebuilt, with a warning
    with caplog.at_level(logging.WARNING, logger="pfl.data.partition"):
        moved, hit = load_or_make_partition(cifar10.targets, 10, spec, fp, tmp_path, num_train=2400)
    assert hit is False and "invalid indices" in caplog.text
    assert int(torch.cat([c.train for c in moved.clients]).max()) < 2400


def test_loaders_record_the_official_train_size(cifar10, cifar100, tinyimagenet_dir, tmp_path):
    from dataclasses import replace

    from conftest import tinyimagenet_classes
    from pfl.data.datasets import load_tinyimagenet

    assert cifar10.num_train == 3000 and len(cifar10) == 3600              # 5 x 600 train rows, then test_batch
    assert cifar100.num_train == 3000 and len(cifar100) == 4000            # train rows, then test
    tiny = load_tinyimagenet(tinyimagenet_classes(tinyimagenet_dir, tmp_path, 2))
    assert tiny.num_train == 160 and len(tiny) == 200                      # 80 train JPEGs a class, then val
    assert tiny.targets[:160].tolist() == [0] * 80 + [1] * 80
    # the fingerprint (the key of partition caches) does not cover the new field
    assert replace(cifar10, num_train=None).fingerprint() == cifar10.fingerprint()


def test_run_config_partition_fields():
    from pfl.config import ConfigError, load_config
    from pfl.train import partition_spec

    cfg = load_config(None, ["partition=iid", "num_clients=8", "num_partitions=20", "official_split=true"])
    spec = partition_spec(cfg)
    assert (spec.official_split, spec.num_partitions, spec.num_clients) == (True, 20, 8)
    assert "official train and test sets" in cfg.describe() and "20 shares" in cfg.describe()
    with pytest.raises(ConfigError, match="num_partitions=4 is below num_clients=8"):
        load_config(None, ["num_clients=8", "num_partitions=4"])
    with pytest.raises(ConfigError, match="official_split"):
        load_config(None, ["partition=pfllib", "partition_name=x", "official_split=true"])


# ---------------------------------------------------------------- natural


def _traces():
    """2 groups (viewers) x 2 videos x 4 time steps; sample i = 8 * group + 4 * video + time."""
    groups = torch.arange(16) // 8
    video = torch.arange(16) // 4 % 2
    time = torch.arange(16) % 4
    return groups, {"video": video, "time": time}


def test_natural_split_by_time_keeps_each_traces_first_part_for_training():
    from pfl.data.partition import natural

    groups, keys = _traces()
    part = natural(groups, keys, PartitionSpec("natural", 2, seed=0, train_ratio=0.75))
    # each trace of 4 steps: floor(0.75 * 4) = 3 train steps (times 0, 1, 2), time 3 tests
    assert part.clients[0].train.tolist() == [0, 1, 2, 4, 5, 6] and part.clients[0].test.tolist() == [3, 7]
    assert part.clients[1].train.tolist() == [8, 9, 10, 12, 13, 14] and part.clients[1].test.tolist() == [11, 15]


def test_natural_split_by_a_key_tests_every_client_on_the_same_unseen_values():
    from pfl.data.partition import natural

    groups, keys = _traces()
    part = natural(groups, keys, PartitionSpec("natural", 2, seed=3, split_by="video", num_test_keys=1))
    test_video = keys["video"][part.clients[0].test].unique().tolist()
    assert len(test_video) == 1
    for c, client in enumerate(part.clients):
        assert set(keys["video"][client.test].tolist()) == set(test_video)  # the same video for every client
        assert test_video[0] not in keys["video"][client.train].tolist()  # never trained on
        assert set(groups[torch.cat([client.train, client.test])].tolist()) == {c}  # one client per group
        assert len(client.train) == len(client.test) == 4


def test_natural_clients_are_the_first_groups_or_a_seeded_sample():
    from pfl.data.partition import natural

    groups = torch.arange(40) // 4  # 10 groups of 4 samples
    keys = {"time": torch.arange(40) % 4}
    first = natural(groups, keys, PartitionSpec("natural", 3, seed=0, train_ratio=0.5))
    assert [groups[c.train[0]].item() for c in first.clients] == [0, 1, 2]
    sampled = natural(groups, keys, PartitionSpec("natural", 3, seed=0, train_ratio=0.5, sample_groups=True))
    chosen = [groups[c.train[0]].item() for c in sampled.clients]
    expected = sorted(np.random.default_rng(0).choice(np.arange(10), 3, replace=False).tolist())
    assert chosen == expected


@pytest.mark.parametrize("spec, message", [
    (dict(num_clients=11), "num_clients=11 exceeds the dataset's 10 natural groups"),
    (dict(num_clients=2, split_by="speaker"), "split_by=speaker: the dataset has no such key"),
    (dict(num_clients=2, split_by="video", num_test_keys=2), "num_test_keys=2: .* of the 2 values of video"),
])
def test_natural_refuses_what_it_cannot_build(spec, message):
    from pfl.data.partition import natural

    groups = torch.arange(40) // 4
    keys = {"time": torch.arange(40) % 4, "video": torch.arange(40) % 2}
    with pytest.raises(PartitionError, match=message):
        natural(groups, keys, PartitionSpec("natural", seed=0, **spec))
