"""`make multiref-study` end to end on a smoke-sized grid: every stage runs, the report is written, a rerun resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datamodules.utils.errors import UserInputError
from lightning_modules.studies.multiref_study import StudyReference, methods, multiref_study

REFERENCES = [StudyReference("good", sft_steps=4, prefft_steps=3), StudyReference("plain", sft_steps=4)]


def test_methods_are_dpo_per_reference_then_objective_times_strategy() -> None:
    plan = methods(REFERENCES, ["MRPO", "MDPO"], ["fixed", "tsw"])
    assert list(plan) == ["dpo_good", "dpo_plain", "mrpo_fixed", "mrpo_tsw", "mdpo_fixed", "mdpo_tsw"]
    assert '"weights": [1.0, 1.0]' in plan["mrpo_fixed"][-1]  # equal fixed weights, one per reference
    assert plan["mdpo_tsw"][1:] == ["--model.init_args.objective=MDPO",
                                    "--model.init_args.weighting=lightning_modules.multiref.TSW"]


@pytest.mark.parametrize("kwargs, pattern", [({"policy": "nope"}, "policy='nope'"),
                                             ({"strategies": ("vaw", "best")}, r"strategies \['best'\]")])
def test_bad_settings_fail_before_anything_runs(tmp_path: Path, kwargs, pattern) -> None:
    with pytest.raises(UserInputError, match=pattern):
        multiref_study(REFERENCES, out_dir=str(tmp_path), policy=kwargs.get("policy", "plain"),
                       strategies=kwargs.get("strategies", ("vaw",)))
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_smoke_study_runs_every_stage_and_resumes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    settings = dict(out_dir=str(out), seeds=(0,), policy="plain", objectives=("MDPO",), strategies=("vaw", "tsw"),
                    sample_size=150, sizes=(100, 25, 25), assets_args=("--n-sft=64", "--n-pref=300", "--n-val=64"))
    rows = multiref_study(REFERENCES, **settings)
    assert [r["method"] for r in rows] == ["dpo_good", "dpo_plain", "mdpo_vaw", "mdpo_tsw"]
    assert all(0 <= r["mean"] <= 1 and r["std"] == 0 for r in rows)  # one seed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["reference_test_accuracy"]) == {"good", "plain"}
    assert "best multi-reference method" in summary["verdict"]
    tsw = summary["runs"]["mdpo_tsw"][0]["alpha"]
    assert tsw["names"] == ["good", "plain"] and len(tsw["steps"]) == 4  # 100 pairs / 25 per step
    assert all(sorted(a) == [0.0, 1.0] for a in tsw["alphas"])  # one reference per step
    assert (out / "multiref.png").read_bytes().startswith(b"\x89PNG")
    assert "| mdpo_vaw |" in (out / "summary.md").read_text()
    capsys.readouterr()
    assert multiref_study(REFERENCES, **settings) == rows  # everything reused
    assert "reusing" in capsys.readouterr().out


def test_multiref_bench_smoke(tmp_path: Path) -> None:
    """`make multiref-bench` on a smoke setting: every configuration timed, the baseline's ratio is 1, report written."""
    from lightning_modules.studies.multiref_benchmark import multiref_benchmark

    rows = multiref_benchmark(out_dir=str(tmp_path), dtypes=("float32", "bfloat16"), objectives=("MDPO",),
                              strategies=("VAW", "TSW"), batch_size=8, steps=2, warmup=1, rounds=1)
    assert [(r["config"], r["K"]) for r in rows] == [("dpo_k1", 1), ("mdpo_vaw_k2", 2), ("mdpo_tsw_k2", 2)]
    assert rows[0]["ratio"] == 1.0 and all(r["ms_per_step"] > 0 for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert all(len(v) == 1 and len(v[0]) == 2 for v in summary["step_seconds"].values())  # rounds × steps timings
    assert (tmp_path / "multiref_bench.png").exists()
