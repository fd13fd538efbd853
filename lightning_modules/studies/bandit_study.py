"""`make bandit`: the on-policy study's categorical bandit, every algorithm offline and on-policy (SPEC section 5).

    python -m lightning_modules.studies.bandit_study --config configs/studies/bandit/study.yaml

Tajwar et al. 2024, section 4, at the scale of a CPU: for each reward (aligned: optimum where π_data has
mass; unaligned: optimum where it has little), algorithm (`configs/bandit/<algorithm>.yaml`: filtered_bc,
bon_negative, awr, dpo, ipo, reinforce), mode (offline: one batch of N actions per context from π_data;
on_policy: N fresh actions from the current policy every round) and seed, one in-process `fit` through
the CLI (`lightning_modules.cli.main`) with a CSV logger; `runs/<reward>/<algorithm>_<mode>/seed_<s>/result.json`
keeps its final metrics and its curve, and a finished cell is not run again (the study resumes).

Writes `summary.json`, `summary.md` (final exact expected reward E_π[r], KL(π‖π_data) and entropy per cell,
mean ± std over seeds, and a verdict computed from them) and `bandit.png` (expected reward against reward
queries, one panel per reward, a line per algorithm × mode, mean over seeds; below, the same against
gradient steps). The verdict asks SPEC's question: on the unaligned reward, do on-policy DPO / IPO and
on-policy best-of-N with a negative gradient end clearly higher than offline best-of-N NLL, and on the
aligned reward is the gap small?
"""

from __future__ import annotations

import csv
import json
import logging
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from datamodules.utils.errors import UserInputError
from datamodules.utils.files import write_text_atomic
from lightning_modules.studies.launch import run_study
from lightning_modules.studies.report import new_figure, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ALGORITHMS = ("filtered_bc", "bon_negative", "awr", "dpo", "ipo", "reinforce")
MODES = ("offline", "on_policy")
REWARDS = ("aligned", "unaligned")
BASELINE = ("filtered_bc", "offline")  # offline best-of-N NLL: the maximum-likelihood, offline corner
CONTENDERS = (("dpo", "on_policy"), ("ipo", "on_policy"), ("bon_negative", "on_policy"))  # SPEC's expected winners
CURVE = ("step", "train/reward_queries", "train/expected_reward", "train/reward", "train/kl_to_data", "train/entropy")
COLORS = {"filtered_bc": "tab:gray", "bon_negative": "tab:red", "awr": "tab:olive", "dpo": "tab:blue",
          "ipo": "tab:cyan", "reinforce": "tab:purple"}


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's per-run info lines ("GPU available ...", "Seed set to ...") off for the study's many fits, and
    LightningCLI's warning that `args` and the study's own command line are both given (by design here)."""
    import lightning.pytorch  # noqa: F401  (its import sets these loggers to INFO: import first, then quiet them)

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def read_curve(path: Path) -> dict[str, list[float]]:
    """The per-step metrics of a CSV logger's `metrics.csv`: {column of `CURVE`: values}, rows with a reward only."""
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/expected_reward")]
    return {key: [float(row[key]) for row in rows] for key in CURVE}


def run_one(config: str, folder: Path, args: list[str]) -> dict[str, Any]:
    """One in-process `fit` through the CLI, logged to `folder/metrics.csv`: final metrics, the curve, settings."""
    from lightning_modules.cli.app import main as cli_main

    start = time.perf_counter()
    cli = cli_main(["fit", "--config", config, f"--trainer.default_root_dir={folder}",
                    "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={folder}",
                    "--trainer.logger.name=", "--trainer.logger.version=", *args])
    curve = read_curve(folder / "metrics.csv")
    model, data = cli.model, cli.datamodule
    final = {key.removeprefix("train/"): values[-1] for key, values in curve.items() if key != "step"}
    return {"final": final, "curve": curve, "seconds": round(time.perf_counter() - start, 2),
            "settings": {"objective": repr(model.objective), "mode": model.mode, "num_samples": model.num_samples,
                         "reuse": model.reuse, "beta": model.beta, "n_contexts": data.n_contexts,
                         "reward": data.reward, "steps": cli.trainer.global_step}}


