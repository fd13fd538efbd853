"""`make onpolicy-study`: on-policy sampling and negative gradients vs offline preference learning (SPEC section 5).

    python -m lightning_modules.studies.onpolicy_study --config configs/studies/onpolicy-study/study.yaml

Tajwar et al. 2024 ("Preference fine-tuning of LLMs should leverage suboptimal, on-policy data") at toy scale,
on the synthetic task: reward `aligned` (word match; the SFT policy is close to its optimum) and `unaligned`
(min length; its optimum, the empty answer, is never produced by the SFT policy). Stages, under `out_dir`, each
skipped when its output exists (an interrupted study resumes):
1. the synthetic assets per variant (`assets_<variant>/`: pairs labelled by that variant's reward);
2. SFT (`sft_config`): once when the variants' demonstrations and model have equal checksums (they do), else
   once per variant;
3. per variant, seed and method, one in-process `fit` through the CLI of the method's config from the SFT
   policy, plus two callbacks: `GenerationReward` (greedy generations on the held-out test prompts scored by the
   variant's reward, `val/generation/reward`) and `RewardCurve` (reward queries spent at each validation).
   Each run's curve goes to `runs/<variant>/seed_<s>/<method>/result.json`.
Reward queries: an on-policy round scores num_samples × prompts responses; an offline pair counts 2 (both of its
responses were scored to label it). The SFT policy's greedy reward is every curve's point 0. Writes
`summary.json`, `summary.md` (greedy reward per method × variant, mean ± std over seeds, at the end and at
`early_queries`, the SFT policy as a baseline row, verdicts computed from the numbers) and `onpolicy.png`.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import yaml

from datamodules.synthetic.task import VARIANTS
from datamodules.utils.errors import UserInputError
from datamodules.utils.files import write_text_atomic
from lightning_modules.onpolicy import OnPolicyModule
from lightning_modules.studies.launch import fit_in_process, run_step, run_study
from lightning_modules.studies.multiref_study import mean_std
from lightning_modules.studies.onpolicy_verdicts import clearly_above, mean_curve, reward_at, verdicts  # noqa: F401 (tests)
from lightning_modules.studies.report import new_figure, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SFT_CONFIG = "configs/studies/onpolicy-study/sft.yaml"
SHARED_ASSETS = ("data/sft/", "model/")  # what the SFT stage reads: equal checksums = one SFT for every variant
CURVE = "lightning_modules.studies.onpolicy_study.RewardCurve"  # by its module's name, also when run with -m


@dataclass(frozen=True)
class StudyMethod:
    """One method of the study.

    Args:
        name: its folder under runs/<variant>/seed_<s>/ and its table row.
        config: its training config (configs/studies/onpolicy-study/offline.yaml or onpolicy.yaml).
        on_policy: trains on responses sampled from the current policy (checked against its config's model class).
        negative_gradient: its loss pushes some responses' likelihood down (DPO, REINFORCE), not maximum
            likelihood only (Pref-FT, filtered BC).
        args: further `lightning_modules fit` overrides, e.g. `--model.init_args.objective=FilteredBC`.
    """

    name: str
    config: str
    on_policy: bool
    negative_gradient: bool
    args: tuple[str, ...] = ()


class RewardCurve(L.Callback):
    """At every validation: the global step, the reward queries spent so far and the greedy-generation reward.

    An on-policy round scores each sampled response once; an offline pair counts 2 (its two labels), also the
    offline pairs an on-policy run mixes in (`mixing_ratio` > 0).
    """

    def __init__(self) -> None:
        self.queries = 0
        self.points: list[dict[str, float | int | None]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pairs = 2 * batch["chosen_input_ids"].shape[0]
        if isinstance(pl_module, OnPolicyModule):
            fresh = pl_module.round is not None and pl_module.round.uses == 1  # this step sampled a new round
            pairs = (pl_module.round.rewards.numel() if fresh else 0) + (pairs if pl_module.mixing_ratio > 0 else 0)
        self.queries += pairs * trainer.world_size

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.points.append({"step": trainer.global_step, "queries": self.queries,
                            **{k: float(metrics[f"val/generation/{k}"]) if f"val/generation/{k}" in metrics else None
                               for k in ("reward", "length")}})

    def state_dict(self) -> dict[str, Any]:
        return {"queries": self.queries, "points": list(self.points)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.queries, self.points = int(state["queries"]), list(state["points"])


def evaluation_callbacks(variant: str, prompts_path: Path, max_new_tokens: int, num_prompts: int) -> list[str]:
    """`--trainer.callbacks+=` overrides: the variant's greedy-generation reward, then the query curve."""
    reward = {"class_path": "lightning_modules.rewards.Synthetic", "init_args": {"variant": variant}}
    generation = {"class_path": "callbacks.GenerationReward",
                  "init_args": {"reward": reward, "prompts_path": str(prompts_path), "num_prompts": num_prompts,
                                "max_new_tokens": max_new_tokens}}
    return [f"--trainer.callbacks+={json.dumps(callback)}" for callback in (generation, {"class_path": CURVE})]


def run_one(config: str, args: list[str]) -> dict[str, Any]:
    """One in-process `fit` through the CLI: the reward curve, the final greedy reward, seconds."""
    from lightning_modules.studies.onpolicy_study import RewardCurve as Curve  # the class CURVE names

    start = time.perf_counter()
    cli = fit_in_process(config, args)
    curve = next(c for c in cli.trainer.callbacks if isinstance(c, Curve))
    if not curve.points or curve.points[-1]["step"] != cli.trainer.global_step or curve.points[-1]["reward"] is None:
        raise UserInputError(f"{config}: the run did not score its final policy's greedy generations; make max_steps "
                             "a multiple of trainer.val_check_interval")
    return {"curve": curve.points, "final_reward": curve.points[-1]["reward"], "queries": curve.queries,
            "steps": cli.trainer.global_step, "seconds": round(time.perf_counter() - start, 1)}


def sft_reward(export: Path, prompts_path: Path, variant: str, max_new_tokens: int, num_prompts: int) -> float:
    """The SFT policy's greedy reward: the generation `GenerationReward` does (same prompts, template, budget)."""
    from transformers import AutoModelForCausalLM

    from datamodules.prompts import load_prompts
    from datamodules.tokenize import load_tokenizer
    from lightning_modules.models.generation import generate_responses
    from lightning_modules.rewards import Synthetic

    prompts = load_prompts(str(prompts_path), num_prompts)
    model = AutoModelForCausalLM.from_pretrained(export)
    responses = generate_responses(model, load_tokenizer(str(export)), prompts, max_new_tokens=max_new_tokens)
    return statistics.fmean(Synthetic(variant)(prompts, responses))


def shared_sft(manifests: list[dict[str, Any]]) -> bool:
    """Whether every variant's assets hold the same SFT data and model (so one SFT serves them all)."""
    shared = [{k: v for k, v in m["files"].items() if k.startswith(SHARED_ASSETS)} for m in manifests]
    return all(s == shared[0] for s in shared) and bool(shared[0])


def plot(curves: dict[str, dict[str, tuple[list[float], list[float]]]], methods: list[StudyMethod],
         baseline: dict[str, float], title: str) -> Figure:
    """One panel per variant: mean greedy reward against reward queries, one line per method."""
    fig, axes = new_figure(len(curves), panel_size=(5.5, 4), title=title)
    for ax, (variant, per_method) in zip(axes, curves.items()):
        for m in methods:
            ax.plot(*per_method[m.name], marker="o", markersize=3, label=m.name, linestyle="-" if m.on_policy else "--")
        ax.axhline(baseline[variant], color="gray", linewidth=0.8, linestyle=":", label="SFT")
        ax.set(title=f"reward: {variant}", xlabel="reward queries", ylabel="greedy reward (held-out prompts)",
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Intra-op threads of this process and of the stages it starts (OMP_NUM_THREADS), restored afterwards."""
    import torch

    before, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if env is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env


def trained_module(method: StudyMethod) -> type:
    """The LightningModule class a method's run trains: its config's `model.class_path`, or an override of it."""
    try:
        class_path = yaml.safe_load(Path(method.config).read_text())["model"]["class_path"]
    except (TypeError, KeyError) as error:
        raise UserInputError(f"methods: {method.name}'s config {method.config} has no model.class_path") from error
    class_path = next((a.split("=", 1)[1] for a in method.args if a.startswith("--model.class_path=")), class_path)
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_settings(methods: list[StudyMethod], variants: tuple[str, ...], seeds: tuple[int, ...], sft_config: str,
                   sizes: dict[str, int], clear_gap: float) -> None:
    """A UserInputError naming the bad setting, before anything runs (`sizes`: settings that must be >= 1)."""
    names = [m.name for m in methods]
    if not methods or len(set(names)) != len(names):
        raise UserInputError(f"methods: need at least one, with unique names (they name folders); got {names}")
    if len({m.on_policy for m in methods}) != 2:
        raise UserInputError(f"methods: the comparison needs at least one on-policy and one offline method; got "
                             f"on_policy={[m.on_policy for m in methods]}")
    missing = [c for c in [*(m.config for m in methods), sft_config] if not Path(c).is_file()]
    if missing:
        raise UserInputError(f"config files not found: {missing}")
    for m in methods:
        if issubclass(module := trained_module(m), OnPolicyModule) != m.on_policy:
            raise UserInputError(f"methods: {m.name} says on_policy={m.on_policy}, but {m.config} with its args "
                                 f"trains {module.__name__}")
    if set(variants) - set(VARIANTS) or not variants or len(set(variants)) != len(variants) or not seeds:
        raise UserInputError(f"variants={list(variants)} (unique, among {list(VARIANTS)}) and seeds={list(seeds)} "
                             "(at least one)")
    if min(sizes.values()) < 1 or clear_gap < 0:
        raise UserInputError(", ".join(f"{k}={v}" for k, v in sizes.items()) + f" (each >= 1) and clear_gap="
                             f"{clear_gap} (>= 0): one is out of range")


def onpolicy_study(methods: list[StudyMethod], out_dir: str = "runs/onpolicy-study",
                   variants: tuple[str, ...] = VARIANTS, seeds: tuple[int, ...] = (0, 1, 2),
                   sft_config: str = SFT_CONFIG, eval_max_new_tokens: int = 24, eval_prompts: int = 64,
                   early_queries: int = 3200, clear_gap: float = 0.05, threads: int = 1,
                   assets_args: tuple[str, ...] = (), sft_args: tuple[str, ...] = (), fit_args: tuple[str, ...] = (),
                   title: str = "synthetic task: on-policy vs offline preference learning") -> list[dict[str, Any]]:
    """Run (or resume) the study; write and return its table rows.

    Args:
        methods: the methods compared, each with its config and overrides (at least one on-policy and one offline).
        out_dir: everything the study makes: assets_<variant>/, sft/, runs/, logs/, the report.
        variants: reward variants of the synthetic task (aligned, unaligned).
        seeds: seed_everything (and, on-policy, the sampling seed) of each repetition.
        sft_config: config of the SFT stage.
        eval_max_new_tokens: greedy-generation budget of the evaluation (responses are at most 16 words).
        eval_prompts: held-out test prompts evaluated (the first N; the task has 34).
        early_queries: the second budget of the table and verdicts: each run's reward at the last validation
            within this many reward queries (how fast, where the final reward says how far).
        clear_gap: a difference of means is clear when it exceeds this and two standard errors of the difference.
        threads: torch intra-op threads of every stage (the tiny model's ops are too small to share out; with
            other processes on the cores, 2 threads ran a training step 3× slower than 1).
        assets_args: extra `python -m datamodules.synthetic build` options.
        sft_args: overrides appended to the SFT stage, e.g. `--trainer.max_steps=4` for a smoke run.
        fit_args: overrides appended to every method's run, e.g. `--trainer.max_steps=4` for a smoke run.
        title: report and plot title.
    """
    variants, seeds, out = tuple(variants), tuple(seeds), Path(out_dir)
    check_settings(methods, variants, seeds, sft_config, {"eval_max_new_tokens": eval_max_new_tokens,
                   "eval_prompts": eval_prompts, "early_queries": early_queries, "threads": threads}, clear_gap)
    with torch_threads(threads):
        assets, exports, shared = prepare(out, variants, sft_config, assets_args, sft_args)
        baseline_file = out / "runs" / "sft_reward.json"
        if not baseline_file.exists():
            write_text_atomic(baseline_file, json.dumps({v: sft_reward(
                exports[v], assets[v] / "data/prompts/test.jsonl", v, eval_max_new_tokens, eval_prompts)
                for v in variants}, indent=2) + "\n")
        baseline = json.loads(baseline_file.read_text())
        results: dict[str, dict[str, list[dict[str, Any]]]] = {m.name: {v: [] for v in variants} for m in methods}
        for v in variants:
            reward = json.dumps({"class_path": "lightning_modules.rewards.Synthetic", "init_args": {"variant": v}})
            for seed in seeds:
                for m in methods:
                    folder = out / "runs" / v / f"seed_{seed}" / m.name
                    if not (folder / "result.json").exists():
                        args = [f"--seed_everything={seed}", f"--trainer.default_root_dir={folder}",
                                f"--model.init_args.model_name_or_path={exports[v]}",
                                f"--data.init_args.path={assets[v] / 'data/prefs'}"]
                        if m.on_policy:
                            args += [f"--model.init_args.reward={reward}", f"--model.init_args.sampling.seed={seed}"]
                        args += [*m.args, *evaluation_callbacks(v, assets[v] / "data/prompts/test.jsonl",
                                                                eval_max_new_tokens, eval_prompts), *fit_args]
                        result = run_one(m.config, args)
                        write_text_atomic(folder / "result.json", json.dumps(result, indent=2) + "\n")
                        print(f"[study] {v} seed {seed} {m.name}: reward {result['final_reward']:.3f}, "
                              f"{result['seconds']:.0f} s", flush=True)
                    results[m.name][v].append(json.loads((folder / "result.json").read_text()))
    return report(methods, out, variants, seeds, baseline, shared, results, early_queries, clear_gap, title)


def prepare(out: Path, variants: tuple[str, ...], sft_config: str, assets_args: tuple[str, ...],
            sft_args: tuple[str, ...]) -> tuple[dict[str, Path], dict[str, Path], bool]:
    """Each variant's assets and SFT export (one SFT when shared), reused when present: (assets, exports, shared)."""
    assets = {v: out / f"assets_{v}" for v in variants}
    for v in variants:
        run_step(f"assets_{v}", ["-m", "datamodules.synthetic", "build", "--out", str(assets[v]), "--variant", v,
                                 *assets_args], assets[v] / "manifest.json", out / "logs")
    shared = shared_sft([json.loads((assets[v] / "manifest.json").read_text()) for v in variants])
    sft = {v: out / ("sft" if shared else f"sft_{v}") for v in variants}
    for v in variants[:1] if shared else variants:
        run_step(sft[v].name, ["-m", "lightning_modules", "fit", "--config", sft_config,
                               f"--trainer.default_root_dir={sft[v]}",
                               f"--data.init_args.path={assets[v] / 'data/sft'}",
                               f"--model.init_args.model_name_or_path={assets[v] / 'model'}", *sft_args],
                 sft[v] / "latest" / "export", out / "logs")
    return assets, {v: sft[v] / "latest" / "export" for v in variants}, shared


def report(methods: list[StudyMethod], out: Path, variants: tuple[str, ...], seeds: tuple[int, ...],
           baseline: dict[str, float], shared: bool, results: dict[str, Any], early_queries: int, clear_gap: float,
           title: str) -> list[dict[str, Any]]:
    """The table (final and early reward per method × variant), the verdicts and the curves, via write_report."""
    values = {"final": {v: {m.name: [r["final_reward"] for r in results[m.name][v]] for m in methods}
                        for v in variants},
              "early": {v: {m.name: [reward_at(r, early_queries, baseline[v]) for r in results[m.name][v]]
                            for m in methods} for v in variants}}
    total = max(r["queries"] for per in results.values() for runs in per.values() for r in runs)
    found = verdicts(values, methods, {"early": early_queries, "final": total} if early_queries < total
                     else {"final": total}, clear_gap)
    columns = {"method": "method", "kind": "kind", **{f"{v}_{b}": f"{v}: {label}" for v in variants for b, label in
                                                      (("final", "final"), ("early", f"at {early_queries:,} queries"))},
               "queries": "reward queries", "seconds": "s / run"}
    rows: list[dict[str, Any]] = [{"method": "sft (start)", "kind": "-", "queries": 0, "seconds": None,
                                   **{f"{v}_{b}": f"{baseline[v]:.3f}" for v in variants for b in ("final", "early")}}]
    for m in methods:
        runs = [r for v in variants for r in results[m.name][v]]
        rows.append({"method": m.name, "kind": ("on-policy" if m.on_policy else "offline")
                     + (", negative gradient" if m.negative_gradient else ""),
                     **{f"{v}_{b}": "{:.3f} ± {:.3f}".format(*mean_std(values[b][v][m.name]))
                        for v in variants for b in ("final", "early")},
                     "queries": max(r["queries"] for r in runs),
                     "seconds": statistics.fmean(r["seconds"] for r in runs)})
    curves = {v: {m.name: mean_curve(results[m.name][v], baseline[v]) for m in methods} for v in variants}
    summary = {"seeds": list(seeds), "variants": list(variants), "shared_sft": shared, "sft_reward": baseline,
               "methods": [vars(m) for m in methods], "early_queries": early_queries, "clear_gap": clear_gap,
               "verdicts": found, "rewards": values, "rows": rows, "runs": results}
    sft = "one SFT for both variants: their demonstrations and model are identical" if shared else "one SFT per variant"
    intro = (f"Greedy reward on the held-out test prompts (the variant's reward, in [0, 1]), mean ± std over seeds "
             f"{list(seeds)}, at the end of training and at the last evaluation within {early_queries:,} reward "
             f"queries. Every method starts from the same SFT policy ({sft}). Reward queries: an on-policy round "
             "scores num_samples × prompts sampled responses; an offline pair counts as 2 queries (both of its "
             f"responses were scored to label it). A difference is *clear* when it exceeds {clear_gap} and two "
             "standard errors.\n\n" + "\n".join(f"- {text}" for text in found.values()))
    write_report(out, summary, rows, plot(curves, methods, baseline, title), title=title, intro=intro,
                 figure_name="onpolicy.png", formats={"seconds": ".0f"}, columns=columns)
    return rows


def main(args: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    run_study(onpolicy_study, args)


if __name__ == "__main__":
    main()
