"""The one negative log-likelihood: per example (objectives, the DPO + SFT term) and reduced (SFT)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor

NLLReduction = Literal["token_mean", "sequence_mean", "sum"]


def nll_loss(logps: Tensor, token_counts: Tensor | None = None, *,
             average: bool = False) -> Tensor:
    """Per-example negative log-likelihood −logπθ(y|x) in float32, shape (B,) -> (B,).

    With average=True it is divided by `token_counts` (B,) (clamped to ≥ 1), i.e. per-token mean.
    """
    losses = -logps.float()
    if not average:
        return losses
    if token_counts is None or token_counts.shape != logps.shape:
        got = None if token_counts is None else tuple(token_counts.shape)
        raise ValueError(f"average=True needs token_counts of shape {tuple(logps.shape)}, "
                         f"got {got}")
    return losses / token_counts.float().clamp_min(1.0)


def reduce_nll(logps: Tensor, token_counts: Tensor, reduction: NLLReduction) -> Tensor:
    """Scalar NLL from per-sequence summed log-probs (B,) and response token counts (B,).

    `token_mean` = Σ −logp / Σ tokens (the usual LM loss); `sequence_mean` = mean over sequences of
    the per-token NLL; `sum` = mean over sequences of the summed NLL.
    """
    if reduction == "token_mean":
        return nll_loss(logps).sum() / token_counts.float().sum().clamp_min(1.0)
    if reduction == "sequence_mean":
        return nll_loss(logps, token_counts, average=True).mean()
    if reduction == "sum":
        return nll_loss(logps).mean()
    raise ValueError(f"reduction must be token_mean, sequence_mean or sum, got {reduction!r}")
