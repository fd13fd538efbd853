"""Chat messages: the three roles, and the one way a plain-string prompt becomes a message list.

A message is `{"role": role, "content": str}` with `role` one of `ROLES`. A prompt is the
conversation before the final answer (a message list ending with a user turn) or a plain string,
which stands for one user turn::

    as_messages("Hi")                                   -> [{"role": "user", "content": "Hi"}]
    as_messages([message(SYSTEM, "Be brief."), message(USER, "Hi")])   -> the same list, unchanged
"""

from __future__ import annotations

from typing import Literal

Role = Literal["system", "user", "assistant"]
SYSTEM: Role = "system"
USER: Role = "user"
ASSISTANT: Role = "assistant"
ROLES: tuple[Role, ...] = (SYSTEM, USER, ASSISTANT)

Message = dict[str, str]
Prompt = str | list[Message]


def message(role: Role, content: str) -> Message:
    """One chat message."""
    return {"role": role, "content": content}


def as_messages(prompt: Prompt) -> list[Message]:
    """A prompt given as a plain string is one user turn; a message list is returned as is."""
    return [message(USER, prompt)] if isinstance(prompt, str) else prompt
