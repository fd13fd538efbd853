"""`make generation-bench`: on-policy sampling throughput, and a sampling round against a training step.

    python -m lightning_modules.studies.generation_benchmark --config configs/studies/generation-bench/bench.yaml

On the demo's embedded default (the tiny synthetic model and task, built under `out_dir/assets`), after a
short SFT (`sft_steps`, in this process, kept in `out_dir/sft_<steps>`) so that the policy answers like the demo's
and stops at its EOS. Measured in this process:
- `sample_<P>x<n>`: `lightning_modules.onpolicy.sample_responses` (one batched `generate`, KV cache on) for P
  prompts × n samples; generated tokens (each response up to and including its EOS) per second;
- `step_<objective>`: one `OnPolicyModule` optimizer step at `train_prompts` × n samples, fresh samples every
  step (`iterations_per_batch=1`), scored by the synthetic task's `unaligned` reward, split into generation
  (`sample_responses`), the rest of the sampling round (decoding, reward, reference log-probs, pairs) and training
  (forward, backward, optimizer: the step minus its round).
Each cell is the best of `rounds` rounds (each round's median over `repeats` calls or `steps` steps, after
`warmup` untimed ones), and the rounds rotate which configuration runs first, as in `make multiref-bench`.
Writes summary.json, summary.md, generation_bench.png.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from datamodules.utils.errors import UserInputError
from lightning_modules.studies.launch import run_study
from lightning_modules.studies.multiref_benchmark import StepTimer
from lightning_modules.studies.onpolicy_study import torch_threads
from lightning_modules.studies.report import new_figure, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def timed(record: list[float], fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, appending the seconds of each call to `record`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            record.append(time.perf_counter() - start)

    return wrapper


def demo_policy(out: Path, sft_steps: int) -> tuple[Path, Path]:
    """The synthetic assets and the tiny model after `sft_steps` of SFT (both reused when present)."""
    from datamodules import SFTDataModule
    from datamodules.synthetic import SyntheticTask, build_assets
    from datamodules.tokenize import load_tokenizer
    from lightning_modules.sft import SFTModule

    assets = build_assets(out / "assets", task=SyntheticTask(), n_sft=2048, n_pref=512, n_val=64)
    sft = out / f"sft_{sft_steps}"
    if not (sft / "config.json").exists():
        L.seed_everything(0, verbose=False)
        module = SFTModule(str(assets / "model"), optimizer=functools.partial(torch.optim.AdamW, lr=3e-3))
        trainer = L.Trainer(max_steps=sft_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            num_sanity_val_steps=0, gradient_clip_val=1.0)
        trainer.fit(module, datamodule=SFTDataModule(str(assets / "data/sft"), str(assets / "model"), max_length=64,
                                                     batch_size=32))
        module.policy.save_pretrained(sft)
        load_tokenizer(str(assets / "model")).save_pretrained(sft)
    return assets, sft


def time_sampling(model: torch.nn.Module, prompt_ids: list[list[int]], sampling: Any, tokenizer: Any, repeats: int,
                  warmup: int) -> tuple[list[float], list[int]]:
    """Seconds and generated tokens of `repeats` seeded calls of `sample_responses` (after `warmup` calls)."""
    from lightning_modules.onpolicy import sample_responses

    seconds, tokens = [], []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        out = sample_responses(model, prompt_ids, sampling, pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, seed=i)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(len(r) for r in out.responses))
    return seconds, tokens


def time_training(policy: Path, assets: Path, objective: Any, sampling: Any, prompts: int, steps: int,
                  warmup: int) -> dict[str, list[float]]:
    """Per timed step of an `OnPolicyModule` run: step, round (sample_round) and generation (_sample) seconds."""
    from datamodules import PreferenceDataModule
    from lightning_modules.onpolicy import OnPolicyModule
    from lightning_modules.rewards import Synthetic

    module = OnPolicyModule(str(policy), objective=objective, reward=Synthetic("unaligned"), sampling=sampling,
                            optimizer=functools.partial(torch.optim.AdamW, lr=5e-5), log_samples_every=0)
    rounds: list[float] = []
    generation: list[float] = []
    module.sample_round = timed(rounds, module.sample_round)
    module._sample = timed(generation, module._sample)
    timer = StepTimer()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=warmup + steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, datamodule=PreferenceDataModule(str(assets / "data/prefs"), str(policy), max_length=64,
                                                         batch_size=prompts, return_prompts=True))
    if len(rounds) != warmup + steps or len(generation) != warmup + steps:
        raise RuntimeError(f"expected one sampling round per step, got {len(rounds)} rounds in {warmup + steps} steps")
    return {"step": timer.step_seconds(warmup), "round": rounds[warmup:], "generation": generation[warmup:]}


def plot(rows: list[dict[str, Any]], title: str) -> Figure:
    """Left: sampling throughput against sequences per call. Right: a training step, split into its parts."""
    fig, (left, right) = new_figure(2, panel_size=(5.5, 3.8), title=title)
    sampling = [r for r in rows if r["config"].startswith("sample_")]
    sequences = [r["sequences"] for r in sampling]
    left.plot(sequences, [r["tokens_per_s"] for r in sampling], marker="o")
    left.set(xscale="log", xlabel="sequences per call (prompts × samples)", ylabel="generated tokens / s",
             title="sample_responses throughput", ylim=(0, None))
    left.set_xticks(sequences, [str(n) for n in sequences])
    left.minorticks_off()
    left.grid(alpha=0.3)
    steps = [r for r in rows if r["config"].startswith("step_")]
    names = [r["config"] for r in steps]
    bottom = [0.0] * len(steps)
    for part, label, color in (("generation_ms", "generation", "tab:orange"),
                               ("reward_ref_ms", "reward + reference", "tab:olive"),
                               ("training_ms", "training", "tab:blue")):
        values = [r[part] for r in steps]
        right.barh(names, values, left=bottom, color=color, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set(xlabel="ms per optimizer step", title="on-policy step", xlim=(0, 1.5 * max(bottom)))  # legend room
    right.legend(fontsize=8, loc="center right")
    return fig


def generation_benchmark(out_dir: str = "runs/generation-bench", sft_steps: int = 60,
                         batch_prompts: tuple[int, ...] = (4, 16, 64), num_samples: int = 4,
                         max_new_tokens: int = 24, temperature: float = 1.0, repeats: int = 5,
                         train_prompts: int = 16, objectives: tuple[str, ...] = ("Sigmoid", "Reinforce"),
                         steps: int = 10, warmup: int = 2, rounds: int = 3, threads: int = 1,
                         title: str = "on-policy sampling: throughput and share of a training step"
                         ) -> list[dict[str, Any]]:
    """Measure and report sampling throughput and an on-policy step's generation / training split.

    Args:
        out_dir: assets, the short-SFT policy and the report.
        sft_steps: SFT steps of the tiny model before measuring (so it answers and stops like the demo's).
        batch_prompts: prompts per `sample_responses` call, each with `num_samples` samples.
        num_samples: n, samples per prompt (sampling and training).
        max_new_tokens: generation budget per response (the synthetic task's answers take ~8 tokens).
        temperature: sampling temperature.
        repeats: timed calls per batch size and round.
        train_prompts: prompts per training step of the on-policy runs.
        objectives: objectives of the on-policy runs (pairwise ones train on 2 of the n samples, sampled ones on all).
        steps: timed optimizer steps per on-policy run and round.
        warmup: untimed calls / steps before them.
        rounds: interleaved repetitions; each cell is the best round's median.
        threads: torch intra-op threads.
        title: report and plot title.
    """
    from lightning_modules import objectives as objective_classes
    from lightning_modules.onpolicy import Sampling

    unknown = [o for o in objectives if not hasattr(objective_classes, o)]
    if unknown or not batch_prompts or min(*batch_prompts, sft_steps, repeats, train_prompts, steps, rounds,
                                            threads, max_new_tokens) < 1 or warmup < 0 or num_samples < 2:
        raise UserInputError(f"objectives {unknown} are not in lightning_modules.objectives, or a size is out of range "
                             f"(batch_prompts={list(batch_prompts)}, sft_steps, repeats, train_prompts, steps, rounds, "
                             f"threads, max_new_tokens >= 1; warmup >= 0; num_samples >= 2)")
    out = Path(out_dir)
    sampling = Sampling(num_samples=num_samples, max_new_tokens=max_new_tokens, temperature=temperature)
    with torch_threads(threads):
        seconds, tokens, parts = measure(out, sft_steps, tuple(batch_prompts), sampling, repeats, train_prompts,
                                         tuple(objectives), steps, warmup, rounds)
    rows = []
    for p in batch_prompts:  # the calls are seeded alike in every round: the same tokens, only the time varies
        name = f"sample_{p}x{num_samples}"
        i = min(range(rounds), key=lambda r: statistics.median(seconds[name][r]))  # the least disturbed round
        rows.append({"config": name, "sequences": p * num_samples, "ms": 1000 * statistics.median(seconds[name][i]),
                     "tokens": statistics.median(tokens[name][i]),
                     "tokens_per_s": statistics.median(t / s for t, s in zip(tokens[name][i], seconds[name][i]))})
    for name, runs in parts.items():
        i = min(range(len(runs)), key=lambda r: statistics.median(runs[r]["step"]))
        step, round_, generation = (statistics.median(runs[i][k]) for k in ("step", "round", "generation"))
        rows.append({"config": name, "sequences": train_prompts * num_samples, "ms": 1000 * step,
                     "generation_ms": 1000 * generation, "reward_ref_ms": 1000 * (round_ - generation),
                     "training_ms": 1000 * (step - round_), "generation_share": generation / step})
    summary = {"settings": {"sft_steps": sft_steps, "num_samples": num_samples, "max_new_tokens": max_new_tokens,
                            "temperature": temperature, "repeats": repeats, "train_prompts": train_prompts,
                            "steps": steps, "warmup": warmup, "rounds": rounds, "torch_threads": threads},
               "rows": rows, "sampling_seconds": seconds, "sampling_tokens": tokens, "step_parts": parts}
    write_report(out, summary, rows, plot(rows, title), title=title, figure_name="generation_bench.png",
                 columns={"config": "config", "sequences": "sequences", "ms": "ms per call / step",
                          "tokens": "tokens generated", "tokens_per_s": "tokens / s", "generation_ms": "generation ms",
                          "reward_ref_ms": "reward + reference ms", "training_ms": "training ms",
                          "generation_share": "generation share"},
                 formats={"ms": ".1f", "tokens": ".0f", "tokens_per_s": ",.0f", "generation_ms": ".1f",
                          "reward_ref_ms": ".1f", "training_ms": ".1f", "generation_share": ".0%"},
                 intro=f"The demo's tiny model after {sft_steps} SFT steps, CPU, {threads} torch thread(s). "
                       f"`sample_PxN`: one `sample_responses` call (KV cache on, temperature {temperature}, at most "
                       f"{max_new_tokens} new tokens), tokens = generated tokens up to each response's EOS. "
                       f"`step_<objective>`: one `OnPolicyModule` optimizer step at {train_prompts} prompts × "
                       f"{num_samples} samples, split into generation, reward + reference log-probs, and training "
                       f"(forward, backward, optimizer). Best of {rounds} rotating rounds of medians.")
    return rows


Timings = tuple[dict[str, list[list[float]]], dict[str, list[list[int]]], dict[str, list[dict[str, list[float]]]]]


def measure(out: Path, sft_steps: int, batch_prompts: tuple[int, ...], sampling: Any, repeats: int,
            train_prompts: int, objectives: tuple[str, ...], steps: int, warmup: int, rounds: int) -> Timings:
    """Every configuration, `rounds` times in rotating order: (sampling seconds, sampling tokens, step parts)."""
    from transformers import AutoModelForCausalLM

    from datamodules import PreferenceDataModule
    from lightning_modules import objectives as objective_classes
    from lightning_modules.onpolicy.sampler import prompt_ids_of

    assets, policy = demo_policy(out, sft_steps)
    data = PreferenceDataModule(str(assets / "data/prefs"), str(policy), max_length=64, batch_size=max(batch_prompts),
                                shuffle=False)
    data.setup("fit")
    all_prompts = prompt_ids_of(next(iter(data.train_dataloader())))
    model = AutoModelForCausalLM.from_pretrained(policy)
    configs: dict[str, Callable[[], Any]] = {}
    for p in batch_prompts:
        configs[f"sample_{p}x{sampling.num_samples}"] = functools.partial(
            time_sampling, model, all_prompts[:p], sampling, data.tokenizer, repeats, warmup)
    for name in objectives:
        configs[f"step_{name.lower()}"] = functools.partial(
            time_training, policy, assets, getattr(objective_classes, name)(), sampling, train_prompts, steps, warmup)
    seconds: dict[str, list[list[float]]] = {}
    tokens: dict[str, list[list[int]]] = {}
    parts: dict[str, list[dict[str, list[float]]]] = {}
    names = list(configs)
    for r in range(rounds):  # each round starts one configuration later, so no one always runs first
        for name in names[r % len(names):] + names[:r % len(names)]:
            result = configs[name]()
            if name.startswith("sample_"):
                seconds.setdefault(name, []).append(result[0])
                tokens.setdefault(name, []).append(result[1])
            else:
                parts.setdefault(name, []).append(result)
    return seconds, tokens, parts


def main(args: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    run_study(generation_benchmark, args)


if __name__ == "__main__":
    main()
