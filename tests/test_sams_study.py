"""`make sams-study`: the config parses, settings are checked first, verdicts follow the numbers, a smoke run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from datamodules.utils.errors import UserInputError
from lightning_modules.studies.launch import study_parser
from lightning_modules.studies.sams_study import (SelectionTrace, StudyMethod, noise_label, paper_methods, run_args,
                                                  sams_study)
from lightning_modules.studies.sams_verdicts import PaperMethods, answer, fewer_flipped, verdicts

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "configs/studies/sams-study/study.yaml"
SFT = str(REPO / "configs/studies/sams-study/sft.yaml")
TRAIN = str(REPO / "configs/studies/sams-study/train.yaml")
METHODS = [StudyMethod("dpo"), StudyMethod("random_50", "random", 0.5), StudyMethod("sams_50", "topk", 0.5)]
PAPER = PaperMethods("dpo", "random_50", "sams_50")


def test_study_config_parses_into_the_papers_three_arms_and_the_ratio_ablation() -> None:
    parser = study_parser(sams_study)
    init = parser.instantiate(parser.parse_args(["--config", str(STUDY)]))
    assert [(m.name, m.selection, m.ratio) for m in init.methods] == [
        ("dpo", None, 0.5), ("random_50", "random", 0.5), ("sams_25", "topk", 0.25), ("sams_50", "topk", 0.5),
        ("sams_75", "topk", 0.75)]
    assert paper_methods(init.methods) == PAPER
    assert tuple(init.noise_levels) == (0.0, 0.2) and tuple(init.seeds) == (0, 1, 2)
    assert [m.label() for m in init.methods] == ["all pairs", "random 50%", "SamS topk 25%", "SamS topk 50%",
                                                 "SamS topk 75%"]


@pytest.mark.parametrize("kwargs, pattern", [
    ({"methods": METHODS + METHODS[:1]}, "unique names"),
    ({"methods": METHODS[:2]}, "the paper's three arms.*'sams': None"),
    ({"methods": [METHODS[0], StudyMethod("random_25", "random", 0.25), METHODS[2]]}, "'random': None"),
    ({"methods": [*METHODS, StudyMethod("all", "topk", 1.5)]}, r"ratio must be in \(0, 1\]; .*\['all'\]"),
    ({"noise_levels": (0.0, 1.0)}, r"noise_levels=\[0.0, 1.0\]"),
    ({"noise_levels": ()}, r"noise_levels=\[\]"),
    ({"variant": "misaligned"}, "variant='misaligned'"),
    ({"seeds": ()}, r"seeds=\[\]"),
    ({"train_config": "nope.yaml"}, r"not found: \['nope.yaml'\]"),
    ({"eval_prompts": 0}, "eval_prompts=0"),
    ({"clear_gap": -0.1}, "clear_gap=-0.1"),
], ids=["duplicate", "no-sams", "no-random-half", "ratio", "noise", "no-noise", "variant", "no-seeds", "config",
        "prompts", "gap"])
def test_bad_settings_fail_before_anything_runs(tmp_path: Path, kwargs, pattern) -> None:
    settings = {"methods": METHODS, "out_dir": str(tmp_path / "study"), "sft_config": SFT, "train_config": TRAIN,
                **kwargs}
    with pytest.raises(UserInputError, match=pattern):
        sams_study(**settings)
    assert not any(tmp_path.iterdir())


def test_run_args_set_the_noise_the_seeds_and_the_methods_scheduler(tmp_path: Path) -> None:
    def args(method: StudyMethod) -> list[str]:
        return run_args(method, 2, 0.2, tmp_path / "run", tmp_path / "export", tmp_path / "assets", "aligned", 24, 64)

    plain, sams = args(METHODS[0]), args(METHODS[2])
    assert "--data.init_args.label_noise=0.2" in plain and "--data.init_args.label_noise_seed=2" in plain
    assert "--seed_everything=2" in plain and not any("sample_scheduler" in a for a in plain)
    scheduler = next(a for a in sams if a.startswith("--model.init_args.sample_scheduler="))
    assert json.loads(scheduler.split("=", 1)[1]) == {"class_path": "lightning_modules.sams.SamS",
                                                      "init_args": {"ratio": 0.5, "selection": "topk", "seed": 2,
                                                                    "replay_batches": 32}}
    assert sams[-1] == '--trainer.callbacks+={"class_path": "lightning_modules.studies.sams_study.SelectionTrace"}'
    assert noise_label(0.2) == "20%" and noise_label(0.0) == "0%" and noise_label(0.125) == "12.5%"


def test_selection_trace_reads_this_steps_shares_only_with_label_noise() -> None:
    """The trace reads the step's own selection metrics (`last_selection.metrics`: every step, logged or not)."""
    trace = SelectionTrace()
    trainer = SimpleNamespace(sanity_checking=False, global_step=7)
    module = SimpleNamespace(last_selection=SimpleNamespace(metrics={"sams/flipped_selected": torch.tensor(0.125),
                                                                     "sams/flipped_all": torch.tensor(0.25)}))
    trace.on_train_batch_end(trainer, module, None, {"label_flipped": torch.zeros(4)}, 0)
    trace.on_train_batch_end(trainer, module, None, {}, 1)  # no label noise: nothing to read
    trace.on_validation_end(trainer, None)
    assert trace.shares == {"selected": [0.125], "chance": [0.25]} and trace.validated == [7]
    resumed = SelectionTrace()
    resumed.load_state_dict(json.loads(json.dumps(trace.state_dict())))
    assert resumed.state_dict() == trace.state_dict()


