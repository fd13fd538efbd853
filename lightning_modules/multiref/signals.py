"""What every weighting strategy reads from a batch: each reference's length-normalized margin and verdict.

SPEC section 4, for pair i and reference k (each reference divides by its *own* token counts, since
references need not share a tokenizer):

    d[i, k] = |logπ_k(y_w^i) − logπ_k(y_l^i)|      how strongly reference k separates the pair
    c[i, k] = 1[logπ_k(y_w^i) > logπ_k(y_l^i)]     whether reference k prefers the chosen response

Inputs are the (B, K) batch columns of `data.reference_cache`: summed log-probs `ref_chosen_logps` /
`ref_rejected_logps` and token counts `ref_chosen_counts` / `ref_rejected_counts`. All in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_counts", "ref_rejected_counts")


@dataclass(frozen=True)
class ReferenceSignals:
    """d (B, K) and c (B, K) of one batch (see the module docstring)."""

    margins: Tensor  # d, float32, >= 0
    agrees: Tensor  # c, float32 in {0, 1}

    @property
    def num_references(self) -> int:
        return self.margins.shape[-1]


def reference_signals(ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, ref_chosen_counts: Tensor,
                      ref_rejected_counts: Tensor) -> ReferenceSignals:
    """d and c from summed (B, K) reference log-probs and each reference's (B, K) response token counts."""
    chosen = ref_chosen_logps.float() / ref_chosen_counts.float().clamp(min=1)
    rejected = ref_rejected_logps.float() / ref_rejected_counts.float().clamp(min=1)
    return ReferenceSignals(margins=(chosen - rejected).abs(), agrees=(chosen > rejected).float())


def batch_signals(batch: dict[str, Tensor]) -> ReferenceSignals:
    """`reference_signals` of a pair batch carrying the K cached references' columns."""
    missing = [key for key in COLUMNS if key not in batch]
    if missing or batch["ref_chosen_logps"].dim() != 2:
        raise KeyError(f"a weighting strategy needs the (B, K) batch columns {list(COLUMNS)} of "
                       f"data.init_args.reference_cache; missing {missing or 'none'}")
    return reference_signals(*(batch[key] for key in COLUMNS))


def normalized(weights: Tensor) -> Tensor:
    """`weights` (..., K) divided by their sum over K; a row summing to 0 becomes uniform 1/K (never NaN)."""
    weights = weights.float()
    total = weights.sum(-1, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / weights.shape[-1])
    return torch.where(total > 0, weights / total.clamp(min=torch.finfo(torch.float32).tiny), uniform)
