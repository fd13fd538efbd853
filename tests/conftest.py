"""Shared fixtures: a small synthetic-task asset folder (tiny Llama + tokenizer + JSONL data), built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the Hugging Face Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A smaller model than the demo's, so module tests run in seconds.
TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """Synthetic assets: `model/` (HF layout), `data/{sft,prefs,prompts}/*.jsonl`."""
    from datamodules.synthetic import SyntheticTask, build_assets

    out = tmp_path_factory.mktemp("assets")
    build_assets(out, task=SyntheticTask(), n_sft=256, n_pref=256, n_val=64, model_kwargs=TINY_MODEL)
    return out


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the CLI (seconds to a minute)")
