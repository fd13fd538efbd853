"""Dataset schemas → one canonical row, so the rest of the code sees a single layout.

A canonical preference pair is

    {"prompt": [{"role": "system" | "user" | "assistant", "content": str}, ...],   # ends with a user turn
     "chosen": str, "rejected": str}                                               # final assistant replies

plus `ref_chosen_logps` / `ref_rejected_logps` (floats) for schemas that carry reference log-probs
(`refdpo`). A canonical prompt row is `{"prompt": [messages]}`.

Schemas (`SCHEMA_HINTS` says how `detect_schema` tells them apart):
- `pairs`: local JSONL / Parquet; `prompt` string or message list, `chosen` / `rejected` strings.
- `messages`: UltraFeedback, PKU-SafeRLHF-30K, TRL's conversational layout; `chosen` / `rejected`
  message lists ending with the reply, the prompt turns before it (or in a `prompt` column).
- `refdpo`: yale-nlp/RefDPO; as `messages`, plus `chosen_logprob` / `rejected_logprob`.
- `alpacafarm`: the Asap7772 relabelled AlpacaFarm sets; `y_w` / `y_l` hold
  `<|prompter|>{instruction}<|endoftext|><|assistant|>{response}[<|endoftext|>]`.
- `hh`: Anthropic/hh-rlhf; `chosen` / `rejected` are `\\n\\nHuman: ...\\n\\nAssistant: ...` transcripts.
- `prompts`: prompt files; a `prompt` string or message list (prompt rows only).

`normalize_pair` / `normalize_prompt` never raise on a bad row: they return one of
`BAD_ROW_REASONS`, which the data modules count in a `RowStats`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from datamodules.chat import ASSISTANT, ROLES, USER, Message, as_messages, message
from datamodules.templates import ALPACA_ASSISTANT, ALPACA_EOS, ALPACA_PROMPTER
from datamodules.utils.errors import UserInputError

SCHEMAS = ("pairs", "messages", "refdpo", "alpacafarm", "hh", "prompts")
REQUIRED_COLUMNS: dict[str, list[str]] = {
    "pairs": ["prompt", "chosen", "rejected"],
    "messages": ["chosen", "rejected"],
    "refdpo": ["chosen", "rejected", "chosen_logprob", "rejected_logprob"],
    "alpacafarm": ["y_w", "y_l"],
    "hh": ["chosen", "rejected"],
    "prompts": ["prompt"],
}
BAD_ROW_REASONS = (
    "missing_field",  # a needed field (or a message's content) is absent or None
    "not_a_string",  # a text field holds another type (a number; a non-list where messages are expected)
    "empty_response",  # a final response is empty after stripping whitespace
    "identical_responses",  # chosen == rejected: no preference to learn
    "wrong_roles",  # unknown role, no final assistant reply, prompt not ending with a user turn, missing marker
    "prompt_mismatch",  # chosen and rejected do not share the same prompt
    "nan_logprob",  # a reference log-prob that is NaN, infinite, None or not a number
)
# How `detect_schema` recognizes each schema (also the hint in its error message).
SCHEMA_HINTS = {
    "pairs": "`prompt` + `chosen`/`rejected` strings",
    "messages": "`chosen`/`rejected` message lists",
    "refdpo": "message lists + `chosen_logprob`/`rejected_logprob`",
    "alpacafarm": "`y_w`/`y_l` texts",
    "hh": "`chosen`/`rejected` transcripts starting with '\\n\\nHuman:'",
    "prompts": "a `prompt` column only",
}

HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": USER, "Assistant": ASSISTANT}

Messages = list[Message]
Side = tuple[Messages, str]  # (prompt turns found on this side, final response)


# ---- detection -----------------------------------------------------------------------------------
def detect_schema(columns: Sequence[str], first_row: Mapping[str, Any]) -> str:
    """The schema of a dataset, from its column names and first row; `UserInputError` if none fits."""
    columns = list(columns)
    chosen = first_row.get("chosen")
    schema = None
    if "y_w" in columns and "y_l" in columns:
        schema = "alpacafarm"
    elif "chosen_logprob" in columns:
        schema = "refdpo"
    elif "chosen" in columns:
        if isinstance(chosen, list):
            schema = "messages"
        elif isinstance(chosen, str) and "prompt" in columns:
            schema = "pairs"
        elif isinstance(chosen, str) and chosen.startswith("\n\nHuman:"):
            schema = "hh"
    elif "prompt" in columns and "y_w" not in columns:
        schema = "prompts"
    if schema is None:
        known = "; ".join(f"{name} ({hint})" for name, hint in SCHEMA_HINTS.items())
        raise UserInputError(f"cannot tell the dataset schema from columns {columns} (first row's `chosen` is "
                             f"{type(chosen).__name__}); known schemas: {known}. Set data.schema explicitly or "
                             f"convert the data to prompt/chosen/rejected columns.")
    missing = [c for c in REQUIRED_COLUMNS[schema] if c not in columns]
    if missing:
        raise UserInputError(f"columns {columns} look like schema {schema!r} but lack {missing}")
    return schema


# ---- per-schema extraction of one side (chosen or rejected) ------------------------------------------
def _field(row: Mapping[str, Any], key: str) -> str:
    """Reason for a bad text field, or "" when `row[key]` is a string."""
    value = row.get(key)
    return "missing_field" if value is None else ("" if isinstance(value, str) else "not_a_string")


def _messages(value: Any) -> Messages | str:
    """A clean copy of a message list (`role`/`content` only), or a bad-row reason."""
    if value is None:
        return "missing_field"
    if not isinstance(value, list):
        return "not_a_string"
    out = []
    for turn in value:
        if not isinstance(turn, Mapping) or turn.get("role") not in ROLES:
            return "wrong_roles"
        content = turn.get("content")
        if content is None:
            return "missing_field"
        if not isinstance(content, str):
            return "not_a_string"
        out.append(message(turn["role"], content))
    return out


def _pairs_side(row: Mapping[str, Any], key: str) -> Side | str:
    """`pairs`: the response is the column itself; the prompt is the `prompt` column."""
    reason = _field(row, key)
    prompt = reason or _prompt_column(row)
    return prompt if isinstance(prompt, str) else (prompt, row[key])


def _messages_side(row: Mapping[str, Any], key: str) -> Side | str:
    """`messages` / `refdpo`: a conversation ending with the assistant's reply."""
    messages = _messages(row.get(key))
    if isinstance(messages, str):
        return messages
    if not messages or messages[-1]["role"] != ASSISTANT:
        return "wrong_roles"
    return messages[:-1], messages[-1]["content"]


