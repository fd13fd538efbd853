"""The sweep driver's own logic: resumable steps, summary rows, the degenerate flag, the plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lightning_modules.studies.refdpo_sweep import collect, plot, run_step

RUN = {"name": "live_beta_0.1", "group": "live (SFT)", "beta": 0.1}


def write_metrics(out: Path, **metrics: float) -> None:
    (out / RUN["name"]).mkdir(parents=True)
    (out / RUN["name"] / "metrics.json").write_text(json.dumps(metrics))


def test_collect_reads_the_run_metrics(tmp_path: Path) -> None:
    write_metrics(tmp_path, **{"val/rewards/accuracies": 0.8, "val/rewards/margins": 0.1, "val/generation/reward": 0.9,
                               "val/generation/length": 4.0, "degenerate": 0.0})
    row = collect(RUN, tmp_path, 12.34)
    assert row == {"run": "live_beta_0.1", "reference": "live (SFT)", "beta": 0.1, "val reward acc": 0.8,
                   "val margin": 0.1, "gen reward": 0.9, "gen length": 4.0, "degenerate": False, "seconds": 12.3}


@pytest.mark.parametrize("metrics", [{"degenerate": 1.0}, {"degenerate": 0.0, "train/loss": float("nan")}])
def test_collect_flags_degenerate_runs(tmp_path: Path, metrics: dict) -> None:
    write_metrics(tmp_path, **metrics)
    assert collect(RUN, tmp_path, 1.0)["degenerate"] is True


def test_run_step_skips_what_exists_and_records_seconds(tmp_path: Path) -> None:
    marker = tmp_path / "made"
    seconds = run_step("touch", ["-c", f"open({str(marker)!r}, 'w').write('x')"], marker, tmp_path / "logs")
    assert marker.read_text() == "x" and seconds > 0
    assert float((tmp_path / "logs" / "touch.seconds").read_text()) == pytest.approx(seconds, abs=0.1)
    assert run_step("touch", ["-c", "raise SystemExit(1)"], marker, tmp_path / "logs") == 0.0  # reused, not rerun
    with pytest.raises(SystemExit, match="fail failed"):
        run_step("fail", ["-c", "import sys; sys.exit(3)"], None, tmp_path / "logs")


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rows = [{"reference": g, "beta": b, "gen reward": 0.5, "val reward acc": 0.7, "degenerate": b < 0.05}
            for g in ("live", "reference-free") for b in (1.0, 0.1, 0.01)]
    plot(rows, tmp_path / "sweep.png")
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


