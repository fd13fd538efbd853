"""`PromptDataModule`: prompt-only rows for generation (`predict`) and on-policy sampling.

Reads a file of prompts, or the prompts of any preference dataset (schema detected as for
`PreferenceDataModule`). Batches are {"prompt": list of message lists}; generation renders them
with the data module's template.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader

from datamodules.schemas import REQUIRED_COLUMNS, detect_schema, normalize_prompt
from datamodules.text_data import TextDataModule
from datamodules.tokenize import encode_prompt


def load_prompts(path: str, limit: int | None = None, field: str = "prompt") -> list:
    """Prompts from a JSONL file (one `{"prompt": ...}` per line) through HF `datasets`."""
    rows = load_dataset("json", data_files={"prompts": path})["prompts"]
    prompts = rows[field]
    return prompts[:limit] if limit else prompts


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Keep raw prompts as a list: generation tokenizes them with left padding itself."""
    return {"prompt": [row["prompt"] for row in rows]}


class PromptDataModule(TextDataModule):
    """Prompts of a prompt file or of a preference dataset; serves the `predict` split."""

    def __init__(self, *args: Any, predict_split: str = "test", **kwargs: Any):
        """Prompt data.

        Args:
            predict_split: split whose prompts `predict` generates responses for.
        """
        super().__init__(*args, **kwargs)
        self.splits["predict"] = predict_split

    def detect_schema(self, dataset: Dataset) -> str:
        return detect_schema(dataset.column_names, dataset[0] if len(dataset) else {})

    def required_columns(self, schema: str) -> list[str]:
        return REQUIRED_COLUMNS[schema]

    def normalize(self, row: dict[str, Any], schema: str) -> dict[str, Any] | str:
        return normalize_prompt(row, schema)

    def encode(self, example: dict[str, Any]) -> dict[str, Any] | str:
        """Prompts longer than max_length are dropped (overlength='drop') or kept for generation to truncate."""
        length = len(encode_prompt(self.tokenizer, example["prompt"], self.template, self.insert_eos))
        too_long = length > self.max_length
        if too_long and self.overlength == "drop":
            return "too_long"
        return {"prompt": example["prompt"], "prompt_length": length, "truncated": too_long}

    def sequence_length(self, item: dict[str, Any]) -> int:
        return item["prompt_length"]

    def collator(self):
        return collate_prompts

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_batch_size, shuffle=False)
