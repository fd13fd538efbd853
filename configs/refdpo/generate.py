"""Write every RefDPO run config, and this folder's README, from one template and the original grid.

Each run file is a complete config, because `tests/test_configs.py` instantiates every YAML on its
own. The files therefore repeat the shared settings, and this script is their single source: edit
it, not the YAML. `tests/test_refdpo_configs.py` fails when a committed file differs from its output.

    python configs/refdpo/generate.py            # rewrite configs/refdpo/*
    python configs/refdpo/generate.py --check    # exit 1 if a committed file is stale or missing

The hardware lines of each run (trainer accelerator, strategy block and precision; the model's dtype,
gradient checkpointing and, with CPU offload, the optimizer class) are copied verbatim from the
composable files `configs/strategy/zero3_8gpu_bf16.yaml` and `configs/strategy/a100_offload.yaml`, so
the grid and those files cannot drift apart: edit a strategy file, then rerun this script.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

sys.path.insert(0, str(Path(__file__).resolve().parent))  # refdpo_hardware.py, also when loaded by path in tests
from refdpo_hardware import EIGHT_GPUS, SINGLE_A100, Hardware, copied_lines, flow  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Policy:
    """An initial (SFT) policy of the paper."""

    label: str  # short name used in tables
    model: str  # hub id of the weights
    insert_eos: bool  # RefDPO's --insert_eos (EOS after system and user turns too): the Mistral runs only


POLICIES = {
    "mistral": Policy("Mistral-7B-SFT", "HuggingFaceH4/mistral-7b-sft-beta", insert_eos=True),
    "tulu2": Policy("Tulu-2-7B", "allenai/tulu-2-7b", insert_eos=False),
}

# Whose log-probs each yale-nlp/RefDPO config stores (the `chosen_logprob` / `rejected_logprob` columns).
REFERENCE_LOGPS = {
    "mistral": "log p(y|x) under Mistral-7B-SFT",
    "tulu2": "log p(y|x) under Tulu-2-7B",
    "mistral_prior": "unconditional log p(y) under Mistral-7B-SFT",
    "mistralv2": "log p(y|x) under Mistral-7B-Instruct-v0.2",
    "llama3": "log p(y|x) under Meta-Llama-3-70B-Instruct",
}




@dataclass(frozen=True)
class Group:
    """A β sweep of one policy against one reference choice: a table of the seed README."""

    folder: str  # runs live in configs/refdpo/<folder>/beta_<β>.yaml and runs/refdpo/<folder>/beta_<β>/
    policy: str  # key of POLICIES
    data: str  # yale-nlp/RefDPO config name (configs/data/refdpo_<data>.yaml)
    reference: str  # model.init_args.reference: precomputed (stored log-probs) or none (reference-free)
    reward: str  # the reward parameterization, as the paper writes it
    question: str  # the paper's research question this sweep answers
    betas: tuple[float, ...]
    results: dict[float, str] = field(default_factory=dict)  # β -> AlpacaEval 2 LC of the seed README


DPO_BETAS = (10.0, 1.0, 0.1, 0.05, 0.02, 0.01, 0.005)
STRONGER_REFERENCE_BETAS = (10.0, 1.0, 0.1, 0.01, 0.005)
DPO_REWARD = "β log pθ(y|x)/p_ref(y|x) (DPO)"
RQ1 = "RQ1: the optimal KL strength β for DPO"
RQ2 = "RQ2: is a reference policy necessary?"
RQ3 = "RQ3: does DPO benefit from a stronger reference?"

GRID = (
    Group("mistral", "mistral", "mistral", "precomputed", DPO_REWARD, RQ1, DPO_BETAS,
          {0.1: "14.03", 0.05: "13.29", 0.02: "16.06", 0.01: "**16.25**", 0.005: "12.36"}),
    Group("tulu2", "tulu2", "tulu2", "precomputed", DPO_REWARD, RQ1, DPO_BETAS,
          {0.1: "9.38", 0.05: "9.96", 0.02: "**10.46**", 0.01: "7.86", 0.005: "degenerate"}),
    Group("mistral_posterior", "mistral", "mistral", "none", "β log pθ(y|x) (posterior probability, reference-free)",
          RQ2, (100.0, 10.0, 1.0), {100.0: "**12.84** (best β of the paper's sweep)"}),
    Group("mistral_likelihood", "mistral", "mistral_prior", "precomputed",
          "β log pθ(x|y) (likelihood: stored unconditional log p(y) as the reference)", RQ2, (0.01,),
          {0.01: "**13.63** (best β of the paper's sweep)"}),
    Group("mistral_ref_mistralv2", "mistral", "mistralv2", "precomputed", DPO_REWARD, RQ3, STRONGER_REFERENCE_BETAS,
          {10.0: "18.74", 1.0: "**20.25**", 0.1: "19.58", 0.01: "17.18", 0.005: "15.34"}),
    Group("mistral_ref_llama3", "mistral", "llama3", "precomputed", DPO_REWARD, RQ3, STRONGER_REFERENCE_BETAS,
          {10.0: "13.29", 1.0: "9.59", 0.1: "10.99", 0.01: "**15.37**", 0.005: "11.70"}),
    Group("tulu2_ref_mistralv2", "tulu2", "mistralv2", "precomputed", DPO_REWARD, RQ3, STRONGER_REFERENCE_BETAS,
          {10.0: "7.61", 1.0: "**7.85**", 0.1: "degenerate", 0.01: "degenerate", 0.005: "degenerate"}),
    Group("tulu2_ref_llama3", "tulu2", "llama3", "precomputed", DPO_REWARD, RQ3, STRONGER_REFERENCE_BETAS,
          {10.0: "9.79", 1.0: "**11.17**", 0.1: "10.31", 0.01: "9.16", 0.005: "3.29"}),
)

# The single-A100 variant: the best Mistral DPO run of RQ1 on one 80 GB GPU.
SINGLE_A100_GROUP, SINGLE_A100_BETA = GRID[0], 0.01
SINGLE_A100_FILE = "mistral_single_a100_beta_0.01.yaml"
SINGLE_A100_NOTE = """\
# This variant: the same run on ONE A100 80 GB, ZeRO-3 with parameters and optimizer offloaded
# to CPU (docs/memory.md: ~20 GB on the GPU, ~200 GB host RAM); 4 pairs x 8 accumulation steps
# keep 32 pairs per optimizer step.
"""

ORIGINAL_SETUP = ("AdamW lr 5e-7, 10% linear warmup then linear decay, 3 epochs, 4 pairs/GPU x 8 GPUs,\n"
                  "# max length 2048, bf16, gradient checkpointing, DeepSpeed ZeRO-3, gradient clipping 1.0.")

REFERENCE_COMMENT = {
    "precomputed": "Δref from the dataset's stored log-probs: no reference model in memory",
    "none": "reference-free: Δref = 0, reward β log pθ(y|x)",
}

RUN = Template("""\
# GENERATED by configs/refdpo/generate.py: edit the script and rerun it, not this file.
# RefDPO (SPEC section 7), $question
# $policy_label from $model, reward $reward, β = $beta_text;
# reference log-probs: yale-nlp/RefDPO config `$data` ($reference_logps).
# Seed README result (AlpacaEval 2 LC): $result
# Original setup: $original_setup
$hardware_note# Run: python -m lightning_modules fit --config configs/refdpo/$relpath
seed_everything: 0
trainer:
$accelerator
  devices: $devices                          # GPUs: $devices x $batch pairs x $accumulate accumulation = 32 pairs/step
