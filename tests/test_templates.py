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
