"""The two collectives the scheduler needs under DDP / DeepSpeed: gather every rank's rows, broadcast rank 0's.

Both are identities in a single process (no process group). Rows may differ in number between ranks
(a last, shorter batch): `gather_rows` pads to the largest and cuts the padding off again.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: Tensor) -> tuple[Tensor, list[int]]:
    """Every rank's `x` (n_r, ...) concatenated in rank order, and the row counts n_r."""
    rank, size = world()
    if size == 1:
        return x, [x.shape[0]]
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
    counts_list = [int(c) for c in counts]
    width = max(counts_list)
    padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts_list)]), counts_list


def broadcast_from_zero(x: Tensor) -> Tensor:
    """Rank 0's `x` on every rank (same shape and dtype everywhere)."""
    _, size = world()
    if size == 1:
        return x
    x = x.contiguous()
    dist.broadcast(x, src=0)
    return x