def _split_at_last(row: Mapping[str, Any], key: str, marker: str) -> tuple[str, str] | str:
    """`row[key]` cut at its last `marker` into (before, after), or a bad-row reason (no text, no marker)."""
    reason = _field(row, key)
    if reason:
        return reason
    prefix, found, response = row[key].rpartition(marker)
    return (prefix, response) if found else "wrong_roles"


def _alpacafarm_side(row: Mapping[str, Any], key: str) -> Side | str:
    """`alpacafarm`: `<|prompter|>{instruction}<|endoftext|><|assistant|>{response}[<|endoftext|>]`."""
    split = _split_at_last(row, key, ALPACA_ASSISTANT)
    if isinstance(split, str):
        return split
    prefix, response = split
    instruction = prefix.removeprefix(ALPACA_PROMPTER).removesuffix(ALPACA_EOS)
    return as_messages(instruction), response.removesuffix(ALPACA_EOS)


def _hh_side(row: Mapping[str, Any], key: str) -> Side | str:
    """`hh`: `\\n\\nHuman: ...\\n\\nAssistant: ...` transcript; the reply follows the last `Assistant:`."""
    split = _split_at_last(row, key, "\n\nAssistant:")
    if isinstance(split, str):
        return split
    prefix, response = split
    parts = HH_TURN.split(prefix)  # [text before the first turn, speaker, content, speaker, content, ...]
    if parts[0].strip():
        return "wrong_roles"
    prompt = [message(HH_ROLES[speaker], content.strip())
              for speaker, content in zip(parts[1::2], parts[2::2])]
    if any(turn["role"] == (USER if i % 2 else ASSISTANT) for i, turn in enumerate(prompt)):
        return "wrong_roles"  # turns must alternate, starting with the user
    return prompt, response.strip()


EXTRACTORS = {"pairs": _pairs_side, "messages": _messages_side, "refdpo": _messages_side,
              "alpacafarm": _alpacafarm_side, "hh": _hh_side}
SIDES = {"alpacafarm": ("y_w", "y_l")}  # (chosen, rejected) column names where they differ from these


def _sides(schema: str) -> tuple[str, str]:
    return SIDES.get(schema, ("chosen", "rejected"))


def _prompt_column(row: Mapping[str, Any]) -> Messages | str:
    """The `prompt` column as messages (a string is one user turn), or a bad-row reason."""
    prompt = row.get("prompt")
    return as_messages(prompt) if isinstance(prompt, str) else _messages(prompt)


