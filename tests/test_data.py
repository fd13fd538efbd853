"""Tests for `datamodules`: prompt rendering, response encoding/truncation, collators, DataModules.

Expected token layouts are built independently: prompts are rendered with an f-string of the
synthetic chat template (`<|user|>\\n{prompt}\\n<|assistant|>\\n`) and tokenized with the tokenizer
itself, never with `datamodules.tokenize`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from datamodules import PreferenceDataModule, SFTDataModule
from datamodules.collate import PairCollator, SFTCollator
from datamodules.templates import render_prompt
from datamodules.tokenize import IGNORE_INDEX, encode_prompt, encode_response, ensure_pad_token, load_tokenizer
from datamodules.utils.errors import UserInputError

PAIR_KEYS = {f"{side}_{k}" for side in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "labels")}


@pytest.fixture(scope="module")
def tok(assets: Path):
    return load_tokenizer(str(assets / "model"))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chat(prompt: str) -> str:
    """The synthetic template's rendering of one user turn with the generation prompt."""
    return f"<|user|>\n{prompt}\n<|assistant|>\n"


def expected_ids(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS), tokenized independently of `datamodules.tokenize`."""
    p = tok(chat(prompt), add_special_tokens=True)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p, r


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


PREF_ROWS = [
    {"prompt": "count 1 to 3", "chosen": "1 2 3", "rejected": "1 2", "rc": -1.5, "rr": -4},
    {"prompt": "repeat cat 2 times", "chosen": "cat cat", "rejected": "cat cat cat hope this helps",
     "rc": -0.25, "rr": -7.0},
    {"prompt": "count 4 to 6", "chosen": "4 5 6", "rejected": "4 5 6 7", "rc": -2.0, "rr": -3.5},
]


# --------------------------------------------------------------------- rendering and encoding


def test_render_prompt_uses_chat_template(tok) -> None:
    assert render_prompt("count 1 to 3", tokenizer=tok) == "<|user|>\ncount 1 to 3\n<|assistant|>\n"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count 1 to 3"}]
    assert render_prompt(messages, tokenizer=tok) == "<|system|>\nbe brief\n<|user|>\ncount 1 to 3\n<|assistant|>\n"


def test_render_prompt_without_chat_template_falls_back_to_zephyr(assets: Path) -> None:
    plain = load_tokenizer(str(assets / "model"))
    plain.chat_template = None
    assert render_prompt("count 1 to 3", tokenizer=plain) == "<|user|>\ncount 1 to 3\n<|assistant|>\n"  # auto -> zephyr
    two_turns = [{"role": "system", "content": "a"}, {"role": "user", "content": "b"}]
    assert render_prompt(two_turns, template="zephyr", tokenizer=plain, insert_eos=True) == "<|system|>\na</s>\n<|user|>\nb</s>\n<|assistant|>\n"
    assert render_prompt(two_turns, template="plain", tokenizer=plain) == "a\n\nb\n"


def test_encode_prompt_tokenizes_the_rendering(tok) -> None:
    ids = encode_prompt(tok, "count 1 to 3")
    assert ids == tok(chat("count 1 to 3"))["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|user|>")
    assert ids[-2:] == tok.convert_tokens_to_ids(["<|assistant|>", "Ċ"])  # generation prompt ends it


def test_ensure_pad_token_pads_with_eos_only_when_missing(assets: Path) -> None:
    fresh = load_tokenizer(str(assets / "model"))
    assert ensure_pad_token(fresh) is fresh and fresh.pad_token == "<pad>"  # has its own: kept
    fresh.pad_token = None
    assert fresh.pad_token_id is None
    assert ensure_pad_token(fresh).pad_token == "</s>" and fresh.pad_token_id == fresh.eos_token_id


def test_encode_response_masks_prompt_and_labels_response_plus_eos(tok) -> None:
    prompt_ids = tok(chat("count 1 to 3"))["input_ids"]
    response = tok("1 2 3", add_special_tokens=False)["input_ids"]
    enc = encode_response(tok, prompt_ids, "1 2 3", max_length=64)
    assert enc.input_ids == prompt_ids + response + [tok.eos_token_id]
    assert enc.labels == [IGNORE_INDEX] * len(prompt_ids) + response + [tok.eos_token_id]
    assert not enc.truncated
    assert tok.eos_token_id == 2 and IGNORE_INDEX == -100


P = [101, 102, 103, 104]  # hand-made prompt ids (any ints: encode_response never decodes them)


@pytest.mark.parametrize(
    ("max_length", "min_response", "want_prompt", "n_response", "eos_kept", "truncated"),
    [
        (8, 1, P, 3, True, False),  # 4 + (3 + EOS) fits exactly
        (7, 1, P, 3, False, True),  # the response loses its end (EOS) first; prompt untouched
        (5, 1, P, 1, False, True),  # response down to 1 token, prompt still fits
        (3, 1, [103, 104], 1, False, True),  # then the prompt keeps its END
        (3, 2, [104], 2, False, True),  # min_response_tokens is honoured before the prompt
    ],
)
def test_truncation_policy(tok, max_length, min_response, want_prompt, n_response, eos_kept, truncated) -> None:
    r = tok("1 2 3", add_special_tokens=False)["input_ids"]
    assert len(r) == 3 and tok.decode(r) == "1 2 3"
    full_response = r + [tok.eos_token_id]
    enc = encode_response(tok, list(P), "1 2 3", max_length, min_response_tokens=min_response)
    want_response = full_response[:n_response] if not eos_kept else full_response
    assert enc.input_ids == want_prompt + want_response
    assert enc.labels == [IGNORE_INDEX] * len(want_prompt) + want_response
    assert enc.truncated is truncated
    assert len(enc.input_ids) <= max_length


class StubTokenizer:
    """Maps a response string to fixed ids; EOS = 2, as in the collator's worked example."""

    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": {"seven eight": [7, 8], "nine": [9]}[text]}


