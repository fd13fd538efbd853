"""`SFTDataModule`: (prompt, response) rows → masked-prompt token ids for `SFTModule`."""

from __future__ import annotations

from typing import Any

from datamodules.collate import SFTCollator
from datamodules.text_data import TextDataModule
from datamodules.tokenize import encode_prompt, encode_response


class SFTDataModule(TextDataModule):
    """Rows with a `prompt` (string or message list) and a `response` string."""

    required_columns = ["prompt", "response"]

    def encode_row(self, row: dict[str, Any], role: str) -> dict[str, Any]:
        encoded = encode_response(self.tokenizer, encode_prompt(self.tokenizer, row["prompt"]),
                                  row["response"], self.max_length)
        self.truncated[role] += encoded.truncated
        return {"input_ids": encoded.input_ids, "labels": encoded.labels}

    def collator(self) -> SFTCollator:
        return SFTCollator(self.tokenizer.pad_token_id)
