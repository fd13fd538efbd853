"""`make refdpo-sweep`: DPO over β and reference choices on the synthetic task, one table and one plot.

Stages (each skipped when its output exists, so an interrupted sweep resumes):
1. synthetic assets; 2. SFT (the policy's start and the default reference); 3. the "stronger
reference": the SFT model trained `stronger_reference_epochs` further; 4. the likelihood run's
cached unconditional log-probs; 5. every run of `configs/sweeps/refdpo.yaml`, each one
`python -m lightning_modules fit --config configs/sweeps/refdpo_dpo.yaml` plus its overrides.
Per run: final validation reward accuracy and margin, mean reward and length of greedy generations
on held-out prompts, and `degenerate` (non-finite loss, repeated n-grams or runaway length, from
`callbacks.DegenerationDetector`). Writes `summary.json`, `summary.md` and `sweep.png` in `out_dir`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lightning_modules.studies.evaluate import markdown_table
from datamodules.utils.files import write_figure_atomic, write_text_atomic

DPO_CONFIG = "configs/sweeps/refdpo_dpo.yaml"
SFT_CONFIG = "configs/sweeps/refdpo_sft.yaml"


def run_step(name: str, args: list[str], creates: Path | None, log_dir: Path) -> float:
    """Run `python <args>` unless `creates` exists (None: always run; the step is idempotent itself).

    Output goes to `log_dir/<name>.log`. Returns seconds.
    """
    if creates is not None and creates.exists():
        print(f"[sweep] {name}: reusing {creates}")
        return 0.0
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"[sweep] {name}: python {' '.join(args)}", flush=True)
    with open(log_dir / f"{name}.log", "w") as log:
        code = subprocess.call([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"[sweep] {name} failed (exit {code}); see {log_dir / f'{name}.log'}")
    seconds = time.perf_counter() - start
    (log_dir / f"{name}.seconds").write_text(f"{seconds:.1f}\n")  # kept for summaries of resumed sweeps
    print(f"[sweep] {name}: {seconds:.0f} s", flush=True)
    return seconds


def collect(run: dict[str, Any], out: Path, seconds: float) -> dict[str, Any]:
    """One summary row from a run's MetricsJSON file."""
    metrics = json.loads((out / run["name"] / "metrics.json").read_text())
    finite = all(math.isfinite(v) for v in metrics.values())
    return {
        "run": run["name"], "reference": run["group"], "beta": run["beta"],
        "val reward acc": metrics.get("val/rewards/accuracies", float("nan")),
        "val margin": metrics.get("val/rewards/margins", float("nan")),
        "gen reward": metrics.get("val/generation/reward", float("nan")),
        "gen length": metrics.get("val/generation/length", float("nan")),
        "degenerate": bool(metrics.get("degenerate", 0.0)) or not finite,
        "seconds": round(seconds, 1),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Generation reward and validation reward accuracy against β, one line per reference choice."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
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
    fig.suptitle("synthetic task: DPO by β and reference choice")
    fig.tight_layout()
    write_figure_atomic(fig, path)


def sweep(config_path: str = "configs/sweeps/refdpo.yaml") -> list[dict[str, Any]]:
    config = yaml.safe_load(Path(config_path).read_text())
    out = Path(config["out_dir"])
    logs = out / "logs"
    assets = out / "assets"
    run_step("assets", ["-m", "datamodules.synthetic", "build", "--out", str(assets)], assets / "manifest.json", logs)
    run_step("sft", ["-m", "lightning_modules", "fit", "--config", SFT_CONFIG,
                     f"--trainer.default_root_dir={out / 'sft'}"], out / "sft" / "export", logs)
    run_step("sft_strong", ["-m", "lightning_modules", "fit", "--config", SFT_CONFIG,
                            f"--trainer.default_root_dir={out / 'sft_strong'}",
                            f"--model.init_args.model_name_or_path={out / 'sft' / 'export'}",
                            f"--trainer.max_epochs={config['stronger_reference_epochs']}"],
             out / "sft_strong" / "export", logs)
    rows = []
    for run in config["runs"]:
        args = ["--config", DPO_CONFIG, f"--trainer.default_root_dir={out / run['name']}",
                f"--model.init_args.beta={run['beta']}", *run.get("args", [])]
        if any(a.startswith("--data.init_args.reference_cache") for a in args):
            data_args = [a for a in args if a.startswith("--data.")]  # the cache needs only the data section
            run_step(f"{run['name']}_cache", ["-m", "lightning_modules.references.cache_builder", "--config", DPO_CONFIG,
                                              *data_args, "--tokenizer", str(out / "sft" / "export")], None, logs)
        run_step(run["name"], ["-m", "lightning_modules", "fit", *args], out / run["name"] / "metrics.json", logs)
        rows.append(collect(run, out, float((logs / f"{run['name']}.seconds").read_text())))
    table = markdown_table(rows)
    write_text_atomic(out / "summary.json", json.dumps({"runs": rows}, indent=2))
    write_text_atomic(out / "summary.md", table + "\n")
    plot(rows, out / "sweep.png")
    print(table)
    print(f"\nwrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'sweep.png'}")
    return rows


if __name__ == "__main__":
    sweep(*sys.argv[1:])
