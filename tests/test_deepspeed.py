"""DeepSpeed ZeRO for real on CPU: 2 gloo processes through the CLI, compared with DDP and one process.

Each run is the quickstart DPO config on the tiny test model: 3 steps of SGD with momentum (an
optimizer state for ZeRO to partition, offload and checkpoint) at a constant learning rate, 8 pairs
per step, unshuffled (as `tests/test_ddp.py`), under `tests/deepspeed_cpu.py`'s `CPUDeepSpeedStrategy`
with `stage3_param_persistence_threshold: 0`, so that every parameter stays partitioned as a 7B
model's do. ZeRO changes where the states live, not the arithmetic, so the exported policy must
equal the DDP run's (and the one-process run's) to float rounding.

The fits keep the config's `max_epochs`: Lightning then builds the training loader while configuring the
optimizer's schedule, before it restores a checkpoint's loop state; `PolicyModule.on_train_start` hands
the saved loader position over, so the resume test covers that path too.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from datamodules.utils.errors import UserInputError
from deepspeed_cpu import CRASH_RANK0_ENV, CPUDeepSpeedStrategy, cli_env, fit_two_ranks, group_alive, \
    run_cli, zero_strategy
from lightning_modules.references.cache_builder import main as build_reference_cache
from lightning_modules.models.zero import complete_deepspeed_config, hf_zero3_config, is_partitioned
from test_configs import REPO, write_localized

STEPS = 3
ZERO3 = zero_strategy(3)
COMMON = [f"--trainer.max_steps={STEPS}", "--model.init_args.optimizer.momentum=0.9"]


def checkpoint_every_step(folder: Path) -> dict:
    return {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(folder), "filename": "{step}", "every_n_train_steps": 1, "save_top_k": -1}}


def fit(config: Path, out: Path, strategy, name: str, *, reference: str, devices: int = 2, callbacks: list = (),
        extra: list[str] = ()) -> Path:
    """The export of a `STEPS`-step DPO fit; `devices` ranks with 8 / `devices` pairs each (8 pairs per step)."""
    export = out / f"export_{name}"
    run = fit_two_ranks(config, out, strategy, export=export, devices=devices, callbacks=callbacks, extra=[
        *COMMON, f"--data.init_args.batch_size={8 // devices}", f"--model.init_args.reference={reference}", *extra])
    assert run.returncode == 0, f"{name}: {run.tail()}"
    return export


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                        initial: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert got.keys() == expected.keys() == initial.keys()
    assert not [k for k, v in got.items() if v.shape != initial[k].shape], "shapes differ (empty partitions?)"
    moved = max((expected[k] - initial[k]).abs().max().item() for k in expected)
    assert moved > 1e-3  # the steps did something
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=atol, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def config(assets: Path, tmp_path_factory) -> Path:
    return write_localized(REPO / "configs/quickstart/dpo.yaml", assets, tmp_path_factory.mktemp("dpo_config"))


@pytest.fixture(scope="module")
def initial(assets: Path) -> dict[str, torch.Tensor]:
    return weights(assets / "model")


@pytest.fixture(scope="module")
def ddp(config: Path, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The baseline: DDP, reference-free DPO."""
    return weights(fit(config, tmp_path_factory.mktemp("ddp"), "ddp", "ddp", reference="none"))


@pytest.fixture(scope="module")
def zero3(config: Path, tmp_path_factory) -> tuple[Path, Path]:
    """ZeRO-3, reference-free DPO, a checkpoint after every step: (export folder, checkpoint folder).

    The micro-batch size is given on the command line, as a user would: it used to reach DeepSpeed as the
    string '4' (`TypeError: '>' not supported between instances of 'str' and 'int'`).
    """
    out = tmp_path_factory.mktemp("zero3")
    export = fit(config, out, ZERO3, "zero3", reference="none", callbacks=[checkpoint_every_step(out / "checkpoints")],
                 extra=["--trainer.strategy.init_args.logging_batch_size_per_gpu=4"])
    return export, out / "checkpoints"


def test_strategy_keeps_every_parameter_partitioned() -> None:
    """What the slow tests rely on: the test strategy's ZeRO-3 config, and `zero_force_ds_cpu_optimizer`."""
    strategy = CPUDeepSpeedStrategy(**ZERO3["init_args"])
    assert strategy.config["zero_optimization"]["stage"] == 3
    assert strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    offload = CPUDeepSpeedStrategy(**zero_strategy(2, offload_optimizer=True, force_ds_cpu_optimizer=False)["init_args"])
    assert offload.config["zero_force_ds_cpu_optimizer"] is False
    assert offload.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("given, expected", [("8", 8), (" 8 ", 8), (8, 8), ("auto", 6), (None, 6)])
