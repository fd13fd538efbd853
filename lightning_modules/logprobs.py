"""Per-sequence log-probabilities of response tokens, and the one concatenated forward.

Conventions (SPEC section 1): `logp(y|x)` sums the log-probabilities of the *response* tokens only;
prompt and padding positions carry the label `IGNORE_INDEX` (-100, from `datamodules.tokenize`) and are
masked out. With `average=True` the sum is divided by that sequence's own count of response tokens.

Batch layout consumed by `concatenated_forward` (built by `datamodules.collate.PairCollator`)::

    chosen_input_ids       (B, T)   chosen_attention_mask   (B, T)   chosen_labels   (B, T)
    rejected_input_ids     (B, T)   rejected_attention_mask (B, T)   rejected_labels (B, T)

Both halves are padded to the same T, so the forward is one call on the (2B, T) concatenation
`[chosen; rejected]` (rows 0..B-1 chosen, rows B..2B-1 rejected). Policy and reference models use
the same helper, so their log-probs are computed identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from datamodules.tokenize import IGNORE_INDEX
from lightning_modules.packing import pack_sequences
from lightning_modules.token_logps import DEFAULT_CHUNK, label_logps


def token_logps(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX,
                chunk_size: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor]:
    """Per-position log-prob of the next labelled token, (B, T) float32 (0 where masked), and the (B, T) bool mask.

    Position t scores token t+1 (`labels[:, t+1]`); the last position scores nothing.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on (B, T)")
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1)  # (B, T)
    mask = targets != ignore_index
    # logits[y] − logsumexp(logits), a chunk of positions at a time, no float32 (B, T, V) copy (token_logps.py)
    return label_logps(logits, targets.masked_fill(~mask, 0), chunk_size=chunk_size) * mask, mask


def sequence_logps(
    logits: Tensor, labels: Tensor, *, average: bool = False, ignore_index: int = IGNORE_INDEX,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """Sum (or mean) of the log-probabilities of the labelled tokens of each sequence.

    Args:
        logits: (B, T, V) next-token logits, position t predicts token t+1.
        labels: (B, T) token ids, `ignore_index` where no loss is taken (prompt, padding).
        average: divide each sum by its number of labelled tokens (length-normalized log-prob).
        ignore_index: label value that marks masked positions.
        chunk_size: sequence positions upcast to float32 at once (`token_logps.label_logps`).

    Returns:
        logps: (B,) float32 summed (or averaged) log-probs of the response tokens.
        token_counts: (B,) number of response tokens of each sequence (long).
    """
    per_token, mask = token_logps(logits, labels, ignore_index=ignore_index, chunk_size=chunk_size)
    counts = mask.sum(-1)
    logps = per_token.sum(-1)
    if average:
        logps = logps / counts.clamp(min=1)
    return logps, counts


@dataclass
class PairLogps:
    """Output of `concatenated_forward`: everything is (B,) except `pooled_hidden`."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_counts: Tensor
    rejected_counts: Tensor
    # (2B, L, D) when requested: each layer's hidden states averaged over each row's real tokens (SamS), else None.
    pooled_hidden: Tensor | None = None


def concatenate_pair(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stack the chosen and rejected halves of a pair batch into (2B, T) tensors."""
    return {
        key: torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], dim=0)
        for key in ("input_ids", "attention_mask", "labels")
    }


