"""Batched generation from a causal LM for prompts rendered with the tokenizer's chat template."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from datamodules.templates import render_prompt
from datamodules.tokenize import tokenize_prompts

# A reward program or model: (prompts, responses) -> one float per response.
RewardFn = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str | list[dict[str, str]]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    template: str = "auto",
    insert_eos: bool = False,
) -> list[str]:
    """Generate one response per prompt (greedy by default) with the KV cache; returns decoded text.

    Prompts (strings or message lists) are rendered with `template` (as the training data was) and
    left-padded so every row's generation starts right after its own prompt.
    """
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    responses: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [render_prompt(p, template=template, tokenizer=tokenizer, insert_eos=insert_eos)
                     for p in prompts[start : start + batch_size]]
            enc = tokenize_prompts(tokenizer, texts, return_tensors="pt", padding=True).to(model.device)
            sampling = dict(temperature=temperature, top_p=top_p) if do_sample else {}
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, **sampling,
            )
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            responses += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return responses


def generate_with_datamodule(trainer, model: PreTrainedModel, prompts: Sequence, **options) -> list[str]:
    """`generate_responses` with the tokenizer, template and insert_eos of `trainer.datamodule` (as trained)."""
    data = trainer.datamodule
    return generate_responses(model, data.tokenizer, prompts, template=data.template, insert_eos=data.insert_eos,
                              **options)
