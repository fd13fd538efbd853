"""Evaluate exported policies: greedy generations on held-out prompts, scored by a reward program.

`python -m lightning_modules.studies.evaluate --config configs/quickstart/evaluate.yaml` writes to `out_dir`:
`summary.json` (`{name}_reward`, `{name}_length`, and `{name}_val_*` pulled from each policy's
`MetricsJSON` file), `summary.md` (the table it also prints), `rewards.png` (reward and length
distributions per policy) and `generations.jsonl` (every prompt, response and reward).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from datamodules.utils.errors import UserInputError, exit_on_user_error
from datamodules.utils.files import write_figure_atomic, write_jsonl_atomic, write_text_atomic
from lightning_modules.models.generation import RewardFn, generate_responses


# MetricsJSON keys copied into the summary as `{policy}_{short name}`; the table shows TABLE_METRICS
# only (`val/loss` means NLL for SFT but the DPO loss for DPO, so it is not one column).
VAL_METRICS = {
    "val/rewards/accuracies": "val_reward_accuracy",
    "val/rewards/margins": "val_reward_margin",
    "val/loss": "val_loss",
}
TABLE_METRICS = ("val_reward_accuracy", "val_reward_margin")


def markdown_table(rows: list[dict[str, object]]) -> str:
    """A GitHub markdown table from a list of same-keyed dicts (floats shown with 3 decimals)."""
    headers = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(row[h]) for h in headers) + " |" for row in rows]
    return "\n".join(lines)


def plot_distributions(results: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """Histogram of per-prompt rewards and response lengths, one colour per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, res in results.items():
        label = f"{name} (mean {statistics.fmean(res['rewards']):.2f})"
        ax_r.hist(res["rewards"], bins=20, range=(0, 1), alpha=0.55, label=label)
        ax_l.hist(res["lengths"], bins=range(0, max(max(r["lengths"]) for r in results.values()) + 2),
                  alpha=0.55, label=name)
    ax_r.set(xlabel="reward of greedy generation", ylabel="prompts", title="reward")
    ax_l.set(xlabel="response length (words)", ylabel="prompts", title="length")
    ax_r.legend(), ax_l.legend()
    fig.suptitle(title)
    fig.tight_layout()
    write_figure_atomic(fig, path)


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
        policies: {name: exported HF folder}, e.g. {sft: runs/demo/sft/export, dpo: runs/demo/dpo/export}.
        prompts_path: JSONL file of {"prompt": ...} rows (held-out prompts).
        reward: callable (prompts, responses) -> rewards, e.g. datamodules.synthetic.SyntheticReward.
        out_dir: folder receiving summary.json, summary.md, rewards.png and generations.jsonl.
        metrics: {name: MetricsJSON file} whose validation metrics are copied into the summary.
        max_new_tokens: generation budget per response.
        batch_size: prompts generated per batch.
        title: plot title.
    """
    from transformers import AutoModelForCausalLM

    from datamodules.prompts import load_prompts
    from datamodules.tokenize import load_tokenizer

    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
                row[short.replace("_", " ")] = logged.get(key, "-")
        table.append(row)
        samples += [{"policy": name, "prompt": p, "response": r, "reward": w}
                    for p, r, w in zip(prompts, responses, rewards)]
    summary["eval_seconds"] = round(time.perf_counter() - start, 1)

    md = markdown_table(table)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "summary.md", md + "\n")
    write_jsonl_atomic(out / "generations.jsonl", samples)
    plot_distributions(results, out / "rewards.png", title)
    print(md)
    print(f"\nwrote {out / 'summary.json'}, {out / 'summary.md'}, {out / 'rewards.png'}, {out / 'generations.jsonl'}")
    return summary


def main(args: list[str] | None = None) -> None:

    from jsonargparse import auto_cli

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with exit_on_user_error():
        auto_cli(evaluate, args=args, parser_mode="omegaconf+")


if __name__ == "__main__":
    main()
