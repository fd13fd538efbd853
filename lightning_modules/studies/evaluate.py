"""Evaluate exported policies: greedy generations on held-out prompts, scored by a reward program.

    python -m lightning_modules.studies.evaluate --config configs/quickstart/evaluate.yaml   # make demo, step 3

Writes to `out_dir`: `summary.json` (`{name}_reward`, `{name}_length`, and `{name}_val_*` pulled
from each policy's `MetricsJSON` file), `summary.md` (the table it also prints), `rewards.png`
(reward and length distributions per policy) and `generations.jsonl` (every prompt, response, reward).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from datamodules.utils.errors import UserInputError
from datamodules.utils.files import write_jsonl_atomic
from lightning_modules.models.generation import RewardFn, generate_responses
from lightning_modules.studies.launch import run_study
from lightning_modules.studies.report import new_figure, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# MetricsJSON keys copied into the summary as `{policy}_{short name}`; the table shows TABLE_METRICS
# only (`val/loss` means NLL for SFT but the DPO loss for DPO, so it is not one column).
VAL_METRICS = {
    "val/rewards/accuracies": "val_reward_accuracy",
    "val/rewards/margins": "val_reward_margin",
    "val/loss": "val_loss",
}
TABLE_METRICS = ("val_reward_accuracy", "val_reward_margin")


def plot_distributions(results: dict[str, dict[str, list[float]]], title: str) -> Figure:
    """Histograms of per-prompt rewards and response lengths, one colour per policy (the figure)."""
    fig, (ax_r, ax_l) = new_figure(2, title=title)
    longest = max(max(r["lengths"]) for r in results.values())
    for name, res in results.items():
        label = f"{name} (mean {statistics.fmean(res['rewards']):.2f})"
        ax_r.hist(res["rewards"], bins=20, range=(0, 1), alpha=0.55, label=label)
        ax_l.hist(res["lengths"], bins=range(0, longest + 2), alpha=0.55, label=name)
    ax_r.set(xlabel="reward of greedy generation", ylabel="prompts", title="reward")
    ax_l.set(xlabel="response length (words)", ylabel="prompts", title="length")
    ax_r.legend(), ax_l.legend()
    return fig


def evaluate(
    policies: dict[str, str],
    prompts_path: str,
    reward: RewardFn,
    out_dir: str,
    metrics: dict[str, str] | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    title: str = "greedy generations on held-out prompts",
) -> dict[str, float]:
    """Generate, score, summarise, plot.

    Args:
        policies: {name: exported HF folder}, e.g. {sft: runs/demo/sft/latest/export, dpo: runs/demo/dpo/latest/export}.
        prompts_path: JSONL file of {"prompt": ...} rows (held-out prompts).
        reward: callable (prompts, responses) -> rewards, e.g. datamodules.synthetic.SyntheticReward.
        out_dir: folder receiving summary.json, summary.md, rewards.png and generations.jsonl.
        metrics: {name: MetricsJSON file} whose validation metrics are copied into the summary.
        max_new_tokens: generation budget per response.
        batch_size: prompts generated per batch.
        title: report and plot title.
    """
    from transformers import AutoModelForCausalLM

    from datamodules.prompts import load_prompts
    from datamodules.tokenize import load_tokenizer

    start = time.perf_counter()
    prompts = load_prompts(prompts_path)
    summary: dict[str, float] = {"num_prompts": len(prompts)}
    results: dict[str, dict[str, list]] = {}
    table: list[dict[str, object]] = []
    samples: list[dict[str, object]] = []
    for name, path in policies.items():
        if not Path(path).exists():
            raise UserInputError(f"policies.{name}={path!r} does not exist (did its training step run?)")
        model = AutoModelForCausalLM.from_pretrained(path)
        responses = generate_responses(model, load_tokenizer(path), prompts, max_new_tokens=max_new_tokens,
                                       batch_size=batch_size)
        rewards = [float(r) for r in reward(prompts, responses)]
        lengths = [len(r.split()) for r in responses]
        results[name] = {"rewards": rewards, "lengths": lengths}
        summary[f"{name}_reward"] = statistics.fmean(rewards)
        summary[f"{name}_reward_std"] = statistics.pstdev(rewards)
        summary[f"{name}_length"] = statistics.fmean(lengths)
        row: dict[str, object] = {"policy": name, "mean reward": summary[f"{name}_reward"],
                                  "std": summary[f"{name}_reward_std"], "mean length": summary[f"{name}_length"]}
        logged = json.loads(Path(metrics[name]).read_text()) if metrics and name in metrics else {}
        for key, short in VAL_METRICS.items():
            if key in logged:
                summary[f"{name}_{short}"] = logged[key]
            if short in TABLE_METRICS:
                row[short.replace("_", " ")] = logged.get(key)  # None (no metrics file) shows as "-"
        table.append(row)
        samples += [{"policy": name, "prompt": p, "response": r, "reward": w}
                    for p, r, w in zip(prompts, responses, rewards)]
    summary["eval_seconds"] = round(time.perf_counter() - start, 1)

    generations = write_jsonl_atomic(Path(out_dir) / "generations.jsonl", samples)
    write_report(out_dir, summary, table, plot_distributions(results, title), title=title, figure_name="rewards.png",
                 intro=f"{len(prompts)} prompts from `{prompts_path}`, greedy decoding, at most {max_new_tokens} "
                       "new tokens; std is over prompts; val columns come from each policy's metrics file.",
                 also_wrote=[generations])
    return summary


def main(args: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    run_study(evaluate, args)


if __name__ == "__main__":
    main()
