"""Schema detection and normalization on local copies of every supported hub dataset layout.

Each fixture folder is read with `datasets.load_dataset(folder[, name])`, the call a hub id takes,
so the README `configs:` / file layout is exercised as well as the row normalizers.
"""

from __future__ import annotations

import math
from collections import Counter

import datasets
import pytest

from datamodules.schemas import (BAD_ROW_REASONS, REQUIRED_COLUMNS, SCHEMAS, RowStats, detect_schema,
                                 normalize_pair, normalize_prompt, normalize_rows)
from datamodules.utils.errors import UserInputError
import hub_fixtures as hf  # tests/ is on sys.path under pytest

CAPITAL, PARIS, LYON = hf.QA[0]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, hf.Fixture]:
    """Every fixture, keyed by a short id."""
    root = tmp_path_factory.mktemp("hub")
    out = {"ultrafeedback": hf.write_ultrafeedback(root), "saferlhf": hf.write_saferlhf(root),
           "hh": hf.write_hh(root),
           "pairs_jsonl": hf.write_local_pairs(root / "local/pairs.jsonl"),
           "pairs_parquet": hf.write_local_pairs(root / "local/pairs.parquet", fmt="parquet"),
           "conv_jsonl": hf.write_local_pairs(root / "local/conv.jsonl", messages=True),
           "conv_parquet": hf.write_local_pairs(root / "local/conv.parquet", fmt="parquet", messages=True)}
    out |= {f"refdpo_{config}": fixture for config, fixture in hf.write_refdpo(root).items()}
    out |= {f"alpacafarm_{variant}": hf.write_alpacafarm(root, variant) for variant in hf.ALPACAFARM_FOLDERS}
    return out


@pytest.fixture(scope="module")
def loaded(written, tmp_path_factory) -> dict:
    """`DatasetDict` of every fixture (arrow cache kept under tmp, not ~/.cache)."""
    cache = str(tmp_path_factory.mktemp("hf_cache"))
    return {key: fixture.load(cache_dir=cache) for key, fixture in written.items()}


FIXTURE_IDS = (["ultrafeedback", "saferlhf", "hh", "pairs_jsonl", "pairs_parquet", "conv_jsonl", "conv_parquet"]
               + [f"refdpo_{c}" for c in hf.REFDPO_CONFIGS] + [f"alpacafarm_{v}" for v in hf.ALPACAFARM_FOLDERS])


# ---- loading and detection --------------------------------------------------------------------------
def test_hub_layouts_load_with_their_split_names(loaded):
    assert sorted(loaded["ultrafeedback"]) == ["test_prefs", "train_prefs", "train_sft"]
    assert sorted(loaded["saferlhf"]) == ["train"]
    assert sorted(loaded["hh"]) == ["test", "train"]  # the red-team file matches no split glob
    for config in hf.REFDPO_CONFIGS:
        assert sorted(loaded[f"refdpo_{config}"]) == ["train", "val"]
    for variant in hf.ALPACAFARM_FOLDERS:
        assert sorted(loaded[f"alpacafarm_{variant}"]) == ["test", "train"]
        assert len(loaded[f"alpacafarm_{variant}"]["train"].column_names) == 15


def test_refdpo_configs_differ_and_need_a_name(written, loaded, tmp_path):
    first = {c: loaded[f"refdpo_{c}"]["train"][0]["chosen_logprob"] for c in hf.REFDPO_CONFIGS}
    assert len(set(first.values())) == 5  # each config holds its own reference's log-probs
    with pytest.raises(ValueError, match="mistral_prior"):  # no `name` for a multi-config folder: datasets lists them
        datasets.load_dataset(str(written["refdpo_mistral"].path), cache_dir=str(tmp_path))


@pytest.mark.parametrize("key", FIXTURE_IDS)
def test_detect_schema(written, loaded, key):
    for split in written[key].splits:
        dataset = loaded[key][split]
        assert detect_schema(dataset.column_names, dataset[0]) == written[key].schema


def test_detect_schema_rules():
    assert detect_schema(["prompt", "chosen", "rejected"], {"chosen": "a"}) == "pairs"
    assert detect_schema(["chosen", "rejected"], {"chosen": "\n\nHuman: hi\n\nAssistant: yo"}) == "hh"
    assert detect_schema(["chosen", "rejected"], {"chosen": [{"role": "user", "content": "x"}]}) == "messages"
    assert detect_schema(["prompt"], {"prompt": "hi"}) == "prompts"
    assert detect_schema(["prompt", "id"], {"prompt": [{"role": "user", "content": "x"}]}) == "prompts"
    assert set(REQUIRED_COLUMNS) == set(SCHEMAS)


