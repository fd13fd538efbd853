"""Tests of the embedded default: the synthetic task, its rewards, and the HF-format assets."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from datamodules.synthetic import (
    FILLER,
    SyntheticReward,
    SyntheticTask,
    all_prompts,
    build_assets,
    build_tiny_model,
    tokenizer_corpus,
    train_tokenizer,
)

SMALL = {"n_sft": 64, "n_pref": 64, "n_val": 16}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_assets(tmp_path_factory.mktemp("synth"), task=SyntheticTask(), **SMALL)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_corpus())


# --- task -------------------------------------------------------------------------------------


def test_prompt_set_and_targets() -> None:
    task = SyntheticTask()
    assert len(all_prompts()) == 40 * 4 + 24 * 4
    assert task.target("count 3 to 6") == "3 4 5 6"
    assert task.target("count 39 to 44") == "39 40 41 42 43 44"
    assert task.target("repeat cat 2 times") == "cat cat"


@pytest.mark.parametrize("bad", ["count 3 to 60", "count 3  to 6", "repeat zebra 3 times", ""])
def test_target_rejects_bad_prompt(bad: str) -> None:
    with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[")):
        SyntheticTask().target(bad)


def test_splits_are_disjoint_and_validation_uses_train_prompts() -> None:
    task = SyntheticTask()
    train, test = set(task.prompts("train")), set(task.prompts("test"))
    assert not train & test and train | test == set(all_prompts())
    assert 0.08 < len(test) / len(all_prompts()) < 0.25
    assert task.prompts("validation") == task.prompts("train") == sorted(train)
    assert {r["prompt"] for r in task.sft_rows("train", 500)} <= train
    assert {r["prompt"] for r in task.preference_rows("validation", 200)} <= train
    assert task.sft_rows("train", 50) != task.sft_rows("validation", 50)


def test_rows_are_deterministic() -> None:
    a, b, c = SyntheticTask(seed=0), SyntheticTask(seed=0), SyntheticTask(seed=1)
    assert a.sft_rows("train", 100) == b.sft_rows("train", 100)
    assert a.preference_rows("train", 100) == b.preference_rows("train", 100)
    assert a.sft_rows("train", 100) != c.sft_rows("train", 100)
    assert a.preference_rows("train", 100) != c.preference_rows("train", 100)
    assert a.sft_rows("train", 10) == a.sft_rows("train", 100)[:10]  # a prefix, not a new draw
    assert a.prompt_rows("test") == [{"prompt": p} for p in a.prompts("test")]


def test_rewards_hand_computed() -> None:
    aligned, unaligned = SyntheticTask(variant="aligned"), SyntheticTask(variant="unaligned")
    p = "count 3 to 6"
    assert aligned.reward(p, "3 4 5 6") == 1.0
    assert aligned.reward(p, "3 4 5 6 hope this helps") == pytest.approx(4 / 7)
    assert aligned.reward(p, "3 4 5") == pytest.approx(3 / 4)
    assert aligned.reward(p, "4 5 6") == 0.0  # positional: shifted words do not match
    assert aligned.reward(p, "") == 0.0
    assert unaligned.reward(p, "3 4 5 6 hope this helps") == pytest.approx(1 - 7 / 16)
    assert unaligned.reward(p, "") == 1.0
    assert unaligned.reward(p, " ".join(["x"] * 20)) == 0.0
    fn = SyntheticReward("aligned")
    assert fn([p, p], ["3 4 5 6", "3 4 5"]) == [1.0, 0.75]
    assert SyntheticReward("unaligned", max_words=8)([p], ["3 4"]) == [0.75]
    with pytest.raises(ValueError):
        fn([p], [])


@pytest.mark.parametrize("variant", ["aligned", "unaligned"])
def test_demonstrator_mode_is_suboptimal(variant: str) -> None:
    task = SyntheticTask(variant=variant)
    rng = random.Random(0)
    for p in all_prompts():
        draws = [task.demonstrate(p, rng) for _ in range(200)]
        assert max(set(draws), key=draws.count) == task.mode(p)
        assert task.reward(p, task.mode(p)) < task.reward(p, task.optimum(p)) == 1.0
        if variant == "unaligned":
            assert task.optimum(p) not in draws  # the optimum has low likelihood


def test_filler_and_early_stop_frequencies() -> None:
    task, rng, p = SyntheticTask(), random.Random(1), "repeat dog 4 times"
    draws = [task.demonstrate(p, rng) for _ in range(2000)]
    assert abs(sum(d.endswith(FILLER) for d in draws) / 2000 - 0.65) < 0.04
    assert abs(sum(d.split()[:4] != ["dog"] * 4 for d in draws) / 2000 - 0.2) < 0.03


def test_preference_labels_and_noise() -> None:
    task = SyntheticTask()
    clean = task.preference_rows("train", 500, label_noise=0.0)
    assert len(clean) == 500
    assert all(r["chosen_reward"] > r["rejected_reward"] and not r["label_flipped"] for r in clean)
    assert all(r["chosen_reward"] == task.reward(r["prompt"], r["chosen"]) for r in clean)
    noisy = task.preference_rows("train", 2000, label_noise=0.3)
    flipped = [r for r in noisy if r["label_flipped"]]
    assert abs(len(flipped) / 2000 - 0.3) < 0.04
    assert all(r["chosen_reward"] < r["rejected_reward"] for r in flipped)
    same_pairs = task.preference_rows("train", 500, label_noise=0.3)
    assert [{r["chosen"], r["rejected"]} for r in same_pairs] == [{r["chosen"], r["rejected"]} for r in clean]


# --- assets ------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_single_tokens(tokenizer) -> None:
    for prompt, target in all_prompts().items():
        for text in (prompt, f"{target} {FILLER}"):
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.decode(ids) == text
            assert len(ids) == len(text.split())  # every number and word is one token


def test_chat_template_exact(tokenizer) -> None:
    messages = [{"role": "user", "content": "count 3 to 6"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\ncount 3 to 6\n<|assistant|>\n"
    answer = [{"role": "assistant", "content": "3 4 5 6"}]
    full = tokenizer.apply_chat_template(messages + answer, tokenize=False)
    assert full == "<|user|>\ncount 3 to 6\n<|assistant|>\n3 4 5 6</s>\n"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(full)["input_ids"])
    assert tokens[:2] == ["<|user|>", "Ċ"] and tokens[-2:] == ["</s>", "Ċ"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.padding_side == "right"


def test_model_size_and_seeded_init(tokenizer) -> None:
    model = build_tiny_model(tokenizer)
    assert 1e6 <= sum(p.numel() for p in model.parameters()) <= 1e7
    state = torch.random.get_rng_state()
    again = build_tiny_model(tokenizer)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert model.config.tie_word_embeddings and model.config.eos_token_id == tokenizer.eos_token_id


def test_saved_assets_reload(assets: Path) -> None:
    tok = AutoTokenizer.from_pretrained(assets / "model")
    model = AutoModelForCausalLM.from_pretrained(assets / "model").eval()
    fresh_tok = train_tokenizer(tokenizer_corpus())
    original = build_tiny_model(fresh_tok)
    text = tok.apply_chat_template([{"role": "user", "content": "repeat owl 3 times"}], tokenize=False,
                                   add_generation_prompt=True)  # fmt: skip
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == fresh_tok(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)
    assert tok.model_max_length == model.config.max_position_embeddings == 128


def test_data_files(assets: Path) -> None:
    manifest = json.loads((assets / "manifest.json").read_text())
    for rel in manifest["files"]:
        assert (assets / rel).is_file()
    read = lambda rel: [json.loads(line) for line in (assets / rel).read_text().splitlines()]  # noqa: E731
    assert len(read("data/sft/train.jsonl")) == 64 and len(read("data/prefs/validation.jsonl")) == 16
    assert read("data/prefs/train.jsonl") == SyntheticTask().preference_rows("train", 64, 0.1)
    test_prompts = {r["prompt"] for r in read("data/prompts/test.jsonl")}
    assert test_prompts == set(SyntheticTask().prompts("test"))
    seen = read("data/sft/train.jsonl") + read("data/prefs/train.jsonl")
    assert not test_prompts & {r["prompt"] for r in seen}


def test_build_is_cached_and_repairs_corruption(tmp_path: Path) -> None:
    out = build_assets(tmp_path, task=SyntheticTask(), **SMALL)
    sft = out / "data/sft/train.jsonl"
    stamp = sft.stat().st_mtime_ns
    build_assets(tmp_path, task=SyntheticTask(), **SMALL)
    assert sft.stat().st_mtime_ns == stamp  # nothing rebuilt
    good = sft.read_bytes()
    sft.write_text("corrupted\n")
    os.utime(sft, ns=(stamp, stamp))
    build_assets(tmp_path, task=SyntheticTask(), **SMALL)
    assert sft.read_bytes() == good
    build_assets(tmp_path, task=SyntheticTask(seed=3), **SMALL)  # new parameters: rebuilt
    assert sft.read_bytes() != good
    assert json.loads((out / "manifest.json").read_text())["params"]["task"]["seed"] == 3
    assert not list(tmp_path.rglob("*.tmp"))
