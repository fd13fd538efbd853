"""The multi-reference study's data preparation (SPEC section 4): filter, sample 7,000 pairs, split per seed.

Two stages, each deterministic and cached as one JSON file under ``cache_dir/study_split/``:

1. filter (``filter-<key>.json``, keyed without seed / sample / sizes, so seeds 0-4 share one token
   count): drop pairs whose prompt, chosen or rejected token count is at or below the
   ``percentile``-th percentile of that field, then pairs with prompt + response > ``max_tokens``;
2. split (``split-<key>.json``): sample ``sample_size`` surviving pairs with ``sample_seed``, then
   permute them with ``seed`` and cut them into train / val / test by ``sizes``.

Counting (tokenizer-agnostic, a simplification of "under the references' tokenizers"): the prompt
is the message contents joined by ``"\\n"`` (the references' chat templates differ, so none is
applied), chosen and rejected are their raw text, all with ``add_special_tokens=False``. Each text's
count is the MAX over the tokenizers, i.e. the count under the longest tokenizer for that text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from datamodules.tokenize import load_tokenizer
from datamodules.utils.cache import local_folder_id, params_key, read_checksummed_json, write_checksummed_json
from datamodules.utils.errors import UserInputError

FIELDS = ("prompt", "chosen", "rejected")
REASONS = ("short_prompt", "short_chosen", "short_rejected", "too_long")
CACHE_FORMAT = "prefopt.study_split/1"
BATCH_SIZE = 1000
TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "spiece")


@dataclass(frozen=True)
class StudySplit:
    """How train / val / test are carved out of one source split (SPEC section 4)."""

    seed: int = 0
    """Seed of the per-run reshuffle of the sample into train / val / test (0-4 in the study)."""
    sample_size: int = 7000
    """Pairs sampled from those that survive the filters."""
    sample_seed: int = 858
    """Seed of that sample; fixed across runs, so every seed splits the same pairs."""
    sizes: tuple[int, int, int] = (5000, 1000, 1000)
    """Train / val / test sizes; must sum to ``sample_size``."""
    percentile: float | None = 2.5
    """Drop pairs whose prompt, chosen or rejected token count is at or below this percentile; null: no such filter."""
    max_tokens: int = 1024
    """Drop pairs whose prompt + longer response exceeds this many tokens (longest tokenizer)."""
    tokenizers: tuple[str, ...] = ()
    """Hub ids / local folders of the references' tokenizers; empty = the policy tokenizer alone."""
    cache_dir: str | None = None
    """Where the filter and split caches go; default: ``<dataset folder>/.prefopt_cache`` or ``~/.cache/prefopt``."""


@dataclass
class StudySplitResult:
    """Row indices (into the ``rows`` given to ``prepare_study_split``) of each role, and provenance."""

    train: list[int]
    val: list[int]
    test: list[int]
    dropped: dict[str, int]
    """Pairs dropped by the filters, by first reason that applies (see ``REASONS``)."""
    kept_after_filter: int
    cache_path: Path
    """The split-stage cache file."""
    from_cache: bool
    """Whether the split was read from its cache (no token counting, no sampling)."""
    filter_from_cache: bool = False
    """Whether the filter stage was read from its cache (True whenever ``from_cache`` is)."""


# --- counting and filtering ----------------------------------------------------------------------


def prompt_text(prompt: list[dict[str, str]] | str) -> str:
    """The prompt as plain text: message contents joined by newlines, no chat template."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def count_tokens(texts: Sequence[str], tokenizer: Any, desc: str = "counting tokens") -> np.ndarray:
    """Token count of each text under ``tokenizer`` (``add_special_tokens=False``), in batches of 1000."""
    counts = np.zeros(len(texts), dtype=np.int64)
    for start in tqdm(range(0, len(texts), BATCH_SIZE), desc=desc, unit="batch", leave=False):
        batch = list(texts[start:start + BATCH_SIZE])
        ids = tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        counts[start:start + len(batch)] = [len(x) for x in ids]
    return counts


def token_counts(rows: Sequence[dict], tokenizers: Sequence[Any]) -> dict[str, np.ndarray]:
    """Per field, each row's token count under the longest of ``tokenizers`` for that text."""
    texts = {"prompt": [prompt_text(r["prompt"]) for r in rows],
             "chosen": [r["chosen"] for r in rows], "rejected": [r["rejected"] for r in rows]}
    counts = {field: np.zeros(len(rows), dtype=np.int64) for field in FIELDS}
    for k, tokenizer in enumerate(tokenizers):
        name = getattr(tokenizer, "name_or_path", "") or f"tokenizer {k}"
        for field in FIELDS:
            counts[field] = np.maximum(counts[field], count_tokens(texts[field], tokenizer, f"{field} · {name}"))
    return counts


