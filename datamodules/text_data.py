"""`TextDataModule`: load a dataset, normalize its schema, tokenize with a template, serve batches.

Per row: `normalize` (schema → canonical row, or a bad-row reason) → `encode` (template +
tokenizer + length policy → token ids, or `too_long` / `no_response_tokens`) → kept, or counted
under its reason in `self.stats[role]`. Nothing is dropped silently: `describe` prints the counts,
and a split whose share of bad rows exceeds `max_bad_fraction` stops with an error listing them.
`validate` / `test` without a validation / test split configured stop with an error naming the key.
Subclasses (`SFTDataModule`, `PreferenceDataModule`, `PromptDataModule`) define the row kind.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning as L
from datasets import Dataset, DatasetDict
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from datamodules.loading import load_splits, require_columns
from datamodules.resumable import (RandomOrderSampler, ResumableDataLoader, ResumableDistributedLengthGroupedSampler,
                                   ResumableDistributedSampler, ResumableLengthGroupedSampler, SkipOnce)
from datamodules.schemas import RowStats
from datamodules.tokenize import NO_RESPONSE_TOKENS, load_tokenizer
from datamodules.utils.errors import UserInputError

# Which splits each Lightning stage reads.
STAGE_ROLES = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
# Reasons a row is dropped by policy rather than for being malformed (not counted as "bad"): longer than
# max_length with overlength='drop', or a prompt that leaves no room for a response token within max_length.
POLICY_DROPS = ("too_long", NO_RESPONSE_TOKENS)
# The data argument that names the split of each role (for messages).
SPLIT_ARGUMENTS = {"train": "train_split", "val": "val_split", "test": "test_split", "predict": "predict_split"}
ROLE_NAMES = {"train": "training", "val": "validation", "test": "test", "predict": "predict"}
Overlength = Literal["truncate", "drop"]


class TextDataModule(L.LightningDataModule):
    """Shared loading, normalization, tokenization, bookkeeping and loaders."""

    def __init__(
        self,
        path: str,
        tokenizer_name_or_path: str,
        name: str | None = None,
        schema: str = "auto",
        template: str = "auto",
        insert_eos: bool = False,
        max_length: int = 512,
        overlength: Overlength = "truncate",
        max_bad_fraction: float = 0.05,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        train_split: str | None = "train",
        val_split: str | None = "validation",
        test_split: str | None = None,
        group_by_length: bool = False,
        shuffle: bool = True,
        num_workers: int = 0,
    ):
        """Shared data arguments.

        Args:
            path: hub dataset id, local folder laid out like a hub repo, or a .jsonl / .parquet file.
            tokenizer_name_or_path: tokenizer to encode with (linked to model.model_name_or_path by the CLI).
            name: dataset config name for multi-config datasets (e.g. RefDPO's mistral, tulu2, llama3).
            schema: row layout: auto (detected from the columns) or a name in datamodules.schemas.SCHEMAS.
            template: prompt format: auto, tokenizer (its chat template), zephyr, alpacafarm or plain.
            insert_eos: zephyr template only: also end system and user turns with EOS (RefDPO option).
            max_length: maximum prompt + response tokens per sequence.
            overlength: rows over max_length: truncate (the response's end) or drop; a prompt filling it drops its row.
            max_bad_fraction: stop with an error if more than this share of a split's rows is malformed.
            batch_size: training batch size per device.
            eval_batch_size: validation / test / predict batch size per device (default: batch_size).
            train_split: name of the training split (None = no training).
            val_split: name of the validation split (None = no validation).
            test_split: name of the test split (None = no test).
            group_by_length: batch training rows of similar length together (less padding; still shuffled).
            shuffle: reshuffle the training split every epoch (seeded by seed_everything; DDP shards per rank).
            num_workers: DataLoader worker processes.
        """
        super().__init__()
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise UserInputError(f"data.max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.path, self.name, self.schema = path, name, schema
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.template, self.insert_eos = template, insert_eos
        self.max_length, self.overlength = max_length, overlength
        self.max_bad_fraction = max_bad_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.splits: dict[str, str | None] = {"train": train_split, "val": val_split, "test": test_split}
        self.group_by_length, self.shuffle, self.num_workers = group_by_length, shuffle, num_workers
        self.tokenizer = None
        self.data: dict[str, list[dict[str, Any]]] = {}
        self.stats: dict[str, RowStats] = {}

    # ---- what a subclass defines -----------------------------------------------------------------
    def detect_schema(self, dataset: Dataset) -> str:
        """The schema name of `dataset` (when `schema='auto'`)."""
        raise NotImplementedError

    def required_columns(self, schema: str) -> list[str]:
        raise NotImplementedError

    def normalize(self, row: dict[str, Any], schema: str) -> dict[str, Any] | str:
        """Raw row → canonical row, or the reason it is bad."""
        raise NotImplementedError

    def encode(self, example: dict[str, Any]) -> dict[str, Any] | str:
        """Canonical row → token ids for the collator, or `too_long` (when overlength='drop'), or
        `no_response_tokens` (the prompt alone fills max_length)."""
        raise NotImplementedError

    def collator(self):
        raise NotImplementedError

    def sequence_length(self, item: dict[str, Any]) -> int:
        """Padded length this item needs (for length grouping)."""
        return max(len(v) for k, v in item.items() if k.endswith("input_ids"))

    # ---- loading ---------------------------------------------------------------------------------
    def role_dataset(self, raw: DatasetDict, role: str) -> Dataset:
        """The rows of `role` (train / val / test / predict): by default the split named for it."""
        split = self.splits[role]
        if split not in raw:
            raise UserInputError(f"data.path={self.path!r} has no split {split!r} (needed as the {role} split); "
                                 f"splits present: {sorted(raw)}")
        return raw[split]

    def setup(self, stage: str | None = None) -> None:
        """Prepare the splits `stage` needs (all configured ones when stage is None); each only once.

        `validate` and `test` need their split configured (data.val_split / data.test_split): without it
        they would run on nothing and report success, so that is a `UserInputError`.
        """
        if stage in ("validate", "test"):
            for role in STAGE_ROLES[stage]:
                self.require_split(role, stage)
        roles = [r for r in STAGE_ROLES.get(stage, list(self.splits)) if self.splits.get(r) and r not in self.data]
        if not roles:
            return
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name_or_path)
        raw = load_splits(self.path, self.name)
        for role in roles:
            dataset = self.role_dataset(raw, role)
            try:
                schema = self.schema if self.schema != "auto" else self.detect_schema(dataset)
            except UserInputError as error:
                raise UserInputError(f"data.path={self.path!r} ({role} split): {error}") from error
            require_columns(dataset, self.required_columns(schema), f"data.path={self.path!r} ({role} split)")
            self.data[role], self.stats[role] = self.prepare(dataset, schema, role)
            stats = self.stats[role].as_dict()
            rank_zero_info(f"data {role} ({self.path} / {self.splits[role]}, schema {schema}): kept {stats['kept']}, "
                           f"dropped {stats['dropped'] or 0}, truncated {stats['truncated']}")

    def require_split(self, role: str, stage: str) -> None:
        """Stop with how to configure it when `stage` needs the split of `role` and none is set."""
        if self.splits.get(role):
            return
        argument, stage = SPLIT_ARGUMENTS[role], getattr(stage, "value", stage)  # Lightning passes a TrainerFn
        present = ""
        if Path(self.path).exists():  # a hint for the message: the splits to choose from (local data loads fast)
            try:
                present = f"; splits of data.path: {sorted(load_splits(self.path, self.name))}"
            except UserInputError:
                pass
        raise UserInputError(f"`{stage}` needs a {ROLE_NAMES[role]} split, but data.{argument} is not set "
                             f"(data.path={self.path!r}{present}). Set data.init_args.{argument} in the config, "
                             f"or pass --data.init_args.{argument}=SPLIT_NAME")

    def prepare(self, rows: Iterable[dict[str, Any]], schema: str, role: str) -> tuple[list[dict], RowStats]:
        """Normalize and encode every row, counting each drop by reason; enforce `max_bad_fraction`."""
        items, stats = [], RowStats()
        for row in rows:
            example = self.normalize(row, schema)
            item = self.encode(example) if isinstance(example, dict) else example
            stats.add(item if isinstance(item, str) else None)
            if isinstance(item, dict):
                item.setdefault("truncated", False)
                stats.truncated += item.pop("truncated")
                items.append(item)
        bad = {reason: n for reason, n in stats.as_dict()["dropped"].items() if reason not in POLICY_DROPS}
        total = stats.kept + stats.dropped
        if total and sum(bad.values()) / total > self.max_bad_fraction:
            raise UserInputError(
                f"data.path={self.path!r} ({role} split, schema {schema!r}): {sum(bad.values())} of {total} rows are "
                f"malformed ({bad}), more than data.max_bad_fraction={self.max_bad_fraction}. Check data.schema, "
                f"or raise max_bad_fraction to skip them."
            )
        if not items:
            policy = {reason: n for reason, n in stats.as_dict()["dropped"].items() if reason in POLICY_DROPS}
            if policy:
                why = {NO_RESPONSE_TOKENS: "the prompt alone fills it, leaving no response token to train on",
                       "too_long": "longer, dropped by data.overlength=drop"}
                hint = (f" {sum(policy.values())} of {total} rows do not fit in data.max_length={self.max_length} ("
                        + "; ".join(f"{n} {reason}: {why[reason]}" for reason, n in policy.items())
                        + "). Raise data.max_length" + (" or set data.overlength=truncate" if "too_long" in policy
                                                        else "") + ".")
            else:
                hint = " The split has no rows." if not total else ""
            raise UserInputError(f"data.path={self.path!r} ({role} split): no usable rows ({stats.as_dict()}).{hint}")
        return items, stats

    # ---- loaders ---------------------------------------------------------------------------------
    def _loader(self, role: str, batch_size: int, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(self.data[role], batch_size=batch_size, shuffle=shuffle if sampler is None else None,
                          sampler=sampler, collate_fn=self.collator(), num_workers=self.num_workers)

    def train_sampler(self) -> SkipOnce:
        """Our own resumable sampler: length-grouped, DDP-sharded (Lightning's DDP sampler always shuffles), or plain."""
        sharding = getattr(self.trainer, "distributed_sampler_kwargs", None) if self.trainer is not None else None
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        data = self.data["train"]
        if self.group_by_length:
            lengths = [self.sequence_length(item) for item in data]
            if sharding:
                return ResumableDistributedLengthGroupedSampler(data, lengths, self.batch_size, shuffle=self.shuffle,
                                                                seed=seed, **sharding)
            return ResumableLengthGroupedSampler(lengths, self.batch_size, shuffle=self.shuffle, seed=seed)
        if sharding:
            return ResumableDistributedSampler(data, shuffle=self.shuffle, seed=seed, **sharding)
        return RandomOrderSampler(len(data), shuffle=self.shuffle)

    def train_dataloader(self) -> ResumableDataLoader:
        """Resumable mid-epoch: Lightning checkpoints its position, and a resumed run skips the batches seen."""
        return ResumableDataLoader(self.data["train"], batch_size=self.batch_size, sampler=self.train_sampler(),
                                   collate_fn=self.collator(), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", self.eval_batch_size, shuffle=False) if "val" in self.data else []

    def test_dataloader(self) -> DataLoader | list:
        self.require_split("test", "test")
        return self._loader("test", self.eval_batch_size, shuffle=False) if "test" in self.data else []
