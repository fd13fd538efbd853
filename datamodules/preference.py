"""`PreferenceDataModule`: preference pairs of any supported schema → pair batches for `DPOModule`.

Schemas (`datamodules.schemas`): local prompt/chosen/rejected files, UltraFeedback and SafeRLHF
message lists, RefDPO (with precomputed reference log-probs), the relabelled AlpacaFarm sets, and
hh-rlhf transcripts. RefDPO's `chosen_logprob` / `rejected_logprob` reach the batch as
`ref_chosen_logps` / `ref_rejected_logps` (use with `model.reference: precomputed`). With
`study_split`, train / val / test are carved out of one source split as in the multi-reference
study (filters, 7,000-pair sample, per-seed 5,000 / 1,000 / 1,000), deterministic and cached.
See `datamodules.collate` for the batch layout.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from datamodules.collate import PairCollator
from datamodules.loading import cache_dir_for, fingerprint
from datamodules.multiref_split import StudySplit, prepare_study_split
from datamodules.schemas import REQUIRED_COLUMNS, detect_schema, normalize_pair
from datamodules.text_data import TextDataModule
from datamodules.tokenize import encode_prompt, encode_response, end_of_response_ids


class PreferenceDataModule(TextDataModule):
    """(prompt, chosen, rejected) pairs; optional reference log-prob columns; optional study split."""

    def __init__(self, *args: Any, reference_columns: tuple[str, str] | None = None,
                 study_split: StudySplit | None = None, **kwargs: Any):
        """Preference data.

        Args:
            reference_columns: extra (chosen, rejected) columns of summed reference log-probs to pass to the batch.
            study_split: carve train/val/test out of train_split as in the multi-reference study (SPEC section 4).
        """
        super().__init__(*args, **kwargs)
        self.reference_columns = reference_columns
        self.study_split = study_split
        self.study_result = None
        if study_split is not None:
            source = self.splits["train"]
            self.splits.update(val=f"{source}[study val]", test=f"{source}[study test]")

    def detect_schema(self, dataset: Dataset) -> str:
        return detect_schema(dataset.column_names, dataset[0] if len(dataset) else {})

    def required_columns(self, schema: str) -> list[str]:
        return REQUIRED_COLUMNS[schema] + list(self.reference_columns or ())

    def normalize(self, row: dict[str, Any], schema: str) -> dict[str, Any] | str:
        example = normalize_pair(row, schema)
        if isinstance(example, dict) and self.reference_columns is not None:
            values = [row.get(column) for column in self.reference_columns]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                return "nan_logprob"
            example["ref_chosen_logps"], example["ref_rejected_logps"] = map(float, values)
        return example

    def encode(self, example: dict[str, Any]) -> dict[str, Any] | str:
        prompt_ids = encode_prompt(self.tokenizer, example["prompt"], self.template, self.insert_eos)
        end_ids = end_of_response_ids(self.tokenizer, self.template)
        item: dict[str, Any] = {"truncated": False}
        for side in ("chosen", "rejected"):
            encoded = encode_response(self.tokenizer, prompt_ids, example[side], self.max_length, end_ids=end_ids)
            if encoded.truncated and self.overlength == "drop":
                return "too_long"
            item["truncated"] |= encoded.truncated
            item[f"{side}_input_ids"], item[f"{side}_labels"] = encoded.input_ids, encoded.labels
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in example:
                item[key] = float(example[key])
        return item

    def collator(self) -> PairCollator:
        return PairCollator(self.tokenizer.pad_token_id)

    def role_dataset(self, raw: DatasetDict, role: str) -> Dataset:
        if self.study_split is None:
            return super().role_dataset(raw, role)
        source = super().role_dataset(raw, "train")
        if self.study_result is None:
            self.study_result = self._study_indices(source)
        return source.select(getattr(self.study_result, role))

    def _study_indices(self, source: Dataset):
        """Normalize the source split once, then filter, sample and split its good rows (cached)."""
        schema = self.schema if self.schema != "auto" else self.detect_schema(source)
        good = [(i, ex) for i, ex in enumerate(normalize_pair(row, schema) for row in source) if isinstance(ex, dict)]
        result = prepare_study_split(
            [ex for _, ex in good], self.study_split,
            dataset_fingerprint=fingerprint(source, self.path, self.name, schema),
            policy_tokenizer=self.tokenizer_name_or_path,
            cache_dir=Path(self.study_split.cache_dir or cache_dir_for(self.path)),
        )
        raw_index = [i for i, _ in good]
        for role in ("train", "val", "test"):  # positions among good rows → rows of the source split
            setattr(result, role, [raw_index[j] for j in getattr(result, role)])
        return result
