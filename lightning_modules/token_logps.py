"""Per-token log-probabilities of the labels without a full-vocabulary float32 log-softmax (the lean path).

    logp_t = logits[t, y_t] − logsumexp(logits[t, :])                      (B, T, V) → (B, T)

The naive `log_softmax(logits.float())` holds, per batch, a float32 copy of the (B, T, V) logits, the
log-softmax output and, for the backward, the softmax again: at V = 128k, T = 2,048 that is 1 GB per
sequence and tensor. Here the forward walks the sequence in chunks of `chunk_size` positions, upcasting
one chunk at a time, and keeps only the (B, T) logsumexp; the backward recomputes each chunk's softmax
and writes the gradient straight into one tensor of the logits' own dtype:

    ∂logp_t / ∂logits[t, v] = 1[v = y_t] − softmax(logits[t])_v

Peak extra memory: one float32 chunk (B, chunk_size, V) plus the gradient the logits need anyway
(`benchmarks`: `make bench` prints both paths' peaks at V = 32k and 128k).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK = 256  # sequence positions upcast at once


class _LabelLogProbs(torch.autograd.Function):
    """(B, T, V) logits, (B, T) targets (valid ids everywhere) → (B, T) float32 log-probs; see the module docstring."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, chunk_size: int) -> Tensor:
        T = logits.shape[1]
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        for start in range(0, T, chunk_size):
            chunk = logits[:, start:start + chunk_size].float()  # (B, c, V)
            lse[:, start:start + chunk_size] = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, targets[:, start:start + chunk_size].unsqueeze(-1)).squeeze(-1)
            out[:, start:start + chunk_size] = picked - lse[:, start:start + chunk_size]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        logits, targets, lse = ctx.saved_tensors
        grad_logits = torch.empty_like(logits)
        for start in range(0, logits.shape[1], ctx.chunk_size):
            stop = start + ctx.chunk_size
            g = grad[:, start:stop].float().unsqueeze(-1)  # (B, c, 1)
            part = torch.exp(logits[:, start:stop].float() - lse[:, start:stop].unsqueeze(-1)).mul_(-g)
            part.scatter_add_(-1, targets[:, start:stop].unsqueeze(-1), g)
            grad_logits[:, start:stop] = part
        return grad_logits, None, None


def label_logps(logits: Tensor, targets: Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
    """log softmax(logits)[targets] per position, (B, T) float32, computed `chunk_size` positions at a time.

    `targets` (B, T) must hold valid token ids everywhere (mask them afterwards); a `chunk_size` of 0 or less
    upcasts the whole sequence at once (still without a log-softmax tensor).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on (B, T)")
    chunk = chunk_size if chunk_size > 0 else max(logits.shape[1], 1)
    return _LabelLogProbs.apply(logits, targets, chunk)
