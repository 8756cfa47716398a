"""Partitions of a labelled pool among clients, with PFLlib's semantics.

Five schemes; the non-IID three of PFLlib as in its ``utils/dataset_utils.py`` (``separate_data``
and ``split_data``) so that numbers compare with the literature:

* **pathological** (McMahan et al., AISTATS 2017; PFLlib ``pat``): classes are dealt
  in order to the first ``ceil(num_clients / num_classes * classes_per_client)``
  clients that still need classes, so each client holds exactly
  ``classes_per_client`` classes; a class's samples are split evenly
  (``balance``) or in random sizes of at least ``max(n/10, least_samples/K)``.
* **dirichlet** (Hsu et al., 2019; PFLlib ``dir``): per class, client shares are
  drawn from Dirichlet(``alpha``); clients already holding more than N/num_clients
  samples get no more; redrawn until every client has ``least_samples`` samples.
* **exdir** (extended Dirichlet, Li et al., arXiv:2311.03154; PFLlib ``exdir``): each client
  first draws ``classes_per_client`` distinct classes, redrawn until every class has enough
  owners; then per class, shares are drawn from Dirichlet(``alpha``) over that class's owners
  only (with ``dirichlet``'s cap), redrawn until every client has 10 samples. See :func:`exdir`.
* **iid** (balanced IID, in the role of PFLlib's ``niid=False, balance=True``): all
  sample indices are shuffled and cut into ``num_clients`` contiguous shards by
  ``numpy.array_split``, so shard sizes differ by at most one and each client's label mix
  follows the pool's up to sampling noise. ``alpha``, ``classes_per_client`` and ``balance``
  are not used. (PFLlib's own ``niid=False`` runs its ``pat`` dealer with every class per
  client, a per-class even split: ``partition=pathological`` with ``classes_per_client``
  = the class count and ``balance=true`` reproduces that one.)
* **shards** (sort-and-shard, McMahan et al., AISTATS 2017, Sec. 3; MocoSFL's ``noniid_alllabel``):
  the samples sorted by label are cut into ``num_clients * shards_per_client`` equal shards and
  every client gets ``shards_per_client`` of them at random. See :func:`shards`.
* **natural** (flwr-datasets' ``NaturalIdPartitioner``): one client per natural group of the dataset (the viewer,
  the speaker), split into train and test by time or by a key such as the video. Needs no labels. See :func:`natural`.

Each client's share is then shuffled and split ``train_ratio`` / rest into train and
test (PFLlib: 75/25). With ``official_split`` train and test are not pooled: the scheme splits the
dataset's own train set and, separately, its own test set, and a client's train split is its
share of the one, its test split its share of the other (FlexiFed, FedGen, MocoSFL, FL-bench);
``train_ratio`` is then not used. With ``num_partitions`` = S the scheme makes S shares and
the first ``num_clients`` of them are the clients (FlexiFed's ``cifar_iid(train, 20)`` of which
8 clients take part). Everything is drawn from one ``numpy.random.Generator``
seeded by ``seed``, and the result is cached on disk keyed by the partition
config and the dataset fingerprint (see :func:`load_or_make_partition`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

# PFLlib's dataset_utils fixes batch_size = 10 when it computes least_samples.
_PFLLIB_BATCH_SIZE = 10
_MAX_DIRICHLET_TRIES = 1000
# exdir: PFLlib's fixed minimum client size (its min_require_size) and our bound on its class-dealing redraws.
_EXDIR_MIN_SAMPLES = 10
_MAX_CLASS_DEALS = 10_000
_CACHE_VERSION = 2  # 2: scikit-learn's train/test sizes at every train_ratio

log = logging.getLogger(__name__)


class PartitionError(ValueError):
    """The requested partition cannot be built; the message names the field to change."""


@dataclass(frozen=True)
class PartitionSpec:
    """Everything that determines a partition (the cache key, with the dataset fingerprint).

    ``alpha`` is used by ``dirichlet`` and ``exdir``, ``classes_per_client`` by ``pathological``
    and ``exdir``, ``shards_per_client`` by ``shards``; none enters the key of another scheme
    (``iid`` uses none). ``official_split``: partition the dataset's own train and test sets
    separately (``train_ratio`` is then not used); ``num_partitions``: make that many shares, of
    which the first ``num_clients`` are the clients (``None``: ``num_clients``). Both enter the
    key only when set, so the keys (and cache files) of earlier specs stay valid.
    """

    scheme: str
    num_clients: int
    seed: int
    alpha: float = 0.1
    classes_per_client: int = 2
    balance: bool = False
    train_ratio: float = 0.75
    shards_per_client: int = 2
    official_split: bool = False
    num_partitions: int | None = None
    split_by: str = "time"
    num_test_keys: int = 4
    sample_groups: bool = False

    def key(self, dataset_fingerprint: str) -> str:
        """16-hex-char hash of the spec's used fields, the dataset fingerprint and the cache format version."""
        unused = {"alpha": self.scheme not in ("dirichlet", "exdir"),
                  "classes_per_client": self.scheme not in ("pathological", "exdir"),
                  "shards_per_client": self.scheme != "shards",
                  "official_split": not self.official_split,
                  "train_ratio": self.official_split,
                  "num_partitions": self.num_partitions is None,
                  "split_by": self.scheme != "natural", "sample_groups": self.scheme != "natural",
                  "num_test_keys": self.scheme != "natural" or self.split_by == "time"}
        used = {k: v for k, v in self.__dict__.items() if not unused.get(k, False)}
        blob = json.dumps({"spec": used, "data": dataset_fingerprint, "v": _CACHE_VERSION}, sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class ClientSplit:
    """One client's data as int64 index tensors into the pool: ``train`` (n_train,), ``test`` (n_test,)."""

    train: torch.Tensor
    test: torch.Tensor


@dataclass(frozen=True)
class Partition:
    """The clients' splits, in client-id order."""

    spec: PartitionSpec
    clients: tuple[ClientSplit, ...]

    def label_counts(self, labels: torch.Tensor, num_classes: int | None) -> dict:
        """Per-client split sizes and label histograms (JSON-ready): ``{"spec": ..., "clients": [{"client",
        "num_train", "num_test", "train", "test"}]}``; a regression (``num_classes`` ``None``) has sizes only."""
        def hist(idx: torch.Tensor) -> dict[str, int]:
            counts = torch.bincount(labels[idx], minlength=num_classes).tolist()
            return {str(c): n for c, n in enumerate(counts) if n}

        def client(i: int, c: ClientSplit) -> dict:
            sizes = {"client": i, "num_train": len(c.train), "num_test": len(c.test)}
            return sizes if num_classes is None else {**sizes, "train": hist(c.train), "test": hist(c.test)}

        return {"spec": self.spec.__dict__, "clients": [client(i, c) for i, c in enumerate(self.clients)]}


def least_samples(num_samples: int, num_clients: int, train_ratio: float) -> int:
    """PFLlib's minimum samples per client: ``int(min(10 / (1 - train_ratio), N / num_clients / 2))``."""
    return int(min(_PFLLIB_BATCH_SIZE / (1 - train_ratio), num_samples / num_clients / 2))


def pathological(labels: np.ndarray, num_classes: int, spec: PartitionSpec,
                 rng: np.random.Generator) -> list[np.ndarray]:
    """Pathological (``pat``) split of sample indices; returns one index array per client.

    Raises:
        PartitionError: ``classes_per_client`` exceeds the number of classes, or too few
            client slots remain for some class (raise ``num_clients`` or ``classes_per_client``).
    """
    n, cpc = spec.num_clients, spec.classes_per_client
    if cpc > num_classes:
        raise PartitionError(f"classes_per_client={cpc} exceeds the {num_classes} classes of the dataset")
    least = least_samples(len(labels), n, spec.train_ratio)
    remaining = [cpc] * n
    owned: list[list[np.ndarray]] = [[] for _ in range(n)]
    per_class = math.ceil(n / num_classes * cpc)
    for c in range(num_classes):
        idx_c = np.flatnonzero(labels == c)
        selected = [i for i in range(n) if remaining[i] > 0][:per_class]
        if not selected:
            raise PartitionError(
                f"pathological partition: no client left for class {c} with num_clients={n} and "
                f"classes_per_client={cpc}; raise num_clients or classes_per_client so that "
                f"num_clients * classes_per_client >= {num_classes} classes")
        num_per = len(idx_c) / len(selected)
        if spec.balance:
            sizes = [int(num_per)] * (len(selected) - 1)
        else:
            low = int(max(num_per / 10, least / num_classes))
            sizes = rng.integers(low, max(low + 1, int(num_per)), len(selected) - 1).tolist()
        sizes.append(len(idx_c) - sum(sizes))
        for client, chunk in zip(selected, np.split(idx_c, np.cumsum(sizes)[:-1])):
            owned[client].append(chunk)
            remaining[client] -= 1
    return [np.concatenate(parts) if parts else np.empty(0, np.int64) for parts in owned]


def dirichlet(labels: np.ndarray, num_classes: int, spec: PartitionSpec,
              rng: np.random.Generator) -> list[np.ndarray]:
    """Dirichlet(``alpha``) (``dir``) split of sample indices; returns one index array per client.

    Raises:
        PartitionError: no draw gave every client PFLlib's minimum number of samples
            within 1,000 tries (raise ``alpha`` or lower ``num_clients``).
    """
    n, total = spec.num_clients, len(labels)
    least = least_samples(total, n, spec.train_ratio)

    def cut_points(c: int, idx_c: np.ndarray, batches: list[list[int]]) -> np.ndarray:
        p = rng.dirichlet(np.repeat(spec.alpha, n))
        capped = np.array([pj * (len(b) < total / n) for pj, b in zip(p, batches)])
        mass = capped.sum()
        p = capped / mass if mass > 0 else p  # every open client drew 0: keep the uncapped draw
        return (np.cumsum(p) * len(idx_c)).astype(int)[:-1]

    return _redraw_until(labels, num_classes, spec, rng, cut_points, least, "dirichlet")


def _redraw_until(labels: np.ndarray, num_classes: int, spec: PartitionSpec, rng: np.random.Generator,
                  cut_points: Callable[[int, np.ndarray, list[list[int]]], np.ndarray], least: int,
                  scheme: str) -> list[np.ndarray]:
    """The Dirichlet schemes' loop: per class, shuffle its indices and cut them at ``cut_points(class, indices,
    clients' indices so far)`` ((num_clients - 1,) ascending); the whole split is redrawn until every client holds
    ``least`` samples.

    Raises:
        PartitionError: no draw in 1,000 gave every client ``least`` samples.
    """
    n = spec.num_clients
    for _ in range(_MAX_DIRICHLET_TRIES):
        batches: list[list[int]] = [[] for _ in range(n)]
        for c in range(num_classes):
            idx_c = np.flatnonzero(labels == c)
            rng.shuffle(idx_c)
            for b, chunk in zip(batches, np.split(idx_c, cut_points(c, idx_c, batches))):
                b.extend(chunk.tolist())
        if min(len(b) for b in batches) >= least:
            return [np.asarray(b, dtype=np.int64) for b in batches]
    raise PartitionError(
        f"{scheme} partition: no draw in {_MAX_DIRICHLET_TRIES} tries gave every one of {n} clients "
        f"at least {least} samples; raise alpha (now {spec.alpha}) or lower num_clients")


def _deal_classes(num_classes: int, spec: PartitionSpec, rng: np.random.Generator) -> list[np.ndarray]:
    """exdir's first level: the owners (ascending client ids) of each class.

    Each client takes ``classes_per_client`` distinct classes uniformly at random (its lowest
    scores in a row of ``rng.random``); the deal is redrawn until every class has at least
    ``max(classes_per_client * num_clients // num_classes // 2, 1)`` owners.

    Raises:
        PartitionError: ``classes_per_client`` exceeds the classes, too few slots cover them,
            or no deal in 10,000 succeeded.
    """
    n, cpc = spec.num_clients, spec.classes_per_client
    if cpc > num_classes:
        raise PartitionError(f"classes_per_client={cpc} exceeds the {num_classes} classes of the dataset")
    if n * cpc < num_classes:
        raise PartitionError(
            f"exdir partition: num_clients * classes_per_client = {n} * {cpc} leaves some of the {num_classes} "
            "classes without an owner; raise num_clients or classes_per_client")
    need = max(cpc * n // num_classes // 2, 1)
    for _ in range(_MAX_CLASS_DEALS):
        taken = np.zeros((n, num_classes), dtype=bool)
        np.put_along_axis(taken, np.argsort(rng.random((n, num_classes)), axis=1)[:, :cpc], True, axis=1)
        if taken.sum(axis=0).min() >= need:
            return [np.flatnonzero(taken[:, c]) for c in range(num_classes)]
    raise PartitionError(
        f"exdir partition: no deal of {cpc} classes to each of {n} clients in {_MAX_CLASS_DEALS} tries gave every "
        f"class {need} owner(s); raise classes_per_client or num_clients")


def exdir(labels: np.ndarray, num_classes: int, spec: PartitionSpec,
          rng: np.random.Generator) -> list[np.ndarray]:
    """Extended Dirichlet (``exdir``) split of sample indices; returns one index array per client.

    PFLlib's ``separate_data`` ``exdir`` branch (``dataset/utils/dataset_utils.py``, after Li et al.,
    arXiv:2311.03154). First level (:func:`_deal_classes`): every client owns ``classes_per_client``
    random classes. Second level, redrawn as a whole until every client holds at least 10 samples
    (PFLlib's fixed ``min_require_size``; not :func:`least_samples`): for each class, its indices are
    shuffled and a share vector over *all* clients is drawn from Dirichlet(``alpha``); a client's
    share is zeroed unless it owns the class and holds fewer than N / ``num_clients`` samples so far;
    the rest is normalized and the class cut at ``floor(cumsum * n_class)``. When the last cut point
    falls short of ``n_class`` (float rounding), the cuts from the class's last owner on are moved to
    ``n_class``, so that owner takes the remainder. A client thus holds at most
    ``classes_per_client`` classes. ``balance`` is not used.

    Deliberate differences from PFLlib: when every owner's share is zero (all full, or zero
    draws), PFLlib divides 0 by 0 and its NaN cut points hand the whole class to the last
    owner; pfl gives it to that owner without the NaNs. PFLlib retries both levels forever;
    pfl stops after 10,000 class deals and 1,000 share draws. The final per-client shuffle is
    left out (:func:`make_partition` permutes every share before its train/test split).

    Raises:
        PartitionError: as :func:`_deal_classes`, or no draw in 1,000 gave every client 10
            samples (raise ``alpha`` or lower ``num_clients``).
    """
    owners = _deal_classes(num_classes, spec, rng)
    n, total = spec.num_clients, len(labels)

    def cut_points(c: int, idx_c: np.ndarray, batches: list[list[int]]) -> np.ndarray:
        p = rng.dirichlet(np.repeat(spec.alpha, n))
        open_owner = np.zeros(n, dtype=bool)
        open_owner[owners[c]] = True
        open_owner &= np.array([len(b) < total / n for b in batches])
        p = p * open_owner
        mass = p.sum()
        cuts = (np.cumsum(p / mass if mass > 0 else p) * len(idx_c)).astype(int)[:-1]
        if cuts.size and cuts[-1] != len(idx_c):
            cuts[owners[c][-1]:] = len(idx_c)
        return cuts

    return _redraw_until(labels, num_classes, spec, rng, cut_points, _EXDIR_MIN_SAMPLES, "exdir")


def iid(labels: np.ndarray, num_classes: int, spec: PartitionSpec,
        rng: np.random.Generator) -> list[np.ndarray]:
    """Balanced IID split of sample indices; returns one index array per client.

    The N indices are permuted by ``rng`` and cut by ``numpy.array_split`` into ``num_clients``
    shards of ``N // num_clients`` or ``N // num_clients + 1`` samples (the larger ones first).
    ``num_classes``, ``alpha``, ``classes_per_client`` and ``balance`` are not used.
    """
    return np.array_split(rng.permutation(len(labels)), spec.num_clients)


def shards(labels: np.ndarray, num_classes: int, spec: PartitionSpec,
           rng: np.random.Generator) -> list[np.ndarray]:
    """Sort-and-shard split of sample indices; returns one index array per client.

    McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017, Sec. 3 (pathological non-IID MNIST: 200 shards of 300, two per client), as
    MocoSFL's ``noniid_alllabel`` (SonyResearch/MocoSFL ``utils.py``, non-``hetero`` branch) runs it:
    the N indices are sorted by label; with S = ``num_clients * shards_per_client`` shards of
    ``N // S`` samples, shard s is the sorted indices ``[s * size, (s + 1) * size)`` (the last
    ``N - S * size`` are left out); every client gets ``shards_per_client`` distinct shards drawn
    uniformly without replacement. On CIFAR-10's 50,000 train images with 100 clients and 2 shards
    each: 200 shards of 250, each inside one class, so a client holds 500 images of at most 2
    (random) classes. Within a class the order is a random permutation (MocoSFL sorts a randomly
    permuted ``Subset``; numpy's default sort is not stable, which reorders a class further, in no
    way that changes the distribution). The clients' shard sets are the rows of a random
    permutation of the shard ids, which draws them with the distribution of MocoSFL's loop of
    ``np.random.choice(remaining, shards_per_client, replace=False)``. ``num_classes``, ``alpha``,
    ``classes_per_client`` and ``balance`` are not used.

    Raises:
        PartitionError: fewer samples than shards (lower ``num_clients`` or ``shards_per_client``).
    """
    n, per = spec.num_clients, spec.shards_per_client
    size = len(labels) // (n * per)
    if size == 0:
        raise PartitionError(f"shards partition: {n} clients x {per} shards_per_client = {n * per} shards exceed "
                             f"the {len(labels)} samples; lower num_clients or shards_per_client")
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    owned = rng.permutation(n * per).reshape(n, per)
    return [np.concatenate([by_label[s * size:(s + 1) * size] for s in row]) for row in owned]


_SCHEMES = {"pathological": pathological, "dirichlet": dirichlet, "exdir": exdir, "iid": iid, "shards": shards}


def train_test_sizes(n: int, train_ratio: float) -> tuple[int, int]:
    """``(n_train, n_test)`` of scikit-learn's ``train_test_split(train_size=train_ratio)`` on n samples.

    scikit-learn (``model_selection._split._validate_shuffle_split``) takes
    ``n_train = floor(train_ratio * n)`` and gives the rest to the test split; PFLlib's
    ``split_data`` calls it this way. (``ceil(n * (1 - train_ratio))`` test samples agrees at
    0.75 only: ``1 - 0.7`` is ``0.30000000000000004`` in floating point.)
    """
    n_train = math.floor(train_ratio * n)
    return n_train, n - n_train


def _train_test(idx: np.ndarray, train_ratio: float, rng: np.random.Generator) -> ClientSplit:
    idx = rng.permutation(idx)
    _, n_test = train_test_sizes(len(idx), train_ratio)  # ShuffleSplit's order: test first, then train
    return ClientSplit(train=torch.from_numpy(idx[n_test:].copy()), test=torch.from_numpy(idx[:n_test].copy()))


def make_partition(labels: torch.Tensor, num_classes: int, spec: PartitionSpec,
                   num_train: int | None = None) -> Partition:
    """Split a labelled pool among ``spec.num_clients`` clients (no cache).

    Pooled (default): the scheme splits the pool into ``spec.num_partitions`` (default
    ``num_clients``) shares, the first ``num_clients`` are kept, and each is shuffled and split
    ``train_ratio`` / rest (:func:`train_test_sizes`). With ``spec.official_split``: the scheme
    splits the official train set ``[0, num_train)`` and, with the same rule and independent
    draws, the official test set ``[num_train, N)``; client i's train split is its (shuffled)
    share of the one, its test split its share of the other. So iid shares of both are uniform,
    ``pathological`` deals the same classes to a client in both (it deals classes in order), and
    ``dirichlet``, ``exdir`` and ``shards`` draw a client's test classes apart from its train
    classes (FlexiFed's ``cifar_iid(test, 20)`` and MocoSFL's whole-test-set kNN need no more).

    Args:
        labels: int64 tensor (N,) of the whole pool.
        num_classes: number of classes K.
        spec: partition settings.
        num_train: how many leading samples of the pool form the dataset's official train set
            (:attr:`pfl.data.datasets.Dataset.num_train`); needed with ``official_split``.

    Raises:
        PartitionError: the scheme is unknown, ``num_partitions`` is below ``num_clients``, there
            are more partitions than samples (in either official part), ``official_split`` without
            a ``num_train`` inside (0, N), or a client ends up with no train or no test sample.
    """
    if spec.scheme not in _SCHEMES:
        raise PartitionError(f"unknown partition {spec.scheme!r}; choose one of {', '.join(_SCHEMES)}")
    parts = spec.num_partitions or spec.num_clients
    if parts < spec.num_clients:
        raise PartitionError(f"num_partitions={parts} is below num_clients={spec.num_clients}; set num_partitions "
                             f">= {spec.num_clients}, or leave it unset")
    rng = np.random.default_rng(spec.seed)
    labels_np = labels.numpy()
    if spec.official_split:
        if num_train is None or not 0 < num_train < len(labels_np):
            raise PartitionError(f"official_split needs the dataset's official train / test boundary inside the pool "
                                 f"of {len(labels_np)} (got num_train={num_train}); set official_split=false")
        train = _shares(labels_np[:num_train], num_classes, spec, rng, "official train set")
        test = _shares(labels_np[num_train:], num_classes, spec, rng, "official test set")
        clients = tuple(ClientSplit(torch.from_numpy(rng.permutation(tr)),
                                    torch.from_numpy(rng.permutation(te) + num_train)) for tr, te in zip(train, test))
    else:
        shares = _shares(labels_np, num_classes, spec, rng, "dataset")
        clients = tuple(_train_test(s, spec.train_ratio, rng) for s in shares)
    empty = [i for i, c in enumerate(clients) if len(c.train) == 0 or len(c.test) == 0]
    if empty:
        raise PartitionError(f"clients {empty} got no train or test samples; lower num_clients")
    return Partition(spec, clients)


def _shares(labels: np.ndarray, num_classes: int, spec: PartitionSpec, rng: np.random.Generator,
            what: str) -> list[np.ndarray]:
    """The first ``num_clients`` of the scheme's ``num_partitions`` shares of ``labels`` (M,): index arrays into it.

    Raises:
        PartitionError: more partitions than the ``what``'s samples, or as the scheme.
    """
    field, parts = ("num_partitions", spec.num_partitions) if spec.num_partitions else ("num_clients", spec.num_clients)
    if parts > len(labels):
        raise PartitionError(f"{field}={parts} exceeds the {len(labels)} samples of the {what}; lower {field}")
    return _SCHEMES[spec.scheme](labels, num_classes, replace(spec, num_clients=parts), rng)[:spec.num_clients]


def load_or_make_partition(labels: torch.Tensor, num_classes: int, spec: PartitionSpec,
                           dataset_fingerprint: str, cache_dir: str | Path,
                           num_train: int | None = None) -> tuple[Partition, bool]:
    """Return the partition for ``spec``, from ``<cache_dir>/partitions/<key>.npz`` when present.

    ``num_train``: the dataset's official train size (:attr:`pfl.data.datasets.Dataset.num_train`),
    used with ``spec.official_split`` (see :func:`make_partition`).

    A cache file that cannot be read or does not hold a valid partition of ``labels`` (with
    ``official_split``: train indices below ``num_train``, test indices from it on) is
    rebuilt and replaced, with a one-line warning on the ``pfl.data.partition`` logger. A new
    file is written under a name unique to this writer and renamed into place, so concurrent
    runs never see a half-written file nor write into each other's. If the cache cannot be
    written (read-only folder, disk full), a one-line warning is logged and the partition is
    returned all the same.

    Returns:
        ``(partition, cache_hit)``.

    Raises:
        PartitionError: as :func:`make_partition`, when the partition must be built.
    """
    path = Path(cache_dir) / "partitions" / f"{spec.key(dataset_fingerprint)}.npz"
    if path.is_file():
        cached = _read_cached(path, spec.num_clients, len(labels), num_train if spec.official_split else None)
        if cached is not None:
            return Partition(spec, cached), True
    partition = make_partition(labels, num_classes, spec, num_train)
    _write_cached(path, partition)
    return partition, False


def _read_cached(path: Path, num_clients: int, num_samples: int,
                 num_train: int | None = None) -> tuple[ClientSplit, ...] | None:
    """The client splits stored in a partition cache file; None (after a logged warning) if unusable.

    Usable means: ``train_{i}`` and ``test_{i}`` for every client, each a 1-D int64 array of
    indices in [0, num_samples); with ``num_train`` (an official split), train indices in
    [0, num_train) and test indices in [num_train, num_samples). Pickled entries are never loaded.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = [(z[f"train_{i}"], z[f"test_{i}"]) for i in range(num_clients)]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        problem = f"cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:160]})"
    else:
        train_end, test_start = (num_samples, 0) if num_train is None else (num_train, num_train)
        bad = [i for i, (tr, te) in enumerate(arrays) if not all(
            a.dtype == np.int64 and a.ndim == 1 and (a.size == 0 or (a.min() >= low and a.max() < high))
            for a, low, high in ((tr, 0, train_end), (te, test_start, num_samples)))]
        if not bad:
            return tuple(ClientSplit(torch.from_numpy(tr), torch.from_numpy(te)) for tr, te in arrays)
        problem = f"holds invalid indices for client {bad[0]}"
    log.warning("partition cache %s %s; rebuilding it", path, problem)
    return None


def _write_cached(path: Path, partition: Partition) -> None:
    """Write ``partition`` to ``path`` atomically (a temp file unique to this writer, then ``os.replace``).

    Logs a one-line warning instead of raising when the file cannot be written; no temp file is left.
    """
    arrays = {f"{part}_{i}": getattr(c, part).numpy() for i, c in enumerate(partition.clients)
              for part in ("train", "test")}
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex}.tmp")  # same folder: rename is atomic
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("xb") as f:  # "x": never opens another writer's file; mode follows the umask
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("cannot write partition cache %s (%s); continuing without it, so the next run builds the "
                    "partition again (set cache_dir=... to a writable folder)", path, err)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a successful replace


def natural(groups: torch.Tensor, keys: dict[str, torch.Tensor], spec: PartitionSpec) -> Partition:
    """One client per natural group (flwr-datasets' ``NaturalIdPartitioner``: one partition per distinct id), each
    split into train and test by ``spec.split_by``.

    Clients are the first ``num_clients`` groups in id order, or with ``sample_groups`` a sample of
    ``num_clients`` groups drawn without replacement (sorted by id). ``split_by``:

    * ``"time"``: each trace (the samples of one group sharing every key but ``time``: one viewer watching one
      video) is ordered by its ``time`` key and its first ``floor(train_ratio * n)`` samples train, the rest test
      (a test window's history may overlap the last train window's target; nothing is skipped between them);
    * a key name (``"video"``): ``num_test_keys`` of the key's values, drawn without replacement, are the test
      values of every client, the rest the train values, so a client's test split holds content it never trained
      on and all clients test on the same content.

    Draws come from ``numpy.random.default_rng(seed)``: first the test values, then the sampled groups. Within a
    split, samples keep the pool's order.

    Args:
        groups: int64 (N,): the natural group of each sample.
        keys: int64 (N,) per-sample keys (:attr:`pfl.data.datasets.Dataset.keys`).
        spec: the partition settings (``scheme`` ``"natural"``).

    Raises:
        PartitionError: more clients than groups, an unknown ``split_by`` key, ``num_test_keys`` not below the
            key's number of values, or a client without train or test samples; the message names the field.
    """
    ids = torch.unique(groups)
    if spec.num_clients > len(ids):
        raise PartitionError(f"num_clients={spec.num_clients} exceeds the dataset's {len(ids)} natural groups; "
                             f"set num_clients <= {len(ids)}")
    if spec.split_by not in keys:
        raise PartitionError(f"split_by={spec.split_by}: the dataset has no such key; choose one of "
                             f"{', '.join(sorted(keys))}")
    rng = np.random.default_rng(spec.seed)
    if spec.split_by == "time":
        is_test = _later_part(groups, keys, spec.train_ratio)
    else:
        values = torch.unique(keys[spec.split_by])
        if not 0 < spec.num_test_keys < len(values):
            raise PartitionError(f"num_test_keys={spec.num_test_keys}: the test split takes that many of the "
                                 f"{len(values)} values of {spec.split_by}; use 1..{len(values) - 1}")
        test_values = torch.from_numpy(rng.choice(values.numpy(), spec.num_test_keys, replace=False))
        is_test = torch.isin(keys[spec.split_by], test_values)
    chosen = np.sort(rng.choice(ids.numpy(), spec.num_clients, replace=False)) if spec.sample_groups else \
        ids[:spec.num_clients].numpy()
    clients = []
    for group in chosen.tolist():
        mine = groups == group
        clients.append(ClientSplit(torch.nonzero(mine & ~is_test).flatten(), torch.nonzero(mine & is_test).flatten()))
    empty = [i for i, c in enumerate(clients) if len(c.train) == 0 or len(c.test) == 0]
    if empty:
        raise PartitionError(f"natural partition: clients {empty} got no train or test samples; change split_by "
                             "or train_ratio")
    return Partition(spec, tuple(clients))


def _later_part(groups: torch.Tensor, keys: dict[str, torch.Tensor], train_ratio: float) -> torch.Tensor:
    """bool (N,): whether a sample lies after the first ``floor(train_ratio * n)`` samples of its trace by ``time``
    (a trace: the samples sharing their group and every key but ``time``)."""
    other = [keys[k] for k in sorted(keys) if k != "time"]
    _, trace = torch.unique(torch.stack([groups, *other], dim=1), dim=0, return_inverse=True)
    order = torch.from_numpy(np.lexsort((keys["time"].numpy(), trace.numpy())))  # by trace, then time
    sizes = torch.bincount(trace)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order)) - starts[trace[order]]  # position of each sample within its trace
    return rank >= torch.floor(sizes[trace] * train_ratio).long()


def split_validation(train: torch.Tensor, val_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out the last ``int(val_ratio * n)`` (at least 1) train indices as validation, as PFLlib's FedFomo does.

    Returns:
        ``(fit, val)`` index tensors; ``fit`` is what local training uses.

    Raises:
        PartitionError: fewer than 2 train samples, so no split leaves both parts non-empty.
    """
    n = len(train)
    if n < 2:
        raise PartitionError(f"a client with {n} train sample(s) cannot hold out a validation split; "
                             "lower num_clients or val_ratio")
    n_val = min(n - 1, max(1, int(val_ratio * n)))
    return train[: n - n_val], train[n - n_val:]
