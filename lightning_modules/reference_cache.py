"""Cached reference log-probs (SPEC section 3): one pass of each reference over a dataset, reused by every run.

`python -m lightning_modules.reference_cache --config EXPERIMENT.yaml [--data.init_args.KEY=VALUE ...]`
scores every canonical pair (`datamodules.schemas.normalize_pair`) of each configured split with each
reference of `data.init_args.reference_cache`, using that reference's OWN tokenizer and template. Per
pair it stores summed response log-probs and response token counts of chosen and rejected;
`PreferenceDataModule` attaches them as (K,) columns, so training loads no reference model at all.

Rows are looked up by content: a pair's key is the sha256 of its canonical (prompt, chosen,
rejected), so row order and dropped rows do not matter. Layout, under
`datamodules.loading.cache_dir_for(data.path) / "reference_logps"`::

    <model>-<key>.npz    keys (N,) S64 hex, chosen_logps / rejected_logps (N,) float32,
                         chosen_counts / rejected_counts (N,) int64
    <model>-<key>.json   manifest: format, key fields (params), reference spec, rows, sha256 of
                         the .npz bytes, seconds; written after the .npz, both atomically

`key` is the sha256 (16 hex digits) of the params: dataset fingerprint of the split, reference
model id (a local folder adds a digest of its files), template, insert_eos, dtype, unconditional
and max_length. A cache with a missing manifest (an interrupted write), a checksum mismatch, an
unreadable array file or a wrong row count is warned about and treated as missing.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lightning_modules.errors import UserInputError
from lightning_modules.files import write_bytes_atomic, write_text_atomic
from lightning_modules.logprobs import concatenated_forward

# `datamodules` imports this module (for `ReferenceSpec`), so its modules are imported inside functions.
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


@dataclass
class CacheResult:
    """What `ensure_reference_cache` did for one (split, reference)."""

    spec: ReferenceSpec
    path: Path  # the .npz file
    rows: int  # distinct pairs in the cache
    seconds: float  # time taken by this call (load, or load + score + write)
    computed: bool  # False: an existing valid cache was reused
    values: CachedLogps


def pair_key(example: dict[str, Any]) -> str:
    """sha256 hex of a canonical pair's (prompt, chosen, rejected): the row's identity in every cache."""
    text = json.dumps([example["prompt"], example["chosen"], example["rejected"]], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_id(name_or_path: str) -> str:
    """A hub id as is; a local folder as its resolved path plus a digest of its files (see `SMALL_FILE`)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.iterdir() if p.is_file()):
        stat = file.stat()
        body = file.read_bytes() if stat.st_size <= SMALL_FILE else f"{stat.st_size}:{stat.st_mtime_ns}".encode()
        digest.update(file.name.encode() + b"\0" + body + b"\0")
    return f"{folder.resolve()}#{digest.hexdigest()[:16]}"


def cache_location(spec: ReferenceSpec, *, dataset_fingerprint: str, max_length: int,
                   cache_dir: str | Path) -> tuple[dict[str, Any], Path, Path]:
    """(key fields, arrays .npz path, manifest .json path) of one (split, reference, max_length) cache."""
    params = {"format": CACHE_FORMAT, "dataset_fingerprint": dataset_fingerprint, "model": model_id(spec.name_or_path),
              "template": spec.template, "insert_eos": spec.insert_eos, "dtype": spec.dtype,
              "unconditional": spec.unconditional, "max_length": int(max_length)}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    stem = Path(cache_dir) / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(spec.name_or_path).name) or 'model'}-{key}"
    return params, Path(f"{stem}.npz"), Path(f"{stem}.json")


def encode_for_reference(tokenizer: Any, example: dict[str, Any], spec: ReferenceSpec, max_length: int) -> dict:
    """Token ids of a pair as `spec` sees it, with the data modules' truncation policy.

    Conditional: the prompt rendered in `spec.template` by the reference's tokenizer. Unconditional
    ("empty prompt"): the prompt ids are just `[tokenizer.bos_token_id]`, or nothing when the
    tokenizer has no BOS token (its first response token then has no context and is not scored).
    Either way the response is followed by the template's end-of-response ids (usually EOS).
    """
    from datamodules.tokenize import encode_prompt, encode_response, end_of_response_ids

    if spec.unconditional:
        prompt_ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    else:
        prompt_ids = encode_prompt(tokenizer, example["prompt"], spec.template, spec.insert_eos)
    end_ids = end_of_response_ids(tokenizer, spec.template)
    item = {}
    for side in ("chosen", "rejected"):
        encoded = encode_response(tokenizer, prompt_ids, example[side], max_length, end_ids=end_ids)
        item[f"{side}_input_ids"], item[f"{side}_labels"] = encoded.input_ids, encoded.labels
    return item


