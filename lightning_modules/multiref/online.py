"""Weighting strategies that read the training batches: `Fixed`, `ARWC`, `SWCW`, `SWCWOneHot` (SPEC section 4).

With d (B, K) the references' length-normalized margins of a batch (`signals.py`):
- ARWC ("original", per pair): α[i, k] = d[i, k] / Σ_j d[i, j];
- SWCW (`online_1`): the batch mean of the previous batch's ARWC rows, one K-vector for the whole
  batch; uniform 1/K on the first batch. The original notebook kept the previous batch's B × K
  matrix and gave its row i to pair i of the next batch, pairing unrelated examples; here the
  rows are averaged, so the weight does not depend on where a pair lands in its batch;
- SWCW one-hot: the reference with the largest mean d over the previous batch, alone.
"Previous batch" is the previous training micro-batch, over all ranks (the global batch).
A pair on which every reference scores chosen and rejected alike (Σ_j d = 0) gets uniform α, not NaN.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from datamodules.utils.errors import UserInputError
from lightning_modules.multiref.base import WeightingContext, WeightingStrategy
from lightning_modules.multiref.signals import ReferenceSignals, normalized


class Fixed(WeightingStrategy):
    """α given in the config (renormalized to sum to 1)."""

    def __init__(self, weights: list[float]):
        """Fixed weights.

        Args:
            weights: one non-negative weight per reference of data.init_args.reference_cache, in that order.
        """
        if not weights or any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise UserInputError(f"model.weighting.weights={weights} must be non-negative, one per reference, "
                                 "and not all 0")
        self.weights = [float(w) for w in weights]

    def alphas(self, signals: ReferenceSignals, *, training: bool, context: WeightingContext) -> Tensor:
        if len(self.weights) != signals.num_references:
            raise UserInputError(f"model.weighting.weights has {len(self.weights)} values, but the batch has "
                                 f"K={signals.num_references} references (data.init_args.reference_cache)")
        return normalized(torch.tensor(self.weights))

    def __repr__(self) -> str:
        return f"Fixed(weights={self.weights})"


class ARWC(WeightingStrategy):
    """Per pair: α[i, k] ∝ d[i, k], each reference's own length-normalized margin on that pair (the paper's original)."""

    per_example = True

    def alphas(self, signals: ReferenceSignals, *, training: bool, context: WeightingContext) -> Tensor:
        return normalized(signals.margins)


class _PreviousBatch(WeightingStrategy):
    """A K-vector summarizing the previous training batch (global over ranks), uniform before the first."""

    def __init__(self):
        self.previous: Tensor | None = None

    def summary(self, signals: ReferenceSignals) -> Tensor:
        """(B, K) rows whose mean over the global batch is stored."""
        raise NotImplementedError

    def weights(self, previous: Tensor) -> Tensor:
        """α (K,) from the stored summary."""
        raise NotImplementedError

    def alphas(self, signals: ReferenceSignals, *, training: bool, context: WeightingContext) -> Tensor:
        k = signals.num_references
        alphas = torch.full((k,), 1.0 / k) if self.previous is None else self.weights(self.previous)
        if training:
            rows = self.summary(signals)
            totals = context.all_reduce_sum(torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])]))
            self.previous = (totals[:k] / totals[k].clamp(min=1)).detach().cpu()
        return alphas

    def state_dict(self) -> dict[str, Any]:
        return {"previous": None if self.previous is None else self.previous.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        previous = state["previous"]
        self.previous = None if previous is None else torch.tensor(previous, dtype=torch.float32)


class SWCW(_PreviousBatch):
    """One α for the batch: the mean ARWC row of the previous training batch (uniform on the first)."""

    def summary(self, signals: ReferenceSignals) -> Tensor:
        return normalized(signals.margins)

    def weights(self, previous: Tensor) -> Tensor:
        return normalized(previous)


class SWCWOneHot(_PreviousBatch):
    """The one reference with the largest mean margin d over the previous training batch (uniform on the first)."""

    def summary(self, signals: ReferenceSignals) -> Tensor:
        return signals.margins

    def weights(self, previous: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(previous.argmax(), previous.shape[0]).float()