def test_pair_collator_reproduces_docstring_example() -> None:
    stub = StubTokenizer()
    chosen = encode_response(stub, [5, 6], "seven eight", max_length=32)
    rejected = encode_response(stub, [5, 6], "nine", max_length=32)
    row = {"chosen_input_ids": chosen.input_ids, "chosen_labels": chosen.labels,
           "rejected_input_ids": rejected.input_ids, "rejected_labels": rejected.labels}
    batch = PairCollator(pad_token_id=0)([row])
    expected = {
        "chosen_input_ids": [[5, 6, 7, 8, 2]],
        "chosen_attention_mask": [[1, 1, 1, 1, 1]],
        "chosen_labels": [[-100, -100, 7, 8, 2]],
        "rejected_input_ids": [[5, 6, 9, 2, 0]],
        "rejected_attention_mask": [[1, 1, 1, 1, 0]],
        "rejected_labels": [[-100, -100, 9, 2, -100]],
    }
    assert set(batch) == set(expected)
    for key, value in expected.items():
        assert batch[key].dtype == torch.long
        assert batch[key].tolist() == value, key


def test_pair_collator_pads_every_row_to_one_length_and_passes_floats() -> None:
    rows = [
        {"chosen_input_ids": [1, 2], "chosen_labels": [-100, 2], "rejected_input_ids": [1, 2, 3],
         "rejected_labels": [-100, 2, 3], "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.0, "flag": True},
        {"chosen_input_ids": [4], "chosen_labels": [4], "rejected_input_ids": [4, 5, 6, 7],
         "rejected_labels": [-100, -100, 6, 7], "ref_chosen_logps": -0.5, "ref_rejected_logps": -3.0, "flag": False},
    ]
    batch = PairCollator(pad_token_id=9)(rows)
    assert batch["chosen_input_ids"].tolist() == [[1, 2, 9, 9], [4, 9, 9, 9]]
    assert batch["chosen_labels"].tolist() == [[-100, 2, -100, -100], [4, -100, -100, -100]]
    assert batch["rejected_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -0.5]
    assert batch["ref_rejected_logps"].tolist() == [-2.0, -3.0]
    assert "flag" not in batch  # only float columns are passed through


def test_sft_collator() -> None:
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [-100]}]
    batch = SFTCollator(pad_token_id=0)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, -100]]


# --------------------------------------------------------------------- DataModules on the assets


