"""`make multiref-study`: single-reference DPO against each of K references vs MRPO / MDPO × every weighting strategy.

    python -m lightning_modules.studies.multiref_study --config configs/studies/multiref-study/study.yaml

The multi-reference paper's study (SPEC section 4) at toy scale, on the synthetic task. Stages, under
`out_dir` (each skipped when its output exists, so an interrupted study resumes):
1. synthetic assets (`assets/`);
2. the K references, through the CLI: SFT of the untrained tiny model for `sft_steps` (`sft_config`,
   `references/sft_<steps>/`), then, for `prefft_steps` > 0, Pref-FT (NLL of the chosen responses,
   `prefft_config`) on the pairs' validation file, which the study never samples from
   (`references/<name>/`): more Pref-FT = a reference whose own likelihood prefers the chosen
   response more often (its test accuracy is in the report);
3. every reference's cached log-probs on the study sample, once (`lightning_modules.references.cache_builder`;
   the cache is keyed by the seed-independent sample, so each seed's train / val / test finds its pairs in it);
4. per seed and method, one in-process `fit` of `train_config` through the CLI (`lightning_modules.cli.main`),
   then `test`: the policy starts as the reference named `policy`; `dpo_<ref>` is single-reference
   DPO against one reference, `<objective>_<strategy>` is `MultiReferenceModule` against all K.
   Each run's result (`runs/seed_<s>/<method>/result.json`) holds its test and validation preference
   accuracy (the policy's own length-normalized logπ(y_w) > logπ(y_l)) and its α over training.
Writes `summary.json`, `summary.md` (test preference accuracy, mean ± std over seeds, methods × the one
dataset as in the paper's table) and `multiref.png` (the accuracies, and α over training per strategy).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from datamodules.utils.errors import UserInputError
from datamodules.utils.files import write_text_atomic
from lightning_modules.studies.launch import run_step, run_study
from lightning_modules.studies.report import new_figure, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SFT_CONFIG = "configs/studies/multiref-study/sft.yaml"
PREFFT_CONFIG = "configs/studies/multiref-study/prefft.yaml"
TRAIN_CONFIG = "configs/studies/multiref-study/train.yaml"
WEIGHTING = {"fixed": "Fixed", "arwc": "ARWC", "vdw": "VDW", "vaw": "VAW", "swcw": "SWCW", "swcw_onehot": "SWCWOneHot",
             "tsw": "TSW"}
PAPER_BEST = "mdpo_vaw"  # the paper: VAW-MDPO best among the multi-reference methods


@dataclass(frozen=True)
class StudyReference:
    """One of the K references.

    Args:
        name: its name in metrics and tables (and its folder under out_dir/references when Pref-FT runs).
        sft_steps: SFT optimizer steps from the untrained tiny model.
        prefft_steps: Pref-FT steps after that SFT (0: the SFT model is the reference).
    """

    name: str
    sft_steps: int
    prefft_steps: int = 0


def export_of(out: Path, ref: StudyReference) -> Path:
    """Where a reference's model is exported."""
    folder = ref.name if ref.prefft_steps else f"sft_{ref.sft_steps}"
    return out / "references" / folder / "latest" / "export"


def methods(references: list[StudyReference], objectives: list[str], strategies: list[str]) -> dict[str, list[str]]:
    """{method name: `fit` overrides}: DPO against each reference, then every objective × strategy against all K."""
    out = {f"dpo_{ref.name}": ["__single__", ref.name] for ref in references}
    for objective in objectives:
        for strategy in strategies:
            weighting = f"lightning_modules.multiref.{WEIGHTING[strategy]}"
            if strategy == "fixed":  # equal weights
                weighting = json.dumps({"class_path": weighting, "init_args": {"weights": [1.0] * len(references)}})
            out[f"{objective.lower()}_{strategy}"] = [
                "--model.class_path=lightning_modules.multiref.MultiReferenceModule",
                f"--model.init_args.objective={objective}", f"--model.init_args.weighting={weighting}"]
    return out


def reference_cache(out: Path, references: list[StudyReference]) -> str:
    specs = [{"name_or_path": str(export_of(out, ref)), "name": ref.name} for ref in references]
    return f"--data.init_args.reference_cache={json.dumps(specs)}"


def run_one(train_config: str, args: list[str]) -> dict[str, Any]:
    """One in-process `fit` + `test` through the CLI: test / validation metrics, α history, seconds."""
    from callbacks.alpha_figure import AlphaFigure
    from lightning_modules.cli.app import main as cli_main

    start = time.perf_counter()
    cli = cli_main(["fit", "--config", train_config, *args])
    validation = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    figure = next((c for c in cli.trainer.callbacks if isinstance(c, AlphaFigure)), None)
    return {"test_preference_accuracy": float(test["test/preference_accuracy"]),
            "val_preference_accuracy": validation.get("val/preference_accuracy", float("nan")),
            "test_loss": float(test["test/loss"]),
            "alpha": figure.state_dict() if figure is not None and figure.steps else None,
            "seconds": round(time.perf_counter() - start, 1)}


