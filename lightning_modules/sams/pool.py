"""`ReplayPool`: a bounded FIFO of the scheduler's past labelled batches (pooled contexts and targets).

Each entry is one step's labelled batch: contexts (k, L, D) and targets (k,). The pool holds at most
`max_pairs` pairs; adding past the bound drops the oldest batches first. Only pooled contexts are kept
(L·D floats per pair: 0.5 MB for a 7B Llama, so the default 512 pairs is 256 MB of CPU RAM), never
full hidden states (the original pre-allocated ~170 GB for those). Entries live on the CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class ReplayPool:
    """Past (contexts, targets) batches, at most `max_pairs` pairs in all."""

    def __init__(self, max_pairs: int = 512):
        if max_pairs < 0:
            raise ValueError(f"max_pairs must be >= 0, got {max_pairs}")
        self.max_pairs = max_pairs
        self.batches: list[tuple[Tensor, Tensor]] = []

    @property
    def num_pairs(self) -> int:
        return sum(len(targets) for _, targets in self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def add(self, contexts: Tensor, targets: Tensor) -> None:
        """Append one labelled batch (k, L, D) / (k,), then drop the oldest batches beyond `max_pairs`."""
        if len(contexts) > self.max_pairs:
            contexts, targets = contexts[-self.max_pairs:], targets[-self.max_pairs:]
        if len(contexts):
            self.batches.append((contexts.detach().float().cpu(), targets.detach().float().cpu()))
        while self.num_pairs > self.max_pairs:
            self.batches.pop(0)

    def sample(self, num_batches: int, generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
        """Up to `num_batches` distinct batches, uniformly at random (all of them when the pool has fewer)."""
        if num_batches >= len(self.batches):
            return list(self.batches)
        picks = torch.randperm(len(self.batches), generator=generator)[:num_batches].tolist()
        return [self.batches[i] for i in sorted(picks)]

    def state_dict(self) -> dict[str, Any]:
        return {"max_pairs": self.max_pairs, "batches": [(c.clone(), t.clone()) for c, t in self.batches]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.max_pairs = int(state["max_pairs"])
        self.batches = [(c.float(), t.float()) for c, t in state["batches"]]