def concatenated_forward(
    model: nn.Module,
    batch: dict[str, Tensor],
    *,
    average: bool = False,
    output_hidden_states: bool = False,
    packed: bool = False,
) -> PairLogps:
    """One forward of `model` on `[chosen; rejected]`, split back into per-pair log-probs.

    Args:
        model: a causal LM returning `.logits` of shape (2B, T, V).
        batch: a pair batch laid out as in this module's docstring.
        average: length-normalize the log-probs (see `sequence_logps`).
        output_hidden_states: also return every layer's hidden states pooled per row (no extra forward).
        packed: run the 2B sequences padding-free (`lightning_modules.packing`); the same values as padded.
    """
    logps, counts, pooled = sequence_forward(model, concatenate_pair(batch), average=average,
                                             output_hidden_states=output_hidden_states, packed=packed)
    n = batch["chosen_input_ids"].shape[0]
    return PairLogps(
        chosen_logps=logps[:n],
        rejected_logps=logps[n:],
        chosen_counts=counts[:n],
        rejected_counts=counts[n:],
        pooled_hidden=pooled,
    )


def sequence_forward(
    model: nn.Module,
    inputs: dict[str, Tensor],
    *,
    average: bool = False,
    output_hidden_states: bool = False,
    packed: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One forward of `model` on (N, T) `input_ids` / `attention_mask` / `labels` (right-padded sequences).

    Returns (logps (N,), token counts (N,), pooled hidden states (N, L, D) or None): see `sequence_logps`;
    the pooled states are each transformer layer's output (not the embeddings) averaged over the sequence's
    real tokens. `packed`: pack the N sequences padding-free into rows (`packing.pack_sequences`) first.
    `concatenated_forward` is this on `[chosen; rejected]`; on-policy samples use it directly.
    """
    if packed:
        return _packed_forward(model, inputs, average=average, output_hidden_states=output_hidden_states)
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        output_hidden_states=output_hidden_states,
        use_cache=False,
    )
    logps, counts = sequence_logps(out.logits, inputs["labels"], average=average)
    pooled = pool_layers(out.hidden_states, inputs["attention_mask"]) if output_hidden_states else None
    return logps, counts, pooled


@torch.no_grad()
def pool_layers(hidden_states: tuple[Tensor, ...], attention_mask: Tensor) -> Tensor:
    """(N, L, D) float32: each layer's output (`hidden_states[1:]`, (N, T, D)) averaged over the row's real tokens.

    Worked example (L = 1, D = 1): hidden [1, 3, 9] with mask [1, 1, 0] pools to 2.
    """
    mask = attention_mask.unsqueeze(-1).float()  # (N, T, 1)
    size = mask.sum(dim=1).clamp(min=1)
    return torch.stack([(h.detach().float() * mask).sum(dim=1) / size for h in hidden_states[1:]], dim=1)


def _packed_forward(model: nn.Module, inputs: dict[str, Tensor], *, average: bool,
                    output_hidden_states: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    rows = pack_sequences(inputs, pad_token_id=0)
    out = model(input_ids=rows.input_ids, position_ids=rows.position_ids, attention_mask=None,
                output_hidden_states=output_hidden_states, use_cache=False)
    per_token, mask = token_logps(out.logits, rows.labels)  # targets never cross sequences (packing.py)
    logps, counts = rows.segment_sum(per_token), rows.segment_sum(mask.long())
    if average:
        logps = logps / counts.clamp(min=1)
    pooled = None
    if output_hidden_states:
        size = rows.lengths().clamp(min=1).unsqueeze(-1).float()  # (N, 1)
        pooled = torch.stack([rows.segment_sum(h.detach().float()) / size for h in out.hidden_states[1:]], dim=1)
    return logps, counts, pooled


def preference_accuracy(logps: PairLogps, *, averaged: bool = False) -> Tensor:
    """(B,) 1.0 where the model's own length-normalized logπ(y_w|x) exceeds logπ(y_l|x), else 0.0.

    The multi-reference study's metric (SPEC section 4). `averaged`: `logps` already came from
    `concatenated_forward(average=True)`; otherwise the sums are divided by each sequence's token count here.
    """
    chosen, rejected = logps.chosen_logps.float(), logps.rejected_logps.float()
    if not averaged:
        chosen = chosen / logps.chosen_counts.clamp(min=1)
        rejected = rejected / logps.rejected_counts.clamp(min=1)
    return (chosen > rejected).float()