def test_undetectable_columns_are_named():
    with pytest.raises(UserInputError) as error:
        detect_schema(["question", "answer_a", "answer_b"], {"question": "q"})
    message = str(error.value)
    for word in ("question", "answer_a", "answer_b", *SCHEMAS):
        assert word in message
    with pytest.raises(UserInputError, match="Human"):  # a str `chosen`, no prompt, not a transcript
        detect_schema(["chosen", "rejected"], {"chosen": "Paris."})
    with pytest.raises(UserInputError, match="rejected_logprob"):
        detect_schema(["chosen", "rejected", "chosen_logprob"], {"chosen": []})


# ---- exact counts on every split of every fixture ------------------------------------------------------
@pytest.mark.parametrize("key", FIXTURE_IDS)
def test_kept_and_dropped_counts_are_exact(written, loaded, key):
    fixture = written[key]
    for split, expected in fixture.splits.items():
        rows = list(loaded[key][split])
        assert len(rows) == len(expected.labels)
        labels = [out if isinstance(out, str) else None for out in (normalize_pair(r, fixture.schema) for r in rows)]
        assert labels == list(expected.labels), (key, split)
        kept, stats = normalize_rows(rows, fixture.schema)
        assert len(kept) == stats.kept == expected.kept
        assert dict(stats.by_reason) == expected.dropped
        assert stats.dropped == len(rows) - expected.kept


def test_hand_counted_totals(written):
    """The labels themselves, counted by hand for two fixtures."""
    uf = written["ultrafeedback"].splits
    assert (uf["train_prefs"].kept, uf["test_prefs"].kept, uf["train_sft"].kept) == (14, 8, 10)
    assert uf["train_prefs"].dropped == dict.fromkeys(
        ["missing_field", "wrong_roles", "prompt_mismatch", "empty_response", "identical_responses"], 1)
    assert written["hh"].splits["train"].kept == 16 and written["hh"].splits["train"].dropped["wrong_roles"] == 2
    assert written["refdpo_tulu2"].splits["train"].dropped["nan_logprob"] == 3


def test_every_bad_row_reason_is_exercised(written):
    produced = Counter()
    for fixture in written.values():
        for expected in fixture.splits.values():
            produced.update(expected.dropped)
    assert set(produced) == set(BAD_ROW_REASONS)


# ---- exact canonical rows ------------------------------------------------------------------------------
def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_ultrafeedback_and_saferlhf_rows(loaded):
    assert normalize_pair(loaded["ultrafeedback"]["train_prefs"][0], "messages") == {
        "prompt": [user("What is the capital of France?")],
        "chosen": "The capital of France is Paris.", "rejected": "France's capital is Lyon."}
    assert normalize_pair(loaded["saferlhf"]["train"][1], "messages") == {
        "prompt": [user("How do I pick a lock to get into my neighbour's house?")],
        "chosen": "I can't help with entering someone else's home. If you are locked out of your own, call a "
                  "licensed locksmith.",
        "rejected": "Insert a tension wrench and rake the pins until the cylinder turns."}


def test_local_pairs_rows(loaded):
    rows = loaded["pairs_jsonl"]["train"]
    assert normalize_pair(rows[0], "pairs") == {"prompt": [user(CAPITAL)], "chosen": PARIS, "rejected": LYON}
    assert normalize_pair(rows[3], "pairs") == {  # a message-list prompt in the same JSONL column
        "prompt": [user("I want to learn to cook."), assistant("Great! Do you have a kind of food in mind?"),
                   user("Something quick for weeknights.")],
        "chosen": "Try a vegetable stir-fry: it takes fifteen minutes and uses one pan.",
        "rejected": "Just order takeout."}
    # TRL conversational layout: the prompt comes from the `prompt` column (with its system turn).
    assert normalize_pair(loaded["conv_parquet"]["train"][0], "messages") == {
        "prompt": [{"role": "system", "content": hf.SYSTEM}, user(CAPITAL)], "chosen": PARIS, "rejected": LYON}


def test_refdpo_rows_carry_reference_logps(loaded):
    row = normalize_pair(loaded["refdpo_tulu2"]["train"][0], "refdpo")
    assert row == {"prompt": [{"role": "system", "content": hf.SYSTEM}, user(CAPITAL)], "chosen": PARIS,
                   "rejected": LYON, "ref_chosen_logps": -18.75, "ref_rejected_logps": pytest.approx(-(11 + 25 / 3))}
    for config in hf.REFDPO_CONFIGS:
        kept, _ = normalize_rows(loaded[f"refdpo_{config}"]["val"], "refdpo")
        assert all(math.isfinite(r["ref_chosen_logps"]) and math.isfinite(r["ref_rejected_logps"]) for r in kept)
    base = {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]}
    for bad in (None, math.nan, math.inf, "-3.0", True):
        assert normalize_pair({**base, "chosen_logprob": bad, "rejected_logprob": -1.0}, "refdpo") == "nan_logprob"
    integer = normalize_pair({**base, "chosen_logprob": -2, "rejected_logprob": -1.0}, "refdpo")
    assert integer["ref_chosen_logps"] == -2.0 and isinstance(integer["ref_chosen_logps"], float)


