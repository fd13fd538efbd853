"""`PreferenceDataModule`: (prompt, chosen, rejected) rows → pair batches for `DPOModule`."""

from __future__ import annotations

from typing import Any

from datamodules.collate import PairCollator
from datamodules.text_data import TextDataModule
from datamodules.tokenize import encode_prompt, encode_response


class PreferenceDataModule(TextDataModule):
    """Rows with `prompt`, `chosen`, `rejected`; optional precomputed reference log-prob columns.

    See `datamodules.collate` for the batch layout. Reference columns named in
    `reference_columns` are passed to the batch as `ref_chosen_logps` / `ref_rejected_logps`.
    """

    required_columns = ["prompt", "chosen", "rejected"]

    def __init__(self, *args: Any, reference_columns: tuple[str, str] | None = None, **kwargs: Any):
        """Preference data.

        Args:
            reference_columns: (chosen, rejected) column names holding precomputed summed reference log-probs.
        """
        super().__init__(*args, **kwargs)
        self.reference_columns = reference_columns
        if reference_columns is not None:
            self.required_columns = self.required_columns + list(reference_columns)

    def encode_row(self, row: dict[str, Any], role: str) -> dict[str, Any]:
        prompt_ids = encode_prompt(self.tokenizer, row["prompt"])
        out: dict[str, Any] = {}
        for side in ("chosen", "rejected"):
            encoded = encode_response(self.tokenizer, prompt_ids, row[side], self.max_length)
            self.truncated[role] += encoded.truncated
            out[f"{side}_input_ids"], out[f"{side}_labels"] = encoded.input_ids, encoded.labels
        if self.reference_columns is not None:
            chosen_key, rejected_key = self.reference_columns
            out["ref_chosen_logps"] = float(row[chosen_key])
            out["ref_rejected_logps"] = float(row[rejected_key])
        return out

    def collator(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id)
