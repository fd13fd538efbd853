"""Cached reference log-probs, data side: what a cache is keyed by, its file format, and lookups.

The cache itself is computed by `lightning_modules.references.cache_builder` (one pass of each
reference model over a dataset); `PreferenceDataModule` only reads it here, so training never loads
a reference model. Rows are looked up by content: a pair's key is the sha256 of its canonical
(prompt, chosen, rejected), so row order and dropped rows do not matter. Layout, under
`datamodules.loading.cache_dir_for(data.path) / "reference_logps"`::

    <model>-<key>.npz    keys (N,) S64 hex, chosen_logps / rejected_logps (N,) float32,
                         chosen_counts / rejected_counts (N,) int64
    <model>-<key>.json   manifest: format, key fields (params), reference spec, rows, sha256 of
                         the .npz bytes, seconds; written after the .npz, both atomically
                         (`datamodules.utils.cache.write_checksummed`)

`key` is the sha256 (16 hex digits) of the params: dataset fingerprint of the split, reference
model id (a local folder adds a digest of its files), template, insert_eos, dtype, unconditional
and max_length. A cache with a missing manifest (an interrupted write), a checksum mismatch, an
unreadable array file or a wrong row count is warned about and treated as missing.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from datamodules.tokenize import encode_pair, encode_prompt, end_of_response_ids, pair_columns
from datamodules.utils.cache import (local_folder_id, params_key, read_checksummed, sha256_hex, warn_invalid,
                                     write_checksummed)

CACHE_FORMAT = "prefopt.reference_logps/1"
ARRAYS = ("keys", "chosen_logps", "rejected_logps", "chosen_counts", "rejected_counts")
SMALL_FILE = 1 << 20  # files up to 1 MiB enter a model id by content, larger ones by (name, size, mtime)


@dataclass(frozen=True)
class ReferenceSpec:
    """One cached reference model: how it renders and scores each pair."""

    name_or_path: str
    """Hub id or local folder (HF layout) of the reference model and its tokenizer."""
    template: str = "auto"
    """Prompt template under the reference's own tokenizer (see `datamodules.templates.TEMPLATES`)."""
    insert_eos: bool = False
    """Zephyr template only: also end system and user turns with EOS (RefDPO option)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the reference weights are loaded in; the log-probs are computed and stored in float32."""
    unconditional: bool = False
    """Score log p(y) with an empty prompt: [BOS] + response + end marker (likelihood parameterization)."""
    name: str | None = None
    """Short name in metric keys and tables (`train/alpha/<name>`); default: from name_or_path. Not part of the cache key."""


@dataclass
class CachedLogps:
    """One reference's values for one split, in cache row order; `lookup` aligns them to pairs by key."""

    arrays: dict[str, np.ndarray]

    def lookup(self, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The four value arrays (N,) in the order of `keys`; None if any key is not cached."""
        index = {k: i for i, k in enumerate(self.arrays["keys"].astype(str).tolist())}
        if not all(k in index for k in keys):
            return None
        order = np.asarray([index[k] for k in keys], dtype=np.int64)
        return {name: self.arrays[name][order] for name in ARRAYS[1:]}


def pair_key(example: dict[str, Any]) -> str:
    """sha256 hex of a canonical pair's (prompt, chosen, rejected): the row's identity in every cache."""
    text = json.dumps([example["prompt"], example["chosen"], example["rejected"]], sort_keys=True, ensure_ascii=False)
    return sha256_hex(text.encode("utf-8"))


def model_id(name_or_path: str) -> str:
    """A hub id as is; a local folder as its resolved path plus a digest of its files (see `SMALL_FILE`)."""
    return local_folder_id(name_or_path, _model_file_entry, digits=16)


def _model_file_entry(file: Path) -> bytes:
    """A file's name and content (small files) or size and mtime (large ones), NUL-separated."""
    stat = file.stat()
    body = file.read_bytes() if stat.st_size <= SMALL_FILE else f"{stat.st_size}:{stat.st_mtime_ns}".encode()
    return file.name.encode() + b"\0" + body + b"\0"


def cache_location(spec: ReferenceSpec, *, dataset_fingerprint: str, max_length: int,
                   cache_dir: str | Path) -> tuple[dict[str, Any], Path, Path]:
    """(key fields, arrays .npz path, manifest .json path) of one (split, reference, max_length) cache."""
    params = {"format": CACHE_FORMAT, "dataset_fingerprint": dataset_fingerprint, "model": model_id(spec.name_or_path),
              "template": spec.template, "insert_eos": spec.insert_eos, "dtype": spec.dtype,
              "unconditional": spec.unconditional, "max_length": int(max_length)}
    key = params_key(params, compact=False)  # json.dumps' default separators: existing cache names stay valid
    stem = Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(spec.name_or_path).name) or 'model'}-{key}"
    return params, Path(f"{stem}.npz"), Path(f"{stem}.json")