def values(dpo: list[float], random: list[float], sams: list[float]) -> dict:
    """The same three per-seed lists for both metrics at 0 % and 20 % noise."""
    per_metric = {"dpo": dpo, "random_50": random, "sams_50": sams}
    return {noise: {"val_accuracy": per_metric, "generation_reward": per_metric} for noise in ("0%", "20%")}


def test_answer_when_sams_beats_random_and_dpo_the_claim_is_reproduced() -> None:
    found = answer(values(dpo=[0.80, 0.81, 0.79], random=[0.70, 0.71, 0.69], sams=[0.90, 0.91, 0.89]), PAPER, 0.02)
    assert found.startswith("Does SamS (sams_50) beat random-50% (random_50) here? Yes: clearly higher on 4 of 4 "
                            "(noise level × metric): 0% val reward accuracy +0.200 (clearly higher);")
    assert "Does it beat DPO (dpo)? Yes: clearly higher on 4 of 4" in found
    assert "Is random-50% below DPO, as in the paper? Yes: clearly lower on 4 of 4" in found
    assert found.endswith("The paper's claim that SamS beats DPO is reproduced here; its finding that random-50% is "
                          "worse than DPO holds.")


def test_answer_when_sams_does_not_beat_random_the_claim_is_not_reproduced() -> None:
    # SamS 0.01 above random (under the gap) and below DPO; random a hair under DPO but within the spread
    found = answer(values(dpo=[0.85, 0.90, 0.80], random=[0.80, 0.86, 0.80], sams=[0.81, 0.87, 0.81]), PAPER, 0.02)
    assert "beat random-50% (random_50) here? No: clearly higher on 0 of 4" in found
    assert "0% val reward accuracy +0.010 (no clear difference)" in found
    assert "Does it beat DPO (dpo)? No: clearly higher on 0 of 4" in found
    assert found.endswith("The paper's claim that SamS beats DPO is not reproduced here; its finding that random-50% "
                          "is worse than DPO does not hold.")


def test_answer_partly_when_sams_beats_dpo_on_one_noise_level_only() -> None:
    clean = values(dpo=[0.80] * 3, random=[0.80] * 3, sams=[0.80] * 3)["0%"]
    noisy = values(dpo=[0.70] * 3, random=[0.60] * 3, sams=[0.75] * 3)["20%"]
    found = answer({"0%": clean, "20%": noisy}, PAPER, 0.02)
    assert "Does it beat DPO (dpo)? Partly: clearly higher on 2 of 4" in found
    assert "20% generation reward +0.050 (clearly higher)" in found
    assert "SamS beats DPO is partly reproduced (2 of 4) here; its finding that random-50% is worse than DPO holds " \
        "in part." in found


