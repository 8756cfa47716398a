"""Random streams: every use of randomness has its own tag, and a stream's parts never collide."""

from __future__ import annotations

import itertools

import pytest

from pfl.seed import STREAMS, derive_seed


def test_a_rounds_sampling_is_not_client_zeros_batch_order():
    # NumPy's SeedSequence ignores trailing zeros: (seed, round) and (seed, round, 0) used to be one stream
    for seed, rnd in itertools.product(range(3), range(1, 5)):
        assert derive_seed(seed, "client_sampling", rnd) != derive_seed(seed, "local_batches", rnd, 0)


def test_trailing_zero_parts_are_a_different_stream():
    assert derive_seed(0, "local_batches", 3) != derive_seed(0, "local_batches", 3, 0)
    assert derive_seed(0, "head_batches", 1, 0) != derive_seed(0, "head_batches", 1, 0, 0)


def test_every_stream_has_its_own_tag_and_seeds():
    assert len(set(STREAMS.values())) == len(STREAMS)
    seeds = {derive_seed(7, name, 1, 2) for name in STREAMS}
    assert len(seeds) == len(STREAMS)


def test_seeds_are_deterministic_63_bit():
    a = derive_seed(11, "ala_slice", 4, 2)
    assert a == derive_seed(11, "ala_slice", 4, 2) and 0 <= a < 2**63


def test_unknown_stream_is_rejected():
    with pytest.raises(ValueError, match="unknown random stream 'typo'"):
        derive_seed(0, "typo", 1)
