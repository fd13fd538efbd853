"""Reference models stored float32 / 8-bit / 4-bit (nf4): memory, speed and log-prob drift (CPU, < 3 min).

    python -m lightning_modules.studies.quantization_benchmark \
        --config configs/studies/reference-quant-bench/quantization.yaml      # or: make reference-quant-bench

Models: the trained demo SFT policy (`runs/demo/sft/latest/export`, the quickstart's DPO reference; its
own validation pairs) when `make demo` has run, and always a larger randomly initialised Llama
(hidden 512, 8 layers, 8 heads, MLP 2048: 34M parameters) on the synthetic task's validation pairs,
built once under `<out>/assets`. Random weights give near-uniform next-token distributions, so its
drift numbers say how quantization noise propagates, not how a trained model's preferences move.
(Checked once by hand: the 4-bit drift is nf4 weight rounding, not the bf16 activations of bnb's
CPU kernel; the fp32 dequantize path drifts as much, and float weights run in bf16 drift 3-30x less.)

Per model and quantization (see `lightning_modules.models.quantization` for what runs on CPU): memory of
parameters, buffers and quantization statistics, and its ratio to float32; load time; forward time
per batch of pairs (after one untimed warm-up batch: 4-bit repacks its weights on the first CPU
forward); over every validation pair, |Δ logp| vs float32 per sequence (summed over response tokens)
and per token (divided by the response length), the max per-sequence |Δ|, and the share of pairs
whose sign of logp(chosen) − logp(rejected) flips. Writes summary.json, summary.md, quantization.png.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from datamodules import PreferenceDataModule
from datamodules.synthetic import SyntheticTask, build_assets
from datamodules.utils.errors import UserInputError
from lightning_modules.logprobs import concatenated_forward
from lightning_modules.models.quantization import (Quantization, load_reference_model, model_memory_bytes,
                                                   quantized_linear_count)
from lightning_modules.studies.launch import run_study
from lightning_modules.studies.report import new_figure, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

LEVELS: tuple[Quantization, ...] = ("none", "8bit", "4bit")
# The table: {row key: header} and the number format of each column (summary.json keeps every key).
COLUMNS = {"model": "model", "quantization": "quant", "memory_mb": "memory MB", "memory_ratio": "× fp32",
           "load_s": "load s", "forward_ms_per_batch": "fwd ms/batch", "mean_abs_dlogp_seq": "mean abs Δ/seq",
           "mean_abs_dlogp_token": "mean abs Δ/token", "max_abs_dlogp_seq": "max abs Δ/seq",
           "sign_flip_fraction": "margin sign flips"}
FORMATS = {"memory_mb": ".2f", "memory_ratio": ".3f", "load_s": ".2f", "forward_ms_per_batch": ".1f",
           "mean_abs_dlogp_seq": ".2e", "mean_abs_dlogp_token": ".2e", "max_abs_dlogp_seq": ".2e",
           "sign_flip_fraction": ".1%"}


def parameter_count(model_path: str | Path) -> int:
    """Parameters of the model saved at `model_path`, counted on the meta device (nothing is loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path)).num_parameters()


def pair_logps(model: torch.nn.Module, batches: list[dict]) -> tuple[np.ndarray, np.ndarray, float]:
    """(P, 2) summed [chosen, rejected] log-probs, (P, 2) response token counts, seconds per batch."""
    with torch.no_grad():
        concatenated_forward(model, batches[0])  # warm-up: 4-bit CPU layers repack on their first call
        start = time.perf_counter()
        outs = [concatenated_forward(model, batch) for batch in batches]
        seconds = (time.perf_counter() - start) / len(batches)
    logps = torch.cat([torch.stack([o.chosen_logps, o.rejected_logps], 1) for o in outs]).double().numpy()
    counts = torch.cat([torch.stack([o.chosen_counts, o.rejected_counts], 1) for o in outs]).numpy()
    return logps, counts, seconds


def compare(name: str, model_path: str, data_path: str, levels: tuple[Quantization, ...] = LEVELS, *,
            batch_size: int, max_pairs: int) -> list[dict]:
    """One row per quantization level of `model_path` on the validation pairs of `data_path`."""
    data = PreferenceDataModule(path=data_path, tokenizer_name_or_path=model_path, train_split=None,
                                eval_batch_size=batch_size, max_length=128)
    data.setup("validate")
    batches, n = [], 0
    for batch in data.val_dataloader():
        if n >= max_pairs:
            break
        batches.append(batch)
        n += batch["chosen_input_ids"].shape[0]
    rows, base = [], None
    for quantization in levels:
        start = time.perf_counter()
        model = load_reference_model(model_path, quantization=quantization, device="cpu")
        load_s = time.perf_counter() - start
        logps, counts, forward_s = pair_logps(model, batches)
        base = base or {"logps": logps, "memory": model_memory_bytes(model)}
        delta = np.abs(logps - base["logps"])  # (P, 2)
        margin, base_margin = logps[:, 0] - logps[:, 1], base["logps"][:, 0] - base["logps"][:, 1]
        quantized, linears = quantized_linear_count(model)
        rows.append({
            "model": name, "quantization": quantization, "parameters": sum(p.numel() for p in model.parameters()),
            "quantized_linears": f"{quantized}/{linears}", "pairs": len(logps),
            "memory_mb": model_memory_bytes(model) / 2**20,
            "memory_ratio": model_memory_bytes(model) / base["memory"],
            "load_s": load_s, "forward_ms_per_batch": 1000 * forward_s,
            "mean_abs_dlogp_seq": float(delta.mean()), "mean_abs_dlogp_token": float((delta / counts).mean()),
            "max_abs_dlogp_seq": float(delta.max()), "mean_logp_token": float((logps / counts).mean()),
            "sign_flip_fraction": float(np.mean(np.sign(margin) != np.sign(base_margin))),
        })  # fmt: skip
        del model
    return rows


