"""`make sams-bench`: the cost of a SamS training step against a plain DPO step, and the scheduler's size.

    python -m lightning_modules.studies.sams_benchmark --config configs/studies/sams-bench/bench.yaml

On the demo's embedded default (the tiny synthetic model and task, built under `out_dir/assets`), full
optimizer steps (forward, backward, optimizer) on the same batches, all in this process:
- `dpo`: `DPOModule` (the baseline);
- `sams_<ratio>`: `DPOModule(sample_scheduler=SamS(ratio=...))` with the scheduler's defaults otherwise.
  Every pair still goes through the forward and the backward (the scheduler needs every pair's context and
  loss, and unselected pairs get zero weight, not a smaller batch), so ratio 1.0 costs what 0.5 does: it is
  there to show that the selection itself saves no compute and that the overhead is the scheduler's.
Each configuration runs `warmup + steps` optimizer steps per round, `rounds` times, the rounds rotating which
configuration runs first (as `make multiref-bench`); a step's time is from one batch hook to the next. The
config's warm-up (34 steps) outlasts `SamS.replay_batches` (32), so the timed steps replay a full pool (the steady
state; a shorter warm-up times a cheaper scheduler).
Every round trains on the same batches in the same order from the same seed, so the i-th timed step does the
same work in every round; other jobs on the machine can only slow a step down. Each step's time is therefore its
fastest over the rounds, and a configuration's time is the median of those (the same for the time inside
`SamS.step`). Reported: that ms / step, its ratio to `dpo` (target: at most 1.10 for ratio 0.5), the
time spent inside `SamS.step` (gather, label the last selection, train f1 / f2 on it plus the replayed
batches, score, select; the rest of the difference is the pooling of every layer's hidden states into contexts
and the logging of the scheduler's metrics), and the scheduler's parameter count against the policy's, for the
demo model and for a 7B Llama shape (`LlamaConfig()`'s defaults, L = 32, D = 4,096: both counted on the meta
device). On the demo model the scheduler is ~8% of the policy's size, so its cost is far larger a share of the
step than at 7B, where it is ~0.1%.
Writes summary.json, summary.md, sams_bench.png.
"""

from __future__ import annotations

import functools
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch

from datamodules.utils.errors import UserInputError
from lightning_modules.studies.generation_benchmark import timed
from lightning_modules.studies.launch import run_study
from lightning_modules.studies.multiref_benchmark import StepTimer, assets_and_references
from lightning_modules.studies.onpolicy_study import torch_threads
from lightning_modules.studies.report import new_figure, write_report

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TARGET = 1.10  # a SamS step may cost at most 10% more than a DPO step (issue 12)
BASELINE = "dpo"


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def scheduler_parameters(num_layers: int, hidden_size: int, **sizes: int) -> int:
    """Parameters of `SchedulerNetworks(num_layers, hidden_size, **sizes)`, built on the meta device (no memory)."""
    from lightning_modules.sams import SchedulerNetworks

    with torch.device("meta"):
        return parameter_count(SchedulerNetworks(num_layers, hidden_size, **sizes))