def apply_filters(counts: dict[str, np.ndarray], *, percentile: float | None,
                  max_tokens: int) -> tuple[list[int], dict[str, int], dict[str, float]]:
    """Kept row indices, drop counts by first reason, and each field's percentile threshold.

    The threshold of a field is ``np.percentile(counts, percentile)`` (linear interpolation) over
    ALL rows, and a row whose count is <= the threshold is dropped ("at or below"); ``percentile=None``
    drops none this way. A row is too
    long when ``prompt + max(chosen, rejected) > max_tokens``: each of prompt + chosen and
    prompt + rejected must fit, since DPO scores both.
    """
    n = len(counts["prompt"])
    if n == 0:
        return [], dict.fromkeys(REASONS, 0), dict.fromkeys(FIELDS, float("nan"))
    # None turns the short-pair filter off (on a constant-length field, e.g. templated synthetic prompts, any
    # percentile is that length, and "at or below" it drops every row)
    thresholds = {f: float(np.percentile(counts[f], percentile)) if percentile is not None else -math.inf
                  for f in FIELDS}
    tests = [counts[f] <= thresholds[f] for f in FIELDS]
    tests.append(counts["prompt"] + np.maximum(counts["chosen"], counts["rejected"]) > max_tokens)
    remaining = np.ones(n, dtype=bool)
    dropped = {}
    for reason, fails in zip(REASONS, tests):
        dropped[reason] = int((remaining & fails).sum())
        remaining &= ~fails
    return np.flatnonzero(remaining).tolist(), dropped, thresholds


def filter_pairs(rows: Sequence[dict], tokenizers: Sequence[Any], *, percentile: float | None,
                 max_tokens: int) -> tuple[list[int], dict[str, int]]:
    """Indices of the rows that survive the length filters, and counts dropped by reason."""
    kept, dropped, _ = apply_filters(token_counts(rows, tokenizers), percentile=percentile, max_tokens=max_tokens)
    return kept, dropped


# --- sampling and splitting ----------------------------------------------------------------------


def check_split(split: StudySplit) -> None:
    """Fail fast on a config that cannot produce a split."""
    sizes = tuple(split.sizes)
    if len(sizes) != 3 or any(s < 0 for s in sizes):
        raise UserInputError(f"data.study_split.sizes={list(sizes)}: give three non-negative train/val/test sizes")
    if sum(sizes) != split.sample_size:
        raise UserInputError(f"data.study_split.sizes={list(sizes)} sum to {sum(sizes)}, "
                             f"but data.study_split.sample_size={split.sample_size}; they must be equal")
    if split.percentile is not None and not 0 <= split.percentile <= 100:
        raise UserInputError(f"data.study_split.percentile={split.percentile} must be within [0, 100]")


def sample_and_split(kept: Sequence[int], split: StudySplit) -> dict[str, list[int]]:
    """Sample ``sample_size`` of ``kept`` (``sample_seed``), then reshuffle (``seed``) and cut by ``sizes``.

    The sample keeps ``rng.choice``'s order (not sorted), so it depends only on ``kept`` and
    ``sample_seed``; every ``seed`` permutes the same pairs.
    """
    check_split(split)
    if len(kept) < split.sample_size:
        raise UserInputError(f"data.study_split.sample_size={split.sample_size}, but only {len(kept)} pairs "
                             "survive the length filters; lower sample_size (and sizes) or relax the filters")
    sample = np.random.default_rng(split.sample_seed).choice(np.asarray(kept, dtype=np.int64),
                                                             size=split.sample_size, replace=False)
    shuffled = np.random.default_rng(split.seed).permutation(sample).tolist()
    n_train, n_val, _ = split.sizes
    return {"train": shuffled[:n_train], "val": shuffled[n_train:n_train + n_val], "test": shuffled[n_train + n_val:]}


# --- caching -------------------------------------------------------------------------------------


def tokenizer_id(name: str) -> str:
    """A cache-key id of a tokenizer: the hub id, or a local folder's path plus a digest of its files."""
    return local_folder_id(name, _tokenizer_file_entry, digits=12)


