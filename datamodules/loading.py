"""One loading path for hub ids, hub-style local folders and single files, through `datasets.load_dataset`.

`path` may be a hub id (`HuggingFaceH4/ultrafeedback_binarized`), a local folder laid out like a hub
repo (data files, optionally a README.md whose `configs:` names each config's files), or one
`.jsonl` / `.json` / `.parquet` file (its rows become split `train`). `name` picks a config of a
multi-config dataset (RefDPO's `mistral`, `tulu2`, ...). Tests exercise hub ids through local
folders with the same layout, so the code below is the code that runs against the hub.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from datamodules.utils.errors import UserInputError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def load_splits(path: str, name: str | None = None) -> DatasetDict:
    """Every split of dataset `path` (config `name`), as a `DatasetDict`."""
    local = Path(path)
    if local.is_file():
        builder = FILE_BUILDERS.get(local.suffix)
        if builder is None:
            raise UserInputError(f"data.path={path!r}: unsupported file type {local.suffix!r}; use {sorted(FILE_BUILDERS)}")
        return load_dataset(builder, data_files={"train": str(local)})
    if path.startswith((".", "/")) and not local.exists():
        raise UserInputError(f"data.path={path!r} does not exist (build the synthetic assets first?)")
    try:
        return load_dataset(path, name=name)
    except FileNotFoundError as error:  # a relative folder that is missing, or an unknown hub dataset
        raise UserInputError(f"data.path={path!r} is neither an existing folder or file nor a hub dataset "
                             f"(build the synthetic assets first?): {error}") from error
    except ValueError as error:  # a missing or unknown config name: datasets lists the available ones
        if "config" in str(error).lower():
            problem = "is required: the dataset has several configs" if name is None else "is not a config of it"
            raise UserInputError(f"data.name={name!r} {problem} (data.path={path!r}): {error}") from error
        raise


def require_columns(dataset: Dataset, columns: list[str], where: str) -> None:
    """Fail at once, naming the missing columns and listing those present."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UserInputError(f"{where}: missing required column(s) {missing}; columns present: {dataset.column_names}")


def fingerprint(dataset: Dataset, *parts: object) -> str:
    """A stable id of a loaded split (HF's content fingerprint) plus any extra parameters."""
    text = "|".join([getattr(dataset, "_fingerprint", ""), str(len(dataset)), *map(str, parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir_for(path: str) -> Path:
    """Where derived files (study splits, reference caches) live: beside a local dataset, else ~/.cache."""
    local = Path(path)
    if local.exists():
        return (local.parent if local.is_file() else local) / ".prefopt_cache"
    return Path.home() / ".cache" / "prefopt" / path.replace("/", "__")
