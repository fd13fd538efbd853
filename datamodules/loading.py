"""One loading path for hub ids, hub-style local folders and single files, through `datasets.load_dataset`.

`path` may be a hub id (`HuggingFaceH4/ultrafeedback_binarized`), a local folder laid out like a hub
repo (data files, optionally a README.md whose `configs:` names each config's files), or one
`.jsonl` / `.json` / `.parquet` file (its rows become split `train`). `name` picks a config of a
multi-config dataset (RefDPO's `mistral`, `tulu2`, ...). Tests exercise hub ids through local
folders with the same layout, so the code below is the code that runs against the hub.

Local data is built into a `datasets` cache folder of its own, keyed by `content_fingerprint` of its
files: `datasets` keys a local folder's build by the folder's name and config only, so a rewritten
folder, or another folder of the same name, would otherwise come back with the rows of the first load.
The same fingerprint becomes part of each split's `_fingerprint` (and so of `fingerprint`, the key of
the reference caches and study splits). A local file that `datasets` cannot read (empty, an invalid
JSON line, splits with different columns) is a `UserInputError` naming the file and what is wrong.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
from datasets.exceptions import DatasetGenerationError

from datamodules.utils.errors import UserInputError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
LOCAL_CACHE = "prefopt_local"  # under the `datasets` cache: one build folder per local dataset content
HASH_LIMIT = 64 * 2**20  # data files up to this size are identified by a sha256 of their bytes, larger by size + mtime


def load_splits(path: str, name: str | None = None) -> DatasetDict:
    """Every split of dataset `path` (config `name`), as a `DatasetDict`."""
    local = Path(path)
    if local.is_file() and local.suffix not in FILE_BUILDERS:
        raise UserInputError(f"data.path={path!r}: unsupported file type {local.suffix!r}; use {sorted(FILE_BUILDERS)}")
    if path.startswith((".", "/")) and not local.exists():
        raise UserInputError(f"data.path={path!r} does not exist (build the synthetic assets first?)")
    if not local.exists():  # a hub id
        return _load(path, name, partial(load_dataset, path, name=name))
    content = content_fingerprint(local)
    cache_dir = str(local_cache_dir(local, content))
    if local.is_file():
        load = partial(load_dataset, FILE_BUILDERS[local.suffix], data_files={"train": str(local)}, cache_dir=cache_dir)
    else:
        load = partial(load_dataset, path, name=name, cache_dir=cache_dir)
    try:
        splits = _load(path, name, load, local=True)
    except UserInputError:
        raise
    except Exception as error:  # datasets' own errors on a file it cannot read: say which file, and why
        problem = diagnose_local_files(local, name, cache_dir)
        if problem is None and isinstance(error, DatasetGenerationError):
            problem = f"`datasets` could not read its data files: {' '.join(str(root_cause(error)).split())}"
        if problem is None:
            raise
        raise UserInputError(f"data.path={path!r}: {problem}") from error
    for split in splits.values():  # the split's identity now follows its files' content
        split._fingerprint = hashlib.sha256(f"{content}|{split._fingerprint}".encode()).hexdigest()[:16]
    return splits


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception of a `raise ... from` chain (what actually went wrong inside `datasets`)."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _load(path: str, name: str | None, load: Callable[[], DatasetDict], local: bool = False) -> DatasetDict:
    """`load()`, with a missing dataset, data file or config turned into a `UserInputError`."""
    try:
        return load()
    except FileNotFoundError as error:
        if local:  # an existing folder without data files, or whose README names files that are not there
            missing = str(error).split(" with any supported extension")[0]
            raise UserInputError(f"data.path={path!r}: {missing}. Put the data files there, or fix the file "
                                 f"patterns under `configs:` in its README.md") from error
        # a relative folder that is missing, or an unknown hub dataset
        raise UserInputError(f"data.path={path!r} is neither an existing folder or file nor a hub dataset "
                             f"(build the synthetic assets first?): {error}") from error
    except ValueError as error:  # a missing or unknown config name: datasets lists the available ones
        if "config" in str(error).lower():
            problem = "is required: the dataset has several configs" if name is None else "is not a config of it"
            raise UserInputError(f"data.name={name!r} {problem} (data.path={path!r}): {error}") from error
        raise


# ---- identity of local data ---------------------------------------------------------------------------------------
def local_data_files(local: Path) -> list[Path]:
    """The files a local dataset consists of: the file itself, or every file under the folder except hidden ones
    (`.git`, and `.prefopt_cache`, where derived files such as reference caches and study splits live)."""
    if local.is_file():
        return [local]
    return sorted(p for p in local.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(local).parts))


def content_fingerprint(local: Path) -> str:
    """Identity of a local dataset's content: each file's relative path and size, plus a sha256 of its bytes
    (files up to HASH_LIMIT) or its mtime_ns (larger files). Equal for an identical copy elsewhere."""
    digest = hashlib.sha256()
    root = local.parent if local.is_file() else local
    for file in local_data_files(local):
        stat = file.stat()
        if stat.st_size <= HASH_LIMIT:
            with file.open("rb") as f:
                identity = hashlib.file_digest(f, "sha256").hexdigest()
        else:
            identity = f"mtime_ns={stat.st_mtime_ns}"
        digest.update(f"{file.relative_to(root).as_posix()}|{stat.st_size}|{identity}\n".encode())
    return digest.hexdigest()[:16]


def local_cache_dir(local: Path, content: str) -> Path:
    """The `datasets` cache folder for one content of a local dataset (a new content builds in a new folder)."""
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / LOCAL_CACHE / f"{local.resolve().name}-{content}"


# ---- what is wrong with a local file that `datasets` could not read ------------------------------------------------
def split_files(local: Path, name: str | None, cache_dir: str | None = None) -> dict[str, list[Path]]:
    """Split → its data files, as `datasets` resolves them (README `configs:` or its default patterns)."""
    if local.is_file():
        return {"train": [local]}
    try:
        from datasets import load_dataset_builder

        data_files = load_dataset_builder(str(local), name=name, cache_dir=cache_dir).config.data_files or {}
        return {str(split): [Path(f) for f in files] for split, files in data_files.items()}
    except Exception:  # only a hint for an error message: fall back to every readable file of the folder
        return {"data": [f for f in local_data_files(local) if _data_suffix(f) in FILE_BUILDERS]}


def _data_suffix(file: Path) -> str:
    suffixes = [s for s in file.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def _read_text(file: Path) -> str:
    data = file.read_bytes()
    return (gzip.decompress(data) if file.suffix == ".gz" else data).decode("utf-8", errors="replace")


def _json_rows(file: Path) -> tuple[list | None, str | None]:
    """The rows of a .json / .jsonl file, or (None, what is wrong with it)."""
    text = _read_text(file)
    if not text.strip():
        return None, "is empty: it has no rows. Write rows into it (one JSON object per line) or remove it"
    if _data_suffix(file) == ".json":  # one JSON document (a list of rows, or {column: values}) is also accepted
        try:
            document = json.loads(text)
            if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
                return [dict(zip(document, values)) for values in zip(*document.values())], None
            return (document if isinstance(document, list) else [document]), None
        except json.JSONDecodeError:
            pass
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            return None, (f"line {number} is not valid JSON ({error.msg} at column {error.colno}: "
                          f"{line[:80]!r}). Fix or delete that line (each line must be one JSON object)")
    return rows, None


def file_columns(file: Path) -> tuple[list[str] | None, str | None]:
    """A data file's column names, or (None, what is wrong with it)."""
    suffix = _data_suffix(file)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_schema(file).names, None
        except Exception as error:  # pyarrow's ArrowInvalid on a file that is not parquet
            return None, f"is not a readable parquet file ({error})"
    if suffix not in FILE_BUILDERS:
        return None, None
    rows, problem = _json_rows(file)
    if problem:
        return None, problem
    if not all(isinstance(row, dict) for row in rows):
        return None, "holds rows that are not JSON objects ({column: value, ...})"
    return list(dict.fromkeys(key for row in rows for key in row)), None


