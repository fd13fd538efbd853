"""Reward functions (`lightning_modules.rewards`): hand values, the mode estimate and its resume, the
synthetic wrapper, a tiny reward model against its unpadded forward, and building each from a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig,
                          LlamaForSequenceClassification, PreTrainedTokenizerFast)

from datamodules.synthetic import SyntheticReward
from datamodules.utils.errors import UserInputError
from lightning_modules.models.generation import RewardFn
from lightning_modules.rewards import (REWARDS, MaxLength, MinLength, ModeLength, RewardFunction, RewardModel,
                                       Synthetic)
from lightning_modules.rewards.length import length_mode
from lightning_modules.rewards.model import render_conversation


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whole words and punctuation as tokens: "a,b a" is 2 words, 4 tokens (a , b a), 5 characters."""
    tok = Tokenizer(models.WordLevel({"a": 0, "b": 1, ",": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


class FakeContext:
    """A `RewardContext` whose policy answers each prompt with fixed samples; counts `generate` calls."""

    def __init__(self, samples: dict[str, list[str]], tokenizer=None) -> None:
        self.samples, self.tokenizer, self.device = samples, tokenizer, torch.device("cpu")
        self.calls: list[tuple[list, int]] = []

    def prompts(self) -> list[str]:
        return list(self.samples)

    def generate(self, prompts, *, num_samples: int) -> list[list[str]]:
        self.calls.append((list(prompts), num_samples))
        return [self.samples[p][:num_samples] for p in prompts]


# ---- length rewards ----------------------------------------------------------------------------

RESPONSES = ["a,b a", "", "a b a b a b a b a b"]  # words 2/0/10, tokens 4/0/10, characters 5/0/19


@pytest.mark.parametrize("unit, expected_min, expected_max", [
    ("words", [1 - 2 / 8, 1.0, 0.0], [2 / 8, 0.0, 1.0]),
    ("tokens", [1 - 4 / 8, 1.0, 0.0], [4 / 8, 0.0, 1.0]),
    ("characters", [1 - 5 / 8, 1.0, 0.0], [5 / 8, 0.0, 1.0]),
])
def test_min_and_max_length_hand_values(unit, expected_min, expected_max):
    context = FakeContext({}, tokenizer=word_tokenizer())
    for cls, expected in ((MinLength, expected_min), (MaxLength, expected_max)):
        reward = cls(max_length=8, unit=unit)
        reward.setup(context)
        assert reward(["p"] * 3, RESPONSES) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("unit, expected", [
    ("words", [1 - 1 / 8, 1 - 3 / 8, 1 - 7 / 8]),  # |2-3|, |0-3|, |10-3|
    ("tokens", [1 - 1 / 8, 1 - 3 / 8, 1 - 7 / 8]),  # |4-3|, |0-3|, |10-3|
    ("characters", [1 - 2 / 8, 1 - 3 / 8, 0.0]),  # |5-3|, |0-3|, |19-3| = 16 > 8 -> 0
])
def test_mode_length_hand_values(unit, expected):
    reward = ModeLength(max_length=8, unit=unit, mode=3)
    reward.setup(FakeContext({}, tokenizer=word_tokenizer()))
    assert reward(["p"] * 3, RESPONSES) == pytest.approx(expected, abs=1e-12)


def test_tokens_without_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match="setup"):
        MinLength(unit="tokens")(["p"], ["a b"])


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        MaxLength()(["p", "q"], ["a"])


def test_bad_options_name_their_key():
    with pytest.raises(UserInputError, match="reward.init_args.max_length"):
        MinLength(max_length=0)
    with pytest.raises(UserInputError, match="reward.init_args.samples_per_prompt"):
        ModeLength(samples_per_prompt=0)


def test_length_mode_tie_goes_to_smallest():
    assert length_mode([3, 3, 1, 1, 2]) == 1
    assert length_mode([5, 2, 5]) == 5


def test_mode_length_estimates_the_mode_from_the_sft_policy():
    context = FakeContext({
        "p0": ["a b c", "a b c", "x y", "never sampled"],
        "p1": ["a b c", "x y", "z", "never sampled"],
        "p2": ["not among the first num_prompts"] * 4,
    })
    reward = ModeLength(max_length=4, num_prompts=2, samples_per_prompt=3)
    reward.setup(context)
    assert context.calls == [(["p0", "p1"], 3)]
    assert reward.mode == 3.0  # lengths 3, 3, 2, 3, 2, 1
    # n = 1, 3, 8: 1 - 2/4, 1, max(0, 1 - 5/4)
    assert reward(["p0"] * 3, ["a", "a b c", "a b c d e f g h"]) == [0.5, 1.0, 0.0]


def test_mode_length_tie_and_state_dict_round_trip():
    context = FakeContext({"p0": ["a b c", "a"], "p1": ["a b c", "a"]})  # lengths 3, 1, 3, 1: tie -> 1
    reward = ModeLength(max_length=4, samples_per_prompt=2)
    reward.setup(context)
    assert reward.mode == 1.0 and len(context.calls) == 1
    state = reward.state_dict()
    assert state == {"mode": 1.0, "unit": "words"}

    resumed = ModeLength(max_length=4, samples_per_prompt=2)
    resumed.load_state_dict(state)
    resumed.setup(context)  # the mode is known: no sampling again
    assert len(context.calls) == 1
    responses = ["", "a b", "a b c d e f"]
    assert resumed(["p"] * 3, responses) == reward(["p"] * 3, responses) == [0.75, 0.75, 0.0]


def test_mode_length_before_setup_names_mode():
    with pytest.raises(RuntimeError, match="mode"):
        ModeLength()(["p"], ["a"])


def test_mode_length_refuses_a_checkpoint_in_another_unit():
    with pytest.raises(UserInputError, match="unit"):
        ModeLength(unit="tokens").load_state_dict({"mode": 3.0, "unit": "words"})


# ---- synthetic -----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["aligned", "unaligned"])
def test_synthetic_equals_the_task_reward(variant):
    prompts = ["count 3 to 6", [{"role": "user", "content": "repeat cat 2 times"}], "count 0 to 2"]
    responses = ["3 4 5 6 hope this helps", "cat cat", "0 1"]
    expected = SyntheticReward(variant, max_words=8)(prompts, responses)
    assert Synthetic(variant, max_words=8)(prompts, responses) == expected
    if variant == "aligned":
        assert expected == [4 / 7, 1.0, 2 / 3]
    else:
        assert expected == [1 - 7 / 8, 1 - 2 / 8, 1 - 2 / 8]


def test_a_reward_function_is_a_reward_fn():
    reward: RewardFn = MinLength(max_length=2)
    assert list(reward(["p"], ["a"])) == [0.5]
    assert repr(ModeLength(mode=2.0)) == \
        "ModeLength(max_length=256, unit='words', mode=2.0, num_prompts=64, samples_per_prompt=4)"


# ---- reward model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["pad", "no_pad"])
def classifier(request, assets, tmp_path_factory) -> Path:
    """A tiny random Llama classifier (2 logits) with the assets tokenizer; `no_pad`: neither has a pad token."""
    folder = tmp_path_factory.mktemp(f"rm_{request.param}")
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    if request.param == "no_pad":
        tokenizer.pad_token = None
    pad_id = tokenizer.pad_token_id if request.param == "pad" else None
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=2, pad_token_id=pad_id,
                         initializer_range=1.0)  # logits of order 1, so 1e-5 agreement means something
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PROMPTS = ["count 3 to 6",
           [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "repeat cat 2 times"}],
           "count 0 to 2", "count 1 to 4"]
