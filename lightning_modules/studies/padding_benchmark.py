"""How much of a batch is padding, with random batches vs `LengthGroupedSampler` (CPU, seconds).

    python -m lightning_modules.studies.padding_benchmark --out runs/padding-bench     # or: make padding-bench

Length model (an assumption, not fitted to downloaded data; no machine here reaches the Hub): a
preference pair shares one prompt, prompt tokens ~ LogNormal(median 100, σ 1.0) and each of the
two responses ~ LogNormal(median 200, σ 0.8), so prompt + response has median ≈ 350 tokens and a
long right tail (p90 ≈ 800, p99 ≈ 1,700), roughly UltraFeedback's shape under a Llama tokenizer.
Each half is clipped to [16, 2048]. Our collator pads chosen and rejected to one shared T, so a
pair needs max(chosen, rejected) positions. 20,000 pairs, seed 0.

Padding fraction = padded tokens / total tokens when each batch is padded to its longest pair (the
chosen-vs-rejected padding inside a pair is the same under any sampler and is not counted).
Random batches are consecutive chunks of a seeded permutation; grouped batches are consecutive
chunks of the `LengthGroupedSampler` order. Writes summary.json, summary.md, padding.png.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.samplers import LengthGroupedSampler, chunks, padding_fraction
from datamodules.utils.files import write_figure_atomic, write_text_atomic

LENGTH_MODEL = {
    "prompt_median": 100, "prompt_sigma": 1.0, "response_median": 200, "response_sigma": 0.8,
    "min_length": 16, "max_length": 2048,
}  # fmt: skip
BATCH_SIZES = (4, 8, 16, 32)


def sample_halves(n: int, seed: int = 0, model: dict = LENGTH_MODEL) -> tuple[np.ndarray, np.ndarray]:
    """Token counts (n,) of prompt + chosen and prompt + rejected for `n` synthetic pairs, clipped."""
    rng = np.random.default_rng(seed)
    prompt = rng.lognormal(np.log(model["prompt_median"]), model["prompt_sigma"], n)
    halves = [prompt + rng.lognormal(np.log(model["response_median"]), model["response_sigma"], n) for _ in range(2)]
    chosen, rejected = (np.clip(np.rint(h), model["min_length"], model["max_length"]).astype(int) for h in halves)
    return chosen, rejected


def sample_pair_lengths(n: int, seed: int = 0, model: dict = LENGTH_MODEL) -> list[int]:
    """Padded length of `n` synthetic pairs: max(prompt + chosen, prompt + rejected)."""
    return np.maximum(*sample_halves(n, seed, model)).tolist()


def compare_padding(lengths: Sequence[int], batch_sizes: Sequence[int] = BATCH_SIZES, *,
                    mega_batch_mult: int = 50, seed: int = 0) -> list[dict]:
    """Per batch size: padding fraction of random and of length-grouped batches, and random / grouped."""
    rows = []
    for batch_size in batch_sizes:
        permutation = np.random.default_rng(seed).permutation(len(lengths)).tolist()
        random = padding_fraction(lengths, chunks(permutation, batch_size))
        order = list(LengthGroupedSampler(lengths, batch_size, seed=seed, mega_batch_mult=mega_batch_mult))
        grouped = padding_fraction(lengths, chunks(order, batch_size))
        rows.append({"batch_size": batch_size, "random": random, "grouped": grouped,
                     "ratio": random / grouped if grouped else None})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| batch size | padding, random batches | padding, length-grouped | random / grouped |",
             "|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ratio']:.1f}×" if r["ratio"] is not None else "∞"
        lines.append(f"| {r['batch_size']} | {r['random']:.1%} | {r['grouped']:.1%} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Grouped bars: padding fraction per batch size, random vs length-grouped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(x - 0.2, [100 * r["random"] for r in rows], 0.4, label="random batches")
    ax.bar(x + 0.2, [100 * r["grouped"] for r in rows], 0.4, label="LengthGroupedSampler")
    ax.set_xticks(x, [str(r["batch_size"]) for r in rows])
    ax.set_xlabel("batch size (pairs)")
    ax.set_ylabel("padding (% of tokens)")
    ax.set_title("Padding per batch: random vs length-grouped")
    ax.legend()
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/padding-bench", help="output folder")
    parser.add_argument("--n-pairs", type=int, default=20_000, help="number of synthetic pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lengths, permutation and sampler")
    parser.add_argument("--mega-batch-mult", type=int, default=50, help="LengthGroupedSampler mega_batch_mult")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen, _ = sample_halves(args.n_pairs, args.seed)
    lengths = sample_pair_lengths(args.n_pairs, args.seed)
    rows = compare_padding(lengths, mega_batch_mult=args.mega_batch_mult, seed=args.seed)
    summary = {
        "n_pairs": args.n_pairs, "seed": args.seed, "mega_batch_mult": args.mega_batch_mult,
        "length_model": LENGTH_MODEL,
        "prompt_plus_chosen_percentiles": {f"p{q}": float(np.percentile(chosen, q)) for q in (10, 50, 90, 99)},
        "pair_length_percentiles": {f"p{q}": float(np.percentile(lengths, q)) for q in (10, 50, 90, 99)},
        "rows": rows,
    }  # fmt: skip
    table = markdown_table(rows)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "summary.md", f"# Padding: random vs length-grouped batches\n\n"
                                          f"{args.n_pairs} synthetic pairs (see datamodules/padding_benchmark.py), "
                                          f"mega_batch_mult {args.mega_batch_mult}, seed {args.seed}.\n\n{table}")
    plot(rows, out / "padding.png")
    print(table, end="")
    print(f"wrote {out}/summary.json, summary.md, padding.png")
    return summary


if __name__ == "__main__":
    main()
