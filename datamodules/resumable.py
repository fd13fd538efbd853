"""Exact mid-epoch resume of the training data order.

Lightning saves the `state_dict()` of every training DataLoader that has one in its checkpoints
and, when a run resumes, calls `load_state_dict()` before the first `iter()`. `ResumableDataLoader`
uses that: its state is the number of batches already yielded in the current epoch plus its
sampler's state, and a resumed run skips those batches at the index level (no data is loaded or
collated for them), so steps k+1..N see exactly the rows an uninterrupted run would have seen.

The samplers here are the training samplers of `TextDataModule`, each able to skip a number of
leading indices once:
- `RandomOrderSampler`: what `DataLoader(shuffle=True)` does (torch's `RandomSampler`: a fresh
  seed drawn from torch's global RNG at each epoch start, then `randperm`), with that seed kept in
  its state so a resumed epoch replays the same permutation; `shuffle=False` is the dataset order.
  Drawing the seed exactly as `RandomSampler` does keeps seeded runs numerically unchanged.
- `ResumableDistributedSampler`, `ResumableLengthGroupedSampler`,
  `ResumableDistributedLengthGroupedSampler`: their order is a function of (seed, epoch), and
  Lightning restores the epoch, so only the skip is needed.
Worked example: 10 rows, batch size 4, stopped after 1 batch of epoch 0 → the resumed loader skips
indices order[0:4] and yields order[4:8], then order[8:10].
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from datamodules.samplers import DistributedLengthGroupedSampler, LengthGroupedSampler


class SkipOnce:
    """Mixin: `skip(n)` makes the next iteration start at its n-th index; every later one is whole."""

    _skip = 0

    def skip(self, n: int) -> None:
        self._skip = int(n)

    def _after_skip(self, indices: Iterator[int]) -> Iterator[int]:
        n, self._skip = self._skip, 0
        return itertools.islice(indices, n, None)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class RandomOrderSampler(SkipOnce, Sampler[int]):
    """`RandomSampler`'s order (seed drawn from the global RNG at each epoch), or the dataset order; resumable."""

    def __init__(self, num_items: int, *, shuffle: bool = True):
        """`num_items`: dataset length; `shuffle`: False gives 0..num_items-1."""
        self.num_items, self.shuffle = num_items, shuffle
        self.seed: int | None = None  # the current epoch's permutation seed
        self._replay_seed: int | None = None

    def __len__(self) -> int:
        return self.num_items

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return self._after_skip(iter(range(self.num_items)))
        if self._replay_seed is not None:  # resuming this epoch: same permutation, no RNG draw
            self.seed, self._replay_seed = self._replay_seed, None
        else:  # exactly RandomSampler's draw, so seeded runs keep their numbers
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return self._after_skip(iter(torch.randperm(self.num_items, generator=generator).tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._replay_seed = state.get("seed")


class ResumableLengthGroupedSampler(SkipOnce, LengthGroupedSampler):
    """`LengthGroupedSampler` that can skip the batches a resumed epoch has already trained on."""

    def __iter__(self) -> Iterator[int]:
        return self._after_skip(super().__iter__())


class ResumableDistributedSampler(SkipOnce, DistributedSampler):
    """`DistributedSampler` (each rank's share, seeded by seed + epoch) that can skip consumed batches."""

    def __iter__(self) -> Iterator[int]:
        return self._after_skip(super().__iter__())


class ResumableDistributedLengthGroupedSampler(SkipOnce, DistributedLengthGroupedSampler):
    """`DistributedLengthGroupedSampler` that can skip consumed batches."""

    def __iter__(self) -> Iterator[int]:
        return self._after_skip(super().__iter__())


class ResumableDataLoader(DataLoader):
    """A DataLoader over a `SkipOnce` sampler whose state is (batches yielded this epoch, sampler state).

    Lightning does not prefetch from sized loaders, so "yielded" is "trained on" when a checkpoint
    is written from a training hook.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, SkipOnce):
            raise TypeError(f"ResumableDataLoader needs a resumable sampler, got {type(self.sampler).__name__}")
        self.batches_yielded = 0
        self._resume_batches = 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._resume_batches = self._resume_batches, 0
        self.sampler.skip(skip * self.batch_size)
        self.batches_yielded = skip
        for batch in super().__iter__():
            self.batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_yielded": self.batches_yielded, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume mid-epoch; a state saved after an epoch's last batch starts the next epoch afresh."""
        done = int(state.get("batches_yielded", 0))
        if 0 < done < len(self):
            self._resume_batches = done
            self.sampler.load_state_dict(state.get("sampler", {}))