ANSWERS = ["3 4 5 6 hope this helps", "cat", "0 1 2", "1 2 3 4 and then some more words to pad the others"]


def manual_rewards(folder: Path, texts: list[str], max_length: int = 10_000) -> torch.Tensor:
    """One unpadded forward per text (no special tokens: the assets tokenizer adds none) → (N, 2) logits."""
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        return torch.cat([model(input_ids=torch.tensor([tokenizer(t)["input_ids"][-max_length:]])).logits
                          for t in texts])


def test_render_conversation_hand_values(assets):
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    assert render_conversation("Hi", "Hello", "auto", tokenizer) == "<|user|>\nHi\n<|assistant|>\nHello</s>\n"
    assert render_conversation("Hi", "Hello", "auto", None) == "Hi\n\nHello"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert render_conversation(messages, "Hello", "plain", tokenizer) == "Be brief.\n\nHi\n\nHello"
    assert render_conversation("Hi", "Hello", "zephyr", None) == "<|user|>\nHi\n<|assistant|>\nHello</s>"
    assert render_conversation("Hi", "Hello", "alpacafarm", None) == \
        "<|prompter|>Hi<|endoftext|><|assistant|>Hello<|endoftext|>"
    with pytest.raises(UserInputError, match="reward.init_args.template"):
        render_conversation("Hi", "Hello", "chatml", tokenizer)