$strategy
$precision
  max_epochs: 3
  accumulate_grad_batches: $accumulate
  gradient_clip_val: 1.0              # DeepSpeed's gradient_clipping (global norm)
  log_every_n_steps: 10
  default_root_dir: runs/refdpo/$run_dir
  logger:
    class_path: lightning_modules.runtime.RunLogger   # <default_root_dir>/version_N/, <default_root_dir>/latest -> it
    init_args: {root_dir: "$${trainer.default_root_dir}"}
  callbacks:
    - class_path: lightning.pytorch.callbacks.LearningRateMonitor
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint   # latest epoch only: ZeRO-3 shards with Adam states
    - class_path: callbacks.MetricsJSON
      init_args: {path: metrics.json}      # in the run directory
    - class_path: callbacks.ExportPretrained       # HF folder for generation / AlpacaEval
      init_args: {dirpath: export}        # in the run directory
model:
  class_path: lightning_modules.dpo.DPOModule
  init_args:
    model_name_or_path: $model
    objective: Sigmoid                # -log σ(β(Δθ - Δref)), Rafailov et al. 2023 eq. 7
    beta: $beta
    reference: $reference${reference_pad}# $reference_comment
$dtype
$gradient_checkpointing
    optimizer: $optimizer
    lr_scheduler:
      class_path: lightning_modules.optim.LinearWarmupDecay
      init_args: {warmup_ratio: 0.1}  # linear warmup over 10% of the steps, then linear decay to 0
