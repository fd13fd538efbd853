"""`validate` and `predict` through the CLI on the shipped quickstart configs (localized to test assets)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from test_configs import REPO, write_localized

from datamodules.synthetic import SyntheticReward
from datamodules.tokenize import load_tokenizer
from lightning_modules.cli import main
from lightning_modules.models.generation import generate_responses


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning_modules"])


def test_validate_dpo_from_its_own_reference_gives_ln2(assets: Path, tmp_path: Path) -> None:
    """Before any update the policy equals its live reference: every pair's loss is ln 2, rewards 0."""
    config = write_localized(REPO / "configs/quickstart/dpo.yaml", assets, tmp_path)
    cli = main(["validate", "--config", str(config), "--trainer.logger=false",
                "--trainer.callbacks=[]", "--trainer.limit_val_batches=2"])
    metrics = cli.trainer.callback_metrics
    assert metrics["val/loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["val/rewards/margins"].item() == pytest.approx(0.0, abs=1e-6)
    assert metrics["val/rewards/accuracies"].item() == 0.0


def test_predict_writes_greedy_generations_with_rewards(assets: Path, tmp_path: Path) -> None:
    config = write_localized(REPO / "configs/quickstart/predict.yaml", assets, tmp_path)
    main(["predict", "--config", str(config), "--model.init_args.generation={max_new_tokens: 8}"])
    rows = [json.loads(line) for line in (tmp_path / "runs/demo/predict/version_0/predictions.jsonl").read_text().splitlines()]

    prompts = [json.loads(line)["prompt"] for line in (assets / "data/prompts/test.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": p}] for p in prompts]
    # the same greedy generations as calling the helper directly on the same weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets / "model")
    expected = generate_responses(model, load_tokenizer(str(assets / "model")), prompts, max_new_tokens=8)
    assert [r["response"] for r in rows] == expected
    assert [r["reward"] for r in rows] == SyntheticReward("aligned")(prompts, expected)
