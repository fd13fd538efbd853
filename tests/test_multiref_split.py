"""The multi-reference study split: length filters, seeded sample and split, and its two caches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from datamodules import multiref_split as ms
from datamodules.multiref_split import StudySplit, apply_filters, filter_pairs, prepare_study_split, sample_and_split
from datamodules.synthetic import WORDS, train_tokenizer
from datamodules.utils.errors import UserInputError

SMALL = {"sample_size": 100, "sizes": (60, 20, 20)}


class WordTokenizer:
    """One token per whitespace-separated word: counts known by hand."""

    name_or_path = "words"

    def __call__(self, texts, add_special_tokens=True, return_attention_mask=True):
        assert add_special_tokens is False
        return {"input_ids": [text.split() for text in texts]}


def pair(prompt: int | list[int], chosen: int, rejected: int) -> dict:
    """A pair whose prompt messages / responses have the given word counts."""
    words = lambda n: " ".join(["w"] * n)  # noqa: E731
    turns = prompt if isinstance(prompt, list) else [prompt]
    return {"prompt": [{"role": "user", "content": words(n)} for n in turns], "chosen": words(chosen),
            "rejected": words(rejected)}


def synthetic_rows(n: int = 200, seed: int = 0, words: tuple[int, int] = (3, 30)) -> list[dict]:
    """``n`` pairs of random WORDS, each text ``words[0]`` to ``words[1]`` words long."""
    rng = random.Random(seed)
    text = lambda: " ".join(rng.choices(WORDS, k=rng.randint(*words)))  # noqa: E731
    return [{"prompt": [{"role": "user", "content": text()}], "chosen": text(), "rejected": text()} for _ in range(n)]


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Path:
    """A second 'reference' tokenizer with an almost byte-level vocab: it tokenizes much longer."""
    out = tmp_path_factory.mktemp("byte_tokenizer")
    train_tokenizer([" ".join(WORDS)] * 4, vocab_size=264).save_pretrained(out)
    return out


def test_percentile_filter_drops_at_or_below_threshold_by_first_reason():
    # 10 rows, percentile 20: threshold = s[1] + 0.8 * (s[2] - s[1]) on each field's sorted counts.
    rows = [pair(3, 1, 9), pair(3, 9, 9), pair([1, 2], 9, 9), pair([2, 3], 2, 9), pair(6, 2, 9),
            pair(7, 9, 4), pair(8, 9, 5), pair(9, 9, 9), pair(10, 9, 9), pair(11, 9, 1)]
    # prompt [3,3,3,5,6,...] -> 3.0 (ties at 3 drop: rows 0-2); chosen [1,2,2,9,...] -> 2.0 (rows 3, 4;
    # row 0 already counted); rejected [1,4,5,9,...] -> 4.8 (rows 5, 9; row 6 with 5 survives);
    # then prompt + max(chosen, rejected): row 8 = 10 + 9 > 18, row 7 = 9 + 9 fits exactly.
    kept, dropped = filter_pairs(rows, [WordTokenizer()], percentile=20, max_tokens=18)
    assert kept == [6, 7]
    assert dropped == {"short_prompt": 3, "short_chosen": 2, "short_rejected": 2, "too_long": 1}


def test_too_long_uses_the_longest_tokenizer_per_text(assets, byte_tokenizer):
    from transformers import AutoTokenizer

    policy, byte = AutoTokenizer.from_pretrained(assets / "model"), AutoTokenizer.from_pretrained(byte_tokenizer)
    rows = [pair(1, 1, 1)] + synthetic_rows(30, words=(2, 8))  # row 0 alone at the minimum: the only percentile-0 drop

    def total(row, tok):
        count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        return count(ms.prompt_text(row["prompt"])), count(row["chosen"]), count(row["rejected"])

    per_tok = np.array([[total(row, tok) for row in rows[1:]] for tok in (policy, byte)])  # (2, 30, 3)
    longest = per_tok.max(axis=0)
    assert (per_tok[1] > per_tok[0]).all()  # the byte tokenizer really is the longer one
    longest_totals = longest[:, 0] + longest[:, 1:].max(axis=1)  # prompt + longer response
    max_tokens = int(np.median(longest_totals))
    assert (per_tok[0][:, 0] + per_tok[0][:, 1:].max(axis=1) <= max_tokens).all()  # all fit the policy's
    expected_long = int((longest_totals > max_tokens).sum())
    assert 0 < expected_long < 30

    kept, dropped = filter_pairs(rows, [policy], percentile=0, max_tokens=max_tokens)
    assert dropped == {"short_prompt": 1, "short_chosen": 0, "short_rejected": 0, "too_long": 0}
    assert kept == list(range(1, 31))
    for tokenizers in ([policy, byte], [byte, policy]):
        kept, dropped = filter_pairs(rows, tokenizers, percentile=0, max_tokens=max_tokens)
        assert dropped == {"short_prompt": 1, "short_chosen": 0, "short_rejected": 0, "too_long": expected_long}
        assert len(kept) == 30 - expected_long


def test_split_is_seeded_disjoint_and_exact():
    kept = list(range(0, 400, 2))  # 200 surviving rows
    first = sample_and_split(kept, StudySplit(seed=0, **SMALL))
    assert first == sample_and_split(kept, StudySplit(seed=0, **SMALL))
    assert [len(first[r]) for r in ("train", "val", "test")] == [60, 20, 20]
    every = first["train"] + first["val"] + first["test"]
    assert len(set(every)) == 100 and set(every) <= set(kept)
    assert all(isinstance(i, int) for i in every)

    other = sample_and_split(kept, StudySplit(seed=1, **SMALL))
    assert other != first
    assert set(other["train"] + other["val"] + other["test"]) == set(every)  # same 100-pair sample

    resampled = sample_and_split(kept, StudySplit(seed=0, sample_seed=1, **SMALL))
    assert set(resampled["train"] + resampled["val"] + resampled["test"]) != set(every)


def test_split_errors():
    with pytest.raises(UserInputError, match=r"data\.study_split\.sample_size=100.*only 99"):
        sample_and_split(list(range(99)), StudySplit(**SMALL))
    with pytest.raises(UserInputError, match=r"data\.study_split\.sizes=\[60, 20, 10\] sum to 90"):
        sample_and_split(list(range(200)), StudySplit(sample_size=100, sizes=(60, 20, 10)))


@pytest.fixture
def prepare(assets, tmp_path):
    rows = synthetic_rows()

    def run(**overrides):
        return prepare_study_split(rows, StudySplit(**{**SMALL, **overrides}), dataset_fingerprint="synthetic-200",
                                   policy_tokenizer=str(assets / "model"), cache_dir=tmp_path)
    return run


def no_counting(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("tokens were counted again")
    monkeypatch.setattr(ms, "count_tokens", fail)


def test_prepare_caches_split_and_reuses_filter_across_seeds(prepare, tmp_path, monkeypatch):
    first = prepare()
    assert not first.from_cache and not first.filter_from_cache
    assert first.cache_path.parent == tmp_path / "study_split" and first.cache_path.exists()
    assert first.kept_after_filter == 200 - sum(first.dropped.values()) >= 100
    assert len(first.train) == 60 and len(first.val) == 20 and len(first.test) == 20

    no_counting(monkeypatch)
    again = prepare()
    assert again.from_cache and (again.train, again.val, again.test) == (first.train, first.val, first.test)
    assert again.dropped == first.dropped and again.cache_path == first.cache_path

    seed1 = prepare(seed=1)  # new split file, but the filter pass comes from its cache
    assert not seed1.from_cache and seed1.filter_from_cache and seed1.cache_path != first.cache_path
    assert set(seed1.train + seed1.val + seed1.test) == set(first.train + first.val + first.test)
    assert len(list((tmp_path / "study_split").glob("filter-*.json"))) == 1

    doc = json.loads(first.cache_path.read_text())
    assert set(doc) == {"format", "params", "payload", "checksum"}
    assert doc["params"]["seed"] == 0 and doc["params"]["sizes"] == [60, 20, 20]
    assert doc["payload"]["train"] == first.train


def test_corrupted_and_truncated_caches_are_rebuilt(prepare, monkeypatch):
    first = prepare()
    doc = json.loads(first.cache_path.read_text())
    doc["payload"]["train"][0] = doc["payload"]["test"][0]  # a hand edit: still valid JSON
    first.cache_path.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        rebuilt = prepare()
    assert not rebuilt.from_cache and rebuilt.filter_from_cache and rebuilt.train == first.train

    text = first.cache_path.read_text()
    first.cache_path.write_text(text[: len(text) // 2])
    with pytest.warns(UserWarning, match="unreadable"):
        assert prepare().train == first.train
    assert prepare().from_cache  # the rebuilt file is valid again

    filter_path = next(first.cache_path.parent.glob("filter-*.json"))  # a bad filter cache: counted again
    filter_path.write_text(filter_path.read_text().replace('"kept": [', '"kept": [0, ', 1))
    first.cache_path.unlink()
    with pytest.warns(UserWarning, match="checksum mismatch"):
        assert not prepare().filter_from_cache
    no_counting(monkeypatch)
    assert prepare().from_cache


def test_cache_key_depends_on_filter_parameters(prepare, byte_tokenizer, assets):
    base = prepare()
    shorter = prepare(max_tokens=45)
    both = prepare(tokenizers=(str(byte_tokenizer), str(assets / "model")))
    assert len({base.cache_path, shorter.cache_path, both.cache_path}) == 3
    assert len(list(base.cache_path.parent.glob("filter-*.json"))) == 3
    assert shorter.dropped["too_long"] > base.dropped["too_long"]
    assert both.dropped["too_long"] >= base.dropped["too_long"]
    same_set = prepare(tokenizers=(str(assets / "model"), str(byte_tokenizer)))  # order does not matter
    assert same_set.from_cache and same_set.cache_path == both.cache_path


def test_prepare_errors_before_counting(prepare, monkeypatch):
    no_counting(monkeypatch)
    with pytest.raises(UserInputError, match=r"data\.study_split\.sizes"):
        prepare(sizes=(60, 20, 10))
    monkeypatch.undo()
    with pytest.raises(UserInputError, match=r"data\.study_split\.sample_size=300, but only \d+ pairs"):
        prepare(sample_size=300, sizes=(200, 50, 50))


def test_no_percentile_keeps_constant_length_fields() -> None:
    """On a constant-length field every percentile is that length, and "at or below" drops every row: null keeps them."""
    counts = {"prompt": np.full(5, 7), "chosen": np.arange(5) + 3, "rejected": np.arange(5) + 4}
    kept, dropped, _ = apply_filters(counts, percentile=None, max_tokens=100)
    assert kept == [0, 1, 2, 3, 4] and sum(dropped.values()) == 0
    kept, dropped, _ = apply_filters(counts, percentile=2.5, max_tokens=100)
    assert kept == [] and dropped["short_prompt"] == 5  # the paper's 2.5 on such data drops everything