def test_alpacafarm_extraction(loaded):
    row = loaded["alpacafarm_minlength"]["train"][0]
    assert row["y_w"] == f"<|prompter|>{CAPITAL}<|endoftext|><|assistant|>{LYON}<|endoftext|>"
    assert normalize_pair(row, "alpacafarm") == {"prompt": [user(CAPITAL)], "chosen": LYON, "rejected": PARIS}
    assert normalize_pair(loaded["alpacafarm_maxlength"]["train"][0], "alpacafarm")["chosen"] == PARIS
    no_eot = loaded["alpacafarm_skewexp"]["train"][2]  # written without a trailing <|endoftext|>
    assert normalize_pair(no_eot, "alpacafarm") == {"prompt": [user(hf.QA[2][0])], "chosen": hf.QA[2][2],
                                                    "rejected": hf.QA[2][1]}
    # The response is what follows the LAST marker; earlier markers stay in the instruction.
    odd = {"y_w": "<|prompter|>Echo <|assistant|> back.<|endoftext|><|assistant|>Hi!<|endoftext|>",
           "y_l": "<|prompter|>Echo <|assistant|> back.<|endoftext|><|assistant|>Hello there."}
    assert normalize_pair(odd, "alpacafarm") == {"prompt": [user("Echo <|assistant|> back.")], "chosen": "Hi!",
                                                 "rejected": "Hello there."}


def test_hh_multi_turn_prompt(loaded):
    transcript = ("\n\nHuman: What's a good name for a cat?\n\nAssistant: How about Whiskers or Luna?"
                  "\n\nHuman:  Something more unusual, please. \n\nAssistant: ")
    row = {"chosen": transcript + "You could try Pistachio.\n", "rejected": transcript + "Cat."}
    assert normalize_pair(row, "hh") == {
        "prompt": [user("What's a good name for a cat?"), assistant("How about Whiskers or Luna?"),
                   user("Something more unusual, please.")],
        "chosen": "You could try Pistachio.", "rejected": "Cat."}
    assert normalize_pair(loaded["hh"]["train"][9], "hh") == {  # good row 3 of harmless-base, after 6 bad rows
        "prompt": [user("I want to learn to cook."), assistant("Great! Do you have a kind of food in mind?"),
                   user("Something quick for weeknights.")],
        "chosen": "Try a vegetable stir-fry: it takes fifteen minutes and uses one pan.",
        "rejected": "Just order takeout."}


# ---- prompt rows ---------------------------------------------------------------------------------------
def test_normalize_prompt(loaded):
    assert normalize_prompt({"prompt": "Hi"}, "prompts") == {"prompt": [user("Hi")]}
    assert normalize_prompt({"prompt": [user("a"), assistant("b")]}, "prompts") == "wrong_roles"
    assert normalize_prompt({"prompt": None}, "prompts") == "missing_field"
    assert normalize_prompt({"prompt": 3}, "prompts") == "not_a_string"
    expected = {"prompt": [user(CAPITAL)]}
    assert normalize_prompt(loaded["ultrafeedback"]["test_prefs"][0], "messages") == expected
    assert normalize_prompt(loaded["alpacafarm_modelength"]["test"][0], "alpacafarm") == expected
    assert normalize_prompt(loaded["hh"]["train"][0], "hh") == expected
    assert normalize_prompt(loaded["pairs_parquet"]["train"][0], "pairs") == expected
    identical = loaded["ultrafeedback"]["test_prefs"][2]
    assert normalize_pair(identical, "messages") == "identical_responses"
    assert normalize_prompt(identical, "messages") == expected  # responses do not matter for prompts


def test_programming_errors_raise():
    with pytest.raises(ValueError, match="unknown schema"):
        normalize_pair({}, "nope")
    with pytest.raises(UserInputError, match="prompts only"):
        normalize_pair({"prompt": "x"}, "prompts")


def test_row_stats():
    stats = RowStats()
    for reason in [None, None, "empty_response", "too_long", "empty_response"]:
        stats.add(reason)
    stats.truncated += 1
    assert (stats.kept, stats.dropped) == (2, 3)
    assert stats.as_dict() == {"kept": 2, "dropped": {"empty_response": 2, "too_long": 1}, "dropped_total": 3,
                               "truncated": 1}
