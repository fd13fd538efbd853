"""Prompt + response tokenization with prompt tokens masked out of the loss.

Truncation policy (when prompt + response exceed `max_length`): the response is cut first (its end
is dropped, keeping at least `min_response_tokens`), then the prompt keeps its *end* (the most
recent turns and the generation prompt survive). `encode_response` reports whether it truncated.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from datamodules.templates import render_prompt as render_template
from datamodules.templates import response_eos

IGNORE_INDEX = -100
Prompt = str | list[dict[str, str]]


def as_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt given as a plain string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, template: str = "auto",
                  insert_eos: bool = False) -> str:
    """The text before the response: the prompt in `template` (see `datamodules.templates`)."""
    return render_template(as_messages(prompt), template=template, tokenizer=tokenizer, insert_eos=insert_eos)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, template: str = "auto",
                  insert_eos: bool = False) -> list[int]:
    """Render and tokenize a prompt (special tokens as the tokenizer adds them, e.g. BOS)."""
    return tokenizer(render_prompt(tokenizer, prompt, template, insert_eos), add_special_tokens=True)["input_ids"]


@dataclass
class Encoded:
    """Token ids of one prompt+response, with `labels` = IGNORE_INDEX on prompt positions."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def end_of_response_ids(tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> list[int]:
    """Token ids that close a response under `template` (usually just EOS)."""
    marker = response_eos(template, tokenizer)
    if marker is None:
        return []
    if marker == tokenizer.eos_token and tokenizer.eos_token_id is not None:
        return [tokenizer.eos_token_id]
    return tokenizer(marker, add_special_tokens=False)["input_ids"]


def encode_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    response: str,
    max_length: int,
    *,
    min_response_tokens: int = 1,
    end_ids: list[int] | None = None,
) -> Encoded:
    """Append the response (plus `end_ids`, default EOS) to encoded prompt ids; apply the truncation policy."""
    if end_ids is None:
        end_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + end_ids
    truncated = len(prompt_ids) + len(response_ids) > max_length
    if truncated:
        keep_response = max(min_response_tokens, max_length - len(prompt_ids))
        response_ids = response_ids[:keep_response]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(response_ids)):]
    return Encoded(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        truncated=truncated,
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` (hub id or local folder) with a pad token guaranteed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