data:
  class_path: datamodules.PreferenceDataModule
  init_args:
    path: yale-nlp/RefDPO
    name: $data${data_pad}# chosen_logprob / rejected_logprob: $reference_logps
    schema: refdpo                    # message lists + stored log-probs, passed to the batch as ref_*_logps
    template: zephyr                  # <|user|>\\n...\\n<|assistant|>\\n, as the RefDPO code formats it
    insert_eos: $insert_eos${eos_pad}# RefDPO's --insert_eos: on for Mistral-7B-SFT, off for Tulu-2-7B
    train_split: train
    val_split: val
    max_length: 2048                  # prompt + response tokens per sequence
    batch_size: $batch                     # pairs per GPU (one forward of 2 x $batch sequences: chosen, then rejected)
""")


def beta_name(beta: float) -> str:
    """File-name form of β: 10.0 -> "10", 0.005 -> "0.005"."""
    return f"{beta:g}"


def pad(text: str, width: int = 38) -> str:
    """Spaces that align a trailing comment after `    key: value` at column `width`."""
    return " " * max(1, width - len(text))


def render_run(group: Group, beta: float, hardware: Hardware = EIGHT_GPUS) -> tuple[str, str]:
    """(path relative to configs/refdpo/, YAML text) of one run."""
    policy = POLICIES[group.policy]
    if hardware.offload:
        relpath, run_dir = SINGLE_A100_FILE, f"{group.folder}_single_a100/beta_{beta_name(beta)}"
        hardware_note = SINGLE_A100_NOTE
    else:
        run_dir, hardware_note = f"{group.folder}/beta_{beta_name(beta)}", ""
        relpath = f"{run_dir}.yaml"
    text = RUN.substitute(
        question=group.question, policy_label=policy.label, model=policy.model, reward=group.reward,
        beta_text=beta_name(beta), data=group.data, reference_logps=REFERENCE_LOGPS[group.data],
        result=group.results.get(beta, "not reported").replace("**", ""), original_setup=ORIGINAL_SETUP,
        hardware_note=hardware_note, relpath=relpath, devices=hardware.devices, batch=hardware.batch,
        accumulate=hardware.accumulate, run_dir=run_dir, **copied_lines(hardware.strategy),
        beta=repr(float(beta)),
        reference=group.reference, reference_pad=pad(f"    reference: {group.reference}"),
        reference_comment=REFERENCE_COMMENT[group.reference], optimizer=hardware.optimizer,
        data_pad=pad(f"    name: {group.data}"), insert_eos=str(policy.insert_eos).lower(),
        eos_pad=pad(f"    insert_eos: {str(policy.insert_eos).lower()}"),
    )
    return relpath, text


README_HEAD = """\
<!-- GENERATED by configs/refdpo/generate.py: edit the script and rerun it, not this file. -->
# RefDPO experiment configs

The grid of "Understanding Reference Policies in Direct Preference Optimization" (seed 002,
SPEC section 7), one complete config per run, all written by `generate.py` from one template.

```bash
python -m lightning_modules fit --config configs/refdpo/mistral/beta_0.01.yaml   # 8 GPUs, ZeRO-3
python -m lightning_modules fit --config configs/refdpo/mistral_single_a100_beta_0.01.yaml
python configs/refdpo/generate.py            # after editing the grid or the shared settings
```

Lightning launches one process per GPU itself (or use `torchrun` / SLURM for several nodes).
The hardware lines of each run (accelerator, DeepSpeed strategy, precision, `dtype`,
`gradient_checkpointing`) are copied from `configs/strategy/zero3_8gpu_bf16.yaml` (single-A100 variant:
`configs/strategy/a100_offload.yaml`), the files that put any other experiment on the same hardware.
Each run writes a fresh `runs/refdpo/<group>/beta_<β>/version_N/` (`checkpoints/`, `metrics.json`,
`export/`, TensorBoard events, `config.yaml`), and `runs/refdpo/<group>/beta_<β>/latest` points at the newest.

## Shared settings (the original's)

