"""Offline weighting strategies: one α vector computed from the validation split before training (SPEC section 4).

- VDW (`offline_1`): α[k] ∝ Σ_i d[i, k], how strongly reference k separates the validation pairs;
- VAW (`offline_2`): α[k] ∝ Σ_i c[i, k], reference k's own accuracy on them.
The sums run over the whole validation split, read from the cached reference columns (no model pass),
so every rank computes the same vector without communicating. The vector is then fixed, logged, and saved in checkpoints,
so a resumed run does not recompute it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from datamodules.utils.errors import UserInputError
from lightning_modules.multiref.base import WeightingContext, WeightingStrategy
from lightning_modules.multiref.signals import ReferenceSignals, normalized


class _Offline(WeightingStrategy):
    def __init__(self):
        self.weights: Tensor | None = None

    def validation_total(self, signals: ReferenceSignals) -> Tensor:
        """(K,) sum over the batch's pairs."""
        raise NotImplementedError

    @property
    def prepared(self) -> bool:
        return self.weights is not None

    def prepare(self, context: WeightingContext) -> None:
        if context.validation_size() == 0:
            raise UserInputError(f"model.weighting={type(self).__name__} computes α from the validation split, which "
                                 "is empty: give the data a validation split (data.init_args.val_split, or a "
                                 "validation file)")
        total = torch.zeros(context.num_references)
        for signals in context.validation_signals():
            total += self.validation_total(signals).cpu()
        self.weights = normalized(total)

    def alphas(self, signals: ReferenceSignals, *, training: bool, context: WeightingContext) -> Tensor:
        if self.weights is None:
            raise RuntimeError(f"{type(self).__name__}.prepare was not called before the first batch")
        return self.weights

    def state_dict(self) -> dict[str, Any]:
        return {"weights": None if self.weights is None else self.weights.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        self.weights = None if weights is None else torch.tensor(weights, dtype=torch.float32)


class VDW(_Offline):
    """α[k] ∝ Σ_i d[i, k] over the validation split: each reference's total length-normalized margin."""

    def validation_total(self, signals: ReferenceSignals) -> Tensor:
        return signals.margins.sum(0)


class VAW(_Offline):
    """α[k] ∝ Σ_i c[i, k] over the validation split: each reference's own preference accuracy."""

    def validation_total(self, signals: ReferenceSignals) -> Tensor:
        return signals.agrees.sum(0)
