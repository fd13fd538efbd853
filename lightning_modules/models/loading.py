"""Loading Hugging Face causal LMs: a hub id and a local folder take the same `from_pretrained` path.

What cannot be loaded is a one-paragraph `UserInputError` naming the config key: a missing folder, an
uncached hub id offline or with the Hub unreachable (`datamodules.tokenize.check_pretrained_source`),
a folder without a model, or a truncated / damaged `*.safetensors` file (named, with "re-export").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled

from datamodules.tokenize import check_pretrained_source
from datamodules.utils.errors import UserInputError

Dtype = Literal["float32", "bfloat16", "float16"]


def load_causal_lm(name_or_path: str, *, dtype: Dtype = "float32", key: str = "model.model_name_or_path",
                   **kwargs) -> PreTrainedModel:
    """Load a causal LM from a hub id or a local folder in HF layout (`kwargs` go to `from_pretrained`).

    `key` is the config key that names `name_or_path` in error messages. Inside DeepSpeed's ZeRO-3 init
    context (Lightning's `configure_model` under ZeRO-3) the weights load straight into their partitions,
    which needs a live `HfDeepSpeedConfig` (`models.zero.hf_zero3_config`); without one this fails here,
    before transformers would initialize weights through empty placeholders.
    """
    check_pretrained_source(name_or_path, key)
    if zero_init_active() and not is_deepspeed_zero3_enabled():
        raise RuntimeError(f"loading {name_or_path!r} inside DeepSpeed's ZeRO-3 init context needs a live "
                           "transformers HfDeepSpeedConfig (lightning_modules.models.zero.hf_zero3_config), kept "
                           "alive while the model is used; PolicyModule.configure_model creates one")
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=getattr(torch, dtype), **kwargs)
    except SafetensorError as error:
        raise UserInputError(damaged_weights_message(name_or_path, key, error)) from error
    except OSError as error:  # a folder without config.json / weights, a hub id that does not exist or is gated
        raise UserInputError(f"{key}={name_or_path!r}: cannot load a model: {' '.join(str(error).split())}") from error
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    return model


def zero_init_active() -> bool:
    """True inside `deepspeed.zero.Init` while it partitions new parameters (not while `zero.outside_zero3`
    suspends it); never imports DeepSpeed."""
    module = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if module is None or getattr(module, "zero_init_context", 0) <= 0:
        return False
    return bool(getattr(getattr(module, "top_level_context", None), "patched", True))


def damaged_safetensors(folder: Path) -> list[Path]:
    """The `*.safetensors` files of `folder` whose size disagrees with their header (truncated, or not safetensors).

    Reads only each file's header (8-byte length + JSON), never the tensors.
    """
    damaged = []
    for file in sorted(folder.glob("*.safetensors")):
        size = file.stat().st_size
        try:
            with open(file, "rb") as stream:
                length = int.from_bytes(stream.read(8), "little")
                if size < 8 or 8 + length > size:
                    damaged.append(file)
                    continue
                header = json.loads(stream.read(length))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
            if 8 + length + end != size:
                damaged.append(file)
        except (ValueError, KeyError, TypeError, IndexError):
            damaged.append(file)
    return damaged


def check_local_weights(name_or_path: str, key: str) -> None:
    """A `UserInputError` naming each truncated `*.safetensors` file of a local model folder (headers read only)."""
    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and damaged_safetensors(folder):
        raise UserInputError(damaged_weights_message(name_or_path, key))


def damaged_weights_message(name_or_path: str, key: str, error: Exception | None = None) -> str:
    folder = Path(name_or_path).expanduser()
    files = damaged_safetensors(folder) if folder.is_dir() else []
    what = ", ".join(str(f) for f in files) if files else f"a weights file of {name_or_path}"
    fix = ("re-export the model (rerun the step that wrote this folder, e.g. its training run's ExportPretrained) "
           "or copy it again" if folder.is_dir() else
           f"delete its cached copy (`hf cache rm model/{name_or_path}`) and download it again")
    detail = f" ({error})" if error is not None else " (its size disagrees with its header)"
    return f"{key}={name_or_path!r}: {what} is truncated or damaged{detail}; {fix}"
