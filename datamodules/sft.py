"""`SFTDataModule`: (prompt, response) rows, or chat `messages`, → masked-prompt token ids for `SFTModule`.

Schemas: `sft` (a `prompt` string or message list plus a `response` string) and `sft_messages`
(a `messages` conversation ending with the assistant turn to learn, e.g. UltraFeedback's
`train_sft`). Bad rows are counted by the same reasons as preference rows.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from datamodules.chat import ASSISTANT, USER, as_messages
from datamodules.collate import SFTCollator
from datamodules.text_data import TextDataModule
from datamodules.tokenize import (NO_RESPONSE_TOKENS, encode_prompt, encode_response, end_of_response_ids,
                                  has_room_for_response)

SFT_COLUMNS = {"sft": ["prompt", "response"], "sft_messages": ["messages"]}


def normalize_sft(row: dict[str, Any], schema: str) -> dict[str, Any] | str:
    """Raw SFT row → {"prompt": messages, "response": str}, or a bad-row reason."""
    if schema == "sft_messages":
        messages = row.get("messages")
        if not isinstance(messages, list) or len(messages) < 2:
            return "missing_field"
        if messages[-1].get("role") != ASSISTANT or messages[-2].get("role") != USER:
            return "wrong_roles"
        prompt, response = messages[:-1], messages[-1].get("content")
    else:
        prompt, response = row.get("prompt"), row.get("response")
        if prompt is None or response is None:
            return "missing_field"
        prompt = as_messages(prompt)
    if not isinstance(response, str) or not all(isinstance(m.get("content"), str) for m in prompt):
        return "not_a_string"
    if not response.strip():
        return "empty_response"
    return {"prompt": prompt, "response": response}


class SFTDataModule(TextDataModule):
    """Supervised fine-tuning rows; only response tokens are trained on."""

    def detect_schema(self, dataset: Dataset) -> str:
        return "sft_messages" if "messages" in dataset.column_names and "response" not in dataset.column_names else "sft"

    def required_columns(self, schema: str) -> list[str]:
        return SFT_COLUMNS[schema]

    def normalize(self, row: dict[str, Any], schema: str) -> dict[str, Any] | str:
        return normalize_sft(row, schema)

    def encode(self, example: dict[str, Any]) -> dict[str, Any] | str:
        prompt_ids = encode_prompt(self.tokenizer, example["prompt"], self.template, self.insert_eos)
        if not has_room_for_response(prompt_ids, self.max_length):
            return NO_RESPONSE_TOKENS
        encoded = encode_response(self.tokenizer, prompt_ids, example["response"], self.max_length,
                                  end_ids=end_of_response_ids(self.tokenizer, self.template))
        if encoded.truncated and self.overlength == "drop":
            return "too_long"
        return {"input_ids": encoded.input_ids, "labels": encoded.labels, "truncated": encoded.truncated}

    def collator(self) -> SFTCollator:
        return SFTCollator(self.tokenizer.pad_token_id)