def test_micro_batch_size_becomes_an_integer(given, expected) -> None:
    """`logging_batch_size_per_gpu` from the command line ('8') or "auto" (the data's batch size, in any stage)."""
    strategy = DeepSpeedStrategy(stage=3, **({} if given is None else {"logging_batch_size_per_gpu": given}))
    if given == "auto":
        strategy.config["train_micro_batch_size_per_gpu"] = "auto"  # as a user's `config: {...}` may write it
    complete_deepspeed_config(SimpleNamespace(strategy=strategy, datamodule=SimpleNamespace(batch_size=6)))
    assert strategy.config["train_micro_batch_size_per_gpu"] == expected


def test_bad_micro_batch_size_and_no_deepspeed() -> None:
    strategy = DeepSpeedStrategy(stage=3, logging_batch_size_per_gpu="eight")
    with pytest.raises(UserInputError, match="logging_batch_size_per_gpu='eight'"):
        complete_deepspeed_config(SimpleNamespace(strategy=strategy, datamodule=None))
    trainer = SimpleNamespace(strategy=object(), datamodule=None)
    complete_deepspeed_config(trainer)  # not DeepSpeed: nothing to do
    assert hf_zero3_config(trainer) is None and hf_zero3_config(None) is None
    assert hf_zero3_config(SimpleNamespace(strategy=DeepSpeedStrategy(stage=2))) is None
    assert not is_partitioned(torch.nn.Linear(2, 2))


def test_qlora_under_zero3_is_refused_before_loading(assets: Path) -> None:
    """A 4-bit LoRA base cannot be partitioned: one paragraph naming the key and the strategy files to use."""
    from lightning_modules.dpo import DPOModule
    from lightning_modules.models.adapters import LoraSpec

    module = DPOModule(str(assets / "model"), lora=LoraSpec(base_quantization="4bit"))
    module._trainer = SimpleNamespace(strategy=DeepSpeedStrategy(stage=3))
    with pytest.raises(UserInputError, match=r"model.lora.base_quantization='4bit'.*single_gpu_lora_4bit_reference"):
        module.configure_model()
    assert module.policy is None


@pytest.mark.slow
def test_zero3_export_equals_ddp(zero3: tuple[Path, Path], ddp, initial) -> None:
    """ZeRO-3 loads into partitions, trains, and exports gathered weights equal to DDP's; they load back.

    Before the fixes: `IndexError: index 0 is out of bounds for dimension 0 with size 0` in
    `_init_weights` (loading inside the ZeRO-3 init context); with loading fixed, the export held
    tensors of shape (0,) (and an extra `lm_head.weight`) and the run still exited 0.
    """
    export, _ = zero3
    assert_same_weights(weights(export), ddp, initial)
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ddp.get(name, ddp["model.embed_tokens.weight"]), atol=1e-5, rtol=0,
                                   msg=name)  # lm_head.weight is tied to the embedding
    assert (export / "tokenizer_config.json").exists()


@pytest.mark.slow
def test_zero3_gradient_accumulation_equals_ddp(config: Path, initial, tmp_path: Path) -> None:
    """2 micro-batches of 4 pairs per rank and optimizer step (with the config's gradient clipping at 1.0):
    ZeRO-3 equals DDP.

    Before the fix: 0.033 apart. Lightning divides the loss by `accumulate_grad_batches` and DeepSpeed's
    `engine.backward` divides it again, so the gradients were 1/accumulate² of the mean (ZeRO-3 at twice the
    learning rate, without clipping, matched DDP to 1e-8): a direct learning-rate cut for SGD / RMSprop, and
    a clipping threshold `accumulate` times too loose for Adam.
    """
    accumulate = ["--trainer.accumulate_grad_batches=2"]
    ddp = weights(fit(config, tmp_path, "ddp", "ddp", reference="none", extra=accumulate))
    zero3 = weights(fit(config, tmp_path, ZERO3, "zero3", reference="none", extra=accumulate))
    assert_same_weights(zero3, ddp, initial)


@pytest.mark.slow
def test_zero3_resume_and_fp32_conversion(config: Path, zero3: tuple[Path, Path], tmp_path: Path) -> None:
    """Resuming from the step-1 ZeRO-3 checkpoint (partitioned weights and momentum) ends where the
    uninterrupted run ended, and DeepSpeed's fp32 conversion of the last checkpoint equals the export."""
    export, checkpoints = zero3
    resumed = fit(config, tmp_path, ZERO3, "resumed", reference="none",
                  extra=[f"--ckpt_path={checkpoints / 'step=1.ckpt'}"])
    full = weights(export)
    for key, tensor in weights(resumed).items():
        assert torch.equal(tensor, full[key]), key

    state = convert_zero_checkpoint_to_fp32_state_dict(checkpoints / f"step={STEPS}.ckpt", tmp_path / "fp32.pt")
    state = state["state_dict"]
    for key, tensor in full.items():
        assert torch.equal(state[f"policy.{key}"], tensor), key


