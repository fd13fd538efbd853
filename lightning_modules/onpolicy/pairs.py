"""From N scored samples per prompt to what the on-policy losses train on: pairs, and a running baseline.

Pure tensor code, no model (SPEC section 5). DPO / IPO on sampled data: `build_pairs` picks (chosen,
rejected) sample indices from the rewards (P, N), `gather_pairs` picks the per-pair log-probs, and the
pairwise objectives of `lightning_modules.objectives` do the rest. `RunningBaseline` is the EMA of the
batch mean reward that REINFORCE's `baseline="running"` subtracts (`Reinforce.uses_running_baseline`).

Worked example, rewards (P=2, N=3) = [[1, 3, 2], [0, 2, 5]], sample (1, 2) padding (mask False):
    best_worst: candidates (p0: 1 vs 0, gap 2), (p1: 1 vs 0, gap 2)            considered = 2
    all:        (p0: 1 vs 0, gap 2), (p0: 2 vs 0, gap 1), (p0: 1 vs 2, gap 1),
                (p1: 1 vs 0, gap 2)                                           considered = 4
    all, min_gap=1: only the gap-2 pairs are kept (the gap must be > min_gap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

PairMode = Literal["best_worst", "all"]


@dataclass
class SampledPairs:
    """M pairs of samples of the same prompt, in order of prompt, then first index, then second index."""

    prompt: Tensor  # (M,) long, prompt index in [0, P)
    chosen: Tensor  # (M,) long, sample index in [0, N) of the higher-reward sample
    rejected: Tensor  # (M,) long, sample index of the lower-reward sample
    considered: int  # candidate pairs before the gap threshold

    def __len__(self) -> int:
        return self.prompt.numel()

    @property
    def kept_fraction(self) -> float:
        """Fraction of the candidate pairs kept by the gap threshold (0.0 when there was no candidate)."""
        return len(self) / self.considered if self.considered else 0.0


def _check_mask(rewards: Tensor, mask: Tensor | None) -> Tensor:
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (P, N), got {tuple(rewards.shape)}")
    if mask is None:
        return torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    if mask.shape != rewards.shape or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape (P, N) = {tuple(rewards.shape)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return mask


def build_pairs(rewards: Tensor, *, mode: PairMode = "best_worst", min_gap: float = 0.0,
                mask: Tensor | None = None) -> SampledPairs:
    """(chosen, rejected) sample pairs of each prompt from rewards (P, N); mask (P, N) bool, False = padding.

    "best_worst": one candidate per prompt with >= 2 valid samples, the highest vs the lowest reward (ties:
    the first index). "all": every pair i < j of valid samples, oriented so that chosen has the higher
    reward. A candidate is kept when its reward gap is > min_gap (strictly: equal rewards never make a
    pair, even at min_gap = 0). `considered` counts the candidates before the threshold.
    """
    mask = _check_mask(rewards, mask)
    if mode not in ("best_worst", "all"):
        raise ValueError(f"mode must be 'best_worst' or 'all', got {mode!r}")
    if not min_gap >= 0:
        raise ValueError(f"min_gap must be >= 0, got {min_gap}")
    r = rewards.detach().float()
    (P, N), device = r.shape, r.device
    if mode == "best_worst":
        prompt = torch.arange(P, device=device)
        first = r.masked_fill(~mask, float("-inf")).argmax(-1)  # (P,)
        second = r.masked_fill(~mask, float("inf")).argmin(-1)
        candidate = mask.sum(-1) >= 2
    else:
        i, j = torch.triu_indices(N, N, offset=1, device=device)  # (N(N-1)/2,) each, ordered by i then j
        prompt = torch.arange(P, device=device).repeat_interleave(i.numel())
        first, second = i.repeat(P), j.repeat(P)
        candidate = mask[prompt, first] & mask[prompt, second]
    r_first, r_second = r[prompt, first], r[prompt, second]
    keep = candidate & ((r_first - r_second).abs() > min_gap)
    first_wins = r_first > r_second
    chosen = torch.where(first_wins, first, second)
    rejected = torch.where(first_wins, second, first)
    return SampledPairs(prompt[keep], chosen[keep], rejected[keep], considered=int(candidate.sum()))


def gather_pairs(values: Tensor, pairs: SampledPairs) -> tuple[Tensor, Tensor]:
    """Per-pair values (M, ...) of the chosen and of the rejected sample, from per-sample values (P, N, ...)."""
    if values.dim() < 2:
        raise ValueError(f"values must have shape (P, N, ...), got {tuple(values.shape)}")
    return values[pairs.prompt, pairs.chosen], values[pairs.prompt, pairs.rejected]


class RunningBaseline:
    """EMA of the batch mean reward: b ← decay·b + (1 − decay)·mean; the first update sets b = mean.

    For an unbiased REINFORCE gradient use `step`: the baseline of a batch is the EMA of the batches
    before it (the first batch's own mean, as there is none before), then the batch is folded in.
    """

    def __init__(self, decay: float = 0.9):
        """Args:
            decay: weight of the past in [0, 1); 0 = the previous batch's mean.
        """
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.value: float | None = None  # None until the first update

    def update(self, rewards: Tensor, mask: Tensor | None = None) -> float:
        """Fold in the mean of the valid rewards of a batch (any shape; mask bool, same shape); the new value."""
        valid = rewards.detach().float() if mask is None else rewards.detach().float()[mask]
        if valid.numel() == 0:
            raise ValueError("RunningBaseline.update needs at least one valid reward")
        mean = valid.mean().item()
        self.value = mean if self.value is None else self.decay * self.value + (1 - self.decay) * mean
        return self.value

    def step(self, rewards: Tensor, mask: Tensor | None = None) -> float:
        """The baseline for this batch (the value before it; at the first batch its own mean), then `update`."""
        before = self.value
        after = self.update(rewards, mask)
        return after if before is None else before

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.value = float(state["decay"]), state["value"]