def sft_dm(assets: Path, **kwargs) -> SFTDataModule:
    return SFTDataModule(str(assets / "data" / "sft"), str(assets / "model"), **kwargs)


def pref_dm(path, assets: Path, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(str(path), str(assets / "model"), **kwargs)


def test_sft_datamodule_rows_and_batches(assets: Path, tok) -> None:
    dm = sft_dm(assets, batch_size=4, eval_batch_size=8)
    dm.setup("fit")
    train = read_jsonl(assets / "data" / "sft" / "train.jsonl")
    assert len(dm.data["train"]) == len(train) == 256
    assert len(dm.data["val"]) == len(read_jsonl(assets / "data" / "sft" / "validation.jsonl")) == 64
    assert {role: stats.truncated for role, stats in dm.stats.items()} == {"train": 0, "val": 0}
    for raw, row in zip(train[:5], dm.data["train"][:5]):  # file order is kept
        p, r = expected_ids(tok, raw["prompt"], raw["response"])
        assert row["input_ids"] == p + r
        assert row["labels"] == [IGNORE_INDEX] * len(p) + r
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    B, T = batch["input_ids"].shape
    assert B == 4 and all(v.shape == (4, T) for v in batch.values())
    assert T == int(batch["attention_mask"].sum(1).max())  # padded to the longest row only
    labelled = batch["labels"] != IGNORE_INDEX
    assert (batch["attention_mask"][labelled] == 1).all()
    assert torch.equal(batch["labels"][labelled], batch["input_ids"][labelled])
    assert next(iter(dm.val_dataloader()))["input_ids"].shape[0] == 8
    with pytest.raises(UserInputError, match=r"`test` needs a test split, but data\.test_split is not set"):
        dm.test_dataloader()  # no test split configured: an error, not an empty loader that tests nothing


def test_preference_datamodule_rows_and_batches(assets: Path, tok) -> None:
    dm = pref_dm(assets / "data" / "prefs", assets, batch_size=4)
    dm.setup("fit")
    train = read_jsonl(assets / "data" / "prefs" / "train.jsonl")
    assert len(dm.data["train"]) == len(train) == 256
    assert len(dm.data["val"]) == len(read_jsonl(assets / "data" / "prefs" / "validation.jsonl")) == 64
    raw, row = train[0], dm.data["train"][0]
    for side in ("chosen", "rejected"):
        p, r = expected_ids(tok, raw["prompt"], raw[side])
        assert row[f"{side}_input_ids"] == p + r
        assert row[f"{side}_labels"] == [IGNORE_INDEX] * len(p) + r
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == PAIR_KEYS  # no reference columns unless asked for
    T = batch["chosen_input_ids"].shape[1]
    assert all(v.shape == (4, T) for v in batch.values())
    lengths = torch.cat([batch["chosen_attention_mask"].sum(1), batch["rejected_attention_mask"].sum(1)])
    assert T == int(lengths.max())


def test_truncated_counts_with_small_max_length(assets: Path, tok) -> None:
    max_length = 16
    dm = pref_dm(assets / "data" / "prefs", assets, max_length=max_length)
    dm.setup("fit")
    expected = {}
    for role, split in (("train", "train"), ("val", "validation")):
        n = 0  # pairs with at least one side cut
        for raw in read_jsonl(assets / "data" / "prefs" / f"{split}.jsonl"):
            lengths = [sum(map(len, expected_ids(tok, raw["prompt"], raw[side]))) for side in ("chosen", "rejected")]
            n += max(lengths) > max_length
        expected[role] = n
    assert {role: stats.truncated for role, stats in dm.stats.items()} == expected
    assert 0 < expected["train"] < 256  # some but not all pairs are cut
    for row in dm.data["train"]:
        for side in ("chosen", "rejected"):
            assert len(row[f"{side}_input_ids"]) <= max_length
            assert row[f"{side}_labels"][-1] != IGNORE_INDEX  # at least one response token survives

    sft = sft_dm(assets, max_length=max_length)
    sft.setup("fit")
    want = sum(len(p) + len(r) > max_length for p, r in (
        expected_ids(tok, raw["prompt"], raw["response"]) for raw in read_jsonl(assets / "data" / "sft" / "train.jsonl")))
    assert sft.stats["train"].truncated == want > 0


def test_missing_split_names_it_and_lists_present(assets: Path) -> None:
    dm = pref_dm(assets / "data" / "prefs", assets, val_split="dev")
    with pytest.raises(UserInputError, match=r"no split 'dev'.*splits present: \['train', 'validation'\]"):
        dm.setup("fit")
    dm = sft_dm(assets, test_split="test")
    dm.setup("fit")  # fit reads train + validation only
    with pytest.raises(UserInputError, match=r"no split 'test' \(needed as the test split\)"):
        dm.setup("test")


def test_setup_reads_only_the_splits_of_its_stage(assets: Path) -> None:
    from datamodules import PromptDataModule

    dm = PromptDataModule(path=str(assets / "data" / "prompts"), tokenizer_name_or_path=str(assets / "model"),
                          predict_split="test", eval_batch_size=5)
    dm.setup("predict")  # the prompts folder has no validation split: predict must not need one
    assert set(dm.data) == {"predict"}
    test_prompts = [json.loads(line)["prompt"] for line in (assets / "data/prompts/test.jsonl").read_text().splitlines()]
    batches = list(dm.predict_dataloader())
    assert [p for b in batches for p in b["prompt"]] == [[{"role": "user", "content": p}] for p in test_prompts]
    assert len(batches[0]["prompt"]) == 5
    with pytest.raises(UserInputError, match="no split 'validation'"):
        dm.setup("fit")


def test_missing_column_names_it_and_lists_present(tmp_path: Path, assets: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "count 1 to 3", "chosen": "1 2 3"}])
    dm = pref_dm(path, assets, val_split=None)
    with pytest.raises(UserInputError) as err:
        dm.setup("fit")
    message = str(err.value)
    assert "lack ['rejected']" in message
    assert "['prompt', 'chosen']" in message
    assert str(path) in message