def test_fewer_flipped_than_chance_and_random_as_the_sanity_check() -> None:
    flips = {"20%": {"random_50": {"selected": [0.19, 0.21, 0.21], "chance": [0.20, 0.20, 0.20]},
                     "sams_50": {"selected": [0.10, 0.11, 0.12], "chance": [0.20, 0.21, 0.19]},
                     "sams_75": {"selected": [0.30, 0.31, 0.29], "chance": [0.20, 0.20, 0.20]}}}
    found = fewer_flipped(flips, 0.02)
    assert found.startswith("Does SamS pick fewer flipped pairs than chance? At 20% flipped labels")
    assert "random_50 0.203 ± 0.012 vs chance 0.200 ± 0.000 (+0.003, no clear difference)" in found
    assert "sams_50 0.110 ± 0.010 vs chance 0.200 ± 0.010 (-0.090, clearly fewer)" in found
    assert "sams_75 0.300 ± 0.010 vs chance 0.200 ± 0.000 (+0.100, clearly more)" in found
    assert "Not measured" in fewer_flipped({}, 0.02)
    every = verdicts(values([0.8] * 3, [0.8] * 3, [0.8] * 3), flips, PAPER, 0.02)
    assert list(every) == ["0%", "20%", "flipped", "answer"]
    assert every["20%"].startswith("20% flipped labels, val reward accuracy: sams_50 0.800 vs random_50 0.800 (+0.000, "
                                   "no clear difference); sams_50 0.800 vs dpo 0.800")


@pytest.mark.slow
def test_smoke_study_reports_every_method_and_noise_level_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    settings = dict(methods=METHODS, out_dir=str(out), seeds=(0,), sft_config=SFT, train_config=TRAIN,
                    assets_args=("--n-sft=64", "--n-pref=128", "--n-val=32"), sft_args=("--trainer.max_steps=2",),
                    fit_args=("--trainer.max_steps=4", "--trainer.val_check_interval=2"))
    rows = sams_study(**settings)
    assert [r["method"] for r in rows] == ["sft (start)", "dpo", "random_50", "sams_50"]
    for row in rows[1:]:
        for key in ("0%_val_accuracy", "0%_generation_reward", "20%_val_accuracy", "20%_generation_reward"):
            mean, std = row[key].split(" ± ")
            assert 0 <= float(mean) <= 1 and float(std) == 0  # one seed
        assert ("20%_selected" in row) == (row["method"] != "dpo")  # flipped shares: runs with a scheduler only
    summary = json.loads((out / "summary.json").read_text())
    assert {"seeds", "noise_levels", "variant", "sft_reward", "methods", "paper_methods", "verdicts", "metrics",
            "flipped", "rows", "runs"} <= summary.keys()
    assert summary["noise_levels"] == ["0%", "20%"] and list(summary["flipped"]) == ["20%"]
    assert list(summary["flipped"]["20%"]) == ["random_50", "sams_50"]
    assert list(summary["verdicts"]) == ["0%", "20%", "flipped", "answer"]
    run = summary["runs"]["20%"]["sams_50"][0]
    assert run["steps"] == 4 and len(run["trace"]["selected"]) == 4 and 0 <= run["flipped"]["selected"] <= 1
    assert summary["runs"]["0%"]["sams_50"][0]["flipped"] == {"selected": None, "chance": None}  # clean labels
    assert (out / "runs/noise_20/seed_0/random_50/result.json").is_file()
    table = (out / "summary.md").read_text()
    assert all(f"| {m.name} |" in table for m in METHODS) and "| sft (start) |" in table
    assert "val reward accuracy (20% flipped)" in table and "flipped share of batch = chance (20%)" in table
    assert "The paper's claim that SamS beats DPO is" in table
    assert (out / "sams.png").read_bytes().startswith(b"\x89PNG")
    first = out / "runs/noise_0/seed_0/dpo/result.json"
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert sams_study(**settings) == rows  # every run reused
    printed = capsys.readouterr().out
    assert "reusing" in printed and " seed 0 " not in printed and first.stat().st_mtime_ns == stamp
