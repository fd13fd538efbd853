"""Every shipped hardware setup (`configs/strategy/*.yaml`) runs: the proof that a GPU user's first command starts.

Each test composes the localized quickstart DPO config (tiny model, synthetic pairs) with one strategy file
as the last `--config`, exactly as README "Scaling out" tells a GPU user to, and runs `fit` through the
normal CLI on 2 CPU processes (gloo) for a few steps. Only the model and data (localized), the device kind
and count (`accelerator: cpu`, `devices: 2`), the step count and the batch size change; the file's
strategy arguments, precision, dtype, gradient checkpointing, LoRA / 4-bit settings and optimizer are kept.
For the DeepSpeed files the strategy's class_path becomes `deepspeed_cpu.CPUDeepSpeedStrategy` (Lightning's
`DeepSpeedStrategy` minus its CUDA-only checks) with the file's init_args. Every run goes through
`deepspeed_cpu.run_cli`: a hard timeout, and the whole process group killed at the end, so no rank can
hang the session.

What each run must produce: exit 0, 2 ranks, an export whose weights moved from the initial ones, in
the file's dtype. The offload and LoRA runs keep the config's own callbacks and run directory (checkpoint,
metrics, generation reward, export), as a user's run would; their export must load with `from_pretrained`
with finite weights and `metrics.json` must reach the last step. The offload run's ZeRO checkpoint shows
what the engine ran with (offloaded and pinned, bf16, DeepSpeedCPUAdam's state). The LoRA export must be
a plain float model equal to the merge of an untrained policy (the dequantized nf4 base) except in the
adapted layers, which moved by a few bf16 ulps, far less than the nf4 rounding (so the base was 4-bit).

`a100_offload.yaml` keeps its `DeepSpeedCPUAdam`: its C++ op is JIT-compiled on first use (into
`TORCH_EXTENSIONS_DIR`, default `~/.cache/torch_extensions`), which takes minutes on a small machine;
later runs load the cached build. Its timeout allows for the compile.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from deepspeed_cpu import STRATEGY, fit_strategy_file, run_cli
from safetensors.torch import load_file
from test_configs import REPO, write_localized
from transformers import AutoModelForCausalLM

FOLDER = REPO / "configs/strategy"
QUICKSTART_DPO = REPO / "configs/quickstart/dpo.yaml"
STEPS = 3
CPU_ADAM_TIMEOUT = 900  # the first run compiles DeepSpeed's CPU Adam op: 91-111 s measured on 2 cores, reportedly 4 min
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # LoraSpec's default


def run_dir(config: Path) -> Path:
    """The newest run directory of a localized config (`<default_root_dir>/latest`)."""
    return Path(yaml.safe_load(config.read_text())["trainer"]["default_root_dir"]) / "latest"


def finite_export(folder: Path) -> dict[str, torch.Tensor]:
    """The export's weights, after checking that it loads as a plain model with finite weights."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return load_file(folder / "model.safetensors")


def last_metrics(config: Path) -> dict:
    metrics = json.loads((run_dir(config) / "metrics.json").read_text())
    assert metrics["step"] == STEPS and math.isfinite(metrics["train/loss"]), metrics
    return metrics


