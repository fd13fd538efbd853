"""RefDPO run hardware, read from the composable files in configs/strategy/ (imported by generate.py).

`copied_lines` gives the lines every run of a setup repeats verbatim (trainer accelerator, strategy
block, precision; the model's dtype and gradient checkpointing); `Hardware` derives the device count,
gradient accumulation (the original 32 pairs per optimizer step) and optimizer class from one file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

STRATEGY_DIR = Path(__file__).resolve().parent.parent / "strategy"  # one composable file per hardware setup
PAIRS_PER_STEP = 32  # the original: 4 pairs per GPU x 8 GPUs


@functools.cache
def strategy_file(name: str) -> tuple[str, dict[str, Any]]:
    """(text, parsed YAML) of configs/strategy/<name>."""
    text = (STRATEGY_DIR / name).read_text()
    return text, yaml.safe_load(text)


def copied_lines(name: str) -> dict[str, str]:
    """The lines of configs/strategy/<name> that every run of that setup repeats, verbatim (comments too).

    `strategy` is the whole `trainer.strategy` block; the others are single `key: value  # comment` lines
    (trainer keys at two spaces of indentation, `model.init_args` keys at four, as in a run file).
    """
    text, _ = strategy_file(name)
    trainer_text, found, model_text = text.partition("\nmodel:\n")
    assert found, f"configs/strategy/{name}: no top-level `model:` section after `trainer:`"
    trainer_lines, model_lines = trainer_text.splitlines(), model_text.splitlines()

    def line(lines: list[str], key: str) -> str:
        matches = [ln for ln in lines if ln.startswith(key + ":")]
        assert len(matches) == 1, f"configs/strategy/{name}: expected one `{key.strip()}:` line, found {len(matches)}"
        return matches[0]

    start = trainer_lines.index(line(trainer_lines, "  strategy"))
    end = next((i for i in range(start + 1, len(trainer_lines)) if not trainer_lines[i].startswith("    ")),
               len(trainer_lines))
    return {"accelerator": line(trainer_lines, "  accelerator"), "strategy": "\n".join(trainer_lines[start:end]),
            "precision": line(trainer_lines, "  precision"), "dtype": line(model_lines, "    dtype"),
            "gradient_checkpointing": line(model_lines, "    gradient_checkpointing")}


def flow(value: Any) -> str:
    """`value` as inline YAML: True -> true, 5e-07 -> 5.0e-07."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@dataclass(frozen=True)
class Hardware:
    """Where a run fits: a configs/strategy/ file; every setup keeps the original 32 pairs per optimizer step."""

    strategy: str  # configs/strategy/<strategy>: its trainer and model lines are copied into the run
    batch: int = 4  # pairs per GPU per forward

    @property
    def setup(self) -> dict[str, Any]:
        return strategy_file(self.strategy)[1]

    @property
    def devices(self) -> int:
        return self.setup["trainer"]["devices"]

    @property
    def accumulate(self) -> int:  # trainer.accumulate_grad_batches
        steps, rest = divmod(PAIRS_PER_STEP, self.devices * self.batch)
        assert steps >= 1 and rest == 0, f"{self.strategy}: {self.devices} GPUs x {self.batch} pairs do not divide 32"
        return steps

    @property
    def offload(self) -> bool:  # ZeRO-3 CPU offload of parameters and optimizer states
        init_args = self.setup["trainer"]["strategy"]["init_args"]
        return bool(init_args.get("offload_parameters") or init_args.get("offload_optimizer"))

    @property
    def optimizer(self) -> str:
        """The original AdamW (lr 5e-7, no weight decay) in the optimizer class the strategy file asks for.

        With CPU offload that is DeepSpeedCPUAdam in AdamW mode: ZeRO-Offload refuses a torch optimizer
        (DeepSpeed's zero_force_ds_cpu_optimizer); the update is the same.
        """
        chosen = self.setup.get("model", {}).get("init_args", {}).get("optimizer")
        if chosen is None:
            return "{class_path: torch.optim.AdamW, init_args: {lr: 5.0e-7, weight_decay: 0.0}}"
        extra = "".join(f", {key}: {flow(value)}" for key, value in chosen.get("init_args", {}).items())
        return (f"{{class_path: {chosen['class_path']},\n"
                f"                init_args: {{lr: 5.0e-7, weight_decay: 0.0{extra}}}}}")


EIGHT_GPUS = Hardware("zero3_8gpu_bf16.yaml")
SINGLE_A100 = Hardware("a100_offload.yaml")
