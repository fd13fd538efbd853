"""The interface every multi-reference weighting strategy implements, and what it may ask of the module.

A strategy turns the K references' signals (`signals.ReferenceSignals`) into α, the weights a
multi-reference objective (MRPO, MDPO) mixes the references with: a (K,) vector shared by the
batch, or (B, K) per pair, rows summing to 1. `MultiReferenceModule` drives it:

    prepare(context)            once, before the first training step (offline strategies read the
                                validation split here; skipped when a checkpoint restored the state)
    before_step(context)        before each optimizer step's first micro-batch (tsw draws its arm)
    alphas(signals, training)   every batch; `training=False` (validation, test) never changes state
    after_step(context)         after each optimizer step (tsw updates its posterior)
    state_dict / load_state_dict   the resume contract: saved in every checkpoint, restored exactly

Under DDP every rank must use the same α. A strategy that summarizes a batch sums over the global
batch through `context.all_reduce_sum`; random draws use a generator whose state is the same on
every rank (and saved).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_modules.multiref.signals import ReferenceSignals


class WeightingContext(Protocol):
    """What a strategy may ask of the module that trains with it (tests pass a small fake)."""

    num_references: int

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over all ranks (itself on one process)."""

    def validation_signals(self) -> Iterable[ReferenceSignals]:
        """The whole validation split (the same on every rank), batch by batch: reference columns only, no model pass."""

    def validation_size(self) -> int:
        """Number of pairs in the validation split."""

    def validation_accuracy(self, indices: list[int]) -> float:
        """The policy's preference accuracy on these validation pairs (same value on every rank)."""


class WeightingStrategy:
    """Base class: uniform α, no state. Subclasses override what they need (see the module docstring)."""

    per_example = False  # True when `alphas` returns (B, K)

    def prepare(self, context: WeightingContext) -> None:
        """Called once before the first training step, unless a checkpoint restored the state."""

    @property
    def prepared(self) -> bool:
        return True

    def before_step(self, context: WeightingContext) -> None:
        """Called before the first micro-batch of every optimizer step."""

    def alphas(self, signals: ReferenceSignals, *, training: bool, context: WeightingContext) -> Tensor:
        """α for this batch: (K,) or (B, K) (`per_example`), non-negative, rows summing to 1."""
        k = signals.num_references
        return torch.full((k,), 1.0 / k)

    def after_step(self, context: WeightingContext) -> None:
        """Called after every optimizer step."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
