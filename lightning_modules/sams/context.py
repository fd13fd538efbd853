"""A pair's context for the scheduler (SPEC section 6, step 1), from the training forward's hidden states.

No extra forward: `concatenated_forward(..., output_hidden_states=True)` returns every layer's hidden
states of the (2B, T) `[chosen; rejected]` rows. Each transformer layer's output (the embedding output
is left out) is mean-pooled over the row's non-pad tokens, and chosen / rejected are averaged:

    hidden_states  L+1 × (2B, T, D)  →  pooled (2B, L, D)  →  context (B, L, D), float32, detached

Worked example (L = 1, D = 1, one pair): chosen hidden [1, 3, 9] with mask [1, 1, 0] pools to 2;
rejected [4, 4, 4] with mask [1, 1, 1] pools to 4; the context is [[3]].
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def pooled_layers(hidden_states: tuple[Tensor, ...], attention_mask: Tensor) -> Tensor:
    """(R, L, D) float32: each layer's hidden states (`hidden_states[1:]`, (R, T, D)) averaged over non-pad tokens."""
    mask = attention_mask.unsqueeze(-1).float()  # (R, T, 1)
    count = mask.sum(dim=1).clamp(min=1)  # (R, 1)
    return torch.stack([(h.detach().float() * mask).sum(dim=1) / count for h in hidden_states[1:]], dim=1)


def pair_contexts(hidden_states: tuple[Tensor, ...], attention_mask: Tensor) -> Tensor:
    """(B, L, D): the mean of the chosen row's and the rejected row's pooled layers, for `[chosen; rejected]` rows."""
    pooled = pooled_layers(hidden_states, attention_mask)
    half = pooled.shape[0] // 2
    return (pooled[:half] + pooled[half:]) / 2
