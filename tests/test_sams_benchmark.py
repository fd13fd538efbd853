"""`make sams-bench` (lightning_modules/studies/sams_benchmark.py) and SamS's full-scale configs (configs/sams/).

The benchmark is not a timed test: the smoke run checks that every configuration is measured and reported, not
how fast SamS is. The scheduler's parameter count for a 7B Llama shape is checked against the networks' formula
(`lightning_modules/sams/networks.py`) written out by hand. The full-scale configs (parsed and built by
tests/test_configs.py like every config) are checked here for what is particular to them: the paper's
hyperparameters as resolved by the CLI, the DPO-baseline override, their hardware lines against the
configs/strategy/ file they copy, and the on-policy UltraFeedback layout they read (a local folder laid out like
princeton-nlp/*-ultrafeedback*, through the same `load_dataset` path as the hub id).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hub_fixtures import QA, write_jsonl_folder

from datamodules import PreferenceDataModule
from lightning_modules.cli import main
from lightning_modules.studies import STUDIES
from lightning_modules.studies.launch import study_parser
from lightning_modules.studies.sams_benchmark import sams_benchmark, scheduler_parameters

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/studies/sams-bench/bench.yaml"
SAMS_CONFIGS = sorted((REPO / "configs/sams").glob("*.yaml"))
# config -> (policy lr, beta, the configs/strategy/ file whose lines it copies)
FULL_SCALE = {"mistral7b_instruct_ultrafeedback.yaml": (5e-7, 0.01, "zero3_8gpu_bf16.yaml"),
              "llama3_8b_instruct_ultrafeedback.yaml": (1e-6, 0.01, "zero3_8gpu_bf16.yaml"),
              "hh_pythia28.yaml": (5e-7, 0.1, "ddp.yaml")}
KEYS = {"sams_over_dpo", "scheduler_parameters", "policy_parameters", "scheduler_over_policy_parameters", "llama_7b",
        "target_met", "verdict"}


def hand_count(L: int, D: int, c: int = 64, e: int = 32) -> int:
    """SchedulerNetworks(L, D, connector_size=c, exploration_size=e), counted from its layers by hand."""
    connectors = L * (D * c + c)  # L × Linear(D → c)
    layer_embedding = L * c
    attention = (3 * c * c + 3 * c) + (c * c + c)  # in-projection of q, k, v, and the out-projection
    feed_forward = (c * 2 * c + 2 * c) + (2 * c * c + c)  # Linear(c → 2c), Linear(2c → c)
    encoder = attention + feed_forward + 2 * (2 * c)  # + two LayerNorms (weight and bias)

    def head(w: int) -> int:  # ResidualMLP(w): LayerNorm, Linear(w → 2w), Linear(2w → w); then Linear(w → 1)
        return 2 * w + (w * 2 * w + 2 * w) + (2 * w * w + w) + (w + 1)

    return connectors + layer_embedding + encoder + head(c) + head(e)


def test_seven_billion_shape_matches_the_formula() -> None:
    assert hand_count(32, 4096) == 32 * (4096 * 64 + 64) + 56_578 == 8_447_234
    assert scheduler_parameters(32, 4096) == hand_count(32, 4096)
    assert scheduler_parameters(4, 128, connector_size=32, exploration_size=16) == hand_count(4, 128, c=32, e=16)


def test_bench_config_parses() -> None:
    assert STUDIES["sams-bench"] == "sams_benchmark"
    parser = study_parser(sams_benchmark)
    config = parser.parse_args(["--config", str(CONFIG)])
    assert tuple(config.ratios) == (0.5, 1.0) and config.reference == "live" and config.warmup > 32  # pool full
    assert "$(PY) -m lightning_modules.studies.sams_benchmark --config configs/studies/sams-bench/bench.yaml" in \
        (REPO / "Makefile").read_text()


def test_sams_bench_smoke(tmp_path: Path, capsys) -> None:
    """A few steps of every configuration into tmp_path: summary.json with the keys, a finite ratio, the table."""
    summary = sams_benchmark(out_dir=str(tmp_path), ratios=(0.5, 1.0), batch_size=8, steps=2, warmup=1, rounds=1)
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    assert KEYS <= set(summary)
    assert math.isfinite(summary["sams_over_dpo"]) and summary["sams_over_dpo"] > 0
    assert summary["target_met"] == (summary["sams_over_dpo"] <= 1.10)
    assert [r["config"] for r in summary["rows"]] == ["dpo", "sams_0.5", "sams_1"]
    assert summary["rows"][1]["over_dpo"] == summary["sams_over_dpo"]
    assert all(r["ms_per_step"] > 0 for r in summary["rows"]) and all(r["scheduler_ms"] > 0 for r in summary["rows"][1:])
    assert all(len(v) == 1 and len(v[0]["step"]) == 2 for v in summary["step_seconds"].values())  # rounds × steps
    # the demo model: L = 4, D = 128
    assert summary["scheduler_parameters"] == hand_count(4, 128)
    assert 0 < summary["scheduler_over_policy_parameters"] == \
        summary["scheduler_parameters"] / summary["policy_parameters"] < 0.2
    assert summary["llama_7b"]["scheduler_parameters"] == hand_count(32, 4096)
    assert summary["llama_7b"]["policy_parameters"] == 6_738_415_616  # LlamaConfig()'s defaults: Llama-2-7B
    assert (tmp_path / "sams_bench.png").read_bytes().startswith(b"\x89PNG")
    printed = capsys.readouterr().out
    assert "| sams_0.5 | 0.5 |" in printed and "the ≤ 1.10 target is" in printed
    assert "| sams_0.5 | 0.5 |" in (tmp_path / "summary.md").read_text()


# ---- configs/sams/ ---------------------------------------------------------------------------------------------
def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for every leaf of a nested mapping (a list is one leaf)."""
    if not isinstance(node, dict):
        return {prefix.removesuffix("."): node}
    return {k: v for key, child in node.items() for k, v in leaves(child, f"{prefix}{key}.").items()}


