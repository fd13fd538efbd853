"""The embedded default: a synthetic instruction task with a programmatic reward, plus local HF assets.

``task`` is pure Python (prompts, demonstrator, rewards, rows); ``assets`` trains the tokenizer,
builds the tiny Llama and writes everything in Hugging Face format (``python -m
datamodules.synthetic build --out DIR``). The ``assets`` names are imported lazily so that using
the task or its reward does not import torch or transformers.
"""
from importlib import import_module
from typing import Any

from datamodules.synthetic.task import (
    FILLER,
    SPLITS,
    VARIANTS,
    WORDS,
    SyntheticReward,
    SyntheticTask,
    aligned_reward,
    all_prompts,
    demonstrate,
    is_test_prompt,
    min_length_reward,
    target_of,
    task_reward,
)

_ASSETS = ("CHAT_TEMPLATE", "SPECIAL_TOKENS", "build_assets", "build_tiny_model", "chat_text",
           "tokenizer_corpus", "train_tokenizer")  # fmt: skip


def __getattr__(name: str) -> Any:
    """Resolve the ``assets`` names on first use (PEP 562)."""
    if name in _ASSETS:
        return getattr(import_module("datamodules.synthetic.assets"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FILLER", "SPLITS", "VARIANTS", "WORDS", "SyntheticReward", "SyntheticTask", "aligned_reward",
    "all_prompts", "demonstrate", "is_test_prompt", "min_length_reward", "target_of", "task_reward",
    *_ASSETS,
]  # fmt: skip
