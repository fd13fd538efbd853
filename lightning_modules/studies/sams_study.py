"""`make sams-study`: SamS, the learned sample scheduler, against DPO and DPO on a random half (SPEC section 6).

    python -m lightning_modules.studies.sams_study --config configs/studies/sams-study/study.yaml

The SamS paper's comparison (seed 004) at toy scale, on the synthetic task: DPO on every pair, DPO on a uniformly
random share of each batch (`SamS(selection=random)`: the scheduler's networks still train, so the overhead is the
same), and DPO on the pairs SamS selects (top-k by its score) at several ratios; each with the training pairs'
labels clean and with a share of them flipped (`PreferenceDataModule.label_noise`; validation keeps the true
labels). Stages, under `out_dir`, each skipped when its output exists (an interrupted study resumes):
1. the synthetic assets, pairs built without label noise (`assets/`);
2. one SFT policy (`sft_config`, `sft/`) and its greedy reward on the held-out prompts (`runs/sft_reward.json`);
3. per noise level, seed and method, one in-process `fit` of `train_config` through the CLI from the SFT policy,
   plus two callbacks: `GenerationReward` (greedy generations on the held-out test prompts scored by the task's
   reward, `val/generation/reward`) and `SelectionTrace` (per training step, the logged share of flipped-label
   pairs among the selected pairs, `train/sams/flipped_selected`, and in the whole batch, `train/sams/flipped_all`).
   Each run's final `val/rewards/accuracies`, generation reward and trace go to
   `runs/noise_<pct>/seed_<s>/<method>/result.json`.
Writes `summary.json`, `summary.md` (per method and noise level: validation reward accuracy and generation reward;
at each noise level > 0 the flipped share of the selected pairs against chance; mean ± std over seeds; verdicts
computed from the numbers by `sams_verdicts`) and `sams.png`.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L

from datamodules.synthetic.task import VARIANTS
from datamodules.utils.errors import UserInputError
from datamodules.utils.files import write_text_atomic
from lightning_modules.sams import Selection
from lightning_modules.studies.launch import fit_in_process, run_step, run_study
from lightning_modules.studies.multiref_study import mean_std
from lightning_modules.studies.onpolicy_study import sft_reward, torch_threads
from lightning_modules.studies.report import new_figure, write_report
from lightning_modules.studies.sams_verdicts import METRICS, PaperMethods, verdicts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SFT_CONFIG = "configs/studies/sams-study/sft.yaml"
TRAIN_CONFIG = "configs/studies/sams-study/train.yaml"
TRACE = "lightning_modules.studies.sams_study.SelectionTrace"  # by its module's name, also when run with -m
FLIPPED = {"selected": "train/sams/flipped_selected", "chance": "train/sams/flipped_all"}


@dataclass(frozen=True)
class StudyMethod:
    """One method of the study: DPO, optionally on the pairs a `SamS` scheduler selects from each batch.

    Args:
        name: its folder under runs/noise_<pct>/seed_<s>/ and its table row.
        selection: None = plain DPO on every pair; topk = SamS (the paper); softmax = SamS sampling by score
            (the released code); random = a uniformly random share (the paper's random baseline).
        ratio: the share of each batch trained on, k = ⌈ratio·n⌉ (with a selection).
        args: further `lightning_modules fit` overrides, e.g.
            `--model.init_args.sample_scheduler.init_args.exploration=false` (no exploration network).
    """

    name: str
    selection: Selection | None = None
    ratio: float = 0.5
    args: tuple[str, ...] = ()

    def label(self) -> str:
        """How the table names the method's selection."""
        if self.selection is None:
            return "all pairs"
        return f"{'SamS ' + self.selection if self.selection != 'random' else 'random'} {self.ratio:.0%}"


class SelectionTrace(L.Callback):
    """Per training step, the logged flipped-label shares (`FLIPPED`); and the global step of each validation."""

    def __init__(self) -> None:
        self.shares: dict[str, list[float]] = {key: [] for key in FLIPPED}
        self.validated: list[int] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch.get("label_flipped") is None:  # no label noise: the module logs no flipped shares
            return
        selection = getattr(pl_module, "last_selection", None)  # None: plain DPO, no scheduler
        if selection is None:
            return
        metrics = selection.metrics  # this step's values (logged only every log_every_n_steps)
        for key, name in FLIPPED.items():
            if name.removeprefix("train/") in metrics:
                self.shares[key].append(float(metrics[name.removeprefix("train/")]))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated.append(trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"shares": {k: list(v) for k, v in self.shares.items()}, "validated": list(self.validated)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shares = {k: list(v) for k, v in state["shares"].items()}
        self.validated = list(state["validated"])


def noise_label(noise: float) -> str:
    """'20%': a noise level as the table and summary.json name it."""
    return f"{100 * noise:g}%"


def paper_methods(methods: list[StudyMethod]) -> PaperMethods:
    """The paper's three arms among `methods`: plain DPO, random at ratio 0.5, SamS top-k at ratio 0.5."""
    def first(selection: str | None, half: bool) -> str | None:
        return next((m.name for m in methods if m.selection == selection and (not half or m.ratio == 0.5)), None)

    found = PaperMethods(first(None, False), first("random", True), first("topk", True))
    if None in found:
        raise UserInputError("methods: the verdict compares the paper's three arms, so the study needs plain DPO "
                             "(no selection), random at ratio 0.5 and topk at ratio 0.5; found "
                             f"{dict(zip(PaperMethods._fields, found))}")
    return found


def check_settings(methods: list[StudyMethod], noise_levels: tuple[float, ...], seeds: tuple[int, ...],
                   variant: str, configs: list[str], sizes: dict[str, int], clear_gap: float) -> PaperMethods:
    """A UserInputError naming the bad setting, before anything runs (`sizes`: settings that must be >= 1)."""
    names = [m.name for m in methods]
    if not methods or len(set(names)) != len(names):
        raise UserInputError(f"methods: need at least one, with unique names (they name folders); got {names}")
    if bad := [m.name for m in methods if not 0 < m.ratio <= 1]:
        raise UserInputError(f"methods: ratio must be in (0, 1]; out of range for {bad}")
    paper = paper_methods(methods)
    if missing := [c for c in configs if not Path(c).is_file()]:
        raise UserInputError(f"config files not found: {missing}")
    labels = [noise_label(n) for n in noise_levels]
    if not noise_levels or len(set(labels)) != len(labels) or not all(0 <= n < 1 for n in noise_levels):
        raise UserInputError(f"noise_levels={list(noise_levels)}: need at least one, unique, each in [0, 1)")
    if variant not in VARIANTS or not seeds:
        raise UserInputError(f"variant={variant!r} (one of {list(VARIANTS)}) and seeds={list(seeds)} (at least one)")
    if min(sizes.values()) < 1 or clear_gap < 0:
        raise UserInputError(", ".join(f"{k}={v}" for k, v in sizes.items()) + f" (each >= 1) and clear_gap="
                             f"{clear_gap} (>= 0): one is out of range")
    return paper


def run_args(method: StudyMethod, seed: int, noise: float, folder: Path, export: Path, assets: Path,
             variant: str, max_new_tokens: int, num_prompts: int) -> list[str]:
    """The `fit` overrides of one run: seed, paths, label noise, the method's scheduler, the evaluation callbacks."""
    args = [f"--seed_everything={seed}", f"--trainer.default_root_dir={folder}",
            f"--model.init_args.model_name_or_path={export}", f"--data.init_args.path={assets / 'data/prefs'}",
            f"--data.init_args.label_noise={noise}", f"--data.init_args.label_noise_seed={seed}"]
    if method.selection is not None:
        scheduler = {"class_path": "lightning_modules.sams.SamS",
                     "init_args": {"ratio": method.ratio, "selection": method.selection, "seed": seed,
                                   "replay_batches": 32}}  # the paper's replay (SamS's default is 8)
        args.append(f"--model.init_args.sample_scheduler={json.dumps(scheduler)}")
    reward = {"class_path": "lightning_modules.rewards.Synthetic", "init_args": {"variant": variant}}
    generation = {"class_path": "callbacks.GenerationReward",
                  "init_args": {"reward": reward, "prompts_path": str(assets / "data/prompts/test.jsonl"),
                                "num_prompts": num_prompts, "max_new_tokens": max_new_tokens}}
    callbacks = [f"--trainer.callbacks+={json.dumps(c)}" for c in (generation, {"class_path": TRACE})]
    return [*args, *method.args, *callbacks]


def run_one(config: str, args: list[str]) -> dict[str, Any]:
    """One in-process `fit` through the CLI: final validation reward accuracy and generation reward, the trace."""
    from lightning_modules.studies.sams_study import SelectionTrace as Trace  # the class TRACE names

    start = time.perf_counter()
    cli = fit_in_process(config, args)
    trace = next(c for c in cli.trainer.callbacks if isinstance(c, Trace))
    metrics, step = cli.trainer.callback_metrics, cli.trainer.global_step
    if trace.validated[-1:] != [step] or "val/generation/reward" not in metrics:
        raise UserInputError(f"{config}: the run did not validate its final policy; make max_steps a multiple of "
                             "trainer.val_check_interval")
    shares = {key: statistics.fmean(values) if values else None for key, values in trace.shares.items()}
    return {"val_accuracy": float(metrics["val/rewards/accuracies"]),
            "generation_reward": float(metrics["val/generation/reward"]), "val_loss": float(metrics["val/loss"]),
            "flipped": shares, "trace": trace.shares, "steps": step, "seconds": round(time.perf_counter() - start, 1)}


def sams_study(methods: list[StudyMethod], out_dir: str = "runs/sams-study",
               noise_levels: tuple[float, ...] = (0.0, 0.2), seeds: tuple[int, ...] = (0, 1, 2),
               variant: str = "aligned", sft_config: str = SFT_CONFIG,
               train_config: str = TRAIN_CONFIG, eval_max_new_tokens: int = 24, eval_prompts: int = 64,
               clear_gap: float = 0.02, threads: int = 1, assets_args: tuple[str, ...] = (),
               sft_args: tuple[str, ...] = (), fit_args: tuple[str, ...] = (),
               title: str = "synthetic task: DPO vs DPO + SamS vs DPO + random selection") -> list[dict[str, Any]]:
    """Run (or resume) the study; write and return its table rows.

    Args:
        methods: the methods compared (plain DPO, random at ratio 0.5 and SamS topk at ratio 0.5 among them).
        out_dir: everything the study makes: assets/, sft/, runs/, logs/, the report.
        noise_levels: shares of the training pairs whose labels are flipped (`data.label_noise`), one study each.
        seeds: seed_everything, the scheduler's seed and `data.label_noise_seed` (which pairs flip) of each
            repetition.
        variant: the synthetic task's reward, which labels the pairs and scores the generations (aligned, unaligned).
        sft_config: config of the SFT stage.
        train_config: config of every DPO run (the study adds the scheduler, the seed, the noise and the paths).
        eval_max_new_tokens: greedy-generation budget of the evaluation (responses are at most 16 words).
        eval_prompts: held-out test prompts evaluated (the first N; the task has 34).
        clear_gap: a difference of means is clear when it exceeds this and two standard errors of the difference.
        threads: torch intra-op threads of every stage (the tiny model's ops are too small to share out).
        assets_args: extra `python -m datamodules.synthetic build` options.
        sft_args: overrides appended to the SFT stage, e.g. `--trainer.max_steps=4` for a smoke run.
        fit_args: overrides appended to every DPO run, e.g. `--trainer.max_steps=4` for a smoke run.
        title: report and plot title.
    """
    noise_levels, seeds, out = tuple(noise_levels), tuple(seeds), Path(out_dir)
    paper = check_settings(methods, noise_levels, seeds, variant, [sft_config, train_config],
                           {"eval_max_new_tokens": eval_max_new_tokens, "eval_prompts": eval_prompts,
                            "threads": threads}, clear_gap)
    with torch_threads(threads):
        assets, export = prepare(out, variant, sft_config, assets_args, sft_args)
        baseline_file = out / "runs" / "sft_reward.json"
        if not baseline_file.exists():
            reward = sft_reward(export, assets / "data/prompts/test.jsonl", variant, eval_max_new_tokens, eval_prompts)
            write_text_atomic(baseline_file, json.dumps({variant: reward}, indent=2) + "\n")
        baseline = json.loads(baseline_file.read_text())[variant]
        results: dict[str, dict[str, list[dict[str, Any]]]] = {
            noise_label(n): {m.name: [] for m in methods} for n in noise_levels}
        for noise in noise_levels:
            for seed in seeds:
                for m in methods:
                    folder = out / "runs" / f"noise_{100 * noise:g}" / f"seed_{seed}" / m.name
                    if not (folder / "result.json").exists():
                        args = run_args(m, seed, noise, folder, export, assets, variant, eval_max_new_tokens,
                                        eval_prompts)
                        result = run_one(train_config, [*args, *fit_args])
                        write_text_atomic(folder / "result.json", json.dumps(result, indent=2) + "\n")
                        print(f"[study] noise {noise_label(noise)} seed {seed} {m.name}: val accuracy "
                              f"{result['val_accuracy']:.3f}, generation reward {result['generation_reward']:.3f}, "
                              f"{result['seconds']:.0f} s", flush=True)
                    results[noise_label(noise)][m.name].append(json.loads((folder / "result.json").read_text()))
    return report(methods, paper, out, seeds, variant, baseline, results, clear_gap, title)


def prepare(out: Path, variant: str, sft_config: str, assets_args: tuple[str, ...],
            sft_args: tuple[str, ...]) -> tuple[Path, Path]:
    """The assets (pairs with their true labels: the study adds the noise) and the SFT export, reused when present."""
    assets, sft = out / "assets", out / "sft"
    run_step("assets", ["-m", "datamodules.synthetic", "build", "--out", str(assets), "--variant", variant,
                        "--label-noise=0", *assets_args], assets / "manifest.json", out / "logs")
    run_step("sft", ["-m", "lightning_modules", "fit", "--config", sft_config, f"--trainer.default_root_dir={sft}",
                     f"--data.init_args.path={assets / 'data/sft'}",
                     f"--model.init_args.model_name_or_path={assets / 'model'}", *sft_args],
             sft / "latest" / "export", out / "logs")
    return assets, sft / "latest" / "export"


def plot(values: dict[str, Any], traces: dict[str, dict[str, tuple[list[float], float]]], methods: list[StudyMethod],
         baseline: float, title: str) -> Figure:
    """Per metric, bars per method and noise level (mean ± std); per noise level > 0, the flipped share over steps."""
    fig, axes = new_figure(len(METRICS) + len(traces), panel_size=(5.2, 3.9), title=title)
    names, width = [m.name for m in methods], 0.8 / len(values)
    for ax, (metric, label) in zip(axes, METRICS.items()):
        for i, (noise, per_metric) in enumerate(values.items()):
            stats = [mean_std(per_metric[metric][n]) for n in names]
            ax.bar([j + (i - (len(values) - 1) / 2) * width for j in range(len(names))], [s[0] for s in stats],
                   width, yerr=[s[1] for s in stats], capsize=2, label=f"{noise} flipped")
        means = [statistics.fmean(p[metric][n]) for p in values.values() for n in names]
        if metric == "generation_reward":  # the SFT policy's greedy reward, where every run starts
            ax.axhline(baseline, color="gray", linewidth=0.8, linestyle=":", label="SFT")
            means.append(baseline)
        low = min(means)
        ax.set(title=label, xticks=range(len(names)), ylim=(max(0.0, low - 0.15), 1.0))
        ax.set_xticklabels(names, rotation=30, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    for ax, (noise, per_method) in zip(axes[len(METRICS):], traces.items()):
        for name, (curve, chance) in per_method.items():
            ax.plot(range(1, len(curve) + 1), curve, label=name, linestyle="--" if name.startswith("random") else "-")
        chances = [chance for _, chance in per_method.values()]
        ax.axhline(statistics.fmean(chances), color="gray", linewidth=0.8, linestyle=":", label="chance (batch)")
        ax.set(title=f"{noise} flipped: flipped share of the pairs trained on", xlabel="step",
               ylabel="flipped share (seed mean, 10-step mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def smoothed(runs: list[dict[str, Any]], window: int = 10) -> list[float]:
    """The flipped share of the selected pairs per step, averaged over seeds, then over a trailing window."""
    steps = min(len(r["trace"]["selected"]) for r in runs)
    mean = [statistics.fmean(r["trace"]["selected"][i] for r in runs) for i in range(steps)]
    return [statistics.fmean(mean[max(0, i - window + 1):i + 1]) for i in range(steps)]


def report(methods: list[StudyMethod], paper: PaperMethods, out: Path, seeds: tuple[int, ...], variant: str,
           baseline: float, results: dict[str, dict[str, list[dict[str, Any]]]], clear_gap: float,
           title: str) -> list[dict[str, Any]]:
    """The table (per method: both metrics per noise level, flipped shares), the verdicts and the figure."""
    values = {noise: {metric: {m.name: [r[metric] for r in per[m.name]] for m in methods} for metric in METRICS}
              for noise, per in results.items()}
    measured = {noise: [m for m in methods if m.selection is not None and all(
        r["flipped"]["selected"] is not None for r in per[m.name])] for noise, per in results.items()}
    flips = {noise: {m.name: {key: [r["flipped"][key] for r in results[noise][m.name]] for key in FLIPPED}
                     for m in group} for noise, group in measured.items() if group}
    found = verdicts(values, flips, paper, clear_gap)
    columns = {"method": "method", "selection": "trains on",
               **{f"{n}_{metric}": f"{label} ({n} flipped)" for n in values for metric, label in METRICS.items()},
               **{f"{n}_{key}": f"flipped share of {'selected' if key == 'selected' else 'batch = chance'} ({n})"
                  for n in flips for key in FLIPPED}, "seconds": "s / run"}
    rows: list[dict[str, Any]] = [{"method": "sft (start)", "selection": "-", "seconds": None,
                                   **{f"{n}_generation_reward": f"{baseline:.3f}" for n in values}}]
    for m in methods:
        cells = {f"{n}_{metric}": "{:.3f} ± {:.3f}".format(*mean_std(per[metric][m.name]))
                 for n, per in values.items() for metric in METRICS}
        cells |= {f"{n}_{key}": "{:.3f} ± {:.3f}".format(*mean_std(per[m.name][key]))
                  for n, per in flips.items() if m.name in per for key in FLIPPED}
        rows.append({"method": m.name, "selection": m.label(), **cells,
                     "seconds": statistics.fmean(r["seconds"] for per in results.values() for r in per[m.name])})
    traces = {noise: {m.name: (smoothed(results[noise][m.name]), statistics.fmean(flips[noise][m.name]["chance"]))
                      for m in measured[noise]} for noise in flips}
    summary = {"seeds": list(seeds), "noise_levels": list(values), "variant": variant, "sft_reward": baseline,
               "methods": [vars(m) for m in methods], "paper_methods": paper._asdict(), "clear_gap": clear_gap,
               "verdicts": found, "metrics": values, "flipped": flips, "rows": rows, "runs": results}
    intro = (f"Synthetic task ({variant} reward), every run from the same SFT policy, the same steps and batches; "
             "a method with a selection trains on k = ⌈ratio·n⌉ pairs of each batch. Validation reward accuracy: "
             "the final `val/rewards/accuracies` on the validation pairs (true labels); generation reward: the task's "
             "reward of greedy generations on the held-out test prompts. Flipped share: the share of flipped-label "
             "pairs among the pairs trained on (selected) and in the whole batch (chance), averaged over training "
             f"steps. Mean ± std over seeds {list(seeds)}. A difference is *clear* when it exceeds {clear_gap} and "
             "two standard errors. Paper (SPEC section 6): random-50% is worse than DPO, SamS better.\n\n"
             + "\n".join(f"- {text}" for text in found.values()))
    write_report(out, summary, rows, plot(values, traces, methods, baseline, title), title=title, intro=intro,
                 figure_name="sams.png", formats={"seconds": ".0f"}, columns=columns)
    print("\n" + found["flipped"] + "\n\n" + found["answer"])
    return rows


def main(args: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    run_study(sams_study, args)


if __name__ == "__main__":
    main()
