"""Length-grouped samplers: permutation, determinism, grouping, DDP dealing, padding accounting."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_modules.studies.padding_benchmark import compare_padding, sample_pair_lengths
from datamodules.samplers import (
    DistributedLengthGroupedSampler,
    LengthGroupedSampler,
    chunks,
    length_grouped_indices,
    padding_fraction,
)


def lognormal_lengths(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(300), 0.7, n), 16, 2048).astype(int).tolist()


LENGTHS = lognormal_lengths(1003)  # not a multiple of any batch or mega-batch size


def test_docstring_example() -> None:
    assert length_grouped_indices([3, 9, 1, 7, 5, 8], 2, 2, seed=None) == [1, 3, 0, 2, 5, 4]


def test_longest_batch_is_swapped_to_the_front() -> None:
    # mega-batches [0..3] → [0, 1, 2, 3] (lengths 4,3,2,1) and [4..7] → [7, 6, 5, 4] (8,7,6,5)
    order = length_grouped_indices([4, 3, 2, 1, 5, 6, 7, 8], 2, 2, seed=None)
    assert order == [7, 6, 2, 3, 0, 1, 5, 4]


@pytest.mark.parametrize("shuffle", [True, False])
def test_every_index_once_per_epoch(shuffle: bool) -> None:
    sampler = LengthGroupedSampler(LENGTHS, 8, shuffle=shuffle, mega_batch_mult=5)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        assert sorted(sampler) == list(range(len(LENGTHS)))
    assert len(sampler) == len(LENGTHS)


def test_deterministic_per_seed_and_epoch() -> None:
    a, b = LengthGroupedSampler(LENGTHS, 8, seed=3), LengthGroupedSampler(LENGTHS, 8, seed=3)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(LengthGroupedSampler(LENGTHS, 8, seed=4)) != list(LengthGroupedSampler(LENGTHS, 8, seed=3))


def test_no_shuffle_ignores_seed_and_epoch() -> None:
    a = LengthGroupedSampler(LENGTHS, 8, shuffle=False, seed=1)
    b = LengthGroupedSampler(LENGTHS, 8, shuffle=False, seed=2)
    b.set_epoch(5)
    assert list(a) == list(b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_longest_batch_first_and_megabatches_sorted(seed: int) -> None:
    batch_size, mult = 8, 5
    order = list(LengthGroupedSampler(LENGTHS, batch_size, seed=seed, mega_batch_mult=mult))
    assert LENGTHS[order[0]] == max(LENGTHS)
    batch_max = [max(LENGTHS[i] for i in batch) for batch in chunks(order, batch_size)]
    assert batch_max[0] == max(batch_max)
    mega = batch_size * mult
    for start in range(0, len(order), mega):
        seg = [LENGTHS[i] for i in order[start : start + mega]]
        # each mega-batch is sorted longest first, except that its first batch may have been swapped
        assert seg[:batch_size] == sorted(seg[:batch_size], reverse=True)
        assert seg[batch_size:] == sorted(seg[batch_size:], reverse=True)


def test_short_tail_holding_the_longest_item() -> None:
    lengths = [1, 2, 3, 4, 5, 6, 7, 8, 100]  # mega-batches of 4: the 100 sits alone in a 1-item tail
    order = length_grouped_indices(lengths, 2, 2, seed=None)
    assert sorted(order) == list(range(9))
    assert order[0] == 8 and [len(b) for b in chunks(order, 2)] == [2, 2, 2, 2, 1]


def test_padding_fraction_hand_example() -> None:
    lengths = [2, 4, 3, 3]
    # batch {2, 4}: 2 padded of 8; batch {3, 3}: 0 of 6 → 2 / 14
    assert padding_fraction(lengths, [[0, 1], [2, 3]]) == pytest.approx(2 / 14)
    assert padding_fraction(lengths, [[0], [1], [2, 3]]) == 0.0
    assert padding_fraction(lengths, []) == 0.0


def test_grouping_reduces_padding() -> None:
    rng = np.random.default_rng(0)
    for batch_size in (4, 16):
        random = padding_fraction(LENGTHS, chunks(rng.permutation(len(LENGTHS)).tolist(), batch_size))
        grouped = padding_fraction(LENGTHS, chunks(list(LengthGroupedSampler(LENGTHS, batch_size)), batch_size))
        assert grouped < random / 3


def distributed(n_ranks: int, batch_size: int, lengths=LENGTHS, mega_batch_mult: int = 5, **kwargs) -> list[list[int]]:
    return [list(DistributedLengthGroupedSampler(list(range(len(lengths))), lengths, batch_size, num_replicas=n_ranks,
                                                 rank=r, mega_batch_mult=mega_batch_mult, **kwargs))
            for r in range(n_ranks)]


@pytest.mark.parametrize(("n_ranks", "batch_size"), [(2, 8), (3, 4), (4, 16)])
def test_distributed_ranks_are_disjoint_and_cover(n_ranks: int, batch_size: int) -> None:
    per_rank = distributed(n_ranks, batch_size)
    n = len(LENGTHS)
    padded = -(-n // n_ranks) * n_ranks
    assert all(len(r) == padded // n_ranks for r in per_rank)
    flat = [i for r in per_rank for i in r]
    assert set(flat) == set(range(n))
    assert len(flat) - len(set(flat)) == padded - n  # only the padding repeats


def test_distributed_drop_last() -> None:
    per_rank = distributed(4, 8, drop_last=True)
    flat = [i for r in per_rank for i in r]
    assert len(flat) == len(set(flat)) == len(LENGTHS) // 4 * 4


def test_distributed_matches_the_global_order_and_groups_each_rank() -> None:
    n_ranks, batch_size = 2, 8
    per_rank = distributed(n_ranks, batch_size, mega_batch_mult=50, seed=7)
    order = length_grouped_indices(LENGTHS, batch_size * n_ranks, 50, seed=7)  # grouped by global batch
    full = (len(LENGTHS) // (batch_size * n_ranks)) * batch_size  # items each rank takes from full chunks
    assert per_rank[0][:full] == [i for c in chunks(order, batch_size)[0 : 2 * full // batch_size : 2] for i in c]
    assert per_rank[1][:full] == [i for c in chunks(order, batch_size)[1 : 2 * full // batch_size : 2] for i in c]
    rng = np.random.default_rng(0)
    random = padding_fraction(LENGTHS, chunks(rng.permutation(len(LENGTHS)).tolist(), batch_size))
    for rank in per_rank:
        assert padding_fraction(LENGTHS, chunks(rank, batch_size)) < random / 3
    # the i-th batches of the ranks have similar lengths (the step waits for the slowest rank)
    maxes = np.array([[max(LENGTHS[i] for i in b) for b in chunks(r, batch_size)] for r in per_rank])
    assert np.median(np.abs(maxes[0] - maxes[1]) / maxes.max(axis=0)) < 0.1


def test_distributed_identical_order_on_every_rank_and_epochs_differ() -> None:
    kwargs = {"num_replicas": 2, "seed": 1, "mega_batch_mult": 5}
    data = list(range(len(LENGTHS)))
    a = DistributedLengthGroupedSampler(data, LENGTHS, 8, rank=0, **kwargs)
    b = DistributedLengthGroupedSampler(data, LENGTHS, 8, rank=0, **kwargs)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)
    assert len(a) == len(list(a))


def test_distributed_tiny_dataset_pads_by_repeating() -> None:
    per_rank = distributed(4, 2, lengths=[5, 9])
    assert all(len(r) == 1 for r in per_rank) and {i for r in per_rank for i in r} == {0, 1}


def test_benchmark_core_on_a_small_sample() -> None:
    lengths = sample_pair_lengths(2000, seed=0)
    assert min(lengths) >= 16 and max(lengths) <= 2048
    rows = compare_padding(lengths, batch_sizes=(4, 16), mega_batch_mult=50, seed=0)
    assert [r["batch_size"] for r in rows] == [4, 16]
    for row in rows:
        assert 0 <= row["grouped"] < row["random"] < 1
        assert row["ratio"] == pytest.approx(row["random"] / row["grouped"])