def encode_for_reference(tokenizer: Any, example: dict[str, Any], spec: ReferenceSpec, max_length: int) -> dict:
    """Token ids of a pair as `spec` sees it, with the data modules' truncation policy.

    Conditional: the prompt rendered in `spec.template` by the reference's tokenizer. Unconditional
    ("empty prompt"): the prompt ids are just `[tokenizer.bos_token_id]`, or nothing when the
    tokenizer has no BOS token (its first response token then has no context and is not scored).
    Either way the response is followed by the template's end-of-response ids (usually EOS).
    """
    if spec.unconditional:
        prompt_ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    else:
        prompt_ids = encode_prompt(tokenizer, example["prompt"], spec.template, spec.insert_eos)
    end_ids = end_of_response_ids(tokenizer, spec.template)
    return pair_columns(encode_pair(tokenizer, prompt_ids, example, max_length, end_ids=end_ids))


def write_cache(npz_path: Path, manifest_path: Path, params: dict[str, Any], spec: ReferenceSpec,
                arrays: dict[str, np.ndarray], seconds: float) -> None:
    """Arrays first, manifest (with the arrays' sha256) last, each atomically; a stale manifest is removed first."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    manifest = {"format": CACHE_FORMAT, "params": params, "reference": asdict(spec), "rows": len(arrays["keys"]),
                "arrays": npz_path.name, "seconds": round(seconds, 3)}
    write_checksummed(npz_path, buffer.getvalue(), manifest_path, manifest)


def read_cache(npz_path: Path, manifest_path: Path, params: dict[str, Any]) -> CachedLogps | None:
    """A validated cache, or None: absent (silently) or invalid (with a warning naming the problem)."""
    checked = read_checksummed(npz_path, manifest_path, expected={"format": CACHE_FORMAT, "params": params},
                               what="reference cache")
    if checked is None:
        return None
    rows = checked.manifest.get("rows")
    try:
        with np.load(io.BytesIO(checked.payload), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in ARRAYS}
    except Exception as error:  # not a zip, a missing array: both mean "rebuild"
        warn_invalid(manifest_path, f"unreadable ({type(error).__name__}: {error})", what="reference cache")
        return None
    if any(a.shape != (rows,) for a in arrays.values()):
        shapes = [a.shape for a in arrays.values()]
        warn_invalid(manifest_path, f"row count mismatch (manifest {rows}, arrays {shapes})", what="reference cache")
        return None
    return CachedLogps(arrays)


def load_reference_cache(spec: ReferenceSpec, *, dataset_fingerprint: str, max_length: int,
                         cache_dir: str | Path) -> tuple[CachedLogps | None, Path]:
    """The validated cache of (split, `spec`, `max_length`) or None, and its manifest path; never loads a model."""
    params, npz_path, manifest_path = cache_location(spec, dataset_fingerprint=dataset_fingerprint,
                                                     max_length=max_length, cache_dir=cache_dir)
    return read_cache(npz_path, manifest_path, params), manifest_path


def reference_labels(specs: Sequence[ReferenceSpec]) -> list[str]:
    """Short unique names of cached references, for metric keys (`train/alpha/<name>`) and tables.

    A spec's own `name`, else the last part of its `name_or_path` (a hub id's model name), with `-<dtype>`
    unless float32 and `-unconditional` when set; where two still collide, the last two path parts; then
    an index suffix.
    """
    def label(spec: ReferenceSpec, parts: int) -> str:
        path = Path(str(spec.name_or_path).rstrip("/"))
        name = "_".join(path.parts[-parts:]) or "reference"
        return name + ("" if spec.dtype == "float32" else f"-{spec.dtype}") + ("-unconditional" if spec.unconditional else "")

    names = [spec.name or label(spec, 1) for spec in specs]
    if len(set(names)) < len(names):
        names = [spec.name or label(spec, 2) for spec in specs]
    return [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]