def _tokenizer_file_entry(file: Path) -> bytes | None:
    """Name and content of a tokenizer file (see `TOKENIZER_FILES`); None for the model's other files."""
    if file.name.startswith(TOKENIZER_FILES) or file.suffix in (".model", ".tiktoken"):
        return file.name.encode() + b"\0" + file.read_bytes()
    return None


def cache_key(params: dict[str, Any]) -> str:
    """First 16 hex digits of the sha256 of the canonical JSON of ``params``."""
    return params_key(params)


def read_cache(path: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """The payload of a valid cache for ``params``; None (with a warning unless absent) otherwise."""
    return read_checksummed_json(path, expected={"format": CACHE_FORMAT, "params": params}, what="study-split cache")


def write_cache(path: Path, params: dict[str, Any], payload: dict[str, Any]) -> None:
    """Write params, payload and their checksum atomically (one JSON document)."""
    write_checksummed_json(path, payload, expected={"format": CACHE_FORMAT, "params": params})


def load_tokenizers(names: Sequence[str]) -> list[Any]:
    """`datamodules.tokenize.load_tokenizer` of each name, with a config-naming error on failure."""
    tokenizers = []
    for name in names:
        try:
            tokenizers.append(load_tokenizer(name, key="data.study_split.tokenizers[]"))
        except OSError as error:
            raise UserInputError(f"data.study_split.tokenizers: cannot load tokenizer {name!r}: {error}") from error
    return tokenizers


def _filter_stage(rows: Sequence[dict], split: StudySplit, params: dict[str, Any],
                  names: Sequence[str], path: Path) -> tuple[dict[str, Any], bool]:
    """The filter payload (kept, dropped, thresholds), from its cache or computed and cached."""
    payload = read_cache(path, params)
    if payload is not None:
        return payload, True
    counts = token_counts(rows, load_tokenizers(names))
    kept, dropped, thresholds = apply_filters(counts, percentile=split.percentile, max_tokens=split.max_tokens)
    payload = {"kept": kept, "dropped": dropped, "thresholds": thresholds}
    write_cache(path, params, payload)
    return payload, False


def prepare_study_split(rows: Sequence[dict], split: StudySplit, *, dataset_fingerprint: str,
                        policy_tokenizer: str, cache_dir: Path) -> StudySplitResult:
    """Filter, sample and split ``rows`` (canonical pairs) as in the study; cached, deterministic.

    Both caches are checksummed JSON documents (``datamodules.utils.cache.write_checksummed_json``).

    Args:
        rows: ``{"prompt": [messages], "chosen": str, "rejected": str}`` pairs; indices refer to it.
        split: the study-split config.
        dataset_fingerprint: identifies ``rows`` (content of the source split and its normalization).
        policy_tokenizer: used for the max-token filter when ``split.tokenizers`` is empty.
        cache_dir: folder of the caches (``study_split/filter-<key>.json``, ``study_split/split-<key>.json``).
    """
    check_split(split)
    names = sorted(split.tokenizers or (policy_tokenizer,))
    filter_params = {"dataset_fingerprint": dataset_fingerprint, "n_rows": len(rows),
                     "tokenizers": [tokenizer_id(n) for n in names],
                     "percentile": None if split.percentile is None else float(split.percentile), "max_tokens": int(split.max_tokens)}
    split_params = {**filter_params, "sample_size": split.sample_size, "sample_seed": split.sample_seed,
                    "sizes": list(split.sizes), "seed": split.seed}
    folder = Path(cache_dir) / "study_split"
    split_path = folder / f"split-{cache_key(split_params)}.json"
    cached = read_cache(split_path, split_params)
    if cached is not None:
        return StudySplitResult(cached["train"], cached["val"], cached["test"], cached["dropped"],
                                cached["kept_after_filter"], split_path, from_cache=True, filter_from_cache=True)
    filtered, filter_from_cache = _filter_stage(rows, split, filter_params, names,
                                                folder / f"filter-{cache_key(filter_params)}.json")
    roles = sample_and_split(filtered["kept"], split)
    payload = {**roles, "dropped": filtered["dropped"], "kept_after_filter": len(filtered["kept"])}
    write_cache(split_path, split_params, payload)
    return StudySplitResult(roles["train"], roles["val"], roles["test"], filtered["dropped"], len(filtered["kept"]),
                            split_path, from_cache=False, filter_from_cache=filter_from_cache)
