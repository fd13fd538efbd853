"""Prompt rendering and (prompt, response) tokenization with prompt tokens masked out of the loss.

Truncation policy (when prompt + response exceed `max_length`): the response is cut first (its end
is dropped, keeping at least `min_response_tokens`), then the prompt keeps its *end* (the most
recent turns and the generation prompt survive). `encode_response` reports what it did so callers
can count truncated rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]]) -> str:
    """Turn a raw prompt (a string or a list of {role, content} messages) into model text.

    Uses the tokenizer's own chat template with the generation prompt when it has one; otherwise
    the prompt string is used as is.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages)


@dataclass
class Encoded:
    """Token ids of one prompt+response, with `labels` = IGNORE_INDEX on prompt positions."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    response: str,
    max_length: int,
    *,
    min_response_tokens: int = 1,
) -> Encoded:
    """Append the response (plus EOS) to already-encoded prompt ids and apply the truncation policy."""
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
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


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, str]]) -> list[int]:
    """Render and tokenize a prompt (special tokens as the tokenizer adds them, e.g. BOS)."""
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=True)["input_ids"]


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` (hub id or local folder) with a pad token guaranteed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