def test_single_jsonl_file_and_parquet_file_load_the_same(tmp_path: Path, assets: Path, tok) -> None:
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in PREF_ROWS]
    jsonl = write_jsonl(tmp_path / "prefs.jsonl", rows)
    parquet = tmp_path / "prefs.parquet"
    Dataset.from_list(rows).to_parquet(str(parquet))
    loaded = []
    for path in (jsonl, parquet):
        dm = pref_dm(path, assets, val_split=None, batch_size=3)
        dm.setup("fit")
        assert len(dm.data["train"]) == 3
        loaded.append(dm.data["train"])
    assert loaded[0] == loaded[1]
    p, r = expected_ids(tok, rows[1]["prompt"], rows[1]["rejected"])
    assert loaded[0][1]["rejected_input_ids"] == p + r


def test_single_file_has_only_a_train_split(tmp_path: Path, assets: Path) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in PREF_ROWS])
    with pytest.raises(UserInputError, match=r"no split 'validation'.*\['train'\]"):
        pref_dm(path, assets).setup("fit")  # default val_split = "validation"


def test_bad_paths_raise_user_input_error(tmp_path: Path, assets: Path) -> None:
    csv = tmp_path / "prefs.csv"
    csv.write_text("prompt,chosen,rejected\n")
    with pytest.raises(UserInputError, match=r"unsupported file type '\.csv'"):
        pref_dm(csv, assets, val_split=None).setup("fit")
    with pytest.raises(UserInputError, match="does not exist"):
        pref_dm(tmp_path / "nowhere", assets).setup("fit")


def test_reference_columns_reach_the_batch(tmp_path: Path, assets: Path) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", PREF_ROWS)
    dm = pref_dm(path, assets, val_split=None, batch_size=3, reference_columns=("rc", "rr"))
    dm.setup("fit")
    batch = dm.collator()(dm.data["train"])  # file order, no shuffling
    assert set(batch) == PAIR_KEYS | {"ref_chosen_logps", "ref_rejected_logps"}
    assert batch["ref_chosen_logps"].dtype == torch.float32 == batch["ref_rejected_logps"].dtype
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -0.25, -2.0]
    assert batch["ref_rejected_logps"].tolist() == [-4.0, -7.0, -3.5]  # the integer -4 is cast too
    # Without reference_columns the same file gives no reference keys (rc/rr are not picked up).
    plain = pref_dm(path, assets, val_split=None)
    plain.setup("fit")
    assert set(plain.collator()(plain.data["train"])) == PAIR_KEYS


