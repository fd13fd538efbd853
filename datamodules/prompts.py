"""`PromptDataModule`: prompt-only rows for generation (`predict`) and, later, on-policy sampling.

Batches are {"prompt": list of raw prompts (strings or message lists)}; the module renders them
with the tokenizer's chat template when it generates.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import DataLoader

from datamodules.text_data import TextDataModule


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, list]:
    """Keep raw prompts as a list: generation tokenizes them with left padding itself."""
    return {"prompt": [row["prompt"] for row in rows]}


class PromptDataModule(TextDataModule):
    """Rows with a `prompt` column (string or message list); serves the `predict` split."""

    required_columns = ["prompt"]

    def __init__(self, *args: Any, predict_split: str = "test", **kwargs: Any):
        """Prompt data.

        Args:
            predict_split: split whose prompts `predict` generates responses for.
        """
        super().__init__(*args, **kwargs)
        self.splits["predict"] = predict_split

    def encode_row(self, row: dict[str, Any], role: str) -> dict[str, Any]:
        return {"prompt": row["prompt"]}

    def collator(self):
        return collate_prompts

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.eval_batch_size, shuffle=False)