@torch.no_grad()
def score_pairs(model: torch.nn.Module, tokenizer: Any, examples: Sequence[dict[str, Any]], spec: ReferenceSpec, *,
                max_length: int, batch_size: int = 8, device: str = "cpu") -> dict[str, np.ndarray]:
    """Summed response log-probs (float32) and counts (int64) of each pair, (N,) each, in `examples` order.

    Pairs are sorted by length (longest first) and batched, then scored with the policy's own
    `concatenated_forward` with the model in eval mode.
    """
    from datamodules.collate import PairCollator

    model.eval()
    items = [encode_for_reference(tokenizer, ex, spec, max_length) for ex in examples]
    order = sorted(range(len(items)), key=lambda i: -max(len(items[i]["chosen_input_ids"]),
                                                          len(items[i]["rejected_input_ids"])))
    collate = PairCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    out = {name: np.zeros(len(items), dtype=np.float32 if "logps" in name else np.int64) for name in ARRAYS[1:]}
    for start in tqdm(range(0, len(order), batch_size), desc=f"reference {spec.name_or_path}", unit="batch"):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([items[i] for i in rows]).items()}
        logps = concatenated_forward(model, batch)
        for name in ARRAYS[1:]:  # logps are float32 already (`sequence_logps`); counts long
            out[name][rows] = getattr(logps, name).cpu().numpy()
    return out


def write_cache(npz_path: Path, manifest_path: Path, params: dict[str, Any], spec: ReferenceSpec,
                arrays: dict[str, np.ndarray], seconds: float) -> None:
    """Arrays first, manifest (with the arrays' sha256) last, each atomically; a stale manifest is removed first."""
    manifest_path.unlink(missing_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    write_bytes_atomic(npz_path, data)
    manifest = {"format": CACHE_FORMAT, "params": params, "reference": asdict(spec), "rows": len(arrays["keys"]),
                "arrays": npz_path.name, "sha256": hashlib.sha256(data).hexdigest(), "seconds": round(seconds, 3)}
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_cache(npz_path: Path, manifest_path: Path, params: dict[str, Any]) -> CachedLogps | None:
    """A validated cache, or None: absent (silently) or invalid (with a warning naming the problem)."""
    if not manifest_path.exists():
        if npz_path.exists():
            warnings.warn(f"reference cache {npz_path} has no manifest (interrupted write?); treating it as missing",
                          stacklevel=2)
        return None
    problem, arrays = None, {}
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        data = npz_path.read_bytes() if npz_path.exists() else None
        if manifest.get("format") != CACHE_FORMAT or manifest.get("params") != params:
            problem = "its manifest does not match these parameters"
        elif data is None:
            problem = "the array file is missing"
        elif hashlib.sha256(data).hexdigest() != manifest.get("sha256"):
            problem = "checksum mismatch: the array file is not the one the manifest describes"
        else:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in ARRAYS}
            if any(a.shape != (manifest.get("rows"),) for a in arrays.values()):
                shapes = [a.shape for a in arrays.values()]
                problem = f"row count mismatch (manifest {manifest.get('rows')}, arrays {shapes})"
    except Exception as error:  # truncated / corrupt zip, bad JSON, missing array: all mean "rebuild"
        problem = f"unreadable ({type(error).__name__}: {error})"
    if problem is None:
        return CachedLogps(arrays)
    warnings.warn(f"reference cache {manifest_path} is invalid ({problem}); treating it as missing", stacklevel=2)
    return None


def load_reference_cache(spec: ReferenceSpec, *, dataset_fingerprint: str, max_length: int,
                         cache_dir: str | Path) -> tuple[CachedLogps | None, Path]:
    """The validated cache of (split, `spec`, `max_length`) or None, and its manifest path; never loads a model."""
    params, npz_path, manifest_path = cache_location(spec, dataset_fingerprint=dataset_fingerprint,
                                                     max_length=max_length, cache_dir=cache_dir)
    return read_cache(npz_path, manifest_path, params), manifest_path


