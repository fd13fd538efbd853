"""Reference models stored float32 / 8-bit / 4-bit (nf4): memory, speed and log-prob drift (CPU, < 3 min).

    python -m lightning_modules.studies.quantization_benchmark --out runs/reference-quant-bench
    # or: make reference-quant-bench

Models: the trained demo SFT policy (`runs/demo/sft/export`, the quickstart's DPO reference; its
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

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from datamodules import PreferenceDataModule
from datamodules.synthetic import SyntheticTask, build_assets
from datamodules.utils.files import write_figure_atomic, write_text_atomic
from lightning_modules.logprobs import concatenated_forward
from lightning_modules.models.quantization import load_reference_model, model_memory_bytes, quantized_linear_count

DEMO_MODEL, DEMO_DATA = Path("runs/demo/sft/export"), Path("runs/demo/assets/data/prefs")
LARGE_MODEL = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048}
LEVELS = ("none", "8bit", "4bit")


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


def compare(name: str, model_path: str, data_path: str, *, batch_size: int, max_pairs: int) -> list[dict]:
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
    for quantization in LEVELS:
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


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | quant | memory MB | × fp32 | load s | fwd ms/batch | mean abs Δ/seq | mean abs Δ/token "
             "| max abs Δ/seq | margin sign flips |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['quantization']} | {r['memory_mb']:.2f} | {r['memory_ratio']:.3f} | "
                     f"{r['load_s']:.2f} | {r['forward_ms_per_batch']:.1f} | {r['mean_abs_dlogp_seq']:.2e} | "
                     f"{r['mean_abs_dlogp_token']:.2e} | {r['max_abs_dlogp_seq']:.2e} | "
                     f"{r['sign_flip_fraction']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Two panels of grouped bars per model: memory vs float32, and mean |Δ logp| per token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    x, width = np.arange(len(models)), 0.8 / len(LEVELS)
    fig, (mem_ax, dev_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, quantization in enumerate(LEVELS):
        picked = [next(r for r in rows if r["model"] == m and r["quantization"] == quantization) for m in models]
        offset = (i - (len(LEVELS) - 1) / 2) * width
        mem_ax.bar(x + offset, [r["memory_ratio"] for r in picked], width, label=quantization)
        if quantization != "none":
            dev_ax.bar(x + offset, [r["mean_abs_dlogp_token"] for r in picked], width, label=quantization,
                       color=f"C{i}")
    mem_ax.set_ylabel("memory / float32")
    mem_ax.set_title("Reference memory (params + buffers + quant stats)")
    dev_ax.set_yscale("log")
    dev_ax.set_ylabel("mean |Δ logp| per token vs float32 (nats)")
    dev_ax.set_title("Log-prob drift from quantization")
    for ax in (mem_ax, dev_ax):
        ax.set_xticks(x, models, fontsize=8)
        ax.legend()
    fig.tight_layout()
    write_figure_atomic(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/reference-quant-bench", help="output folder")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward")
    parser.add_argument("--max-pairs", type=int, default=256, help="validation pairs per model (at most)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    torch.set_num_threads(args.threads)
    import bitsandbytes  # noqa: F401  (imported before any timing, so no load time includes it)

    torch.manual_seed(0)
    large = build_assets(out / "assets", task=SyntheticTask(), n_sft=64, n_pref=64, n_val=args.max_pairs,
                         model_kwargs=LARGE_MODEL)
    models = [("random 34M", str(large / "model"), str(large / "data/prefs"))]
    if (DEMO_MODEL / "config.json").exists() and DEMO_DATA.exists():
        models.insert(0, ("demo SFT (trained)", str(DEMO_MODEL), str(DEMO_DATA)))
    else:
        print(f"[quant-bench] {DEMO_MODEL} not found (run `make demo`): benchmarking the random model only")
    rows = [row for name, model, data in models
            for row in compare(name, model, data, batch_size=args.batch_size, max_pairs=args.max_pairs)]
    summary = {"batch_size": args.batch_size, "max_pairs": args.max_pairs, "torch_threads": args.threads,
               "device": "cpu", "models": {name: path for name, path, _ in models}, "rows": rows}
    table = markdown_table(rows)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "summary.md", "# Reference quantization: float32 vs 8-bit vs 4-bit (nf4)\n\n"
                                          "CPU, bitsandbytes through transformers' BitsAndBytesConfig (see "
                                          "lightning_modules/quantization.py); Δ = quantized − float32 "
                                          f"log-prob in nats; batches of {args.batch_size} pairs, {args.threads} "
                                          f"torch thread(s).\n\n{table}")
    plot(rows, out / "quantization.png")
    print(table, end="")
    print(f"wrote {out}/summary.json, summary.md, quantization.png")
    return summary


if __name__ == "__main__":
    main()
