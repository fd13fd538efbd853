"""Prompt templates: exact rendered strings (written out by hand), `auto` resolution, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamodules.chat import as_messages
from datamodules.templates import TEMPLATES, render_prompt, response_eos
from datamodules.utils.errors import UserInputError

ONE_TURN = [{"role": "user", "content": "Hi"}]
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
]


@pytest.fixture(scope="module")
def tok(assets: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets / "model")


@pytest.fixture
def no_template_tok(assets: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    tokenizer.chat_template = None
    return tokenizer


def test_templates_tuple() -> None:
    assert TEMPLATES == ("auto", "tokenizer", "zephyr", "alpacafarm", "plain")


@pytest.mark.parametrize(
    ("template", "insert_eos", "messages", "expected"),
    [
        ("zephyr", False, ONE_TURN, "<|user|>\nHi\n<|assistant|>\n"),
        ("zephyr", True, ONE_TURN, "<|user|>\nHi</s>\n<|assistant|>\n"),
        ("zephyr", False, TWO_TURNS,
         "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\nName a colour.\n<|assistant|>\n"),
        ("zephyr", True, TWO_TURNS,
         "<|system|>\nBe brief.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello!</s>\n"
         "<|user|>\nName a colour.</s>\n<|assistant|>\n"),
        ("alpacafarm", False, ONE_TURN, "<|prompter|>Hi<|endoftext|><|assistant|>"),
        ("alpacafarm", False, TWO_TURNS,
         "<|prompter|>Be brief.\n\nHi<|endoftext|><|assistant|>Hello!<|endoftext|>"
         "<|prompter|>Name a colour.<|endoftext|><|assistant|>"),
        ("alpacafarm", True, ONE_TURN, "<|prompter|>Hi<|endoftext|><|assistant|>"),  # insert_eos: zephyr only
        ("plain", False, ONE_TURN, "Hi\n"),
        ("plain", False, TWO_TURNS, "Be brief.\n\nHi\n\nHello!\n\nName a colour.\n"),
        ("plain", True, TWO_TURNS, "Be brief.\n\nHi\n\nHello!\n\nName a colour.\n"),
    ],
)
def test_exact_rendering_without_tokenizer(template, insert_eos, messages, expected) -> None:
    assert render_prompt(messages, template=template, insert_eos=insert_eos) == expected


def test_zephyr_uses_the_tokenizers_eos(tok) -> None:
    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.eos_token = "<|user|>"  # any token of the vocabulary: it must appear where the eos goes
    assert render_prompt(ONE_TURN, template="zephyr", tokenizer=tok, insert_eos=True) == (
        "<|user|>\nHi<|user|>\n<|assistant|>\n"
    )


def test_tokenizer_template_is_the_chat_template(tok) -> None:
    assert render_prompt(ONE_TURN, template="tokenizer", tokenizer=tok) == "<|user|>\nHi\n<|assistant|>\n"
    assert render_prompt(TWO_TURNS, template="tokenizer", tokenizer=tok) == (
        "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!</s>\n<|user|>\nName a colour.\n<|assistant|>\n"
    )


def test_auto_picks_the_tokenizers_template(tok) -> None:
    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.chat_template = (  # unlike zephyr, so the two cannot be confused
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }};{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    assert render_prompt(TWO_TURNS[:2], template="auto", tokenizer=tok) == "[system] Be brief.;[user] Hi;[assistant] "


def test_auto_falls_back_to_zephyr(no_template_tok) -> None:
    assert render_prompt(TWO_TURNS, template="auto", tokenizer=no_template_tok) == render_prompt(
        TWO_TURNS, template="zephyr"
    )
    assert render_prompt(ONE_TURN) == "<|user|>\nHi\n<|assistant|>\n"  # no tokenizer at all
    assert render_prompt(ONE_TURN, tokenizer=no_template_tok, insert_eos=True) == "<|user|>\nHi</s>\n<|assistant|>\n"


def test_tokenizer_template_without_chat_template_is_a_user_error(no_template_tok) -> None:
    for tokenizer in (no_template_tok, None):
        with pytest.raises(UserInputError, match=r"data\.template.*zephyr.*plain"):
            render_prompt(ONE_TURN, template="tokenizer", tokenizer=tokenizer)


def test_unknown_template_is_a_user_error() -> None:
    with pytest.raises(UserInputError, match=r"data\.template='chatml'.*'zephyr', 'alpacafarm', 'plain'"):
        render_prompt(ONE_TURN, template="chatml")
    with pytest.raises(UserInputError, match=r"data\.template"):
        response_eos("chatml", None)


def test_malformed_messages_are_user_errors() -> None:
    with pytest.raises(UserInputError, match="empty"):
        render_prompt([], template="plain")
    with pytest.raises(UserInputError, match="role"):
        render_prompt([{"role": "human", "content": "Hi"}], template="zephyr")


def test_response_eos(tok) -> None:
    for template in ("auto", "tokenizer", "zephyr", "plain"):
        assert response_eos(template, tok) == "</s>"
    assert response_eos("alpacafarm", tok) == "</s>"  # the synthetic vocabulary has no <|endoftext|>
    alpaca_tok = type(tok).from_pretrained(tok.name_or_path)
    alpaca_tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
    assert response_eos("alpacafarm", alpaca_tok) == "<|endoftext|>"
    assert response_eos("zephyr", None) == "</s>"
    assert response_eos("alpacafarm", None) == "<|endoftext|>"


@pytest.mark.parametrize("template", TEMPLATES[2:])
def test_a_string_prompt_is_one_user_turn(template) -> None:
    assert render_prompt("Hi", template=template) == render_prompt(ONE_TURN, template=template)
    assert as_messages("Hi") == ONE_TURN and as_messages(TWO_TURNS) is TWO_TURNS


# ---- chat templates that write BOS themselves (Llama-3-Instruct, Mistral-Instruct, Gemma) ---------------------
@pytest.fixture(scope="module")
def bos_tok(assets: Path, tmp_path_factory):
    """The tiny tokenizer made to add BOS itself (add_special_tokens=True), with a chat template that also writes
    `{{ bos_token }}`; saved and reloaded like a hub tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    tokenizer.add_bos_token = True
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    folder = tmp_path_factory.mktemp("bos_tokenizer")
    tokenizer.save_pretrained(folder)
    reloaded = AutoTokenizer.from_pretrained(folder)
    assert reloaded("Hi")["input_ids"][0] == reloaded.bos_token_id  # the tokenizer adds BOS on its own
    return reloaded