| original | config key |
|---|---|
| AdamW, lr 5e-7, no weight decay | `model.init_args.optimizer` |
| linear warmup over 10% of the steps, then linear decay | `model.init_args.lr_scheduler`: `LinearWarmupDecay`, 0.1 |
| 3 epochs | `trainer.max_epochs: 3` |
| 4 pairs per GPU x 8 GPUs (32 pairs per step) | `data.init_args.batch_size: 4`, `trainer.devices: 8` |
| max length 2048 | `data.init_args.max_length: 2048` |
| bf16 | `trainer.precision: bf16-mixed`, `model.init_args.dtype: bfloat16` |
| gradient checkpointing | `model.init_args.gradient_checkpointing: true` |
| DeepSpeed ZeRO-3 | `trainer.strategy`: `DeepSpeedStrategy` with `stage: 3` |
| gradient clipping 1.0 | `trainer.gradient_clip_val: 1.0` |
| `--insert_eos` with Mistral-7B-SFT | `data.init_args.insert_eos: true` (false for Tulu-2-7B) |
| reference log-probs shipped with the dataset | `model.init_args.reference: precomputed` |
| `--ref_free` | `model.init_args.reference: none` |

Memory: `docs/memory.md` (ZeRO-3 on 8 x 80 GB: ~35 GB per GPU; one A100 with CPU offload:
~20 GB GPU, ~200 GB host RAM, so a 256 GB host).

## Runs

"""

README_TAIL = """
The single-A100 variant `mistral_single_a100_beta_0.01.yaml` is `mistral/beta_0.01.yaml` on one
GPU: ZeRO-3 with parameters and optimizer states offloaded to the CPU (`DeepSpeedCPUAdam`, which
ZeRO-Offload requires), 4 pairs x 8 accumulation steps = the same 32 pairs per optimizer step.

The Tulu-2-7B rows of RQ3 use the Tulu setting of `insert_eos` (off) with the stronger
references' log-probs; the seed README lists them with the Mistral ones.

## Results to compare against

AlpacaEval 2 length-controlled win rate, as the seed README reports it (bold: best of its
sweep; "degenerate": the paper's run degenerated; "-": not reported there).

"""


def row(*cells: str) -> str:
    """One Markdown table row; `|` inside a cell (as in log p(y|x)) is escaped."""
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def render_readme() -> str:
    """This folder's README: the run table and the original results, from GRID."""
    header = ("group", "policy", "reference log-probs (RefDPO config)", "reference mode", "reward", "β", "question")
    lines = [row(*header), row(*["---"] * len(header))]
    for g in GRID:
        lines.append(row(f"`{g.folder}/`", POLICIES[g.policy].label, f"`{g.data}`: {REFERENCE_LOGPS[g.data]}",
                         f"`{g.reference}`", g.reward, ", ".join(beta_name(b) for b in g.betas),
                         g.question.partition(":")[0]))
    results = []
    for g in GRID:
        results += [f"### `{g.folder}/`: {POLICIES[g.policy].label}, reference `{g.data}`, {g.question}", "",
                    row("β", "config", "AlpacaEval 2 LC (original)"), row("---", "---", "---")]
        for b in g.betas:
            file = f"{g.folder}/beta_{beta_name(b)}.yaml"
            results.append(row(beta_name(b), f"[`{file}`]({file})", g.results.get(b, "-")))
        results.append("")
    return README_HEAD + "\n".join(lines) + "\n" + README_TAIL + "\n".join(results)


def render_all() -> dict[str, str]:
    """Every generated file: path relative to configs/refdpo/ -> text."""
    files = dict(render_run(g, b) for g in GRID for b in g.betas)
    files.update([render_run(SINGLE_A100_GROUP, SINGLE_A100_BETA, SINGLE_A100)])
    files["README.md"] = render_readme()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ from the output")
    args = parser.parse_args(argv)
    files = render_all()
    stale = [p for p, text in files.items() if not (HERE / p).exists() or (HERE / p).read_text() != text]
    extra = sorted(p.relative_to(HERE).as_posix() for p in HERE.rglob("*.yaml")
                   if p.relative_to(HERE).as_posix() not in files)
    if args.check:
        for path in stale + extra:
            print(f"{'stale' if path in stale else 'not generated'}: configs/refdpo/{path}")
        return 1 if stale or extra else 0
    for path in stale:
        (HERE / path).parent.mkdir(parents=True, exist_ok=True)
        (HERE / path).write_text(files[path])
    print(f"configs/refdpo: {len(files)} files, {len(stale)} rewritten"
          + (f"; not generated (delete?): {', '.join(extra)}" if extra else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
