"""Sampling n responses per prompt from the current policy, as training sequences (SPEC section 5).

`sample_responses` runs one batched HF `generate` (KV cache on, sampling with temperature, top-k and
top-p) on left-padded prompt ids, cuts each response after its first EOS, and lays prompt + response
out as right-padded training rows, prompts masked in the labels (the pair collator's layout, one side).
Row `p * n + j` is sample j of prompt p. The draw is seeded (`seed`), inside `torch.random.fork_rng`, so
the caller's random streams are untouched and a rerun with the same seed samples the same responses.

Worked example (pad 0, EOS 2, n = 1): prompt [5, 6] and generated [7, 2, 0] give
    input_ids [[5, 6, 7, 2]]   attention_mask [[1, 1, 1, 1]]   labels [[-100, -100, 7, 2]]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from datamodules.collate import pad
from datamodules.utils.errors import UserInputError
from datamodules.tokenize import IGNORE_INDEX


@dataclass(frozen=True)
class Sampling:
    """How responses are sampled from the current policy."""

    num_samples: int = 4
    """n: responses sampled per prompt."""
    max_new_tokens: int = 64
    """Generation budget per response (a response that reaches it has no EOS)."""
    temperature: float = 1.0
    """Softmax temperature of the sampling distribution."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 = off."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest token set with this much probability; 1.0 = off."""
    seed: int = 0
    """Base seed; each round draws with (seed, rank, round), so a rerun samples identical responses."""

    def __post_init__(self) -> None:
        if self.num_samples < 2 or self.max_new_tokens < 1 or self.temperature <= 0 or self.top_k < 0 \
                or not 0 < self.top_p <= 1:
            raise UserInputError(f"model.init_args.sampling={self}: needs num_samples >= 2, max_new_tokens >= 1, temperature > 0, "
                             "top_k >= 0 and 0 < top_p <= 1")


@dataclass
class SampledSequences:
    """n sampled responses for each of P prompts, as right-padded training rows (M = P·n)."""

    input_ids: Tensor  # (M, T) long
    attention_mask: Tensor  # (M, T) long
    labels: Tensor  # (M, T) long, IGNORE_INDEX on prompt and padding
    responses: list[list[int]]  # M response token ids (with the EOS when one was generated)
    num_samples: int

    @property
    def inputs(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}

    @property
    def num_prompts(self) -> int:
        return len(self.responses) // self.num_samples


def prompt_ids_of(batch: dict[str, Tensor]) -> list[list[int]]:
    """Each pair's prompt ids: the chosen row's tokens before its first labelled (response) token."""
    ids, labels = batch["chosen_input_ids"], batch["chosen_labels"]
    starts = (labels != IGNORE_INDEX).int().argmax(dim=1).tolist()  # first response position
    return [row[:start].tolist() for row, start in zip(ids, starts)]


def round_seed(seed: int, rank: int, round_index: int) -> int:
    """One 63-bit seed per (base seed, rank, round): distinct streams, the same on a rerun."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + rank * 7_919 + round_index)
    return int(torch.randint(0, 2**62, (1,), generator=generator))


@torch.no_grad()
def sample_responses(model: nn.Module, prompt_ids: Sequence[Sequence[int]], sampling: Sampling, *, pad_token_id: int,
                     eos_token_id: int, seed: int, synced_gpus: bool = False) -> SampledSequences:
    """`sampling.num_samples` responses per prompt from `model` (in eval mode while sampling), seeded by `seed`.

    `synced_gpus`: keep every rank generating until all are done (needed under DeepSpeed ZeRO-3, whose
    forward gathers weights collectively).
    """
    n = sampling.num_samples
    width = max(len(p) for p in prompt_ids)
    left = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(left)
    for i, ids in enumerate(prompt_ids):
        left[i, width - len(ids):] = torch.as_tensor(list(ids), dtype=torch.long)
        mask[i, width - len(ids):] = 1
    device = next(model.parameters()).device
    options = {"top_k": sampling.top_k, "top_p": sampling.top_p, "temperature": sampling.temperature}
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = model.generate(input_ids=left.repeat_interleave(n, 0).to(device),
                                 attention_mask=mask.repeat_interleave(n, 0).to(device), do_sample=True,
                                 max_new_tokens=sampling.max_new_tokens, pad_token_id=pad_token_id,
                                 eos_token_id=eos_token_id, use_cache=True, synced_gpus=synced_gpus, **options)
    finally:
        model.train(was_training)
    responses = [cut_at_eos(row.tolist(), eos_token_id) for row in out[:, width:].cpu()]
    prompts = [list(prompt_ids[i // n]) for i in range(len(responses))]
    rows = [p + r for p, r in zip(prompts, responses)]
    length = max(len(row) for row in rows)
    labels = [[IGNORE_INDEX] * len(p) + r for p, r in zip(prompts, responses)]
    return SampledSequences(input_ids=pad(rows, pad_token_id, length), attention_mask=pad([[1] * len(r) for r in rows], 0, length),
                            labels=pad(labels, IGNORE_INDEX, length), responses=responses, num_samples=n)


def cut_at_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    """The tokens up to and including the first EOS (all of them when there is none)."""
    return tokens[:tokens.index(eos_token_id) + 1] if eos_token_id in tokens else tokens