@pytest.mark.slow
def test_zero2_cpu_optimizer_offload_equals_ddp(config: Path, ddp, initial, tmp_path: Path) -> None:
    """ZeRO-2 with the optimizer states in host memory (stepped by the torch optimizer on the CPU)."""
    strategy = zero_strategy(2, offload_optimizer=True, force_ds_cpu_optimizer=False)
    assert_same_weights(weights(fit(config, tmp_path, strategy, "zero2_offload", reference="none")), ddp, initial)


@pytest.mark.slow
def test_zero3_live_reference_from_source_and_synced(config: Path, initial, tmp_path: Path) -> None:
    """Under ZeRO-3 the default live reference is loaded again from the policy's source, not deep-copied,
    and TR-DPO's soft sync (after step 2) updates its partitions: the run equals one process's.

    Before the fix: `AssertionError {'status': 'NOT_AVAILABLE', 'ds_numel': 0, ...}` at the reference's
    first forward (a deep copy of partitioned weights holds no partitions). Before ReferenceSync
    gathered, its update of partitioned weights changed nothing (the placeholders are empty).
    """
    sync = [{"class_path": "callbacks.ReferenceSync", "init_args": {"every_n_steps": 2, "alpha": 0.5}}]
    single = fit(config, tmp_path, "auto", "single", reference="live", devices=1, callbacks=sync)
    zero3 = fit(config, tmp_path, ZERO3, "zero3", reference="live", callbacks=sync)
    assert_same_weights(weights(zero3), weights(single), initial)


@pytest.mark.slow
def test_zero3_cached_reference_equals_a_live_one(config: Path, initial, assets: Path, tmp_path: Path) -> None:
    """Reference log-probs cached once (one process) and read from the batch under ZeRO-3 train exactly as a
    live reference of the same model does in one process: no reference model exists in the ZeRO-3 run."""
    data = tmp_path / "prefs"
    shutil.copytree(assets / "data/prefs", data)  # the cache is written beside the data
    cache = [f"--data.init_args.path={data}", f"--data.init_args.reference_cache=[{{name_or_path: {assets / 'model'}}}]"]
    build_reference_cache(["--config", str(config), *cache])
    live = fit(config, tmp_path, "auto", "live", reference="live", devices=1, extra=[f"--data.init_args.path={data}"])
    cached = fit(config, tmp_path, ZERO3, "cached", reference="cached", extra=cache)
    assert_same_weights(weights(cached), weights(live), initial)