def queries_to_reach(curve: dict[str, list[float]], target: float) -> float | None:
    """Reward queries spent when the expected reward first reaches `target` (None: never)."""
    return next((q for q, r in zip(curve["train/reward_queries"], curve["train/expected_reward"]) if r >= target),
                None)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(results: dict[tuple[str, str, str], list[dict[str, Any]]], clear_gap: float, small_gap: float) -> dict[str, Any]:
    """SPEC's expected finding, judged from the final expected rewards (see `bandit_study`'s clear_gap / small_gap)."""
    def rewards(reward: str, algorithm: str, mode: str) -> list[float] | None:
        runs = results.get((reward, algorithm, mode))
        return [r["final"]["expected_reward"] for r in runs] if runs else None

    out: dict[str, Any] = {"clear_gap": clear_gap, "small_gap": small_gap}
    parts = []
    for reward in ("unaligned", "aligned"):  # the claim, then the control
        base = rewards(reward, *BASELINE)
        gaps = {}
        for algorithm, mode in CONTENDERS:
            mine = rewards(reward, algorithm, mode)
            if base is None or mine is None:
                continue
            gap = statistics.fmean(mine) - statistics.fmean(base)
            # clearly higher: by at least clear_gap on average, and every seed above every seed of the baseline
            gaps[f"{algorithm}_{mode}"] = {"gap": gap, "clearly_higher": gap >= clear_gap and min(mine) > max(base)}
        out[reward] = {"baseline": None if base is None else statistics.fmean(base), "gaps": gaps}
        if not gaps:
            parts.append(f"{reward}: not run (needs offline filtered_bc and on-policy dpo / ipo / bon_negative)")
            continue
        listed = ", ".join(f"{name} {g['gap']:+.3f}" for name, g in gaps.items())
        if reward == "unaligned":
            ok = all(g["clearly_higher"] for g in gaps.values()) and len(gaps) == len(CONTENDERS)
            out[reward]["expected"] = ok
            parts.append(f"unaligned reward: against offline best-of-N NLL ({statistics.fmean(base):.3f}) the final "
                         f"expected reward differs by {listed}; {'all' if ok else 'not all'} clearly higher "
                         f"(by >= {clear_gap} and on every seed)")
        else:
            largest = max(abs(g["gap"]) for g in gaps.values())
            ok = largest <= small_gap and len(gaps) == len(CONTENDERS)
            out[reward]["expected"] = ok
            parts.append(f"aligned reward: the same gaps are {listed} (largest {largest:.3f}, "
                         f"{'small' if largest <= small_gap else 'not small'}: threshold {small_gap})")
    reproduced = all(out.get(reward, {}).get("expected", False) for reward in REWARDS)
    out["reproduced"] = reproduced
    out["text"] = "; ".join(parts) + (". The paper's finding is reproduced." if reproduced else
                                      ". The paper's finding is not (fully) reproduced here.")
    return out


def mean_curve(runs: list[dict[str, Any]], key: str) -> tuple[list[float], list[float], list[float]]:
    """(steps, queries, mean of `key` over seeds), over the steps every seed logged."""
    length = min(len(r["curve"][key]) for r in runs)
    first = runs[0]["curve"]
    means = [statistics.fmean(r["curve"][key][i] for r in runs) for i in range(length)]
    return first["step"][:length], first["train/reward_queries"][:length], means


def plot(results: dict[tuple[str, str, str], list[dict[str, Any]]], rewards: list[str], title: str) -> Figure:
    """Top: expected reward against reward queries per reward (offline: dashed, flat after its one batch);
    bottom: against gradient steps. Mean over seeds."""
    fig, axes = new_figure(len(rewards), 2, panel_size=(5.6, 3.8), title=title)
    top, bottom = axes[:len(rewards)], axes[len(rewards):]
    for column, reward in enumerate(rewards):
        longest = max((r["curve"]["train/reward_queries"][-1] for (rw, _, _), runs in results.items() if rw == reward
                       for r in runs), default=1.0)
        for (rw, algorithm, mode), runs in results.items():
            if rw != reward:
                continue
            steps, queries, values = mean_curve(runs, "train/expected_reward")
            style = dict(color=COLORS.get(algorithm), linestyle="--" if mode == "offline" else "-", linewidth=1.3)
            label = f"{algorithm} ({mode.replace('_', '-')})"
            if mode == "offline":  # all of its queries are spent on the first batch: its final reward, flat
                top[column].hlines(values[-1], queries[-1], longest, **style)
                top[column].plot([queries[-1]], [values[-1]], marker="o", markersize=4, label=label, **style)
            else:
                top[column].plot(queries, values, label=label, **style)
            bottom[column].plot(steps, values, **style)
        top[column].set(xscale="log", xlabel="reward queries", ylabel="expected reward E_π[r]", ylim=(-0.02, 1.02),
                        title=f"{reward} reward")
        bottom[column].set(xlabel="gradient step", ylabel="expected reward E_π[r]", ylim=(-0.02, 1.02))
    top[0].legend(fontsize=6, ncol=2, loc="lower right")
    return fig


