"""Prompt + response tokenization with prompt tokens masked out of the loss.

Truncation policy (when prompt + response exceed `max_length`): the response is cut first (its end
is dropped, keeping at least `min_response_tokens`), then the prompt keeps its *end* (the most
recent turns and the generation prompt survive). `encode_response` reports whether it truncated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from datamodules.chat import Prompt
from datamodules.templates import render_prompt, response_eos

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
"""The label of positions no loss is taken on (prompt, padding); the one definition, also used by the models."""
PAIR_SIDES = ("chosen", "rejected")


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, template: str = "auto",
                  insert_eos: bool = False) -> list[int]:
    """Render `prompt` in `template` (`datamodules.templates.render_prompt`) and tokenize it, special tokens
    as the tokenizer adds them (e.g. BOS)."""
    text = render_prompt(prompt, template=template, tokenizer=tokenizer, insert_eos=insert_eos)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


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


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The one pad-token fix-up: a tokenizer without a pad token pads with its EOS token. Returns `tokenizer`.

    Padding positions are masked (attention 0, label IGNORE_INDEX), so which id pads does not matter.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], example: dict[str, Any], max_length: int,
                *, end_ids: list[int] | None = None) -> dict[str, Encoded]:
    """Both responses of a pair (`example["chosen"]`, `example["rejected"]`) after the same prompt ids.

    Each side gets `encode_response`'s truncation policy on its own; keys are "chosen", "rejected".
    """
    return {side: encode_response(tokenizer, prompt_ids, example[side], max_length, end_ids=end_ids)
            for side in PAIR_SIDES}


def pair_columns(encoded: dict[str, Encoded]) -> dict[str, list[int]]:
    """`{chosen,rejected}_input_ids` and `{chosen,rejected}_labels` of an `encode_pair` result (the collator's rows)."""
    columns = {}
    for side, enc in encoded.items():
        columns[f"{side}_input_ids"], columns[f"{side}_labels"] = enc.input_ids, enc.labels
    return columns


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` (hub id or local folder) with a pad token guaranteed (`ensure_pad_token`)."""
    from transformers import AutoTokenizer

    return ensure_pad_token(AutoTokenizer.from_pretrained(name_or_path))