@pytest.mark.parametrize("label_index", [0, 1])
def test_reward_model_equals_unpadded_forward(classifier, label_index):
    texts = [render_conversation(p, r, "auto", AutoTokenizer.from_pretrained(classifier))
             for p, r in zip(PROMPTS, ANSWERS)]
    expected = manual_rewards(classifier, texts)[:, label_index].tolist()
    reward = RewardModel(str(classifier), label_index=label_index, batch_size=3)
    reward.setup(FakeContext({}))
    scores = reward(PROMPTS, ANSWERS)
    assert scores == pytest.approx(expected, abs=1e-5)
    assert RewardModel(str(classifier), label_index=label_index, batch_size=1)(PROMPTS, ANSWERS) == \
        pytest.approx(scores, abs=1e-5)
    assert len({round(s, 4) for s in scores}) == len(scores)  # different responses, different rewards
    if "no_pad" in classifier.name:  # EOS pads, and the config learned it
        assert reward.model.config.pad_token_id == reward.tokenizer.eos_token_id


def test_reward_model_keeps_the_last_max_length_tokens(classifier):
    texts = [render_conversation(p, r, "auto", AutoTokenizer.from_pretrained(classifier))
             for p, r in zip(PROMPTS, ANSWERS)]
    expected = manual_rewards(classifier, texts, max_length=6)[:, 0].tolist()
    assert RewardModel(str(classifier), max_length=6, batch_size=4)(PROMPTS, ANSWERS) == \
        pytest.approx(expected, abs=1e-5)


def test_reward_model_label_index_out_of_range(classifier):
    with pytest.raises(UserInputError, match="reward.init_args.label_index=2"):
        RewardModel(str(classifier), label_index=2)(["p"], ["r"])


def test_reward_model_missing_folder_names_the_key(tmp_path):
    reward = RewardModel(str(tmp_path / "no-such-rm"))  # builds: nothing loads yet
    with pytest.raises(UserInputError, match=r"reward\.init_args\.name_or_path=.*no such folder"):
        reward.setup(FakeContext({}))


def test_reward_model_refuses_a_causal_lm(assets):
    with pytest.raises(UserInputError, match="LlamaForCausalLM"):
        RewardModel(str(assets / "model"))(["p"], ["r"])


# ---- configs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, init_args", [
    ("MinLength", {"max_length": 64, "unit": "characters"}),
    ("MaxLength", {"max_length": 32}),
    ("ModeLength", {"mode": 12, "unit": "tokens", "num_prompts": 8}),
    ("Synthetic", {"variant": "unaligned", "max_words": 10}),
    ("RewardModel", {"name_or_path": "runs/rm", "label_index": 1, "dtype": "bfloat16"}),
])
def test_every_reward_builds_from_a_class_path_config(name, init_args):
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=RewardFunction)
    config = parser.parse_string(f"reward: {{class_path: lightning_modules.rewards.{name}, init_args: {init_args}}}")
    reward = parser.instantiate(config).reward
    assert type(reward).__name__ == name and REWARDS[reward.name] is type(reward)
    options = reward.options()
    assert {k: options[k] for k in init_args} == init_args


def test_a_misspelt_option_fails_in_the_parser():
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=RewardFunction)
    with pytest.raises(Exception, match="unit"):
        parser.parse_string("reward: {class_path: lightning_modules.rewards.MinLength, init_args: {unit: bytes}}")
