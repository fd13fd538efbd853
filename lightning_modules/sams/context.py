"""A pair's context for the scheduler (SPEC section 6, step 1), from the training forward's hidden states.

No extra forward: `concatenated_forward(..., output_hidden_states=True)` returns, for each of the (2B)
`[chosen; rejected]` rows, every transformer layer's output (the embedding output left out) mean-pooled
over the row's real tokens (`logprobs.pool_layers`, or per packed sequence), detached, as (2B, L, D).
A pair's context is the mean of its chosen and rejected rows:

    pooled (2B, L, D)  →  context (B, L, D), float32

Worked example (L = 1, D = 1, one pair): chosen hidden [1, 3, 9] with mask [1, 1, 0] pools to 2; rejected
[4, 4, 4] with mask [1, 1, 1] pools to 4; the context is [[3]].
"""

from __future__ import annotations

from torch import Tensor


def pair_contexts(pooled: Tensor) -> Tensor:
    """(B, L, D): the mean of each pair's chosen and rejected rows of (2B, L, D) `[chosen; rejected]` pooled states."""
    half = pooled.shape[0] // 2
    return (pooled[:half] + pooled[half:]) / 2


def sample_pair_contexts(pooled: Tensor, chosen: Tensor, rejected: Tensor) -> Tensor:
    """(M, L, D) contexts of M pairs given as row indices into (R, L, D) pooled states (on-policy samples)."""
    return (pooled[chosen] + pooled[rejected]) / 2
