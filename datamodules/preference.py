"""`PreferenceDataModule`: preference pairs of any supported schema → pair batches for `DPOModule`.

Schemas (`datamodules.schemas`): local prompt/chosen/rejected files, UltraFeedback and SafeRLHF
message lists, RefDPO (with precomputed reference log-probs), the relabelled AlpacaFarm sets, and
hh-rlhf transcripts. RefDPO's `chosen_logprob` / `rejected_logprob` reach the batch as
`ref_chosen_logps` / `ref_rejected_logps` (use with `model.reference: precomputed`). With
`reference_cache`, each pair instead gets the cached log-probs of K reference models
(`lightning_modules.references.cache_builder`, computed once beforehand, looked up by pair content) as lists
of K values: `ref_chosen_logps` / `ref_rejected_logps` (floats) and `ref_chosen_counts` /
`ref_rejected_counts` (each reference's own response token counts), batched as (B, K) (use with
`model.reference: cached`); a missing or invalid cache stops setup with the command that computes it.
With `study_split`, train / val / test are carved out of one source split as in the multi-reference
study (filters, 7,000-pair sample, per-seed 5,000 / 1,000 / 1,000), deterministic and cached.
See `datamodules.collate` for the batch layout.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict
from lightning.pytorch.utilities import rank_zero_info

from datamodules.collate import PairCollator
from datamodules.label_noise import FLAG, add_label_noise
from datamodules.loading import cache_dir_for, fingerprint, load_splits
from datamodules.multiref_split import StudySplit, prepare_study_split
from datamodules.reference_cache import ReferenceSpec, load_reference_cache, pair_key
from datamodules.schemas import REQUIRED_COLUMNS, RowStats, detect_schema, normalize_pair
from datamodules.text_data import TextDataModule
from datamodules.tokenize import (NO_RESPONSE_TOKENS, encode_pair, encode_prompt, end_of_response_ids,
                                  has_room_for_response, pair_columns)
from datamodules.utils.cache import sha256_hex
from datamodules.utils.errors import UserInputError


class PreferenceDataModule(TextDataModule):
    """(prompt, chosen, rejected) pairs; optional reference log-prob columns; optional study split."""

    def __init__(self, *args: Any, reference_columns: tuple[str, str] | None = None,
                 study_split: StudySplit | None = None, reference_cache: list[ReferenceSpec] | None = None,
                 return_prompts: bool = False, label_noise: float = 0.0, label_noise_seed: int = 0, **kwargs: Any):
        """Preference data.

        Args:
            reference_columns: extra (chosen, rejected) columns of summed reference log-probs to pass to the batch.
            study_split: carve train/val/test out of train_split as in the multi-reference study (SPEC section 4).
            reference_cache: references whose cached log-probs are attached to each pair as (K,) columns.
            return_prompts: also pass each pair's raw prompt to the batch as `prompt` (on-policy training scores to it).
            label_noise: swap chosen and rejected in this share of the training pairs; > 0 also batches `label_flipped`.
            label_noise_seed: which pairs `label_noise` flips.
        """
        super().__init__(*args, **kwargs)
        if not 0.0 <= label_noise <= 1.0:
            raise UserInputError(f"data.label_noise={label_noise}: the share of flipped training pairs, in [0, 1]")
        self.label_noise, self.label_noise_seed = label_noise, label_noise_seed
        specs = [s if isinstance(s, ReferenceSpec) else ReferenceSpec(**s) for s in reference_cache or ()]
        if specs and reference_columns is not None:
            raise UserInputError("data.reference_columns and data.reference_cache both fill ref_chosen_logps / "
                                 "ref_rejected_logps; set only one of them")
        self.reference_cache = specs or None
        self.return_prompts = return_prompts
        self.reference_columns = reference_columns
        self.study_split = study_split
        self.study_result = None
        self._study_sample: tuple[Dataset, str, str] | None = None
        if study_split is not None:
            source = self.splits["train"]
            self.splits.update(val=f"{source}[study val]", test=f"{source}[study test]")

    def detect_schema(self, dataset: Dataset) -> str:
        return detect_schema(dataset.column_names, dataset[0] if len(dataset) else {})

    def required_columns(self, schema: str) -> list[str]:
        return REQUIRED_COLUMNS[schema] + list(self.reference_columns or ())

    def normalize(self, row: dict[str, Any], schema: str) -> dict[str, Any] | str:
        example = normalize_pair(row, schema)
        if isinstance(example, dict) and isinstance(row.get(FLAG), (bool, int, float)):
            example[FLAG] = float(row[FLAG])
        if isinstance(example, dict) and self.reference_columns is not None:
            values = [row.get(column) for column in self.reference_columns]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                return "nan_logprob"
            example["ref_chosen_logps"], example["ref_rejected_logps"] = map(float, values)
        return example

    def encode(self, example: dict[str, Any]) -> dict[str, Any] | str:
        prompt_ids = encode_prompt(self.tokenizer, example["prompt"], self.template, self.insert_eos)
        if not has_room_for_response(prompt_ids, self.max_length):
            return NO_RESPONSE_TOKENS
        end_ids = end_of_response_ids(self.tokenizer, self.template)
        encoded = encode_pair(self.tokenizer, prompt_ids, example, self.max_length, end_ids=end_ids)
        truncated = any(side.truncated for side in encoded.values())
        if truncated and self.overlength == "drop":
            return "too_long"
        item: dict[str, Any] = {"truncated": truncated, **pair_columns(encoded)}
        if self.return_prompts:
            item["prompt"] = example["prompt"]
        if FLAG in example and self.label_noise > 0:  # the source's own flips (the synthetic task's), toggled below
            item[FLAG] = example[FLAG]
        if self.reference_cache:  # cached values replace any shipped ones (RefDPO's) in `prepare`
            item["pair_key"] = pair_key(example)
            return item
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in example:
                item[key] = float(example[key])
        return item

    def prepare(self, rows: Dataset, schema: str, role: str) -> tuple[list[dict], RowStats]:
        items, stats = super().prepare(rows, schema, role)
        if self.reference_cache:
            self.attach_reference_cache(items, self.cache_fingerprint(rows, schema), role)
        if role == "train" and self.label_noise > 0:  # after the cache: its columns are swapped with the pair
            items = add_label_noise(items, self.label_noise, self.label_noise_seed)
        return items, stats

    # ---- cached reference log-probs (lightning_modules.references.cache_builder) --------------------------------
    def cache_fingerprint(self, dataset: Dataset, schema: str) -> str:
        """Identity of one split's raw rows as this module reads them: part of each reference cache's key.

        With a study split, every role's cache is the one of the seed-independent sample (rows are looked up by
        pair content), so seeds 0-4 share one cache instead of each scoring the same pairs again.
        """
        if self.study_split is not None:
            return self.study_sample()[1]
        return fingerprint(dataset, self.path, self.name, schema)

    def study_sample(self) -> tuple[Dataset, str, str]:
        """(rows, fingerprint, schema) of the study split's sample: train + val + test of every seed."""
        if self.study_result is None:
            self.role_dataset(load_splits(self.path, self.name), "train")
        return self._study_sample

    def reference_cache_dir(self) -> Path:
        """Folder of the reference caches: `reference_logps/` beside the dataset (see `cache_dir_for`)."""
        return cache_dir_for(self.path) / "reference_logps"

    def reference_sources(self) -> list[tuple[str, Dataset, str]]:
        """(role, raw rows, schema) of every configured split, read as `setup` reads them."""
        if self.study_split is not None:  # one source: the sample that every seed splits (see `cache_fingerprint`)
            rows, _, schema = self.study_sample()
            return [("study sample", rows, schema)]
        raw = load_splits(self.path, self.name)
        sources = []
        for role in ("train", "val", "test"):
            if self.splits.get(role):
                dataset = self.role_dataset(raw, role)
                sources.append((role, dataset, self.schema if self.schema != "auto" else self.detect_schema(dataset)))
        return sources

    def attach_reference_cache(self, items: list[dict[str, Any]], dataset_fingerprint: str, role: str) -> None:
        """Give every item its K references' cached values (config order); never loads a model."""
        keys = [item.pop("pair_key") for item in items]
        columns: dict[str, list[np.ndarray]] = {}
        for k, spec in enumerate(self.reference_cache):
            cached, manifest = load_reference_cache(spec, dataset_fingerprint=dataset_fingerprint,
                                                    max_length=self.max_length, cache_dir=self.reference_cache_dir())
            values = cached.lookup(keys) if cached is not None else None
            if values is None:
                problem = "has no valid cached log-probs for" if cached is None else "does not cover every pair of"
                raise UserInputError(
                    f"data.reference_cache[{k}] ({spec.name_or_path!r}) {problem} the {role} split (expected "
                    f"{manifest}). Compute the reference caches once with: {compute_command()}")
            for name, array in values.items():
                columns.setdefault(name, []).append(array)
        stacked = {f"ref_{name}": np.stack(arrays, axis=1).tolist() for name, arrays in columns.items()}  # (N, K)
        for i, item in enumerate(items):
            item.update({name: rows[i] for name, rows in stacked.items()})
        rank_zero_info(f"data {role}: cached log-probs of {len(self.reference_cache)} reference(s) attached")

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
        sample = sorted(result.train + result.val + result.test)
        sample_id = sha256_hex(json.dumps(sample).encode())[:16]
        self._study_sample = (source.select(sample), fingerprint(source, self.path, self.name, schema, "sample",
                                                                 sample_id), schema)
        return result


def compute_command() -> str:
    """The command that computes the caches of the current run (its --config and --data.* arguments from argv)."""
    args, argv = [], sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--config" or (arg.startswith("--data.") and "=" not in arg):
            args += [arg, argv[i + 1]] if i + 1 < len(argv) else [arg]
        elif arg.startswith(("--config=", "--data.")):
            args.append(arg)
    return " ".join(["python -m lightning_modules.references.cache_builder", *(args or ["--config YOUR_EXPERIMENT.yaml"])])