def diagnose_local_files(local: Path, name: str | None, cache_dir: str | None = None) -> str | None:
    """What is wrong with the data files of a local dataset `datasets` failed to read (None: nothing found)."""
    columns: dict[tuple[str, Path], list[str]] = {}
    for split, files in split_files(local, name, cache_dir).items():
        for file in files:
            found, problem = file_columns(file)
            if problem:
                return f"data file {file} ({split} split) {problem}."
            if found is not None:
                columns[split, file] = found
    if len({tuple(sorted(c)) for c in columns.values()}) > 1:
        listing = "; ".join(f"{split} file {file}: {cols}" for (split, file), cols in columns.items())
        return (f"the data files have different columns ({listing}). `datasets` reads every split of a dataset "
                f"with the same columns: give every file the columns of the schema you use (see data.schema)")
    return None


# ---- identities and places of derived files ----------------------------------------------------------------------
def require_columns(dataset: Dataset, columns: list[str], where: str) -> None:
    """Fail at once, naming the missing columns and listing those present."""
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise UserInputError(f"{where}: missing required column(s) {missing}; columns present: {dataset.column_names}")


def fingerprint(dataset: Dataset, *parts: object) -> str:
    """A stable id of a loaded split plus any extra parameters.

    The split's `_fingerprint` is HF's (for a hub id: its revision); for local data `load_splits` folds in
    `content_fingerprint`, so rewritten files give a new id and derived caches keyed by it are not reused.
    """
    text = "|".join([getattr(dataset, "_fingerprint", ""), str(len(dataset)), *map(str, parts)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir_for(path: str) -> Path:
    """Where derived files (study splits, reference caches) live: beside a local dataset, else ~/.cache."""
    local = Path(path)
    if local.exists():
        return (local.parent if local.is_file() else local) / ".prefopt_cache"
    return Path.home() / ".cache" / "prefopt" / path.replace("/", "__")