def ensure_reference_cache(examples: Sequence[dict[str, Any]], spec: ReferenceSpec, *, dataset_fingerprint: str,
                           max_length: int, cache_dir: str | Path, batch_size: int = 8,
                           device: str | None = None) -> CacheResult:
    """Reuse the valid cache covering every pair of `examples`, else score the distinct pairs and write it."""
    start = time.perf_counter()
    params, npz_path, manifest_path = cache_location(spec, dataset_fingerprint=dataset_fingerprint,
                                                     max_length=max_length, cache_dir=cache_dir)
    keys = [pair_key(ex) for ex in examples]
    cached = read_cache(npz_path, manifest_path, params)
    if cached is not None and cached.lookup(keys) is not None:
        return CacheResult(spec, npz_path, len(cached.arrays["keys"]), time.perf_counter() - start, False, cached)
    if cached is not None:
        warnings.warn(f"reference cache {manifest_path} does not cover every pair of the split; rebuilding it")
    from datamodules.tokenize import load_tokenizer
    from lightning_modules import policy

    distinct = dict(zip(keys, examples))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = load_tokenizer(spec.name_or_path)
        model = policy.load_causal_lm(spec.name_or_path, dtype=spec.dtype).to(device)
    except OSError as error:
        raise UserInputError(f"data.reference_cache: cannot load reference {spec.name_or_path!r}: {error}") from error
    values = score_pairs(model, tokenizer, list(distinct.values()), spec, max_length=max_length,
                         batch_size=batch_size, device=device)
    arrays = {"keys": np.asarray(list(distinct), dtype="S64"), **values}
    write_cache(npz_path, manifest_path, params, spec, arrays, time.perf_counter() - start)
    return CacheResult(spec, npz_path, len(distinct), time.perf_counter() - start, True, CachedLogps(arrays))


def compute_for_datamodule(dm: Any, *, batch_size: int = 8,
                           device: str | None = None) -> list[tuple[str, CacheResult]]:
    """Compute (or reuse) the cache of every reference of `dm.reference_cache` on each configured split."""
    from datamodules.preference import PreferenceDataModule
    from datamodules.schemas import normalize_pair

    if not isinstance(dm, PreferenceDataModule) or not dm.reference_cache:
        raise UserInputError("the config's data module is not a PreferenceDataModule with a "
                             "data.init_args.reference_cache list: nothing to compute")
    results = []
    for role, dataset, schema in dm.reference_sources():
        examples = [ex for ex in (normalize_pair(row, schema) for row in dataset) if isinstance(ex, dict)]
        for spec in dm.reference_cache:
            results.append((role, ensure_reference_cache(
                examples, spec, dataset_fingerprint=dm.cache_fingerprint(dataset, schema), max_length=dm.max_length,
                cache_dir=dm.reference_cache_dir(), batch_size=batch_size, device=device)))
    return results


def main(argv: list[str] | None = None) -> list[tuple[str, CacheResult]]:
    """`python -m lightning_modules.reference_cache --config CONFIG [--tokenizer T] [--data.init_args.* ...]`."""
    from datamodules.describe import build_datamodule

    parser = argparse.ArgumentParser(prog="python -m lightning_modules.reference_cache",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment config with data.init_args.reference_cache")
    parser.add_argument("--tokenizer", help="policy tokenizer path or hub id (default: the config's model)")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per reference forward pass")
    parser.add_argument("--device", help="torch device to score on (default: cuda if available, else cpu)")
    known, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        results = compute_for_datamodule(build_datamodule(known.config, overrides, known.tokenizer),
                                         batch_size=known.batch_size, device=known.device)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    for role, r in results:
        print(f"{role:<5} {r.spec.name_or_path}: {r.rows} rows, {r.seconds:.1f} s, "
              f"{'computed' if r.computed else 'reused'} -> {r.path}")
    return results


if __name__ == "__main__":  # run the imported module's main, so `ReferenceSpec` is one class, not two
    from lightning_modules.reference_cache import main as _main

    _main()
