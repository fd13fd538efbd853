"""`make refdpo-sweep`: DPO over β and reference choices on the synthetic task, one table and one plot.

    python -m lightning_modules.studies.refdpo_sweep --config configs/studies/refdpo-sweep/sweep.yaml

Stages, all under `out_dir` (each skipped when its output exists, so an interrupted sweep resumes):
1. synthetic assets; 2. SFT (`sft_config`: the policy's start and the default reference); 3. the
"stronger reference": the SFT model trained `stronger_reference_epochs` further; 4. the likelihood
run's cached unconditional log-probs; 5. every run of `runs`, each one
`python -m lightning_modules fit --config <dpo_config>` plus the run's β and overrides.
Per run: final validation reward accuracy and margin, mean reward and length of greedy generations
on held-out prompts, and `degenerate` (non-finite loss, repeated n-grams or runaway length, from
`callbacks.DegenerationDetector`). Writes `summary.json`, `summary.md` and `sweep.png` in `out_dir`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datamodules.utils.errors import UserInputError
from lightning_modules.studies.launch import run_step, run_study
from lightning_modules.studies.report import new_figure, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SFT_CONFIG = "configs/studies/refdpo-sweep/sft.yaml"
DPO_CONFIG = "configs/studies/refdpo-sweep/dpo.yaml"


@dataclass(frozen=True)
class SweepRun:
    """One DPO run of the sweep.

    Args:
        name: the run's folder under out_dir (unique; also the table's `run` column).
        group: the reference choice, one plot line per group (e.g. "live (SFT)", "reference-free").
        beta: DPO β (`--model.init_args.beta`).
        args: further `lightning_modules fit` overrides, e.g. `--model.init_args.reference=none`; a
            `--data.init_args.reference_cache=...` override first builds that cache.
    """

    name: str
    group: str
    beta: float
    args: tuple[str, ...] = ()


def collect(run: SweepRun, out: Path, seconds: float) -> dict[str, Any]:
    """One summary row from a run's MetricsJSON file."""
    metrics = json.loads((out / run.name / "latest" / "metrics.json").read_text())
    finite = all(math.isfinite(v) for v in metrics.values())
    return {
        "run": run.name, "reference": run.group, "beta": run.beta,
        "val reward acc": metrics.get("val/rewards/accuracies", float("nan")),
        "val margin": metrics.get("val/rewards/margins", float("nan")),
        "gen reward": metrics.get("val/generation/reward", float("nan")),
        "gen length": metrics.get("val/generation/length", float("nan")),
        "degenerate": bool(metrics.get("degenerate", 0.0)) or not finite,
        "seconds": round(seconds, 1),
    }


def plot(rows: list[dict[str, Any]], title: str = "synthetic task: DPO by β and reference choice") -> Figure:
    """Generation reward and validation reward accuracy against β, one line per reference choice (the figure)."""
    fig, axes = new_figure(2, panel_size=(5.5, 4), title=title)
    for ax, key in zip(axes, ("gen reward", "val reward acc")):
        for group in dict.fromkeys(r["reference"] for r in rows):
            mine = sorted((r for r in rows if r["reference"] == group), key=lambda r: r["beta"])
            ax.plot([r["beta"] for r in mine], [r[key] for r in mine], marker="o", label=group)
            for r in mine:
                if r["degenerate"]:
                    ax.scatter([r["beta"]], [r[key]], marker="x", s=120, color="red", zorder=5)
        ax.set(xscale="log", xlabel="β", ylabel=key, title=f"{key} (red x = degenerate)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return fig


def refdpo_sweep(runs: list[SweepRun], out_dir: str = "runs/refdpo-sweep", stronger_reference_epochs: int = 3,
                 sft_config: str = SFT_CONFIG, dpo_config: str = DPO_CONFIG, assets_args: tuple[str, ...] = (),
                 fit_args: tuple[str, ...] = (),
                 title: str = "synthetic task: DPO by β and reference choice") -> list[dict[str, Any]]:
    """Run (or resume) the sweep; write and return its table rows.

    Args:
        runs: the grid, one DPO run each.
        out_dir: everything the sweep makes: assets/, sft/, sft_strong/, one folder per run, logs/, the report.
        stronger_reference_epochs: extra SFT epochs, from the SFT export, that make the "stronger reference".
        sft_config: training config of the SFT stages (model, data and outputs are pointed into out_dir).
        dpo_config: training config of every run (policy = out_dir/sft/latest/export; data from out_dir/assets).
        assets_args: extra `python -m datamodules.synthetic build` options, e.g. `--n-sft=256` for a smoke run.
        fit_args: overrides appended to every training (SFT and DPO), e.g. `--trainer.limit_train_batches=2`.
        title: report and plot title.
    """
    names = [run.name for run in runs]
    if not runs or len(names) != len(set(names)):
        raise UserInputError(f"runs: need at least one run and unique names (they name folders), got {names}")
    out = Path(out_dir)
    logs, assets, sft = out / "logs", out / "assets", out / "sft" / "latest" / "export"
    sft_args = ["-m", "lightning_modules", "fit", "--config", sft_config,
                f"--data.init_args.path={assets / 'data/sft'}"]
    run_step("assets", ["-m", "datamodules.synthetic", "build", "--out", str(assets), *assets_args],
             assets / "manifest.json", logs)
    run_step("sft", [*sft_args, f"--trainer.default_root_dir={out / 'sft'}",
                     f"--model.init_args.model_name_or_path={assets / 'model'}", *fit_args], sft, logs)
    run_step("sft_strong", [*sft_args, f"--trainer.default_root_dir={out / 'sft_strong'}",
                            f"--model.init_args.model_name_or_path={sft}",
                            f"--trainer.max_epochs={stronger_reference_epochs}", *fit_args],
             out / "sft_strong" / "latest" / "export", logs)
    data = [f"--data.init_args.path={assets / 'data/prefs'}"]
    rows = []
    for run in runs:
        args = ["--config", dpo_config, f"--trainer.default_root_dir={out / run.name}",
                f"--model.init_args.model_name_or_path={sft}", *data, f"--model.init_args.beta={run.beta}", *run.args]
        if any(a.startswith("--data.init_args.reference_cache") for a in args):
            data_args = [a for a in args if a.startswith("--data.")]  # the cache needs only the data section
            run_step(f"{run.name}_cache", ["-m", "lightning_modules.references.cache_builder", "--config", dpo_config,
                                           *data_args, "--tokenizer", str(sft)], None, logs)
        run_step(run.name, ["-m", "lightning_modules", "fit", *args, *fit_args], out / run.name / "latest" / "metrics.json",
                 logs)
        rows.append(collect(run, out, float((logs / f"{run.name}.seconds").read_text())))
    formats = {"beta": "g", "val margin": ".2f", "gen length": ".1f", "seconds": ".0f",
               "degenerate": lambda flagged: "**yes**" if flagged else "no"}
    write_report(out, {"runs": rows}, rows, plot(rows, title), title=title, figure_name="sweep.png", formats=formats,
                 intro=f"Each run: `{dpo_config}` + its β and overrides, from the SFT policy in `{sft}`; gen = "
                       "greedy generations on held-out prompts scored by the aligned reward; seconds = training time.")
    return rows


def main(args: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    run_study(refdpo_sweep, args)


if __name__ == "__main__":
    main()
