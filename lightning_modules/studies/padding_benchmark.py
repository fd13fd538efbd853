"""How much of a batch is padding, with random batches vs `LengthGroupedSampler` (CPU, seconds).

    python -m lightning_modules.studies.padding_benchmark --config configs/studies/padding-bench/padding.yaml
    # or: make padding-bench

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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from datamodules.samplers import LengthGroupedSampler, chunks, padding_fraction
from lightning_modules.studies.launch import run_study
from lightning_modules.studies.report import new_figure, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BATCH_SIZES = (4, 8, 16, 32)


@dataclass(frozen=True)
class LengthModel:
    """Token counts of a synthetic preference pair: log-normal prompt and responses, clipped.

    Args:
        prompt_median: median prompt length (tokens).
        prompt_sigma: σ of the log prompt length.
        response_median: median length of each response (tokens).
        response_sigma: σ of the log response length.
        min_length: shortest prompt + response kept (shorter halves are clipped up).
        max_length: longest prompt + response kept (longer halves are clipped down).
    """

    prompt_median: float = 100
    prompt_sigma: float = 1.0
    response_median: float = 200
    response_sigma: float = 0.8
    min_length: int = 16
    max_length: int = 2048


def sample_halves(n: int, seed: int = 0, model: LengthModel = LengthModel()) -> tuple[np.ndarray, np.ndarray]:
    """Token counts (n,) of prompt + chosen and prompt + rejected for `n` synthetic pairs, clipped."""
    rng = np.random.default_rng(seed)
    prompt = rng.lognormal(np.log(model.prompt_median), model.prompt_sigma, n)
    halves = [prompt + rng.lognormal(np.log(model.response_median), model.response_sigma, n) for _ in range(2)]
    chosen, rejected = (np.clip(np.rint(h), model.min_length, model.max_length).astype(int) for h in halves)
    return chosen, rejected


def sample_pair_lengths(n: int, seed: int = 0, model: LengthModel = LengthModel()) -> list[int]:
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


def plot(rows: list[dict]) -> Figure:
    """Grouped bars: padding fraction per batch size, random vs length-grouped (the figure)."""
    x = np.arange(len(rows))
    fig, (ax,) = new_figure(panel_size=(6, 3.5))
    ax.bar(x - 0.2, [100 * r["random"] for r in rows], 0.4, label="random batches")
    ax.bar(x + 0.2, [100 * r["grouped"] for r in rows], 0.4, label="LengthGroupedSampler")
    ax.set_xticks(x, [str(r["batch_size"]) for r in rows])
    ax.set(xlabel="batch size (pairs)", ylabel="padding (% of tokens)",
           title="Padding per batch: random vs length-grouped")
    ax.legend()
    return fig


def padding_benchmark(out_dir: str = "runs/padding-bench", n_pairs: int = 20_000, seed: int = 0,
                      mega_batch_mult: int = 50, batch_sizes: tuple[int, ...] = BATCH_SIZES,
                      length_model: LengthModel = LengthModel()) -> dict:
    """Padding fraction of random vs length-grouped batches on synthetic pair lengths.

    Args:
        out_dir: folder receiving summary.json, summary.md and padding.png.
        n_pairs: number of synthetic preference pairs.
        seed: seed of the lengths, the random permutation and the sampler.
        mega_batch_mult: `LengthGroupedSampler`'s mega_batch_mult (batches sorted together).
        batch_sizes: batch sizes (pairs per batch) compared, one table row each.
        length_model: the distribution of prompt and response lengths.
    """
    chosen, _ = sample_halves(n_pairs, seed, length_model)
    lengths = sample_pair_lengths(n_pairs, seed, length_model)
    rows = compare_padding(lengths, batch_sizes, mega_batch_mult=mega_batch_mult, seed=seed)
    summary = {
        "n_pairs": n_pairs, "seed": seed, "mega_batch_mult": mega_batch_mult,
        "length_model": dataclasses.asdict(length_model),
        "prompt_plus_chosen_percentiles": {f"p{q}": float(np.percentile(chosen, q)) for q in (10, 50, 90, 99)},
        "pair_length_percentiles": {f"p{q}": float(np.percentile(lengths, q)) for q in (10, 50, 90, 99)},
        "rows": rows,
    }  # fmt: skip
    write_report(out_dir, summary, rows, plot(rows), title="Padding: random vs length-grouped batches",
                 intro=f"{n_pairs} synthetic pairs (see lightning_modules/studies/padding_benchmark.py), "
                       f"mega_batch_mult {mega_batch_mult}, seed {seed}.",
                 figure_name="padding.png", dpi=120,
                 columns={"batch_size": "batch size", "random": "padding, random batches",
                          "grouped": "padding, length-grouped", "ratio": "random / grouped"},
                 formats={"random": ".1%", "grouped": ".1%", "ratio": "{:.1f}×"})
    return summary


def main(args: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    run_study(padding_benchmark, args)


if __name__ == "__main__":
    main()