def reference_accuracy(train_config: str, data_args: list[str], tokenizer: str, names: list[str]) -> dict[str, float]:
    """Each reference's own preference accuracy on the test split (length-normalized, from its cache)."""
    from lightning_modules.references.cache_builder import build_datamodule
    from lightning_modules.multiref import reference_signals

    dm = build_datamodule(train_config, data_args, tokenizer)
    dm.setup("test")
    items = dm.data["test"]
    columns = [torch.tensor([item[key] for item in items]) for key in
               ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_counts", "ref_rejected_counts")]
    agrees = reference_signals(*columns).agrees.mean(0)
    return dict(zip(names, agrees.tolist()))


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(rows: list[dict[str, Any]], alphas: dict[str, dict[str, Any]], title: str) -> Figure:
    """Left: test preference accuracy per method (mean ± std over seeds). Then α over training per strategy."""
    panels = 1 + len(alphas)
    ncols = min(4, panels)
    fig, axes = new_figure(ncols, -(-panels // ncols), panel_size=(4.2, 3.2), title=title)
    ax = axes[0]
    names = [r["method"] for r in rows]
    ax.barh(names, [r["mean"] for r in rows], xerr=[r["std"] for r in rows], color=[
        "tab:gray" if n.startswith("dpo_") else "tab:blue" if n.startswith("mdpo") else "tab:orange" for n in names])
    low = min(r["mean"] - r["std"] for r in rows)
    ax.set(xlabel="test preference accuracy", xlim=(max(0.0, low - 0.05), None), title="accuracy (mean ± std)")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    for ax, (method, history) in zip(axes[1:], alphas.items()):
        ax.stackplot(history["steps"], list(zip(*history["alphas"])), labels=history["names"])
        ax.set(title=f"α: {method}", xlabel="step", ylim=(0, 1))
        ax.legend(fontsize=6, loc="upper right")
    for ax in axes[panels:]:
        ax.axis("off")
    return fig


def multiref_study(references: list[StudyReference], out_dir: str = "runs/multiref-study",
                   seeds: tuple[int, ...] = (0, 1, 2), sample_size: int = 900,
                   sizes: tuple[int, int, int] = (600, 150, 150), policy: str = "weak",
                   objectives: tuple[str, ...] = ("MRPO", "MDPO"), strategies: tuple[str, ...] = tuple(WEIGHTING),
                   sft_config: str = SFT_CONFIG, prefft_config: str = PREFFT_CONFIG, train_config: str = TRAIN_CONFIG, assets_args: tuple[str, ...] = (),
                   fit_args: tuple[str, ...] = (),
                   title: str = "synthetic task: multi-reference DPO") -> list[dict[str, Any]]:
    """Run (or resume) the study; write and return its table rows.

    Args:
        references: the K references (name, SFT steps, Pref-FT steps), in the order of their cache columns.
        out_dir: everything the study makes: assets/, references/, runs/, logs/, the report.
        seeds: seed_everything and study-split seed of each repetition.
        sample_size: pairs sampled (the same for every seed) from the synthetic pairs' train file.
        sizes: how each seed splits them into train / val / test.
        policy: the reference whose export the policy starts from.
        objectives: multi-reference objectives (MRPO, MDPO).
        strategies: weighting strategies (fixed = equal weights, arwc, vdw, vaw, swcw, swcw_onehot, tsw).
        sft_config: config of the reference SFT runs.
        prefft_config: config of the reference Pref-FT runs.
        train_config: config of every training run (see its header).
        assets_args: extra `python -m datamodules.synthetic build` options.
        fit_args: overrides appended to every training run (SFT and preference), e.g. for a smoke run.
        title: report and plot title.
    """
    names = [ref.name for ref in references]
    if len(references) < 2 or len(set(names)) != len(names) or policy not in names:
        raise UserInputError(f"references: need at least 2 with unique names, and policy={policy!r} among them; "
                             f"got {names}")
    unknown = sorted(set(strategies) - set(WEIGHTING))
    if unknown or not seeds:
        raise UserInputError(f"strategies {unknown} are not among {list(WEIGHTING)} (or seeds is empty)")
    out = Path(out_dir)
    logs, assets = out / "logs", out / "assets"
    run_step("assets", ["-m", "datamodules.synthetic", "build", "--out", str(assets), *assets_args],
             assets / "manifest.json", logs)
    for steps in sorted({ref.sft_steps for ref in references}):
        run_step(f"sft_{steps}", ["-m", "lightning_modules", "fit", "--config", sft_config,
                                  f"--trainer.default_root_dir={out / 'references' / f'sft_{steps}'}",
                                  f"--trainer.max_steps={steps}", f"--data.init_args.path={assets / 'data/sft'}",
                                  f"--model.init_args.model_name_or_path={assets / 'model'}", *fit_args],
                 out / "references" / f"sft_{steps}" / "latest" / "export", logs)
    for ref in references:
        if ref.prefft_steps:
            sft = out / "references" / f"sft_{ref.sft_steps}" / "latest" / "export"
            run_step(f"prefft_{ref.name}", ["-m", "lightning_modules", "fit", "--config", prefft_config,
                                            f"--trainer.default_root_dir={out / 'references' / ref.name}",
                                            f"--trainer.max_steps={ref.prefft_steps}",
                                            f"--data.init_args.path={assets / 'data/prefs'}",
                                            f"--model.init_args.model_name_or_path={sft}", *fit_args],
                     export_of(out, ref), logs)
    plan = methods(references, list(objectives), list(strategies))
    results: dict[str, list[dict[str, Any]]] = {method: [] for method in plan}
    reference_quality: dict[str, list[float]] = {name: [] for name in names}
    policy_path = str(export_of(out, references[names.index(policy)]))
    all_refs = reference_cache(out, references)

    def data_args(seed: int) -> list[str]:
        return [f"--data.init_args.study_split.seed={seed}", f"--data.init_args.path={assets / 'data/prefs'}",
                f"--data.init_args.study_split.sample_size={sample_size}",
                f"--data.init_args.study_split.sizes={list(sizes)}"]

    done = out / "runs" / "caches.done"  # one cache of the sample serves every seed
    run_step("cache", ["-m", "lightning_modules.references.cache_builder", "--config", train_config,
                       *data_args(seeds[0]), all_refs, "--tokenizer", policy_path], done, logs)
    write_text_atomic(done, "ok\n")
    for seed in seeds:
        common = [f"--seed_everything={seed}", *data_args(seed), f"--model.init_args.model_name_or_path={policy_path}"]
        for name, value in reference_accuracy(train_config, [*data_args(seed), all_refs], policy_path, names).items():
            reference_quality[name].append(value)
        for method, overrides in plan.items():
            folder = out / "runs" / f"seed_{seed}" / method
            result_file = folder / "result.json"
            if not result_file.exists():
                if overrides[0] == "__single__":
                    ref = references[names.index(overrides[1])]
                    overrides = [reference_cache(out, [ref])]
                else:
                    overrides = [*overrides, all_refs]
                print(f"[study] seed {seed} {method}", flush=True)
                result = run_one(train_config, [*common, f"--trainer.default_root_dir={folder}", *overrides, *fit_args])
                write_text_atomic(result_file, json.dumps(result, indent=2) + "\n")
            results[method].append(json.loads(result_file.read_text()))

    rows = []
    for method, runs in results.items():
        mean, std = mean_std([r["test_preference_accuracy"] for r in runs])
        rows.append({"method": method, "synthetic": f"{mean:.3f} ± {std:.3f}", "mean": mean, "std": std,
                     "val": statistics.fmean(r["val_preference_accuracy"] for r in runs),
                     "seconds": statistics.fmean(r["seconds"] for r in runs)})
    single = max((r for r in rows if r["method"].startswith("dpo_")), key=lambda r: r["mean"])
    multi = max((r for r in rows if not r["method"].startswith("dpo_")), key=lambda r: r["mean"])
    quality = {name: statistics.fmean(values) for name, values in reference_quality.items()}
    verdict = (f"best multi-reference method: {multi['method']} ({multi['synthetic']}); best single-reference DPO: "
               f"{single['method']} ({single['synthetic']}). The paper's best multi-reference method is "
               f"{PAPER_BEST}: {'reproduced' if multi['method'] == PAPER_BEST else 'not reproduced'} here.")
    alphas = {}
    for method in plan:  # α over training of the first seed, MDPO (or the first objective) per strategy
        history = results[method][0].get("alpha")
        strategy = method.split("_", 1)[1]
        if history and method.startswith(objectives[-1].lower() + "_") and strategy in WEIGHTING:
            alphas[method] = history
    summary = {"seeds": list(seeds), "references": [vars(r) for r in references], "policy": policy,
               "reference_test_accuracy": quality, "verdict": verdict, "rows": rows,
               "runs": {method: runs for method, runs in results.items()}}
    intro = (f"Test preference accuracy (the policy's own length-normalized logπ(y_w) > logπ(y_l)), mean ± std over "
             f"seeds {list(seeds)}; each seed re-splits the sampled pairs. The policy starts as reference `{policy}`. "
             "References' own test accuracy: " + ", ".join(f"{n} {q:.3f}" for n, q in quality.items()) +
             f". {verdict}")
    formats = {"val": ".3f", "seconds": ".0f"}
    write_report(out, summary, rows, plot(rows, alphas, title), title=title, intro=intro, figure_name="multiref.png",
                 columns={"method": "method", "synthetic": "synthetic (test pref. acc.)", "val": "val pref. acc.",
                          "seconds": "s / run"}, formats=formats)
    return rows


def main(args: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    run_study(multiref_study, args)


if __name__ == "__main__":
    main()