@pytest.mark.slow
def test_zero3_validate_with_auto_micro_batch(config: Path, tmp_path: Path) -> None:
    """`validate` under ZeRO-3 with the micro-batch size left at "auto" gives the one-process metrics.

    Before the fix: `KeyError: 'train'` (Lightning asked the training dataloader for the batch size of
    DeepSpeed's throughput logs, in a run that sets up no training split).
    """
    metrics = {}
    for name, devices, strategy in [("single", 1, "auto"), ("zero3", 2, json.dumps(ZERO3))]:
        path = tmp_path / f"metrics_{name}.json"
        run = run_cli(["validate", "--config", str(config), "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
                       f"--trainer.strategy={strategy}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                       f"--trainer.callbacks=[{{class_path: callbacks.MetricsJSON, init_args: {{path: {path}}}}}]"],
                      tmp_path, timeout=180)
        assert run.returncode == 0, f"{name}: {run.tail()}"
        metrics[name] = json.loads(path.read_text())
    assert metrics["zero3"]["val/loss"] == pytest.approx(math.log(2), abs=1e-6)  # live reference = the policy
    for key, value in metrics["single"].items():
        assert metrics["zero3"][key] == pytest.approx(value, abs=1e-4), key


@pytest.mark.slow
def test_rank0_crash_before_rendezvous_never_hangs(config: Path, tmp_path: Path) -> None:
    """Rank 0 dies before the process group is up: rank 1 would wait for it for DeepSpeed's 30-minute timeout.

    The helper waits for rank 0 only and then kills the process group, so the run ends with rank 0's error.
    """
    start = time.monotonic()
    run = run_cli(["fit", "--config", str(config), "--trainer.accelerator=cpu", "--trainer.devices=2",
                   f"--trainer.strategy={json.dumps(ZERO3)}", "--trainer.logger=false", "--trainer.callbacks=[]"],
                  tmp_path, timeout=120, env=cli_env(**{CRASH_RANK0_ENV: "1"}))
    assert run.returncode not in (0, -9), run.tail()
    assert CRASH_RANK0_ENV in run.stderr
    assert time.monotonic() - start < 100
    deadline = time.monotonic() + 10  # rank 1, killed, is reaped by init
    while group_alive(run.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not group_alive(run.pid), "a rank outlived the run"


LORA = "--model.init_args.lora={r: 4, alpha: 8.0}"


@pytest.mark.slow
def test_zero3_lora_policy_equals_one_process(config: Path, initial, tmp_path: Path) -> None:
    """A LoRA policy (float base, frozen and partitioned) whose reference is its own base with the adapters
    off, under ZeRO-3: the merged export equals a one-process run's, and only adapted linear weights moved.

    Before: refused ("model.lora is not supported under DeepSpeed ZeRO-3 yet"). Loading inside ZeRO-3's init
    context alone would also be wrong: peft's `B = 0` initialisation runs on empty placeholders, so B keeps
    `nn.Linear`'s random values and the fresh policy is not its base.
    """
    single = weights(fit(config, tmp_path, "auto", "single", reference="live", devices=1, extra=[LORA]))
    zero3 = weights(fit(config, tmp_path, ZERO3, "zero3", reference="live", extra=[LORA]))
    assert_same_weights(zero3, single, initial)
    assert torch.equal(zero3["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])  # frozen base
    adapted = [k for k in initial if k.endswith("proj.weight")]
    assert adapted and all(not torch.equal(zero3[k], initial[k]) for k in adapted)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_zero3_quantized_reference_stays_outside_the_engine(config: Path, initial, tmp_path: Path) -> None:
    """A 4-bit (nf4) live reference under ZeRO-3 is loaded whole on every rank, outside ZeRO's partitioning,
    and trains exactly as the same quantized reference does in one process.

    Before: refused ("model.reference_quantization='4bit' is not supported under DeepSpeed ZeRO-3 yet").
    """
    quantized = ["--model.init_args.reference_quantization=4bit"]
    single = weights(fit(config, tmp_path, "auto", "single", reference="live", devices=1, extra=quantized))
    zero3 = weights(fit(config, tmp_path, ZERO3, "zero3", reference="live", extra=quantized))
    assert_same_weights(zero3, single, initial)


@pytest.mark.slow
@pytest.mark.parametrize(("sabotage", "accumulate"), [("NaNOnRanks", 1), ("NaNGradientOnRanks", 1), ("NaNOnRanks", 2)])
def test_zero3_nan_on_one_rank_skips_the_step_as_ddp_does(sabotage: str, accumulate: int, config: Path, initial,
                                                          tmp_path: Path) -> None:
    """A NaN loss, or a finite loss with NaN gradients, on rank 1 at step 2 (`tests/sabotage.py`): ZeRO-3 skips that
    step on both ranks exactly as DDP does (momentum untouched), counts it in `train/skipped_steps`, and trains on.

    Under DeepSpeed the gradients live in the engine, so the guard cannot read or drop them: the engine itself
    skips a step whose gradient norm is not finite, and the guard reads that norm after the step. Before:
    NaN gradients under a finite loss were skipped by the engine but counted as good steps (`skipped_steps`
    0), so `max_nonfinite_steps` could never stop a run that no longer trained. With 2 micro-batches per
    step (DeepSpeed accumulates itself, so the guard's hook runs on every micro-batch), the NaN is on the first
    micro-batch of step 2 and the step counts once.
    """
    extra = [f"--model.class_path=sabotage.{sabotage}", "--model.init_args.bad_ranks=[1]", "--trainer.log_every_n_steps=1",
             f"--trainer.accumulate_grad_batches={accumulate}", f"--model.init_args.bad_batch={1 if accumulate == 1 else 2}"]
    runs = {}
    for name, strategy in [("ddp", "ddp"), ("zero3", ZERO3)]:
        metrics = tmp_path / f"metrics_{name}.json"
        callbacks = [{"class_path": "callbacks.MetricsJSON", "init_args": {"path": str(metrics)}}]
        runs[name] = weights(fit(config, tmp_path, strategy, name, reference="none", callbacks=callbacks, extra=extra))
        assert json.loads(metrics.read_text())["train/skipped_steps"] == 1.0, name
    assert_same_weights(runs["zero3"], runs["ddp"], initial)