def plot(rows: list[dict], levels: tuple[str, ...]) -> Figure:
    """Two panels of grouped bars per model: memory vs float32, and mean |Δ logp| per token (the figure)."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    x, width = np.arange(len(models)), 0.8 / len(levels)
    fig, (mem_ax, dev_ax) = new_figure(2)
    for i, quantization in enumerate(levels):
        picked = [next(r for r in rows if r["model"] == m and r["quantization"] == quantization) for m in models]
        offset = (i - (len(levels) - 1) / 2) * width
        mem_ax.bar(x + offset, [r["memory_ratio"] for r in picked], width, label=quantization)
        if quantization != "none":
            dev_ax.bar(x + offset, [r["mean_abs_dlogp_token"] for r in picked], width, label=quantization,
                       color=f"C{i}")
    mem_ax.set(ylabel="memory / float32", title="Reference memory (params + buffers + quant stats)")
    dev_ax.set(yscale="log", ylabel="mean |Δ logp| per token vs float32 (nats)",
               title="Log-prob drift from quantization")
    for ax in (mem_ax, dev_ax):
        ax.set_xticks(x, models, fontsize=8)
        ax.legend()
    return fig


@dataclass(frozen=True)
class RandomModel:
    """Shape of the randomly initialised Llama always benchmarked (the default has 34M parameters).

    Args:
        hidden_size: width of the residual stream.
        num_layers: decoder layers.
        num_heads: attention heads per layer.
        intermediate_size: width of each MLP.
    """

    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    intermediate_size: int = 2048


def quantization_benchmark(out_dir: str = "runs/reference-quant-bench", batch_size: int = 16, max_pairs: int = 256,
                           threads: int = 1, levels: tuple[Quantization, ...] = LEVELS,
                           random_model: RandomModel = RandomModel(), demo_model: str = "runs/demo/sft/latest/export",
                           demo_data: str = "runs/demo/assets/data/prefs") -> dict:
    """Memory, speed and log-prob drift of each quantization level, per model.

    Args:
        out_dir: folder receiving summary.json, summary.md, quantization.png and the random model's `assets/`.
        batch_size: validation pairs per forward.
        max_pairs: validation pairs per model (at most).
        threads: torch CPU threads (1: steadier timings on a shared machine).
        levels: quantization levels compared; the first must be "none" (the float32 baseline).
        random_model: shape of the random Llama benchmarked on the synthetic task's validation pairs.
        demo_model: the trained demo SFT policy, benchmarked too when it exists (after `make demo`).
        demo_data: preference data folder whose validation pairs the demo model is scored on.
    """
    if not levels or levels[0] != "none":
        raise UserInputError(f"levels={list(levels)}: the first level must be 'none' (the float32 baseline)")
    out = Path(out_dir)
    torch.set_num_threads(threads)
    import bitsandbytes  # noqa: F401  (imported before any timing, so no load time includes it)

    torch.manual_seed(0)
    large = build_assets(out / "assets", task=SyntheticTask(), n_sft=64, n_pref=64, n_val=max_pairs,
                         model_kwargs=dataclasses.asdict(random_model))
    size = parameter_count(large / "model")
    label = f"random {size / 1e6:.0f}M" if size >= 1e6 else f"random {size / 1e3:.0f}K"
    models = [(label, str(large / "model"), str(large / "data/prefs"))]
    if (Path(demo_model) / "config.json").exists() and Path(demo_data).exists():
        models.insert(0, ("demo SFT (trained)", demo_model, demo_data))
    else:
        print(f"[quant-bench] {demo_model} not found (run `make demo`): benchmarking the random model only")
    rows = [row for name, model, data in models
            for row in compare(name, model, data, levels, batch_size=batch_size, max_pairs=max_pairs)]
    summary = {"batch_size": batch_size, "max_pairs": max_pairs, "torch_threads": threads, "device": "cpu",
               "models": {name: path for name, path, _ in models}, "rows": rows}
    write_report(out, summary, rows, plot(rows, levels), figure_name="quantization.png", dpi=120,
                 title="Reference quantization: float32 vs 8-bit vs 4-bit (nf4)",
                 intro="CPU, bitsandbytes through transformers' BitsAndBytesConfig (see "
                       "lightning_modules/models/quantization.py); Δ = quantized − float32 log-prob in nats; "
                       f"batches of {batch_size} pairs, {threads} torch thread(s).",
                 columns=COLUMNS, formats=FORMATS)
    return summary


def main(args: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    run_study(quantization_benchmark, args)


if __name__ == "__main__":
    main()
