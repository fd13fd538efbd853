"""The evaluation report: generations scored by the reward, summary keys, table, plot, errors."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from datamodules.synthetic import SyntheticReward
from datamodules.utils.errors import UserInputError
from lightning_modules.studies.evaluate import evaluate, main


def test_evaluate_writes_summary_table_plot_and_generations(assets: Path, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"val/rewards/accuracies": 0.75, "val/rewards/margins": 0.5, "val/loss": 0.6}))
    prompts = assets / "data/prompts/test.jsonl"
    model = str(assets / "model")
    summary = evaluate(policies={"a": model, "b": model}, prompts_path=str(prompts), reward=SyntheticReward("unaligned"),
                       out_dir=str(tmp_path / "out"), metrics={"b": str(metrics)}, max_new_tokens=6)

    rows = [json.loads(line) for line in (tmp_path / "out/generations.jsonl").read_text().splitlines()]
    n_prompts = len(prompts.read_text().splitlines())
    assert summary["num_prompts"] == n_prompts and len(rows) == 2 * n_prompts
    for name in ("a", "b"):
        mine = [r for r in rows if r["policy"] == name]
        # each stored reward is the reward program applied to the stored response
        assert [r["reward"] for r in mine] == SyntheticReward("unaligned")([r["prompt"] for r in mine],
                                                                            [r["response"] for r in mine])
        assert summary[f"{name}_reward"] == pytest.approx(statistics.fmean(r["reward"] for r in mine))
        assert summary[f"{name}_length"] == pytest.approx(statistics.fmean(len(r["response"].split()) for r in mine))
    assert summary["a_reward"] == summary["b_reward"]  # same weights, greedy decoding
    assert summary["b_val_reward_accuracy"] == 0.75 and summary["b_val_loss"] == 0.6
    assert "a_val_reward_accuracy" not in summary
    assert json.loads((tmp_path / "out/summary.json").read_text()) == summary
    table = (tmp_path / "out/summary.md").read_text()
    assert table.startswith("# greedy generations on held-out prompts\n")
    assert "| a | " in table and "| b |" in table and "0.750" in table and "val loss" not in table
    assert "| policy | mean reward | std | mean length | val reward accuracy | val reward margin |" in table
    assert table.splitlines()[-2].endswith("| - | - |")  # policy `a` has no metrics file
    assert (tmp_path / "out/rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_policy_folder_names_it(assets: Path, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=r"policies\.dpo="):
        evaluate(policies={"dpo": str(tmp_path / "missing")}, prompts_path=str(assets / "data/prompts/test.jsonl"),
                 reward=SyntheticReward(), out_dir=str(tmp_path / "out"))


def test_command_line_reports_a_missing_policy_in_one_paragraph(assets: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "evaluate.yaml"
    config.write_text(f"policies: {{dpo: {tmp_path / 'missing'}}}\nprompts_path: {assets / 'data/prompts/test.jsonl'}\n"
                      f"reward: {{class_path: datamodules.synthetic.SyntheticReward}}\nout_dir: {tmp_path / 'out'}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: policies.dpo=") and err.count("\n") == 1
