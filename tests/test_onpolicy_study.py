"""`make onpolicy-study` and `make generation-bench`: settings checked first, verdicts computed, smoke runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.utils.errors import UserInputError
from lightning_modules.studies.onpolicy_study import (StudyMethod, clearly_above, onpolicy_study, reward_at,
                                                      shared_sft, verdicts)

REPO = Path(__file__).resolve().parents[1]
OFFLINE = str(REPO / "configs/studies/onpolicy-study/offline.yaml")
ONPOLICY = str(REPO / "configs/studies/onpolicy-study/onpolicy.yaml")
SFT = str(REPO / "configs/studies/onpolicy-study/sft.yaml")
METHODS = [StudyMethod("offline_dpo", OFFLINE, on_policy=False, negative_gradient=True),
           StudyMethod("pref_ft", OFFLINE, on_policy=False, negative_gradient=False,
                       args=("--model.init_args.objective=PrefFT", "--model.init_args.reference=none")),
           StudyMethod("onpolicy_dpo", ONPOLICY, on_policy=True, negative_gradient=True),
           StudyMethod("filtered_bc", ONPOLICY, on_policy=True, negative_gradient=False,
                       args=("--model.init_args.objective=FilteredBC",)),
           StudyMethod("reinforce", ONPOLICY, on_policy=True, negative_gradient=True,
                       args=("--model.init_args.objective={class_path: Reinforce, init_args: {baseline: loo}}",))]


@pytest.mark.parametrize("kwargs, pattern", [
    ({"methods": METHODS + METHODS[:1]}, "unique names"),
    ({"methods": METHODS[2:]}, "at least one on-policy and one offline"),
    ({"methods": [*METHODS[:1], StudyMethod("x", "nope.yaml", True, True)]}, r"not found: \['nope.yaml'\]"),
    ({"methods": [*METHODS, StudyMethod("x", OFFLINE, on_policy=True, negative_gradient=True)]},
     "x says on_policy=True, but .*offline.yaml with its args trains DPOModule"),
    ({"methods": [*METHODS, StudyMethod("y", OFFLINE, on_policy=False, negative_gradient=True,
                                        args=("--model.class_path=lightning_modules.onpolicy.OnPolicyModule",))]},
     "y says on_policy=False, .* OnPolicyModule"),
    ({"variants": ("aligned", "misaligned")}, "variants="),
    ({"seeds": ()}, r"seeds=\[\]"),
    ({"eval_max_new_tokens": 0}, "eval_max_new_tokens=0"),
    ({"clear_gap": -0.1}, "clear_gap=-0.1"),
], ids=["duplicate", "no-offline", "missing-config", "not-on-policy", "not-offline", "variant", "no-seeds", "tokens",
        "gap"])
def test_bad_settings_fail_before_anything_runs(tmp_path: Path, kwargs, pattern) -> None:
    settings = {"methods": METHODS, "out_dir": str(tmp_path / "study"), "sft_config": SFT, **kwargs}
    with pytest.raises(UserInputError, match=pattern):
        onpolicy_study(**settings)
    assert not any(tmp_path.iterdir())


def test_one_sft_only_when_demonstrations_and_model_agree() -> None:
    files = {"data/sft/train.jsonl": "a", "model/model.safetensors": "b", "data/prefs/train.jsonl": "c"}
    relabelled = {**files, "data/prefs/train.jsonl": "d"}  # other pairs: the SFT is still shared
    assert shared_sft([{"files": files}, {"files": relabelled}])
    assert not shared_sft([{"files": files}, {"files": {**files, "model/model.safetensors": "e"}}])
    assert not shared_sft([{"files": files}, {"files": {**files, "data/sft/train.jsonl": "f"}}])


def test_reward_at_takes_the_last_evaluation_within_the_budget() -> None:
    run = {"curve": [{"queries": 100, "reward": 0.5}, {"queries": 200, "reward": 0.7}, {"queries": 300, "reward": 0.9}]}
    assert reward_at(run, 250, start=0.1) == 0.7
    assert reward_at(run, 300, start=0.1) == 0.9
    assert reward_at(run, 50, start=0.1) == 0.1  # before any evaluation: the SFT policy's reward


def test_clearly_above_needs_the_gap_and_two_standard_errors() -> None:
    assert clearly_above([0.9, 0.9, 0.9], [0.8, 0.8, 0.8], gap=0.05)
    assert not clearly_above([0.9, 0.9, 0.9], [0.8, 0.8, 0.8], gap=0.15)  # under the gap
    # +0.1 on average, but the spread: 2·SE = 2·sqrt(0.1²/3 + 0.1²/3) = 0.163 > 0.1
    assert not clearly_above([0.8, 0.9, 1.0], [0.7, 0.8, 0.9], gap=0.05)
    assert not clearly_above([0.8, 0.8, 0.8], [0.9, 0.9, 0.9], gap=0.0)


def test_verdicts_state_the_papers_claim_from_the_numbers() -> None:
    """Unaligned: every on-policy method clearly above both offline ones; aligned: all within 0.02."""
    final = {"unaligned": {"offline_dpo": [0.90, 0.92, 0.94], "pref_ft": [0.75, 0.76, 0.77], "onpolicy_dpo": [1.0] * 3,
                           "filtered_bc": [1.0] * 3, "reinforce": [0.99, 1.0, 1.0]},
             "aligned": {"offline_dpo": [0.85] * 3, "pref_ft": [0.88] * 3, "onpolicy_dpo": [0.87] * 3,
                         "filtered_bc": [0.89] * 3, "reinforce": [0.88] * 3}}
    found = verdicts({"final": final}, METHODS, {"final": 8000}, gap=0.05)
    assert found["answer"] == ("Does on-policy sampling reach clearly higher reward than offline Pref-FT and DPO on "
                               "the unaligned reward? Yes (best vs best at the end: +0.080, clearly higher). Is the "
                               "gap small on the aligned reward? Yes (+0.010, no clear difference).")
    unaligned, negative = found["unaligned"], found["unaligned_negative_gradient"]
    assert "clearly above every offline method at the end: onpolicy_dpo, filtered_bc, reinforce (of 3)" in unaligned
    assert "at the end (8,000 queries): onpolicy_dpo 1.000 vs offline_dpo 0.920 (+0.080, clearly higher)" in unaligned
    assert "offline offline_dpo 0.920 vs pref_ft 0.760 (+0.160, clearly higher)" in negative
    assert "offline offline_dpo 0.850 vs pref_ft 0.880 (-0.030, no clear difference)" in \
        found["aligned_negative_gradient"]
    flipped = {"unaligned": final["aligned"], "aligned": final["unaligned"]}  # the same numbers, the other way round
    answer = verdicts({"final": flipped}, METHODS, {"final": 8000}, gap=0.05)["answer"]
    assert "reward? No (best vs best at the end: +0.010, no clear difference). Is the gap small on the aligned " \
        "reward? No (+0.080, clearly higher)." in answer
    offline_ahead = {v: {**per, "pref_ft": [0.99] * 3} for v, per in final.items()}  # an offline method far ahead
    assert "small on the aligned reward? No (-0.100, clearly lower)" in \
        verdicts({"final": offline_ahead}, METHODS, {"final": 8000}, gap=0.05)["answer"]


@pytest.mark.slow
def test_smoke_study_reports_every_method_and_variant_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    settings = dict(methods=METHODS, out_dir=str(out), seeds=(0,), sft_config=SFT, early_queries=128,
                    assets_args=("--n-sft=64", "--n-pref=128", "--n-val=32"), sft_args=("--trainer.max_steps=2",),
                    fit_args=("--trainer.max_steps=4", "--trainer.val_check_interval=2"))
    rows = onpolicy_study(**settings)
    assert [r["method"] for r in rows] == ["sft (start)"] + [m.name for m in METHODS]
    for row in rows[1:]:
        assert row["queries"] == 256  # 4 steps × 32 pairs × 2 labels, or 4 steps × 16 prompts × 4 samples
        for variant in ("aligned", "unaligned"):
            for budget in ("final", "early"):
                mean, std = row[f"{variant}_{budget}"].split(" ± ")
                assert 0 <= float(mean) <= 1 and float(std) == 0  # one seed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shared_sft"] and (out / "sft").is_dir() and not (out / "sft_aligned").exists()
    run = summary["runs"]["onpolicy_dpo"]["unaligned"][0]
    assert [(p["step"], p["queries"]) for p in run["curve"]] == [(2, 128), (4, 256)]
    assert summary["rewards"]["early"]["unaligned"]["onpolicy_dpo"] == [run["curve"][0]["reward"]]
    assert "answer" in summary["verdicts"] and "unaligned" in summary["verdicts"]
    table = (out / "summary.md").read_text()
    assert all(f"| {m.name} |" in table for m in METHODS) and "| sft (start) |" in table
    assert "aligned: final" in table and "unaligned: at 128 queries" in table
    assert (out / "onpolicy.png").read_bytes().startswith(b"\x89PNG")
    first = out / "runs/unaligned/seed_0/reinforce/result.json"
    stamp = first.stat().st_mtime_ns
    capsys.readouterr()
    assert onpolicy_study(**settings) == rows  # every cell reused
    printed = capsys.readouterr().out
    assert "reusing" in printed and " seed 0 " not in printed and first.stat().st_mtime_ns == stamp


def test_generation_bench_smoke(tmp_path: Path) -> None:
    """`make generation-bench` on a smoke setting: every configuration measured, the step split adds up."""
    from lightning_modules.studies.generation_benchmark import generation_benchmark

    rows = generation_benchmark(out_dir=str(tmp_path), sft_steps=2, batch_prompts=(2, 4), num_samples=2,
                                max_new_tokens=6, repeats=2, train_prompts=4, objectives=("Sigmoid", "Reinforce"),
                                steps=2, warmup=1, rounds=2)
    assert [(r["config"], r["sequences"]) for r in rows] == [("sample_2x2", 4), ("sample_4x2", 8),
                                                             ("step_sigmoid", 8), ("step_reinforce", 8)]
    for row in rows[:2]:
        assert 0 < row["tokens"] <= row["sequences"] * 6 and row["tokens_per_s"] > 0
    for row in rows[2:]:
        assert row["ms"] == pytest.approx(row["generation_ms"] + row["reward_ref_ms"] + row["training_ms"])
        assert row["generation_ms"] > 0 and row["training_ms"] > 0 and 0 < row["generation_share"] < 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(len(v) == 2 and len(v[0]) == 2 for v in summary["sampling_seconds"].values())  # rounds × repeats
    assert all(len(v) == 2 and len(v[0]["step"]) == 2 for v in summary["step_parts"].values())  # rounds × steps
    assert (tmp_path / "generation_bench.png").read_bytes().startswith(b"\x89PNG")
    with pytest.raises(UserInputError, match=r"objectives \['DPO'\]"):
        generation_benchmark(out_dir=str(tmp_path / "bad"), objectives=("DPO",))
    assert not (tmp_path / "bad").exists()