def bandit_study(out_dir: str = "runs/bandit", algorithms: tuple[str, ...] = ALGORITHMS,
                 modes: tuple[str, ...] = MODES, rewards: tuple[str, ...] = REWARDS, seeds: tuple[int, ...] = (0, 1, 2),
                 config_dir: str = "configs/bandit", fit_args: tuple[str, ...] = (), threads: int = 1,
                 clear_gap: float = 0.1, small_gap: float = 0.1, target: float = 0.9,
                 title: str = "bandit: offline vs on-policy, with and without negative gradients") -> list[dict[str, Any]]:
    """Run (or resume) the study; write and return its table rows.

    Args:
        out_dir: everything the study makes: runs/<reward>/<algorithm>_<mode>/seed_<s>/ and the report.
        algorithms: config names under config_dir (filtered_bc, bon_negative, awr, dpo, ipo, reinforce).
        modes: offline (one batch of N actions per context from π_data) and / or on_policy.
        rewards: aligned and / or unaligned.
        seeds: seed_everything of each repetition (the environment, data.seed, stays fixed).
        config_dir: folder of the per-algorithm training configs.
        fit_args: overrides appended to every run (e.g. --trainer.max_steps=20 for a smoke run).
        threads: torch CPU threads (1: the runs are tiny, more threads only contend).
        clear_gap: verdict: "clearly higher" = mean final reward at least this much higher, and every seed higher.
        small_gap: verdict: the aligned reward's gap is "small" when no contender differs by more than this.
        target: the table's "queries to <target>": reward queries spent when the expected reward first reaches it.
        title: report and plot title.
    """
    unknown = [m for m in modes if m not in MODES] + [r for r in rewards if r not in REWARDS]
    missing = [a for a in algorithms if not (Path(config_dir) / f"{a}.yaml").is_file()]
    if unknown or missing or not seeds or not algorithms:
        raise UserInputError(f"bandit_study: modes {list(modes)} must be among {list(MODES)}, rewards {list(rewards)} "
                             f"among {list(REWARDS)}, every algorithm needs {config_dir}/<algorithm>.yaml (missing: "
                             f"{missing}), and seeds / algorithms must not be empty")
    if threads < 1:
        raise UserInputError(f"bandit_study: threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    out = Path(out_dir)
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    start = time.perf_counter()
    with quiet_lightning():
        for reward in rewards:
            for algorithm in algorithms:
                for mode in modes:
                    runs = results.setdefault((reward, algorithm, mode), [])
                    for seed in seeds:
                        folder = out / "runs" / reward / f"{algorithm}_{mode}" / f"seed_{seed}"
                        result_file = folder / "result.json"
                        if not result_file.exists():
                            result = run_one(str(Path(config_dir) / f"{algorithm}.yaml"), folder, [
                                f"--seed_everything={seed}", f"--data.init_args.reward={reward}",
                                f"--model.init_args.mode={mode}", *fit_args])
                            write_text_atomic(result_file, json.dumps(result) + "\n")
                            print(f"[study] {reward} {algorithm} {mode} seed {seed}: expected reward "
                                  f"{result['final']['expected_reward']:.3f} ({result['seconds']:.1f} s)", flush=True)
                        runs.append(json.loads(result_file.read_text()))
    wall = time.perf_counter() - start

    rows = []
    for (reward, algorithm, mode), runs in results.items():
        row: dict[str, Any] = {"reward": reward, "algorithm": algorithm, "mode": mode.replace("_", "-")}
        for key in ("expected_reward", "kl_to_data", "entropy"):
            mean, std = mean_std([r["final"][key] for r in runs])
            row[key] = f"{mean:.3f} ± {std:.3f}"
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        row["reward_queries"] = int(statistics.fmean(r["final"]["reward_queries"] for r in runs))
        reached = [queries_to_reach(r["curve"], target) for r in runs]
        row["queries_to_target"] = None if None in reached else statistics.fmean(reached)
        row["seconds"] = statistics.fmean(r["seconds"] for r in runs)
        rows.append(row)
    judged = verdict(results, clear_gap, small_gap)
    settings = results[next(iter(results))][0]["settings"]
    summary = {"seeds": list(seeds), "settings": {k: settings[k] for k in ("num_samples", "reuse", "n_contexts", "steps")},
               "wall_seconds_this_invocation": round(wall, 1),
               "run_seconds_total": round(sum(r["seconds"] for runs in results.values() for r in runs), 1),
               "verdict": judged, "rows": rows,
               "runs": {"/".join(key): [{k: r[k] for k in ("final", "seconds", "settings")} for r in runs]
                        for key, runs in results.items()}}
    intro = (f"Final exact expected reward E_π[r] (mean over the contexts), KL(π‖π_data) and entropy after "
             f"{settings['steps']} gradient steps, mean ± std over seeds {list(seeds)}; {settings['n_contexts']} "
             f"contexts × N = {settings['num_samples']} actions per round, reuse {settings['reuse']}. Offline runs "
             f"query rewards once (their first batch), on-policy runs every round. 'queries to {target:g}': reward "
             f"queries spent when E_π[r] first reached {target:g} (mean over seeds; - when a seed never did).\n\n"
             f"**Verdict** (computed from these numbers): {judged['text']}")
    write_report(out, summary, rows, plot(results, list(rewards), title), title=title, intro=intro,
                 figure_name="bandit.png",
                 columns={"reward": "reward", "algorithm": "algorithm", "mode": "mode",
                          "expected_reward": "final E_π[r]", "kl_to_data": "KL(π‖π_data)", "entropy": "entropy",
                          "reward_queries": "reward queries", "queries_to_target": f"queries to {target:g}",
                          "seconds": "s / run"},
                 formats={"seconds": ".1f", "queries_to_target": lambda q: f"{q:.0f}"})
    print(f"\nverdict: {judged['text']}")
    return rows


def main(args: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    run_study(bandit_study, args)


if __name__ == "__main__":
    main()