def printed_config(path: Path, *overrides: str, capsys, monkeypatch) -> dict[str, Any]:
    """`fit --config path [overrides] --print_config`, parsed: every key and type as shipped, nothing instantiated."""
    monkeypatch.setattr(sys, "argv", ["lightning_modules"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), *overrides, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_every_full_scale_training_config_is_checked() -> None:
    """Every DPO + SamS config of configs/sams/ (other SamS steps there, e.g. scheduler pretraining, have their own)."""
    dpo = {p.name for p in SAMS_CONFIGS
           if yaml.safe_load(p.read_text())["model"]["class_path"] == "lightning_modules.dpo.DPOModule"}
    assert dpo == set(FULL_SCALE)


@pytest.mark.parametrize("name", sorted(FULL_SCALE))
def test_full_scale_config_has_the_papers_hyperparameters(name: str, capsys, monkeypatch) -> None:
    lr, beta, _ = FULL_SCALE[name]
    config = printed_config(REPO / "configs/sams" / name, capsys=capsys, monkeypatch=monkeypatch)
    model = config["model"]["init_args"]
    assert (model["beta"], model["optimizer"]["init_args"]["lr"], config["trainer"]["devices"]) == (beta, lr, 8)
    scheduler = model["sample_scheduler"]
    assert scheduler["class_path"] == "lightning_modules.sams.SamS"
    assert {k: scheduler["init_args"][k] for k in ("ratio", "selection", "lr", "weight_decay")} == \
        {"ratio": 0.5, "selection": "topk", "lr": 1e-4, "weight_decay": 1e-5}
    baseline = printed_config(REPO / "configs/sams" / name, "--model.init_args.sample_scheduler=null",
                              capsys=capsys, monkeypatch=monkeypatch)  # the DPO baseline of the header
    assert baseline["model"]["init_args"]["sample_scheduler"] is None
    with_scheduler, without = leaves(config), leaves(baseline)
    changed = {k for k in {*with_scheduler, *without} if with_scheduler.get(k, "<none>") != without.get(k, "<none>")}
    assert changed and all(k.startswith("model.init_args.sample_scheduler") for k in changed)  # nothing else


@pytest.mark.parametrize("name", sorted(FULL_SCALE))
def test_hardware_lines_equal_the_strategy_file(name: str) -> None:
    """The copied trainer / model lines of configs/strategy/<file> are in the config, value for value."""
    strategy = leaves(yaml.safe_load((REPO / "configs/strategy" / FULL_SCALE[name][2]).read_text()))
    config = leaves(yaml.safe_load((REPO / "configs/sams" / name).read_text()))
    assert {k: config.get(k, "<missing>") for k in strategy} == strategy


def test_on_policy_ultrafeedback_layout_loads(tmp_path: Path, assets: Path) -> None:
    """princeton-nlp/mistral-instruct-ultrafeedback's columns (the llama3 ArmoRM set's are the same), schema messages."""
    def row(i: int) -> dict[str, Any]:
        question, better, worse = QA[i % len(QA)]
        return {"prompt_id": f"{i:04d}", "prompt": question,
                "all_generated_responses": [better, worse, "A third sample.", "A fourth.", "A fifth."],
                "all_rm_scores": [0.9, -0.3, 0.1, 0.0, 0.2],
                "chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": better}],
                "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": worse}]}

    folder = write_jsonl_folder(tmp_path / "mistral-instruct-ultrafeedback",
                                {"train": [row(i) for i in range(12)], "test": [row(i) for i in range(12, 16)]})
    data = yaml.safe_load((REPO / "configs/sams/mistral7b_instruct_ultrafeedback.yaml").read_text())["data"]["init_args"]
    options = {k: data[k] for k in ("schema", "template", "train_split", "val_split")}
    dm = PreferenceDataModule(str(folder), str(assets / "model"), max_length=128, batch_size=4, **options)
    dm.setup("fit")
    assert (dm.stats["train"].as_dict()["kept"], dm.stats["val"].as_dict()["kept"]) == (12, 4)
    assert not dm.stats["train"].as_dict()["dropped"]  # no row dropped, for any reason
