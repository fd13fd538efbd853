"""Loading Hugging Face causal LMs: a hub id and a local folder take the same `from_pretrained` path."""

from __future__ import annotations

from typing import Literal

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

Dtype = Literal["float32", "bfloat16", "float16"]


def load_causal_lm(name_or_path: str, *, dtype: Dtype = "float32", **kwargs) -> PreTrainedModel:
    """Load a causal LM from a hub id or a local folder in HF layout (`kwargs` go to `from_pretrained`)."""
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype), **kwargs)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    return model
