"""Prompt templates: a message list → the exact text that precedes the response tokens.

A prompt is the conversation before the final answer, `[{"role": "system"|"user"|"assistant",
"content": str}, ...]`, ending with a user turn, or a plain string (one user turn; see
`datamodules.chat`). `render_prompt` returns it rendered in one of `TEMPLATES`, generation prompt
included; `response_eos` gives the marker written after the response.

Worked example: the 2-turn conversation

    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."}]

with eos = `</s>` renders as (Python string literals):

    zephyr      "<|system|>\\nBe brief.\\n<|user|>\\nHi\\n<|assistant|>\\nHello!</s>\\n"
                "<|user|>\\nName a colour.\\n<|assistant|>\\n"
    zephyr, insert_eos=True
                "<|system|>\\nBe brief.</s>\\n<|user|>\\nHi</s>\\n<|assistant|>\\nHello!</s>\\n"
                "<|user|>\\nName a colour.</s>\\n<|assistant|>\\n"
    alpacafarm  "<|prompter|>Be brief.\\n\\nHi<|endoftext|><|assistant|>Hello!<|endoftext|>"
                "<|prompter|>Name a colour.<|endoftext|><|assistant|>"
    plain       "Be brief.\\n\\nHi\\n\\nHello!\\n\\nName a colour.\\n"
    tokenizer   whatever `tokenizer.apply_chat_template(messages, tokenize=False,
                add_generation_prompt=True)` returns (for the synthetic assets' Zephyr-like
                template: the `zephyr` text above)
    auto        `tokenizer` when the tokenizer has a chat template, else `zephyr`

A single user turn "Hi" gives `"<|user|>\\nHi\\n<|assistant|>\\n"` (zephyr),
`"<|prompter|>Hi<|endoftext|><|assistant|>"` (alpacafarm) and `"Hi\\n"` (plain).
`zephyr` is the Zephyr / Tulu format RefDPO trains with (SPEC §7, including its `insert_eos`);
`alpacafarm` is the prompt format of the relabelled AlpacaFarm sets (SPEC §5); `plain` is for base
models without role markers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datamodules.chat import ASSISTANT, ROLES, SYSTEM, USER, Prompt, as_messages
from datamodules.utils.errors import UserInputError

TEMPLATES = ("auto", "tokenizer", "zephyr", "alpacafarm", "plain")
DEFAULT_EOS = "</s>"  # zephyr's end-of-turn marker when no tokenizer is given
ALPACA_PROMPTER, ALPACA_ASSISTANT, ALPACA_EOS = "<|prompter|>", "<|assistant|>", "<|endoftext|>"  # AlpacaFarm's markers
BLANK_LINE = "\n\n"

Messages = Sequence[dict[str, str]]


def _check_template(template: str) -> None:
    if template not in TEMPLATES:
        raise UserInputError(f"data.template={template!r} is not a known prompt template; use one of {list(TEMPLATES)}")


def _check_messages(messages: Messages) -> None:
    if not messages:
        raise UserInputError("prompt is an empty message list; it needs at least one user turn")
    for message in messages:
        if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise UserInputError(f"prompt message {message!r}: expected {{'role': one of {list(ROLES)}, "
                                 f"'content': str}}")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether `tokenizer` carries a chat template of its own."""
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def resolve_template(template: str, tokenizer: Any = None) -> str:
    """`auto` → `tokenizer` when the tokenizer has a chat template, else `zephyr`; others unchanged."""
    _check_template(template)
    if template == "auto":
        return "tokenizer" if has_chat_template(tokenizer) else "zephyr"
    return template


def _eos(tokenizer: Any) -> str:
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    return eos if eos is not None else DEFAULT_EOS


def zephyr_marker(role: str) -> str:
    """The Zephyr turn marker of a role: `<|user|>` (also a special token of the synthetic tokenizer)."""
    return f"<|{role}|>"


def render_zephyr(messages: Messages, eos: str = DEFAULT_EOS, insert_eos: bool = False) -> str:
    """`<|role|>\\n{content}` + `{eos}\\n` (assistant; all turns with insert_eos) or `\\n`, then `<|assistant|>\\n`."""
    text = ""
    for m in messages:
        end = eos if insert_eos or m["role"] == ASSISTANT else ""
        text += f"{zephyr_marker(m['role'])}\n{m['content']}{end}\n"
    return text + f"{zephyr_marker(ASSISTANT)}\n"


def render_alpacafarm(messages: Messages) -> str:
    """`<|prompter|>{user}<|endoftext|><|assistant|>` per user turn, `{assistant}<|endoftext|>` per answer.

    System text is prepended to the next user turn's content, followed by a blank line.
    """
    parts, system = [], []
    for m in messages:
        if m["role"] == SYSTEM:
            system.append(m["content"])
        elif m["role"] == USER:
            content = BLANK_LINE.join([*system, m["content"]])
            system = []
            parts.append(f"{ALPACA_PROMPTER}{content}{ALPACA_EOS}{ALPACA_ASSISTANT}")
        else:
            parts.append(f"{m['content']}{ALPACA_EOS}")
    if system:  # a system message with no user turn after it becomes a prompter turn of its own
        parts.append(f"{ALPACA_PROMPTER}{BLANK_LINE.join(system)}{ALPACA_EOS}{ALPACA_ASSISTANT}")
    return "".join(parts)


def render_plain(messages: Messages) -> str:
    """Contents joined by blank lines, plus a final newline: no role markers (base models)."""
    return BLANK_LINE.join(m["content"] for m in messages) + "\n"


def render_prompt(prompt: Prompt | Messages, *, template: str = "auto", tokenizer: Any = None,
                  insert_eos: bool = False) -> str:
    """The text before the response tokens (generation prompt included) for `prompt` in `template`.

    Args:
        prompt: the conversation before the final answer, ending with a user turn; a plain
            string is one user turn (`render_prompt("Hi")` == `"<|user|>\\nHi\\n<|assistant|>\\n"`).
        template: one of TEMPLATES (see the module docstring for each one's exact output).
        tokenizer: needed for `tokenizer` (its chat template); gives zephyr's eos (default `</s>`).
        insert_eos: zephyr only: also close system and user turns with eos (RefDPO's option).
    """
    resolved = resolve_template(template, tokenizer)
    messages = as_messages(prompt)
    _check_messages(messages)
    if resolved == "tokenizer":
        if not has_chat_template(tokenizer):
            raise UserInputError("data.template='tokenizer' but the tokenizer has no chat template; "
                                 "set data.template to 'zephyr' (chat models) or 'plain' (base models)")
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    if resolved == "zephyr":
        return render_zephyr(messages, _eos(tokenizer), insert_eos)
    if resolved == "alpacafarm":
        return render_alpacafarm(messages)
    return render_plain(messages)


def response_eos(template: str, tokenizer: Any = None) -> str | None:
    """The marker appended after the response tokens under `template` (None: the tokenizer has no EOS).

    `tokenizer.eos_token` for tokenizer / auto / zephyr / plain; for alpacafarm `<|endoftext|>` when
    the tokenizer's vocabulary has it, else its eos. Without a tokenizer: `</s>`, or `<|endoftext|>`
    for alpacafarm.
    """
    _check_template(template)
    if tokenizer is None:
        return ALPACA_EOS if template == "alpacafarm" else DEFAULT_EOS
    if template == "alpacafarm" and ALPACA_EOS in tokenizer.get_vocab():
        return ALPACA_EOS
    return tokenizer.eos_token
