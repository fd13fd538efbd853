"""Runs never overwrite each other: each CLI run claims `<default_root_dir>/version_N`, `latest` points at it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from lightning_modules.cli import main
from lightning_modules.runtime.run_dir import claim_version_dir, point_latest, resolve_in_run_dir
from test_export import tiny_sft_config

FAST = ["--trainer.max_steps=2", "--trainer.limit_train_batches=2", "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=4",
        "--data.init_args.eval_batch_size=4"]


def run_cli(args: list[str], monkeypatch) -> object:
    monkeypatch.setattr(sys, "argv", ["lightning_modules"])
    monkeypatch.delenv("PREFOPT_RUN_DIR", raising=False)
    return main(args)


def test_claiming_skips_taken_versions_and_latest_moves(tmp_path: Path) -> None:
    (tmp_path / "version_4").mkdir(parents=True)
    (tmp_path / "version_x").mkdir()  # not a version: ignored
    first, second = claim_version_dir(tmp_path), claim_version_dir(tmp_path)
    assert (first.name, second.name) == ("version_5", "version_6")
    point_latest(first)
    point_latest(second)
    assert (tmp_path / "latest").resolve() == second.resolve() and os.readlink(tmp_path / "latest") == "version_6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "version_4", "version_5", "version_6", "version_x"]


def test_relative_outputs_land_in_the_run_directory(tmp_path: Path) -> None:
    class Logger:
        log_dir = str(tmp_path / "job/version_2")

    class Trainer:
        logger = Logger()

    assert resolve_in_run_dir("export", Trainer()) == tmp_path / "job/version_2/export"
    assert resolve_in_run_dir(tmp_path / "abs.json", Trainer()) == tmp_path / "abs.json"


@pytest.mark.slow
def test_a_second_fit_and_a_validate_leave_the_first_run_intact(assets: Path, tmp_path: Path, monkeypatch) -> None:
    config = str(tiny_sft_config(assets, tmp_path))
    job = tmp_path / "runs/demo/sft"
    run_cli(["fit", "--config", config, *FAST], monkeypatch)
    first = job / "version_0"
    files = {p: p.read_bytes() for p in first.rglob("*") if p.is_file() and "events" not in p.name}
    assert {"config.yaml", "metrics.json"} <= {p.name for p in files} and (first / "export/model.safetensors").exists()
    assert (first / "checkpoints/last.ckpt").exists()
    assert (job / "latest").resolve() == first.resolve()
    hparams = yaml.safe_load((first / "hparams.yaml").read_text())  # the real, resolved hyperparameters
    assert hparams["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 3e-3
    assert hparams["trainer"]["max_steps"] == 2 and hparams["data"]["init_args"]["batch_size"] == 4

    run_cli(["fit", "--config", config, *FAST, "--trainer.max_steps=1"], monkeypatch)
    second = job / "version_1"
    assert (job / "latest").resolve() == second.resolve()
    assert json.loads((second / "metrics.json").read_text())["step"] == 1
    assert yaml.safe_load((second / "config.yaml").read_text())["trainer"]["max_steps"] == 1
    assert (second / "checkpoints/last.ckpt").exists() and not list(second.glob("checkpoints/last-v*.ckpt"))

    run_cli(["validate", "--config", config, *FAST], monkeypatch)
    assert (job / "version_2/config.yaml").exists()  # validate has its own run directory ...
    assert (job / "latest").resolve() == second.resolve()  # ... and `latest` still names the newest trained policy
    for path, content in files.items():  # nothing of the first run was rewritten
        assert path.read_bytes() == content, path
    assert json.loads((first / "metrics.json").read_text())["step"] == 2