@pytest.mark.slow
def test_ddp_file_trains_two_steps_on_two_cpu_processes(assets, tmp_path):
    """ddp.yaml as written but for accelerator cpu and 2 devices: 2 gloo ranks train, the export moves."""
    experiment = write_localized(QUICKSTART_DPO, assets, tmp_path)
    export = tmp_path / "export"
    run = run_cli(["fit", "--config", str(experiment), "--config", str(FOLDER / "ddp.yaml"),
                   "--trainer.accelerator=cpu", "--trainer.devices=2",
                   "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.logger=false",
                   "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                   f"--trainer.callbacks=[{{class_path: callbacks.ExportPretrained, init_args: {{dirpath: {export}}}}}]",
                   "--data.init_args.batch_size=4"], tmp_path, timeout=600)
    assert run.returncode == 0, run.tail()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in run.stderr
    trained, initial = load_file(export / "model.safetensors"), load_file(assets / "model/model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in trained.values())  # dtype: float32 master weights
    assert max((trained[k] - initial[k]).abs().max().item() for k in trained) > 1e-6


@pytest.mark.slow
def test_zero3_8gpu_file_starts(assets, tmp_path):
    """zero3_8gpu_bf16.yaml (the RefDPO setup): ZeRO-3, bf16, gradient checkpointing, on 2 CPU ranks for 3 steps,
    with the config's own callbacks (metrics, generation reward, export) and run directory."""
    config = write_localized(QUICKSTART_DPO, assets, tmp_path)
    run = fit_strategy_file(config, FOLDER / "zero3_8gpu_bf16.yaml", tmp_path, steps=STEPS,
                            extra=[f"--trainer.strategy.class_path={STRATEGY}", "--trainer.limit_val_batches=1",
                                   "--data.init_args.batch_size=4"])
    assert run.returncode == 0, run.tail()
    assert "initializing deepspeed distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in run.stderr
    exported, initial = finite_export(run_dir(config) / "export"), load_file(assets / "model/model.safetensors")
    assert exported.keys() == initial.keys()
    assert all(tensor.dtype == torch.bfloat16 for tensor in exported.values())  # dtype: bfloat16
    assert not [k for k, v in exported.items() if v.shape != initial[k].shape], "empty partitions exported"
    assert any(not torch.equal(exported[k], initial[k].to(torch.bfloat16)) for k in initial)
    last_metrics(config)


@pytest.mark.slow
def test_a100_offload_file_starts(assets, tmp_path):
    """a100_offload.yaml: ZeRO-3 with weights and optimizer offloaded, pinned memory, bf16, gradient
    checkpointing and the file's `DeepSpeedCPUAdam` (its C++ op compiled on first use), on 2 CPU ranks.

    The config's own callbacks (checkpoint, metrics, generation reward, export) and run directory are kept.
    """
    config = write_localized(QUICKSTART_DPO, assets, tmp_path)
    run = fit_strategy_file(config, FOLDER / "a100_offload.yaml", tmp_path, steps=STEPS, timeout=CPU_ADAM_TIMEOUT,
                            extra=[f"--trainer.strategy.class_path={STRATEGY}", "--trainer.limit_val_batches=1",
                                   "--data.init_args.batch_size=4"])
    print(f"\n[a100_offload] fit took {run.seconds:.0f}s")
    assert run.returncode == 0, run.tail()
    assert "initializing deepspeed distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in run.stderr
    # What the engine ran with, from rank 0's ZeRO checkpoint (the config's ModelCheckpoint, save_last).
    shards = run_dir(config) / "checkpoints/last.ckpt/checkpoint"
    ds_config = torch.load(shards / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["ds_config"]
    zero = ds_config["zero_optimization"]
    assert zero["stage"] == 3 and ds_config["bf16"] == {"enabled": True}
    for offload in (zero["offload_optimizer"], zero["offload_param"]):
        assert offload["device"] == "cpu" and offload["pin_memory"] is True
    optimizer = torch.load(shards / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                           weights_only=False)["optimizer_state_dict"]
    (group,), (state,) = optimizer["optimizer_state_dict"]["param_groups"], optimizer["optimizer_state_dict"]["state"].values()
    assert "bias_correction" in group, group  # DeepSpeedCPUAdam's own key (torch's AdamW has none)
    assert state["step"] == STEPS and all(flat.dtype == torch.float32 for flat in optimizer["fp32_flat_groups"])

    exported = finite_export(run_dir(config) / "export")
    initial = load_file(assets / "model/model.safetensors")
    assert exported.keys() == initial.keys()
    assert all(tensor.dtype == torch.bfloat16 for tensor in exported.values())  # dtype: bfloat16
    assert not [k for k, v in exported.items() if v.shape != initial[k].shape], "empty partitions exported"
    changed = sum((exported[k] != initial[k].to(torch.bfloat16)).sum().item() for k in initial)
    total = sum(tensor.numel() for tensor in initial.values())
    assert changed > 0.01 * total, f"only {changed} of {total} weights moved"
    last_metrics(config)


@pytest.mark.slow
def test_single_gpu_lora_4bit_file_trains_on_two_cpu_processes(assets, tmp_path):
    """single_gpu_lora_4bit_reference.yaml: LoRA r=32 on an nf4 base, reference = base with adapters off,
    bf16-mixed, bf16 compute, gradient checkpointing; `devices: 2` makes Lightning's `auto` strategy DDP.

    The merged export must load as a plain float model (no adapter files), equal to the merge of an
    untrained policy everywhere but the adapted linear layers, which all moved.
    """
    from lightning_modules.models.adapters import LoraSpec, load_lora_policy, merged_copy

    config = write_localized(QUICKSTART_DPO, assets, tmp_path)
    run = fit_strategy_file(config, FOLDER / "single_gpu_lora_4bit_reference.yaml", tmp_path, steps=STEPS,
                            timeout=300, extra=["--trainer.limit_val_batches=1", "--data.init_args.batch_size=4"])
    print(f"\n[single_gpu_lora_4bit_reference] fit took {run.seconds:.0f}s")
    assert run.returncode == 0, run.tail()
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in run.stderr  # DDP, 2 ranks

    folder = run_dir(config) / "export"
    files = {path.name for path in folder.iterdir()}
    assert "model.safetensors" in files and not [f for f in files if f.startswith("adapter")], files
    exported = finite_export(folder)
    assert all(tensor.is_floating_point() for tensor in exported.values())  # no nf4 codes, no 4-bit statistics

    # The export of the same policy before any step (B = 0): the dequantized nf4 base, float parts from source.
    untrained = merged_copy(load_lora_policy(str(assets / "model"), LoraSpec(r=32, alpha=16, base_quantization="4bit"),
                                             dtype="bfloat16", device="cpu")).state_dict()
    assert exported.keys() <= untrained.keys()
    adapted = [k for k in exported if k.split(".")[-2] in TARGETS]
    assert len(adapted) == 2 * len(TARGETS)  # 2 layers of the tiny model
    for key, tensor in exported.items():
        assert tensor.dtype == untrained[key].dtype == torch.bfloat16, key
        if key in adapted:  # 16-33% of each layer's bf16 weights changed (by one or two ulps) in 3 steps
            moved = (tensor.float() - untrained[key].float()).abs()
            assert (moved > 0).float().mean() > 0.05, f"{key}: adapter did not move"
            # ... from the nf4 base's dequantization: the original float weights are 1e-2 away from it
            assert moved.max() < 1e-3, f"{key}: not the 4-bit base plus adapters"
        else:
            assert torch.equal(tensor, untrained[key]), f"{key}: frozen weight moved"
    metrics = last_metrics(config)
    assert metrics["train/rewards/chosen"] != 0  # after 2 updates, the adapters-off reference differs from the policy