def test_missing_reference_column_is_reported(tmp_path: Path, assets: Path) -> None:
    path = write_jsonl(tmp_path / "prefs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected", "rc")}
                                                  for r in PREF_ROWS])
    dm = pref_dm(path, assets, val_split=None, reference_columns=("rc", "rr"))
    with pytest.raises(UserInputError, match=r"missing required column\(s\) \['rr'\]"):
        dm.setup("fit")


def test_overlength_drop_counts_too_long_and_keeps_the_rest(assets: Path, tok) -> None:
    max_length = 16
    dm = pref_dm(assets / "data" / "prefs", assets, max_length=max_length, overlength="drop")
    dm.setup("fit")
    raws = read_jsonl(assets / "data" / "prefs" / "train.jsonl")
    too_long = sum(max(sum(map(len, expected_ids(tok, r["prompt"], r[s]))) for s in ("chosen", "rejected")) > max_length
                   for r in raws)
    stats = dm.stats["train"].as_dict()
    assert stats["dropped"] == {"too_long": too_long} and stats["kept"] == len(raws) - too_long
    assert stats["truncated"] == 0 and len(dm.data["train"]) == len(raws) - too_long


def test_max_bad_fraction_stops_with_counts(tmp_path: Path, assets: Path) -> None:
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 8 + [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 2
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(UserInputError, match=r"2 of 10 rows are malformed \(\{'identical_responses': 2\}\)"):
        pref_dm(path, assets, val_split=None, max_bad_fraction=0.1).setup("fit")
    dm = pref_dm(path, assets, val_split=None, max_bad_fraction=0.2)  # 20% is allowed: skipped and counted
    dm.setup("fit")
    assert dm.stats["train"].as_dict()["dropped"] == {"identical_responses": 2} and len(dm.data["train"]) == 8


def test_label_noise_flips_a_seeded_share_of_training_pairs_only(assets: Path) -> None:
    """data.label_noise swaps chosen and rejected (tokens and labels) in about that share of the training pairs, the
    same pairs whatever the order, and records the net flip in `label_flipped`; validation keeps its labels."""
    from datamodules.label_noise import add_label_noise

    def load(**kwargs):
        dm = PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"), max_length=64, **kwargs)
        dm.setup("fit")
        return dm

    clean, noisy = load(), load(label_noise=0.3, label_noise_seed=1)
    pairs = list(zip(clean.data["train"], noisy.data["train"]))
    swapped = [b["chosen_input_ids"] == a["rejected_input_ids"] and b["rejected_labels"] == a["chosen_labels"]
               for a, b in pairs]
    kept = [b["chosen_input_ids"] == a["chosen_input_ids"] for a, b in pairs]
    assert all(s != k for s, k in zip(swapped, kept))  # each pair is either swapped whole or untouched
    assert 0.2 < sum(swapped) / len(pairs) < 0.4
    # the net flag: the synthetic task's own flips (label_noise 0.1 when the assets were built), toggled when swapped
    source = [bool(row["label_flipped"]) for row in read_jsonl(assets / "data/prefs/train.jsonl")]
    assert len(source) == len(pairs) and "label_flipped" not in clean.data["train"][0]  # only with label_noise > 0
    assert [b["label_flipped"] for _, b in pairs] == [float(f != s) for f, s in zip(source, swapped)]
    assert [x["chosen_input_ids"] for x in noisy.data["val"]] == [x["chosen_input_ids"] for x in clean.data["val"]]
    reversed_items = add_label_noise(list(reversed(clean.data["train"])), 0.3, 1)
    sides = lambda items: [(x["chosen_input_ids"], x["rejected_input_ids"]) for x in items]  # noqa: E731
    assert sides(reversed(reversed_items)) == sides(noisy.data["train"])  # order-free: the same pairs flip
    with pytest.raises(UserInputError, match="data.label_noise=1.5"):
        PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"), label_noise=1.5)
