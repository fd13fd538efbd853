"""Length-grouped sampling: batches of similar lengths, so little of each batch is padding.

The order (as HF transformers' `get_length_grouped_indices`): permute the indices, cut the
permutation into mega-batches of `batch_size * mega_batch_mult`, sort each mega-batch by length
(longest first), then swap the longest batch to the front so an out-of-memory error shows at
step 0 rather than hours in. Example, lengths [3, 9, 1, 7, 5, 8], batch_size 2, mega_batch_mult 2,
no shuffle: mega-batches [0, 1, 2, 3] and [4, 5] sort to [1, 3, 0, 2] and [5, 4]; batch [1, 3]
(max 9) is already first, so the order is [1, 3, 0, 2, 5, 4] → batches {9, 7}, {3, 1}, {8, 5}.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DistributedSampler, Sampler


def length_grouped_indices(lengths: Sequence[int], batch_size: int, mega_batch_mult: int = 50,
                           seed: int | None = 0) -> list[int]:
    """The grouped order of `range(len(lengths))`; `seed=None` skips the permutation (identity)."""
    n = len(lengths)
    if seed is None:
        indices = list(range(n))
    else:
        indices = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    mega = batch_size * mega_batch_mult
    order = []
    for start in range(0, n, mega):
        order += sorted(indices[start : start + mega], key=lambda i: lengths[i], reverse=True)
    return _longest_batch_first(order, lengths, batch_size)


def _longest_batch_first(order: list[int], lengths: Sequence[int], batch_size: int) -> list[int]:
    """Swap the batch holding the longest item with batch 0 (only its first item when it is a short tail)."""
    if not order:
        return order
    k = max(range(len(order)), key=lambda p: lengths[order[p]]) // batch_size  # first position of the max
    head, batch = order[:batch_size], order[k * batch_size : (k + 1) * batch_size]
    if k == 0:
        return order
    if len(batch) == len(head):
        order[:batch_size], order[k * batch_size : (k + 1) * batch_size] = batch, head
    else:  # a tail shorter than batch_size: swapping it would shift every later batch boundary
        p = k * batch_size
        order[0], order[p] = order[p], order[0]
    return order


class LengthGroupedSampler(Sampler[int]):
    """Yields every index once per epoch, in an order whose consecutive `batch_size` chunks have similar lengths."""

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 mega_batch_mult: int = 50):
        """Args:
        lengths: padded length each item needs (e.g. max of chosen and rejected tokens).
        batch_size: the DataLoader's batch size (the grouping unit).
        shuffle: permute before grouping, seeded by seed + epoch (False: the dataset order).
        seed: base seed; the same (seed, epoch) gives the same order.
        mega_batch_mult: mega-batch = batch_size * mega_batch_mult items sorted together
            (larger: less padding, less randomness).
        """
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"batch_size={batch_size} and mega_batch_mult={mega_batch_mult} must be >= 1")
        self.lengths, self.batch_size = list(lengths), batch_size
        self.shuffle, self.seed, self.mega_batch_mult = shuffle, seed, mega_batch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        seed = self.seed + self.epoch if self.shuffle else None
        return iter(length_grouped_indices(self.lengths, self.batch_size, self.mega_batch_mult, seed))


class DistributedLengthGroupedSampler(DistributedSampler):
    """Length grouping under DDP: one global grouped order, dealt out so the ranks' i-th batches match.

    Every rank builds the same order (same seed + epoch) with the global batch `batch_size *
    num_replicas` as grouping unit (so mega-batches hold whole global batches and the longest
    global batch comes first), pads it to `total_size` by repeating items from its tail (the
    shortest, so the padding adds little padding) or truncates it (drop_last), cuts it into global
    chunks of `batch_size * num_replicas` consecutive indices and takes the rank-th `batch_size`
    slice of each; a final short chunk is split evenly, so all ranks get `num_samples`.
    Subclassing DistributedSampler makes Lightning keep it instead of injecting its own.
    """

    def __init__(self, dataset: Any, lengths: Sequence[int], batch_size: int, *, num_replicas: int | None = None,
                 rank: int | None = None, shuffle: bool = True, seed: int = 0, mega_batch_mult: int = 50,
                 drop_last: bool = False):
        """Args as `LengthGroupedSampler`, plus DistributedSampler's `dataset`, `num_replicas`, `rank`, `drop_last`."""
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        if len(lengths) != len(dataset):
            raise ValueError(f"{len(lengths)} lengths for a dataset of {len(dataset)} items")
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"batch_size={batch_size} and mega_batch_mult={mega_batch_mult} must be >= 1")
        self.lengths, self.batch_size, self.mega_batch_mult = list(lengths), batch_size, mega_batch_mult

    def __iter__(self) -> Iterator[int]:
        seed = self.seed + self.epoch if self.shuffle else None
        chunk = self.batch_size * self.num_replicas
        order = length_grouped_indices(self.lengths, chunk, self.mega_batch_mult, seed)
        if len(order) < self.total_size:  # pad with the tail, repeated if it is too short
            tail = order[::-1] * math.ceil((self.total_size - len(order)) / len(order))
            order += tail[: self.total_size - len(order)]
        order = order[: self.total_size]
        mine = []
        for start in range(0, self.total_size, chunk):
            piece = order[start : start + chunk]
            size = len(piece) // self.num_replicas  # batch_size, or less in the final short chunk
            mine += piece[self.rank * size : (self.rank + 1) * size]
        assert len(mine) == self.num_samples
        return iter(mine)


def padding_fraction(lengths: Sequence[int], batches: Iterable[Sequence[int]]) -> float:
    """Padded tokens / total tokens when each batch (a list of indices) is padded to its longest item."""
    total = used = 0
    for batch in batches:
        if batch:
            sizes = [lengths[i] for i in batch]
            total += max(sizes) * len(sizes)
            used += sum(sizes)
    return (total - used) / total if total else 0.0


def chunks(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive `batch_size` slices of `order` (the last may be shorter), as a DataLoader batches them."""
    return [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
