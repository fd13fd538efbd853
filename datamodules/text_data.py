"""`TextDataModule`: load a dataset through HF `datasets`, tokenize each split, serve batches.

`path` is a hub id, a local folder laid out like a hub dataset repo (`train.jsonl`,
`validation.jsonl`, ...), or a single JSONL / Parquet file: all go through `datasets.load_dataset`.
Subclasses define how one row becomes token ids (`encode_row`) and the collator.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from datamodules.tokenize import load_tokenizer
from lightning_modules.errors import UserInputError

# Which splits each Lightning stage reads.
STAGE_ROLES = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["predict"]}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_splits(path: str) -> DatasetDict:
    """Load every split of `path` (hub id, dataset folder, or a single file → split `train`)."""
    local = Path(path)
    if local.is_file():
        builder = FILE_BUILDERS.get(local.suffix)
        if builder is None:
            raise UserInputError(f"data.path={path!r}: unsupported file type {local.suffix!r}; use {sorted(FILE_BUILDERS)}")
        return load_dataset(builder, data_files={"train": str(local)})
    if path.startswith((".", "/")) and not local.exists():
        raise UserInputError(f"data.path={path!r} does not exist (build the synthetic assets first?)")
    try:
        return load_dataset(path)
    except FileNotFoundError as error:  # a relative folder that is missing, or an unknown hub dataset
        raise UserInputError(f"data.path={path!r} is neither an existing folder or file nor a hub dataset "
                             f"(build the synthetic assets first?): {error}") from error


def require_columns(dataset: Dataset, columns: list[str], where: str) -> None:
    """Fail at once, naming the missing columns and listing those present."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UserInputError(f"{where}: missing required column(s) {missing}; columns present: {dataset.column_names}")


class TextDataModule(L.LightningDataModule):
    """Shared loading, tokenization and loaders; see `SFTDataModule` and `PreferenceDataModule`."""

    required_columns: list[str] = []

    def __init__(
        self,
        path: str,
        tokenizer_name_or_path: str,
        max_length: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        train_split: str | None = "train",
        val_split: str | None = "validation",
        test_split: str | None = None,
        num_workers: int = 0,
        shuffle: bool = True,
    ):
        """Shared data arguments.

        Args:
            path: hub dataset id, local dataset folder, or a .jsonl / .parquet file.
            tokenizer_name_or_path: tokenizer to encode with (linked to model.model_name_or_path by the CLI).
            max_length: maximum prompt + response tokens; longer rows are truncated (response first).
            batch_size: training batch size per device.
            eval_batch_size: validation / test batch size per device (default: batch_size).
            train_split: name of the training split (None = no training).
            val_split: name of the validation split (None = no validation).
            test_split: name of the test split (None = no test).
            num_workers: DataLoader worker processes.
            shuffle: reshuffle the training split every epoch (seeded by seed_everything; DDP shards per rank).
        """
        super().__init__()
        self.path = path
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.tokenizer = None
        self.data: dict[str, list[dict[str, Any]]] = {}
        self.truncated: dict[str, int] = {}

    def encode_row(self, row: dict[str, Any], role: str) -> dict[str, Any]:
        """Turn one raw row into token-id lists (and float columns) for the collator."""
        raise NotImplementedError

    def collator(self):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Tokenize the splits `stage` needs (all configured ones when stage is None); each only once."""
        roles = [r for r in STAGE_ROLES.get(stage, list(self.splits)) if self.splits.get(r) and r not in self.data]
        if not roles:
            return
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.tokenizer_name_or_path)
        raw = load_splits(self.path)
        for role in roles:
            split = self.splits[role]
            if split not in raw:
                raise UserInputError(f"data.path={self.path!r} has no split {split!r} (needed as the {role} split); "
                                     f"splits present: {sorted(raw)}")
            require_columns(raw[split], self.required_columns, f"data.path={self.path!r} split {split!r}")
            self.truncated[role] = 0
            self.data[role] = [self.encode_row(row, role) for row in raw[split]]

    def _loader(self, role: str, batch_size: int, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(self.data[role], batch_size=batch_size, shuffle=shuffle if sampler is None else None,
                          sampler=sampler, collate_fn=self.collator(), num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        # Under DDP Lightning would install a DistributedSampler that always shuffles the training split;
        # ours honours `shuffle` (same seed convention as Lightning's: PL_GLOBAL_SEED).
        sharding = getattr(self.trainer, "distributed_sampler_kwargs", None) if self.trainer is not None else None
        if sharding:
            sampler = DistributedSampler(self.data["train"], shuffle=self.shuffle,
                                         seed=int(os.environ.get("PL_GLOBAL_SEED", 0)), **sharding)
            return self._loader("train", self.batch_size, shuffle=False, sampler=sampler)
        return self._loader("train", self.batch_size, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", self.eval_batch_size, shuffle=False) if "val" in self.data else []

    def test_dataloader(self) -> DataLoader | list:
        return self._loader("test", self.eval_batch_size, shuffle=False) if "test" in self.data else []
