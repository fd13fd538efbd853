"""The scheduler's reward (SPEC section 6, step 4): pure functions of detached losses and log-probs.

    Δ   = (ℓ_{t−1} − ℓ_t) / max(|ℓ_{t−1}|, |ℓ_t|)          relative decrease of the batch DPO loss
    r_B = σ(κ·Δ + 0.5)                                       batch term, κ = 50 in the original
    r_S = σ(½·g(margin) + ½·(1 − g(logπθ(y_w))))             sample term, g = min-max over the batch
    y   = γ·r_B + (1 − γ)·r_S                                 the target f1 regresses (γ = 0.5)

Sign: the original divided by a *signed* maximum of two negative numbers, which flips the sign of Δ,
so there a loss increase was rewarded. Here the denominator is the larger magnitude, so a decrease
(ℓ_t < ℓ_{t−1}) gives Δ > 0 and r_B > σ(0.5); an increase gives r_B < σ(0.5).

Worked example: ℓ_{t−1} = 0.70, ℓ_t = 0.63 → Δ = 0.07 / 0.70 = 0.1 → r_B = σ(5.5) = 0.9959.
"""

from __future__ import annotations

import torch
from torch import Tensor


def relative_decrease(previous: float, current: float) -> float:
    """Δ = (ℓ_{t−1} − ℓ_t) / max(|ℓ_{t−1}|, |ℓ_t|); 0 when both are 0."""
    scale = max(abs(previous), abs(current))
    return 0.0 if scale == 0 else (previous - current) / scale


def batch_reward(previous: float, current: float, kappa: float = 50.0) -> float:
    """r_B = σ(κ·Δ + 0.5): larger when the batch loss fell from step t−1 to step t."""
    return float(torch.sigmoid(torch.tensor(kappa * relative_decrease(previous, current) + 0.5, dtype=torch.float64)))


def minmax(values: Tensor) -> Tensor:
    """g: (x − min) / (max − min) over the batch, in [0, 1]; 0.5 everywhere when all values are equal."""
    values = values.detach().float()
    low, high = values.min(), values.max()
    if high - low <= 0:
        return torch.full_like(values, 0.5)
    return (values - low) / (high - low)


def sample_reward(margins: Tensor, chosen_logps: Tensor) -> Tensor:
    """r_S = σ(½·g(margin) + ½·(1 − g(logπθ(y_w)))), (N,): prefers a large implicit-reward margin and a chosen
    response the policy finds unlikely. `margins` (N,) β·(Δchosen − Δrejected); `chosen_logps` (N,)."""
    return torch.sigmoid(0.5 * minmax(margins) + 0.5 * (1 - minmax(chosen_logps)))


def scheduler_target(r_batch: float, r_sample: Tensor, gamma: float = 0.5) -> Tensor:
    """y = γ·r_B + (1 − γ)·r_S, (N,)."""
    return gamma * r_batch + (1 - gamma) * r_sample
