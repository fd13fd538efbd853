"""Cached reference log-probs, model side: score every pair with each reference and write the cache.

`python -m lightning_modules.references.cache_builder --config EXPERIMENT.yaml [--data.init_args.KEY=VALUE ...]`
scores every canonical pair (`datamodules.schemas.normalize_pair`) of each configured split with each
reference of `data.init_args.reference_cache`, using that reference's OWN tokenizer and template. Per
pair it stores summed response log-probs and response token counts of chosen and rejected;
`PreferenceDataModule` attaches them as (K,) columns, so training loads no reference model at all.
The key, the file format and the validation live with the data, in `datamodules.reference_cache`.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from datamodules.collate import PairCollator
from datamodules.describe import build_datamodule
from datamodules.preference import PreferenceDataModule
from datamodules.reference_cache import (ARRAYS, CachedLogps, ReferenceSpec, cache_location, encode_for_reference,
                                         pair_key, read_cache, write_cache)
from datamodules.schemas import normalize_pair
from datamodules.tokenize import load_tokenizer
from datamodules.utils.errors import UserInputError, exit_on_user_error
from lightning_modules.logprobs import concatenated_forward
from lightning_modules.packing import supports_packing
from lightning_modules.models.loading import load_causal_lm


@dataclass
class CacheResult:
    """What `ensure_reference_cache` did for one (split, reference)."""

    spec: ReferenceSpec
    path: Path  # the .npz file
    rows: int  # distinct pairs in the cache
    seconds: float  # time taken by this call (load, or load + score + write)
    computed: bool  # False: an existing valid cache was reused
    values: CachedLogps


@torch.no_grad()
def score_pairs(model: torch.nn.Module, tokenizer: Any, examples: Sequence[dict[str, Any]], spec: ReferenceSpec, *,
                max_length: int, batch_size: int = 8, device: str = "cpu") -> dict[str, np.ndarray]:
    """Summed response log-probs (float32) and counts (int64) of each pair, (N,) each, in `examples` order.

    Pairs are sorted by length (longest first) and batched, then scored with the policy's own
    `concatenated_forward` with the model in eval mode.
    """
    model.eval()
    items = [encode_for_reference(tokenizer, ex, spec, max_length) for ex in examples]
    order = sorted(range(len(items)), key=lambda i: -max(len(items[i]["chosen_input_ids"]),
                                                          len(items[i]["rejected_input_ids"])))
    collate = PairCollator(tokenizer.pad_token_id)  # load_tokenizer sets a pad token
    out = {name: np.zeros(len(items), dtype=np.float32 if "logps" in name else np.int64) for name in ARRAYS[1:]}
    for start in tqdm(range(0, len(order), batch_size), desc=f"reference {spec.name_or_path}", unit="batch"):
        rows = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([items[i] for i in rows]).items()}
        logps = concatenated_forward(model, batch, packed=supports_packing(model))  # the same values, padding-free
        for name in ARRAYS[1:]:  # logps are float32 already (`sequence_logps`); counts long
            out[name][rows] = getattr(logps, name).cpu().numpy()
    return out


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
    distinct = dict(zip(keys, examples))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        tokenizer = load_tokenizer(spec.name_or_path, key="data.reference_cache[].name_or_path")
        model = load_causal_lm(spec.name_or_path, dtype=spec.dtype, key="data.reference_cache[].name_or_path").to(device)
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
    """`python -m lightning_modules.references.cache_builder --config CONFIG [--tokenizer T] [--data.init_args.* ...]`."""
    parser = argparse.ArgumentParser(prog="python -m lightning_modules.references.cache_builder",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment config with data.init_args.reference_cache")
    parser.add_argument("--tokenizer", help="policy tokenizer path or hub id (default: the config's model)")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per reference forward pass")
    parser.add_argument("--device", help="torch device to score on (default: cuda if available, else cpu)")
    known, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    with exit_on_user_error():
        results = compute_for_datamodule(build_datamodule(known.config, overrides, known.tokenizer),
                                         batch_size=known.batch_size, device=known.device)
    for role, r in results:
        print(f"{role:<5} {r.spec.name_or_path}: {r.rows} rows, {r.seconds:.1f} s, "
              f"{'computed' if r.computed else 'reused'} -> {r.path}")
    return results


if __name__ == "__main__":
    main()
