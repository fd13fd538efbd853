"""Test-only modules that make chosen steps non-finite (imported by class path in subprocess CLI runs)."""

from __future__ import annotations

from typing import Any

import torch

from lightning_modules.dpo import DPOModule


class NaNOnRanks(DPOModule):
    """DPO whose training loss is NaN on batch `bad_batch` of the ranks in `bad_ranks`."""

    def __init__(self, *args: Any, bad_batch: int = 1, bad_ranks: list[int] | None = None, **kwargs: Any):
        """Sabotage.

        Args:
            bad_batch: training batch index (0-based, over the whole run) whose loss is NaN.
            bad_ranks: the ranks where it is NaN (default: rank 1 only).
        """
        super().__init__(*args, **kwargs)
        self.bad_batch, self.bad_ranks = bad_batch, list(bad_ranks if bad_ranks is not None else [1])

    def model_step(self, batch, stage):
        loss, metrics = super().model_step(batch, stage)
        if stage == "train" and self.trainer.fit_loop.total_batch_idx == self.bad_batch \
                and self.global_rank in self.bad_ranks:
            loss = loss * float("nan")
        return loss, metrics


class _NaNGradient(torch.autograd.Function):
    """Identity forward; the gradient flowing back through it becomes NaN."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNGradientOnRanks(NaNOnRanks):
    """DPO whose training loss stays finite on batch `bad_batch`, but whose gradients are NaN on `bad_ranks`."""

    def model_step(self, batch, stage):
        loss, metrics = DPOModule.model_step(self, batch, stage)
        if stage == "train" and self.trainer.fit_loop.total_batch_idx == self.bad_batch \
                and self.global_rank in self.bad_ranks:
            loss = _NaNGradient.apply(loss)
        return loss, metrics
