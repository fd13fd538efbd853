"""Padding collators for SFT and pair batches.

Worked example (pad id 0, IGNORE = -100) for one pair with prompt `[5, 6]`, chosen response
`[7, 8]` + EOS 2, rejected response `[9]` + EOS 2::

    chosen_input_ids        [[5, 6, 7, 8, 2]]        rejected_input_ids        [[5, 6, 9, 2, 0]]
    chosen_attention_mask   [[1, 1, 1, 1, 1]]        rejected_attention_mask   [[1, 1, 1, 1, 0]]
    chosen_labels           [[-100, -100, 7, 8, 2]]  rejected_labels           [[-100, -100, 9, 2, -100]]

Chosen and rejected are padded (on the right) to one common length T, so
`lightning_modules.logprobs.concatenated_forward` can stack them into a (2B, T) batch. Any float
column present in every row (e.g. RefDPO's `ref_chosen_logps`) is passed through as a (B,) float32
tensor, and any column of equal-length number lists other than the token columns (the K cached
references' `ref_chosen_logps`, `ref_chosen_counts`, ...) as a (B, K) tensor: float32 for lists of
floats, long for lists of ints. For K = 2 cached references and B = 1::

    ref_chosen_logps   [[-7.25, -9.5]]   ref_chosen_counts   [[5, 7]]   (each reference's own tokens)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from datamodules.tokenize import IGNORE_INDEX


def pad(sequences: Sequence[Sequence[int]], value: int, length: int) -> Tensor:
    """Right-pad integer sequences to `length` → (N, length) long tensor."""
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def _pad_text(rows: list[dict[str, Any]], prefix: str, pad_id: int, length: int) -> dict[str, Tensor]:
    ids = [row[f"{prefix}input_ids"] for row in rows]
    return {
        f"{prefix}input_ids": pad(ids, pad_id, length),
        f"{prefix}attention_mask": pad([[1] * len(x) for x in ids], 0, length),
        f"{prefix}labels": pad([row[f"{prefix}labels"] for row in rows], IGNORE_INDEX, length),
    }


TOKEN_COLUMNS = ("input_ids", "labels", "attention_mask")


def _is_number_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, (int, float)) for x in value)


def _float_columns(rows: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Float columns → (B,) float32; number-list columns (not token ids) → (B, K) float32 or long."""
    out = {}
    for key, value in rows[0].items():
        if isinstance(value, float):
            out[key] = torch.tensor([row[key] for row in rows], dtype=torch.float32)
        elif _is_number_list(value) and not key.endswith(TOKEN_COLUMNS):
            floats = any(isinstance(x, float) for row in rows for x in row[key])
            out[key] = torch.tensor([row[key] for row in rows], dtype=torch.float32 if floats else torch.long)
    return out


class SFTCollator:
    """Rows {input_ids, labels} → {input_ids, attention_mask, labels}, each (B, T)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        length = max(len(row["input_ids"]) for row in rows)
        return _pad_text(rows, "", self.pad_token_id, length)


class PairCollator:
    """Rows {chosen_*, rejected_*} → the (B, T) pair layout of the module docstring."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Tensor]:
        length = max(max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows)
        batch = _pad_text(rows, "chosen_", self.pad_token_id, length)
        batch.update(_pad_text(rows, "rejected_", self.pad_token_id, length))
        batch.update(_float_columns(rows))
        if "prompt" in rows[0]:  # raw prompts (`PreferenceDataModule(return_prompts=True)`), a list of B
            batch["prompt"] = [row["prompt"] for row in rows]
        return batch