def _finish_prompt(turns: Messages, row: Mapping[str, Any]) -> Messages | str:
    """Fall back on the `prompt` column when the side held no prompt turns; the prompt must end with a user turn."""
    if not turns and "prompt" in row:
        turns = _prompt_column(row)
        if isinstance(turns, str):
            return turns
    if not turns or turns[-1]["role"] != USER:
        return "wrong_roles"
    return turns


def _logprob(value: Any) -> float | None:
    """A finite float, or None for NaN / inf / None / non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _check_schema(schema: str) -> None:
    if schema == "prompts":
        raise UserInputError("schema 'prompts' holds prompts only; preference training needs chosen/rejected "
                             f"responses (schemas {[s for s in SCHEMAS if s != 'prompts']})")
    if schema not in EXTRACTORS:
        raise ValueError(f"unknown schema {schema!r}; known: {SCHEMAS}")


# ---- public normalizers -----------------------------------------------------------------------------
def normalize_pair(row: Mapping[str, Any], schema: str) -> dict[str, Any] | str:
    """One raw row of `schema` → a canonical preference pair, or the reason (in BAD_ROW_REASONS) it is bad."""
    _check_schema(schema)
    extract, (chosen_key, rejected_key) = EXTRACTORS[schema], _sides(schema)
    chosen = extract(row, chosen_key)
    if isinstance(chosen, str):
        return chosen
    rejected = extract(row, rejected_key)
    if isinstance(rejected, str):
        return rejected
    if chosen[0] != rejected[0]:
        return "prompt_mismatch"
    prompt = _finish_prompt(chosen[0], row)
    if isinstance(prompt, str):
        return prompt
    if not chosen[1].strip() or not rejected[1].strip():
        return "empty_response"
    if chosen[1] == rejected[1]:
        return "identical_responses"
    example: dict[str, Any] = {"prompt": prompt, "chosen": chosen[1], "rejected": rejected[1]}
    if schema == "refdpo":
        ref_chosen, ref_rejected = _logprob(row.get("chosen_logprob")), _logprob(row.get("rejected_logprob"))
        if ref_chosen is None or ref_rejected is None:
            return "nan_logprob"
        example["ref_chosen_logps"], example["ref_rejected_logps"] = ref_chosen, ref_rejected
    return example


def normalize_prompt(row: Mapping[str, Any], schema: str) -> dict[str, Any] | str:
    """One raw row → `{"prompt": messages}` (the chosen side's prompt for pair schemas), or a bad-row reason."""
    if schema in ("prompts", "pairs"):
        prompt = _prompt_column(row)
        prompt = prompt if isinstance(prompt, str) else _finish_prompt(prompt, row)
    else:
        _check_schema(schema)
        side = EXTRACTORS[schema](row, _sides(schema)[0])
        prompt = side if isinstance(side, str) else _finish_prompt(side[0], row)
    return prompt if isinstance(prompt, str) else {"prompt": prompt}


def normalize_rows(rows: Iterable[Mapping[str, Any]], schema: str, prompts_only: bool = False,
                   ) -> tuple[list[dict[str, Any]], RowStats]:
    """Normalize every row, keeping the good ones and counting the others by reason."""
    normalize = normalize_prompt if prompts_only else normalize_pair
    kept, stats = [], RowStats()
    for row in rows:
        example = normalize(row, schema)
        stats.add(example if isinstance(example, str) else None)
        if isinstance(example, dict):
            kept.append(example)
    return kept, stats


# ---- counting ------------------------------------------------------------------------------------------
@dataclass
class RowStats:
    """Rows kept, rows dropped by reason (any string: BAD_ROW_REASONS or a policy drop like `too_long`),
    and rows kept but truncated."""

    kept: int = 0
    by_reason: Counter = field(default_factory=Counter)
    truncated: int = 0

    def add(self, reason: str | None) -> None:
        """Count one row: kept when `reason` is None, else dropped for `reason`."""
        if reason is None:
            self.kept += 1
        else:
            self.by_reason[reason] += 1

    @property
    def dropped(self) -> int:
        return sum(self.by_reason.values())

    def as_dict(self) -> dict[str, Any]:
        """{"kept", "dropped": {reason: count} (BAD_ROW_REASONS order, then others), "dropped_total", "truncated"}."""
        order = [r for r in BAD_ROW_REASONS if r in self.by_reason]
        order += sorted(set(self.by_reason) - set(BAD_ROW_REASONS))
        return {"kept": self.kept, "dropped": {r: self.by_reason[r] for r in order},
                "dropped_total": self.dropped, "truncated": self.truncated}
