"""Padding-free batches: N right-padded sequences packed into R ≤ N rows, attention kept within each sequence.

Real preference data is long-tailed, so a padded (N, T) batch is often half padding, paid for in every
forward and backward. `pack_sequences` lays the sequences' real tokens end to end, first-fit decreasing into
rows of `capacity` tokens (default: the longest sequence, i.e. the padded batch's width T). The MLPs, the
LM head and the log-softmax then see only real tokens, and attention (masked block-diagonal, so each row
costs C² whatever it holds) never costs more than the padded batch: R ≤ N rows of T tokens. Longer rows
pack tighter but pay C² per row: one 2,048-token row of 64 short demo sequences made a CPU step 4-5×
slower than padded (`make sams-bench`, found while building it), so longer rows are opt-in (`capacity`). Position ids restart at 0 at each sequence; with
`attention_mask=None` and `use_cache=False`, transformers (5.x `masking_utils.find_packed_sequence_indices`)
reads the restarts and keeps attention block-diagonal for the `sdpa`, `eager` and `flex_attention`
implementations (flash-attention's varlen path reads the same position ids).

Worked example (pad 0, IGNORE −100): sequences [5, 6, 7] (labels [−100, 6, 7]) and [8, 9] (labels [−100, 9])
at capacity 3 give two rows, the second filled up with one pad token that forms its own segment:

    input_ids     [[5, 6, 7], [8, 9, 0]]
    position_ids  [[0, 1, 2], [0, 1, 0]]
    labels        [[−100, 6, 7], [−100, 9, −100]]
    sequence      [[0, 0, 0], [1, 1, −1]]        (which input sequence each position holds; −1: filler)

A sequence's first label is always IGNORE (no position predicts it), so the next-token targets never cross
from one packed sequence into the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from datamodules.tokenize import IGNORE_INDEX

# Attention implementations whose masks follow packed position ids in the pinned transformers (5.23)
PACKING_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")


@dataclass
class PackedRows:
    """R rows of C tokens holding N sequences; see the module docstring."""

    input_ids: Tensor  # (R, C) long
    position_ids: Tensor  # (R, C) long, restarting at 0 per sequence (and per filler run)
    labels: Tensor  # (R, C) long, IGNORE_INDEX at each sequence's first token and on filler
    sequence: Tensor  # (R, C) long, index of the input sequence at each position, -1 on filler
    num_sequences: int

    def segment_sum(self, values: Tensor) -> Tensor:
        """(R, C, ...) per-position values summed per input sequence → (N, ...); filler is left out."""
        flat, owner = values.reshape(-1, *values.shape[2:]), self.sequence.reshape(-1)
        keep = owner >= 0
        out = values.new_zeros((self.num_sequences, *values.shape[2:]))
        return out.index_add_(0, owner[keep], flat[keep])

    def lengths(self) -> Tensor:
        """(N,) real tokens of each input sequence."""
        return self.segment_sum(torch.ones_like(self.sequence, dtype=torch.long))


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether the model's attention implementation keeps packed sequences apart (`PACKING_ATTENTION`)."""
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) in PACKING_ATTENTION


def pack_sequences(inputs: dict[str, Tensor], *, capacity: int | None = None, pad_token_id: int = 0) -> PackedRows:
    """Pack right-padded `input_ids` / `attention_mask` / `labels` (N, T) first-fit decreasing into rows of `capacity`
    tokens (default and minimum: the longest sequence)."""
    mask = inputs["attention_mask"].bool()
    lengths = mask.sum(dim=1).tolist()
    capacity = max(capacity or 0, max(lengths), 1)
    rows: list[list[int]] = []  # sequence indices per row
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([]), room.append(capacity)
            slot = len(rows) - 1
        rows[slot].append(i)
        room[slot] -= lengths[i]
    device = inputs["input_ids"].device
    ids = torch.full((len(rows), capacity), pad_token_id, dtype=torch.long, device=device)
    positions = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    sequence = torch.full_like(ids, -1)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            n = lengths[i]
            ids[r, at:at + n] = inputs["input_ids"][i, :n]
            labels[r, at + 1:at + n] = inputs["labels"][i, 1:n]
            positions[r, at:at + n] = torch.arange(n, device=device)
            sequence[r, at:at + n] = i
            at += n
        positions[r, at:] = torch.arange(capacity - at, device=device)  # filler: its own segment
    return PackedRows(input_ids=ids, position_ids=positions, labels=labels, sequence=sequence,
                      num_sequences=len(lengths))