def llama_7b_parameters() -> tuple[int, int, int]:
    """(L, D, parameters) of a 7B Llama (`LlamaConfig()`'s defaults: Llama-2-7B), counted on the meta device."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return config.num_hidden_layers, config.hidden_size, parameter_count(model)


def time_run(make_module: Callable[[], Any], make_data: Callable[[], Any], steps: int,
             warmup: int) -> tuple[Any, dict[str, list[float]]]:
    """Train a fresh module for `warmup + steps` steps; (the module, {"step": s, "scheduler": s} of the timed steps)."""
    module = make_module()
    inside: list[float] = []
    if module.sample_scheduler is not None:  # the instance attribute shadows the method for this run only
        module.sample_scheduler.step = timed(inside, module.sample_scheduler.step)
    timer = StepTimer()
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=warmup + steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, datamodule=make_data())
    return module, {"step": timer.step_seconds(warmup), "scheduler": inside[warmup:]}


def fastest(rounds: list[list[float]]) -> list[float]:
    """Per step, its fastest time over the rounds (the i-th step of every round does the same work)."""
    return [min(times) for times in zip(*rounds)]


def plot(rows: list[dict[str, Any]], shares: dict[str, float], title: str) -> Figure:
    """Left: ms per step, split into time inside SamS.step and the rest. Right: scheduler / policy parameters."""
    fig, (left, right) = new_figure(2, panel_size=(5.5, 3.5), title=title)
    names = [r["config"] for r in rows]
    inside = [r.get("scheduler_ms") or 0.0 for r in rows]
    rest = [r["ms_per_step"] - s for r, s in zip(rows, inside)]
    left.barh(names, rest, color="tab:gray", label="rest of the step")
    left.barh(names, inside, left=rest, color="tab:orange", label="inside SamS.step")
    left.axvline(rows[0]["ms_per_step"] * TARGET, color="red", linestyle="--", label=f"{TARGET:.2f} × {BASELINE}")
    left.set(xlabel="ms / optimizer step (median of each step's fastest round)",
             xlim=(0, 1.45 * max(r["ms_per_step"] for r in rows)))
    left.invert_yaxis()
    left.legend(fontsize=8, loc="lower right")
    right.barh(list(shares), [100 * v for v in shares.values()], color="tab:blue")
    for i, value in enumerate(shares.values()):
        right.annotate(f"{100 * value:.3g}%", (100 * value, i), xytext=(3, 0), textcoords="offset points",
                       va="center", fontsize=8)
    right.set(xscale="log", xlabel="scheduler parameters, % of the policy's",
              xlim=(100 * min(shares.values()) / 5, 100 * max(shares.values()) * 8))
    right.invert_yaxis()
    return fig


def sams_benchmark(out_dir: str = "runs/sams-bench", ratios: tuple[float, ...] = (0.5, 1.0),
                   reference: Literal["live", "cached"] = "live", batch_size: int = 32, steps: int = 20,
                   warmup: int = 34, rounds: int = 3, threads: int = 1, replay_batches: int = 8,
                   title: str = "SamS: step cost against DPO, and the scheduler's size") -> dict[str, Any]:
    """Measure and report ms / step of DPO + SamS against plain DPO, and the scheduler's parameter count.

    Args:
        out_dir: assets and the report.
        ratios: SamS selection ratios to time; the first is the one held to the target (the paper's 0.5).
        reference: live (a frozen copy of the policy, as the demo's DPO) or cached (the reference's log-probs
            precomputed: no reference forward, so the scheduler is a larger share of the step).
        batch_size: pairs per step (the demo's DPO: 32).
        steps: timed steps per configuration and round.
        warmup: untimed steps before them; at least SamS's replay_batches (32) + 1, so the timed steps
            replay a full pool.
        rounds: interleaved repetitions; a step's time is its fastest round's, a configuration's the median of those.
        threads: torch intra-op threads.
        replay_batches: SamS's replay_batches (its default: 8; the paper's "up to 32" costs about 4x more scheduler time).
        title: report and plot title.
    """
    from datamodules import PreferenceDataModule
    from datamodules.synthetic import SyntheticTask, build_assets
    from lightning_modules.dpo import DPOModule
    from lightning_modules.sams import SamS

    if not ratios or not all(0 < r <= 1 for r in ratios) or min(batch_size, steps, rounds, threads) < 1 or warmup < 0:
        raise UserInputError(f"ratios={list(ratios)} must be in (0, 1] (at least one), batch_size, steps, rounds and "
                             "threads >= 1, warmup >= 0")
    out = Path(out_dir)
    if reference == "cached":
        assets, refs = assets_and_references(out, ("float32",))
    else:  # the same assets as multiref-bench's, without computing a cache
        assets, refs = build_assets(out / "assets", task=SyntheticTask(), n_sft=64, n_pref=1024, n_val=64), None
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-4)

    def make(ratio: float | None) -> Callable[[], Any]:
        return lambda: DPOModule(str(assets / "model"), reference=reference, optimizer=optimizer,
                                 sample_scheduler=None if ratio is None else SamS(ratio=ratio,
                                                                                  replay_batches=replay_batches))

    def data() -> Any:
        return PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"), reference_cache=refs,
                                    max_length=64, batch_size=batch_size, eval_batch_size=64, shuffle=False)

    selection: dict[str, float | None] = {BASELINE: None, **{f"sams_{r:g}": r for r in ratios}}  # name -> ratio
    runs: dict[str, list[dict[str, list[float]]]] = {name: [] for name in selection}
    modules: dict[str, Any] = {}
    loads: list[float] = []
    names = list(selection)
    with torch_threads(threads):
        for r in range(rounds):  # each round starts one configuration later, so no one always runs first
            for name in names[r % len(names):] + names[:r % len(names)]:
                modules[name], seconds = time_run(make(selection[name]), data, steps, warmup)
                runs[name].append(seconds)
                loads.append(os.getloadavg()[0])  # other jobs slow the policy's matmuls more than the scheduler
    ms = {name: 1000 * statistics.median(fastest([r["step"] for r in rs])) for name, rs in runs.items()}

    policy_parameters = parameter_count(modules[BASELINE].policy)
    first = f"sams_{ratios[0]:g}"
    networks = modules[first].sample_scheduler.networks
    demo_scheduler = parameter_count(networks)
    sizes = modules[first].sample_scheduler.sizes
    layers, hidden, llama_parameters = llama_7b_parameters()
    llama_scheduler = scheduler_parameters(layers, hidden, **sizes)

    rows = []
    for name in names:
        row: dict[str, Any] = {"config": name, "ratio": selection[name], "ms_per_step": ms[name],
                               "over_dpo": ms[name] / ms[BASELINE]}
        if name != BASELINE:
            inside = 1000 * statistics.median(fastest([r["scheduler"] for r in runs[name]]))
            row.update(scheduler_ms=inside, scheduler_share=inside / ms[name])
        rows.append(row)
    ratio = ms[first] / ms[BASELINE]
    met = ratio <= TARGET
    verdict = (f"SamS (ratio {ratios[0]:g}) step / DPO step = {ratio:.3f} on the demo model: the ≤ {TARGET:.2f} "
               f"target is {'met' if met else 'NOT met'}. Its scheduler has {demo_scheduler:,} parameters, "
               f"{100 * demo_scheduler / policy_parameters:.1f}% of the {policy_parameters:,}-parameter demo policy; "
               f"for a 7B Llama (L = {layers}, D = {hidden:,}) {llama_scheduler:,}, "
               f"{100 * llama_scheduler / llama_parameters:.3f}% of {llama_parameters:,}.")
    summary = {
        "sams_over_dpo": ratio, "target": TARGET, "target_met": met,
        "sams_over_dpo_by_round": [statistics.median(a["step"]) / statistics.median(b["step"])  # the spread of noise
                                   for a, b in zip(runs[first], runs[BASELINE])],
        "scheduler_parameters": demo_scheduler, "policy_parameters": policy_parameters,
        "scheduler_over_policy_parameters": demo_scheduler / policy_parameters,
        "llama_7b": {"num_layers": layers, "hidden_size": hidden, "scheduler_parameters": llama_scheduler,
                     "policy_parameters": llama_parameters,
                     "scheduler_over_policy_parameters": llama_scheduler / llama_parameters},
        "scheduler_sizes": sizes, "verdict": verdict,
        "settings": {"ratios": list(ratios), "reference": reference, "batch_size": batch_size, "steps": steps,
                     "warmup": warmup, "rounds": rounds, "torch_threads": threads, "cpus": os.cpu_count(),
                     "max_load_average": max(loads),
                     "packed_sequences": getattr(modules[BASELINE], "packing", None),  # the policy's forwards
                     "note": "every configuration ran in this one process, on the same batches"},
        "rows": rows, "step_seconds": runs}
    demo_shape = f"L={networks.layer_embedding.shape[0]}, D={networks.connectors[0][0].in_features}"
    shares = {f"demo ({demo_shape})": demo_scheduler / policy_parameters,
              f"7B Llama (L={layers}, D={hidden:,})": llama_scheduler / llama_parameters}
    packing = {True: "packed", False: "padded"}.get(summary["settings"]["packed_sequences"], "the module's default")
    load = (f"1-minute load average after each run: at most {max(loads):.1f} on {os.cpu_count()} CPUs, this "
            f"benchmark's {threads} thread(s) included (more means other jobs: a busy machine slows the policy's "
            f"matmuls more than the scheduler's small ops, so the ratio reads low).")
    write_report(out, summary, rows, plot(rows, shares, title), title=title, figure_name="sams_bench.png",
                 columns={"config": "config", "ratio": "selection ratio", "ms_per_step": "ms / step",
                          "over_dpo": f"× {BASELINE}", "scheduler_ms": "inside SamS.step, ms",
                          "scheduler_share": "share of the step"},
                 formats={"ratio": "g", "ms_per_step": ".1f", "over_dpo": "{:.3f}×", "scheduler_ms": ".1f",
                          "scheduler_share": ".0%"},
                 intro=f"ms per optimizer step (forward, backward, optimizer): the median over {steps} timed steps "
                       f"(after {warmup} untimed ones: the replay pool full) of each step's fastest of {rounds} "
                       f"rotating rounds (the same batches and work in every round), batch "
                       f"{batch_size}, {reference} reference, {packing} forwards, the demo's tiny model on CPU, {threads} torch "
                       f"thread(s); every configuration in one process on the same batches, so the ratios compare "
                       f"like with like. Target: SamS within {TARGET:.2f}× of `{BASELINE}`. {load}\n\n{verdict}")
    print(f"{verdict}\n{load}")
    return summary


def main(args: list[str] | None = None) -> None:
    """Command line: see the module docstring."""
    run_study(sams_benchmark, args)


if __name__ == "__main__":
    main()