def chat_template_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.mark.parametrize("template", ["tokenizer", "auto"])
@pytest.mark.parametrize("messages", [ONE_TURN, TWO_TURNS], ids=["one_turn", "two_turns"])
def test_a_template_that_writes_bos_gets_one_bos(bos_tok, template, messages) -> None:
    """Before: `[BOS, BOS, ...]` (the template's BOS, then the tokenizer's own)."""
    from datamodules.tokenize import encode_prompt

    ids = encode_prompt(bos_tok, messages, template)
    assert ids == chat_template_ids(bos_tok, messages)
    assert ids[0] == bos_tok.bos_token_id and ids.count(bos_tok.bos_token_id) == 1


def test_zephyr_still_gets_the_tokenizers_bos(bos_tok) -> None:
    from datamodules.tokenize import encode_prompt

    text = render_prompt(TWO_TURNS, template="zephyr", tokenizer=bos_tok)
    assert encode_prompt(bos_tok, TWO_TURNS, "zephyr") == [bos_tok.bos_token_id] + bos_tok(
        text, add_special_tokens=False)["input_ids"]


def test_preference_rows_have_one_bos(bos_tok, assets: Path) -> None:
    from datamodules import PreferenceDataModule

    dm = PreferenceDataModule(str(assets / "data/prefs"), bos_tok.name_or_path, template="tokenizer",
                              val_split=None, max_length=64)
    dm.setup("fit")
    for item in dm.data["train"][:16]:
        for side in ("chosen", "rejected"):
            assert item[f"{side}_input_ids"].count(bos_tok.bos_token_id) == 1


class RecordingModel:
    """Stands in for a causal LM in `generate_responses`: records the prompt ids, answers with EOS."""

    training = False
    device = "cpu"

    def __init__(self, eos_id: int):
        self.eos_id, self.inputs = eos_id, []

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, **kwargs):
        import torch

        self.inputs.append((input_ids, attention_mask))
        return torch.cat([input_ids, torch.full((input_ids.shape[0], 1), self.eos_id)], dim=1)


def test_generation_prompts_have_one_bos(bos_tok) -> None:
    """Before: generation tokenized the rendered prompts with special tokens on: two BOS per prompt."""
    from lightning_modules.models.generation import generate_responses

    model = RecordingModel(bos_tok.eos_token_id)
    prompts = [ONE_TURN, TWO_TURNS]
    generate_responses(model, bos_tok, prompts, template="tokenizer", max_new_tokens=1)
    (input_ids, attention_mask), = model.inputs
    for row, mask, messages in zip(input_ids.tolist(), attention_mask.tolist(), prompts):
        assert [t for t, m in zip(row, mask) if m] == chat_template_ids(bos_tok, messages)
    zephyr = RecordingModel(bos_tok.eos_token_id)  # a template without BOS still gets the tokenizer's
    generate_responses(zephyr, bos_tok, prompts, template="zephyr", max_new_tokens=1)
    (input_ids, attention_mask), = zephyr.inputs
    for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        kept = [t for t, m in zip(row, mask) if m]
        assert kept[0] == bos_tok.bos_token_id and kept.count(bos_tok.bos_token_id) == 1
