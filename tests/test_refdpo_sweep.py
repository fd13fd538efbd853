"""The sweep driver: resumable steps, summary rows, the degenerate flag, the plot, and a tiny grid end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_modules.studies import launch as launch_module
from lightning_modules.studies.launch import run_step
from lightning_modules.studies.refdpo_sweep import SweepRun, collect, plot, refdpo_sweep

RUN = SweepRun(name="live_beta_0.1", group="live (SFT)", beta=0.1)
LIKELIHOOD = SweepRun(name="likelihood_beta_0.1", group="likelihood", beta=0.1, args=(
    "--model.init_args.reference=cached", "--data.init_args.reference_cache=[{name_or_path: x, unconditional: true}]"))
METRICS = {"val/rewards/accuracies": 0.8, "val/rewards/margins": 0.1, "val/generation/reward": 0.9,
           "val/generation/length": 4.0, "degenerate": 0.0}


def write_metrics(out: Path, **metrics: float) -> None:
    (out / RUN.name / "latest").mkdir(parents=True)  # a run directory (a symlink in real runs)
    (out / RUN.name / "latest" / "metrics.json").write_text(json.dumps(metrics))


def test_collect_reads_the_run_metrics(tmp_path: Path) -> None:
    write_metrics(tmp_path, **METRICS)
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


def test_plot_makes_a_two_panel_figure() -> None:
    rows = [{"reference": g, "beta": b, "gen reward": 0.5, "val reward acc": 0.7, "degenerate": b < 0.05}
            for g in ("live", "reference-free") for b in (1.0, 0.1, 0.01)]
    fig = plot(rows)
    assert [ax.get_ylabel() for ax in fig.axes] == ["gen reward", "val reward acc"]
    assert len(fig.axes[0].get_lines()) == 2  # one line per reference choice


class FakePython:
    """Stands in for `subprocess.call([python, ...])`: records the command and makes the outputs it would make."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, command: list[str], **kwargs) -> int:
        args = command[1:]
        self.calls.append(args)
        value = lambda key: next(a.split("=", 1)[1] for a in args if a.startswith(f"--{key}="))  # noqa: E731
        if args[1] == "datamodules.synthetic":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True)
            (out / "manifest.json").write_text("{}")
        elif args[1] == "lightning_modules" and "sft" in Path(args[args.index("--config") + 1]).name:
            (Path(value("trainer.default_root_dir")) / "latest" / "export").mkdir(parents=True)
        elif args[1] == "lightning_modules":
            root = Path(value("trainer.default_root_dir")) / "latest"
            root.mkdir(parents=True)
            (root / "metrics.json").write_text(json.dumps({**METRICS, "val/rewards/margins": float(value(
                "model.init_args.beta"))}))
        return 0


def test_tiny_grid_runs_every_stage_resumes_and_reports(tmp_path: Path, monkeypatch, capsys) -> None:
    """The real driver on a two-run grid; only the training subprocesses are faked."""
    fake = FakePython()
    monkeypatch.setattr(launch_module.subprocess, "call", fake)
    out = tmp_path / "sweep"
    rows = refdpo_sweep([RUN, LIKELIHOOD], out_dir=str(out), stronger_reference_epochs=2,
                        assets_args=("--n-sft=8",), fit_args=("--trainer.limit_train_batches=1",))

    steps = [(c[1], c[c.index("--config") + 1] if "--config" in c else None) for c in fake.calls]
    assert [s[0] for s in steps] == ["datamodules.synthetic", "lightning_modules", "lightning_modules",
                                     "lightning_modules", "lightning_modules.references.cache_builder",
                                     "lightning_modules"]
    sft_strong, live, cache, likelihood = fake.calls[2], fake.calls[3], fake.calls[4], fake.calls[5]
    assert f"--model.init_args.model_name_or_path={out}/sft/latest/export" in sft_strong
    assert "--trainer.max_epochs=2" in sft_strong
    assert live[-1] == "--trainer.limit_train_batches=1" and f"--data.init_args.path={out}/assets/data/prefs" in live
    assert "--model.init_args.beta=0.1" in live and f"--model.init_args.model_name_or_path={out}/sft/latest/export" in live
    assert cache[-2:] == ["--tokenizer", f"{out}/sft/latest/export"] and LIKELIHOOD.args[1] in cache
    assert all(a.startswith("--data.") for a in cache[4:-2])
    assert [r["run"] for r in rows] == [RUN.name, LIKELIHOOD.name] and rows[0]["val margin"] == 0.1
    assert json.loads((out / "summary.json").read_text()) == {"runs": rows}
    assert "| likelihood_beta_0.1 | likelihood | 0.1 | 0.800 | 0.10 | 0.900 | 4.0 | no |" in (out / "summary.md").read_text()
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| run | reference | beta |" in capsys.readouterr().out

    # resumed: only the cache step (idempotent itself) runs again; the table is the same
    fake.calls.clear()
    assert refdpo_sweep([RUN, LIKELIHOOD], out_dir=str(out)) == rows
    assert [c[1] for c in fake.calls] == ["lightning_modules.references.cache_builder"]


def test_the_command_line_rejects_a_misspelt_run_field(tmp_path: Path) -> None:
    config = tmp_path / "sweep.yaml"
    config.write_text(f"out_dir: {tmp_path}\nruns:\n  - {{name: a, group: g, betta: 0.1}}\n")
    result = subprocess.run([sys.executable, "-m", "lightning_modules.studies.refdpo_sweep", "--config", str(config)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and not (tmp_path / "logs").exists()
    assert "betta" in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.slow
def test_tiny_grid_trains_for_real(tmp_path: Path) -> None:
    """`make refdpo-sweep`'s command on a tiny grid with real SFT, DPO and cache subprocesses (about a minute)."""
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "lightning_modules.studies.refdpo_sweep",
               "--config", "configs/studies/refdpo-sweep/sweep.yaml", f"--out_dir={out}", "--stronger_reference_epochs=1",
               "--runs=[{name: live, group: live, beta: 0.1}, {name: likelihood, group: likelihood, beta: 0.1, args: ["
               "--model.init_args.reference=cached, '--data.init_args.reference_cache=[{name_or_path: ${out_dir}/sft/latest/export,"
               " unconditional: true}]']}]",
               "--assets_args=[--n-sft=64, --n-pref=64, --n-val=16]",
               "--fit_args=[--trainer.max_epochs=1, --trainer.limit_train_batches=2, --trainer.limit_val_batches=1]"]
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(command, cwd=repo, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["run"] for r in rows] == ["live", "likelihood"]
    # two training steps: the metrics exist and are finite (generations of so short an SFT may be empty)
    assert all(0.0 <= r["val reward acc"] <= 1.0 and 0.0 <= r["gen reward"] <= 1.0 and not r["degenerate"] for r in rows)
    assert (out / "sweep.png").exists() and not (repo / "runs/refdpo-sweep/live").exists()
