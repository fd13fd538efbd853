"""Tests for `lightning_modules.logprobs`: per-sequence log-probs and the concatenated forward.

`sequence_logps` is checked against a naive per-token loop and against a value written out by hand
with math.log / math.exp; `concatenated_forward` against separate forwards of the tiny Llama from
the `assets` fixture on the chosen and rejected halves, and against unpadded one-row forwards.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from datamodules import PreferenceDataModule
from lightning_modules.logprobs import IGNORE_INDEX, concatenated_forward, sequence_logps


def naive_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False):
    """Explicit loop over (b, t): token t+1 is scored by log_softmax(logits[b, t])."""
    B, T, _ = logits.shape
    sums, counts = [], []
    for b in range(B):
        total, n = 0.0, 0
        for t in range(T - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            total += float(torch.log_softmax(logits[b, t].double(), dim=-1)[y])
            n += 1
        sums.append(total / max(n, 1) if average else total)
        counts.append(n)
    return torch.tensor(sums, dtype=torch.float32), torch.tensor(counts, dtype=torch.long)


# --------------------------------------------------------------------- sequence_logps


@pytest.mark.parametrize("average", [False, True])
def test_matches_naive_loop_on_random_masks(average: bool) -> None:
    g = torch.Generator().manual_seed(0)
    B, T, V = 5, 9, 13
    logits = torch.randn(B, T, V, generator=g) * 3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.35] = IGNORE_INDEX
    labels[3] = IGNORE_INDEX  # a row with no response token at all
    labels[4, :3] = IGNORE_INDEX  # a "prompt" prefix, the usual layout
    logps, counts = sequence_logps(logits, labels, average=average)
    want_logps, want_counts = naive_logps(logits, labels, average=average)
    assert logps.dtype == torch.float32 and counts.dtype == torch.long
    torch.testing.assert_close(counts, want_counts)
    torch.testing.assert_close(logps, want_logps, rtol=1e-5, atol=1e-5)
    assert counts[3] == 0 and logps[3] == 0.0  # fully masked row: 0, not NaN
    assert (counts[:3] > 0).all()


def test_hand_computed_three_token_vocab() -> None:
    # One sequence [0, 2, 0] with the first token as prompt: positions 0 and 1 predict tokens 2 and 0.
    logits = torch.tensor([[[1.0, 2.0, 3.0], [2.0, 0.0, 1.0], [50.0, -50.0, 7.0]]])
    labels = torch.tensor([[IGNORE_INDEX, 2, 0]])
    lp_token1 = 3.0 - math.log(math.exp(1.0) + math.exp(2.0) + math.exp(3.0))  # log_softmax([1,2,3])[2]
    lp_token2 = 2.0 - math.log(math.exp(2.0) + math.exp(0.0) + math.exp(1.0))  # log_softmax([2,0,1])[0]
    total = lp_token1 + lp_token2  # log(30.193) = 3.40761, so ≈ 2 × (-0.40761)
    logps, counts = sequence_logps(logits, labels)
    assert counts.tolist() == [2]
    assert logps.item() == pytest.approx(total, abs=1e-6)
    assert total == pytest.approx(-0.815212, abs=1e-5)  # the hand arithmetic itself
    avg, _ = sequence_logps(logits, labels, average=True)
    assert avg.item() == pytest.approx(total / 2, abs=1e-6)


def test_position_t_predicts_token_t_plus_1() -> None:
    # logits[t] puts 20 on one token and 0 on the V-1 others. Aligned with labels[t+1] the
    # log-prob of each scored token is 20 - log(e^20 + 3); aligned with labels[t] it is -log(e^20 + 3).
    V, seq = 4, [0, 1, 2, 3]
    labels = torch.tensor([seq])
    shifted = torch.zeros(1, 4, V)
    unshifted = torch.zeros(1, 4, V)
    for t in range(4):
        if t + 1 < 4:
            shifted[0, t, seq[t + 1]] = 20.0
        unshifted[0, t, seq[t]] = 20.0
    per_hit = 20.0 - math.log(math.exp(20.0) + 3)
    per_miss = -math.log(math.exp(20.0) + 3)
    logps, counts = sequence_logps(shifted, labels)
    assert counts.item() == 3  # the first token has no predictor and is never scored
    assert logps.item() == pytest.approx(3 * per_hit, abs=1e-6)
    logps, _ = sequence_logps(unshifted, labels)
    assert logps.item() == pytest.approx(3 * per_miss, rel=1e-6)
    # The label at position 0 and the logits at the last position are never used.
    masked_first = labels.clone()
    masked_first[0, 0] = IGNORE_INDEX
    last_changed = shifted.clone()
    last_changed[0, -1] = torch.tensor([9.0, -9.0, 3.0, 1.0])
    assert sequence_logps(last_changed, masked_first)[0].item() == pytest.approx(3 * per_hit, abs=1e-6)


def test_token_counts_and_low_precision_input() -> None:
    labels = torch.tensor([
        [IGNORE_INDEX, IGNORE_INDEX, 4, 5, 1],  # 3 response tokens
        [IGNORE_INDEX, 3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],  # 1 (then padding)
        [7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],  # 0: position 0 is never scored
    ])
    logits = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    logps, counts = sequence_logps(logits, labels)
    assert counts.tolist() == [3, 1, 0]
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, naive_logps(logits.float(), labels)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("labels_shape", [(2, 4), (3, 5), (2, 5, 1)])
def test_shape_mismatch_raises(labels_shape: tuple[int, ...]) -> None:
    logits = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match=r"disagree on \(B, T\)"):
        sequence_logps(logits, torch.zeros(labels_shape, dtype=torch.long))


# --------------------------------------------------------------------- concatenated_forward


@pytest.fixture(scope="module")
def model(assets: Path):
    return AutoModelForCausalLM.from_pretrained(assets / "model").eval()


@pytest.fixture(scope="module")
def pair_batch(assets: Path) -> dict[str, torch.Tensor]:
    dm = PreferenceDataModule(str(assets / "data" / "prefs"), str(assets / "model"), val_split=None)
    dm.setup("fit")
    rows = dm.data["train"][:4]
    # The halves differ in length, so both carry some right padding.
    assert len({len(r["chosen_input_ids"]) for r in rows} | {len(r["rejected_input_ids"]) for r in rows}) > 1
    return dm.collator()(rows)


def half_logps(model, batch: dict[str, torch.Tensor], side: str, average: bool = False):
    with torch.no_grad():
        logits = model(input_ids=batch[f"{side}_input_ids"], attention_mask=batch[f"{side}_attention_mask"]).logits
    return naive_logps(logits, batch[f"{side}_labels"], average=average)


@pytest.mark.parametrize("average", [False, True])
def test_concatenated_forward_equals_separate_forwards(model, pair_batch, average: bool) -> None:
    with torch.no_grad():
        out = concatenated_forward(model, pair_batch, average=average)
    for side in ("chosen", "rejected"):
        want_logps, want_counts = half_logps(model, pair_batch, side, average)
        torch.testing.assert_close(getattr(out, f"{side}_logps"), want_logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(getattr(out, f"{side}_counts"), want_counts)
    assert out.pooled_hidden is None
    assert not torch.allclose(out.chosen_logps, out.rejected_logps)  # the halves are not mixed up


def test_concatenated_forward_equals_unpadded_rows(model, pair_batch) -> None:
    with torch.no_grad():
        out = concatenated_forward(model, pair_batch)
        for side in ("chosen", "rejected"):
            for i in range(pair_batch[f"{side}_input_ids"].shape[0]):
                n = int(pair_batch[f"{side}_attention_mask"][i].sum())
                ids = pair_batch[f"{side}_input_ids"][i : i + 1, :n]
                logits = model(input_ids=ids).logits
                want, _ = naive_logps(logits, pair_batch[f"{side}_labels"][i : i + 1, :n])
                assert getattr(out, f"{side}_logps")[i].item() == pytest.approx(want.item(), abs=1e-5)


def test_extra_right_padding_does_not_change_logps(model, pair_batch) -> None:
    extra = 6
    padded = {}
    for key, value in pair_batch.items():
        fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}[key.split("_", 1)[1]]
        padded[key] = torch.cat([value, torch.full((value.shape[0], extra), fill, dtype=value.dtype)], dim=1)
    with torch.no_grad():
        base = concatenated_forward(model, pair_batch)
        more = concatenated_forward(model, padded)
    assert padded["chosen_input_ids"].shape[1] == pair_batch["chosen_input_ids"].shape[1] + extra
    for field in ("chosen_logps", "rejected_logps", "chosen_counts", "rejected_counts"):
        torch.testing.assert_close(getattr(more, field), getattr(base, field), rtol=1e-5, atol=1e-5)


def test_pooled_hidden_states_come_from_the_same_forward(model, pair_batch) -> None:
    """Each row's every-layer hidden states averaged over its real tokens, as a separate unpadded forward gives."""
    with torch.no_grad():
        out = concatenated_forward(model, pair_batch, output_hidden_states=True)
        B, T = pair_batch["chosen_input_ids"].shape
        assert out.pooled_hidden.shape == (2 * B, model.config.num_hidden_layers, model.config.hidden_size)
        n = int(pair_batch["rejected_attention_mask"][0].sum())  # row B: the first rejected sequence
        alone = model(input_ids=pair_batch["rejected_input_ids"][:1, :n], output_hidden_states=True).hidden_states
    want = torch.stack([h[0].mean(dim=0) for h in alone[1:]])  # (L, D), the embeddings left out
    torch.testing.assert_close(out.pooled_hidden[B], want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------- the lean path (token_logps.py)


def naive_label_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The naive path: a full float32 log-softmax, then the gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 0])
def test_lean_label_logps_equal_the_naive_ones_values_and_gradients(chunk_size: int) -> None:
    """Chunked forward, recomputed backward: the same values and logits-gradients as log_softmax + gather,
    for chunks that divide T, do not divide it, and the whole sequence at once."""
    from lightning_modules.token_logps import label_logps

    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 11, generator=g, dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 11, (3, 7), generator=g)
    weights = torch.randn(3, 7, generator=g, dtype=torch.float64)  # an arbitrary upstream gradient
    lean = label_logps(logits, targets, chunk_size=chunk_size)
    (lean.double() * weights).sum().backward()
    lean_grad, logits.grad = logits.grad.clone(), None
    naive = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (naive * weights).sum().backward()
    torch.testing.assert_close(lean.double(), naive.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(lean_grad, logits.grad, atol=1e-6, rtol=0)


def test_lean_path_keeps_the_logits_dtype_for_the_gradient() -> None:
    """bfloat16 logits: float32 log-probs equal to the naive upcast ones, a bfloat16 gradient close to the naive one."""
    from lightning_modules.token_logps import label_logps

    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 5, 32, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 32, (2, 5), generator=g)
    lean = label_logps(logits, targets, chunk_size=2)
    assert lean.dtype == torch.float32
    lean.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    lean_grad, logits.grad = logits.grad.float(), None
    naive = naive_label_logps(logits, targets)
    naive.sum().backward()
    torch.testing.assert_close(lean, naive.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(lean_grad, logits.grad.float(), atol=1e-2, rtol=1e-2)


def test_sequence_logps_chunking_does_not_change_the_result() -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 10, 17, generator=g)
    labels = torch.randint(0, 17, (4, 10), generator=g)
    labels[:, :3] = IGNORE_INDEX
    whole, counts = sequence_logps(logits, labels, chunk_size=0)
    for chunk in (1, 4):
        torch.testing.assert_close(sequence_logps(logits, labels, chunk_size=chunk)[0], whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(whole, naive_logps(logits, labels)[0], atol=1e-5, rtol=1e-5)
