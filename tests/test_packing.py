"""Padding-free pair batches (`lightning_modules.packing`): the layout, and the same log-probs, pooled hidden states
and gradients as padded batches for every attention implementation the packing switch allows on CPU."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from datamodules import PreferenceDataModule
from lightning_modules.logprobs import IGNORE_INDEX, concatenated_forward
from lightning_modules.packing import pack_sequences, supports_packing

I = IGNORE_INDEX


def test_packing_worked_example() -> None:
    """The module docstring's example: [5, 6, 7] and [8, 9] at capacity 3 → two rows, one pad filler segment."""
    inputs = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
              "labels": torch.tensor([[I, 6, 7], [I, 9, I]])}
    rows = pack_sequences(inputs, capacity=3)
    assert rows.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert rows.position_ids.tolist() == [[0, 1, 2], [0, 1, 0]]
    assert rows.labels.tolist() == [[I, 6, 7], [I, 9, I]]
    assert rows.sequence.tolist() == [[0, 0, 0], [1, 1, -1]]
    assert rows.lengths().tolist() == [3, 2]


def test_first_fit_decreasing_fills_rows_and_masks_each_first_label() -> None:
    """Lengths 4, 1, 3, 2 at capacity 5 → rows {4, 1} and {3, 2}; the first token of every sequence has no target,
    even where the collator labelled it (a sequence's first token is never predicted from inside it)."""
    lengths = [4, 1, 3, 2]
    ids = torch.zeros(4, 4, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + 10 * (i + 1)
    mask = (ids != 0).long()
    rows = pack_sequences({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, I)},
                          capacity=5)
    assert rows.sequence.tolist() == [[0, 0, 0, 0, 1], [2, 2, 2, 3, 3]]
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert rows.labels.tolist() == [[I, 12, 13, 14, I], [I, 32, 33, I, 42]]
    assert rows.segment_sum(torch.ones(2, 5)).tolist() == [4.0, 1.0, 3.0, 2.0]


@pytest.fixture(scope="module")
def pair_batch(assets: Path) -> dict:
    dm = PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"), batch_size=6, max_length=64,
                              shuffle=False)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    lengths = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]]).sum(1)
    assert lengths.min() < lengths.max()  # really variable-length, so padding and packing differ
    return batch


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flex_attention"])
@pytest.mark.parametrize("average, capacity", [(False, None), (True, 64)], ids=["sum-rows_of_T", "mean-rows_of_64"])
def test_packed_equals_padded_log_probs_hidden_states_and_gradients(assets: Path, pair_batch, implementation,
                                                                    average, capacity, monkeypatch) -> None:
    """Rows as long as the longest sequence (the default: here one sequence and a filler segment per row) and rows
    of 64 tokens (3-5 sequences each)."""
    import lightning_modules.logprobs as logprobs

    monkeypatch.setattr(logprobs, "pack_sequences", functools.partial(pack_sequences, capacity=capacity))
    model = AutoModelForCausalLM.from_pretrained(str(assets / "model"), attn_implementation=implementation)
    assert supports_packing(model)
    backward = implementation != "flex_attention"  # torch 2.13's FlexAttention has no backward on CPU
    results = {}
    for packed in (False, True):
        model.zero_grad()
        with torch.set_grad_enabled(backward):
            out = concatenated_forward(model, pair_batch, average=average, output_hidden_states=True, packed=packed)
        if backward:
            (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
        results[packed] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (padded, padded_grads), (packed, packed_grads) = results[False], results[True]
    for field in ("chosen_logps", "rejected_logps", "pooled_hidden"):
        torch.testing.assert_close(getattr(packed, field), getattr(padded, field), atol=1e-5, rtol=1e-5, msg=field)
    assert torch.equal(packed.chosen_counts, padded.chosen_counts)
    assert len(padded_grads) == (len(list(model.parameters())) if backward else 0)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packing_never_processes_more_tokens_than_padding(pair_batch) -> None:
    inputs = {key: torch.cat([pair_batch[f"chosen_{key}"], pair_batch[f"rejected_{key}"]])
              for key in ("input_ids", "attention_mask", "labels")}
    rows = pack_sequences(inputs)  # rows as long as the longest sequence: never more rows or columns than padded
    assert rows.input_ids.shape[1] == inputs["input_ids"].shape[1] and rows.input_ids.shape[0] <= 12
    assert pack_sequences(inputs, capacity=1).input_ids.shape == rows.input_ids.shape  # never below the longest
    assert pack_sequences(inputs, capacity=2048).input_ids.shape[0] == 1  # opt-in long rows: all 12 in one
    assert int((rows.sequence >= 0).sum()) == int(inputs["attention_mask"].sum())  # every real token, once
