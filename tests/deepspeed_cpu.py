"""DeepSpeed for real on CPU: a test-only strategy and a 2-process CLI `fit` helper (tests only, not the library).

Lightning's `DeepSpeedStrategy` refuses a CPU accelerator in three places, none of which DeepSpeed
itself needs (its CPU accelerator, chosen by `DS_ACCELERATOR=cpu`, runs ZeRO's collectives over gloo):

1. `setup_environment` raises unless the accelerator is CUDA;
2. `setup_distributed` validates CUDA device indices;
3. `deepspeed.initialize(args=Namespace(device_rank=root_device.index))` gets `None` for a CPU device,
   a TypeError in DeepSpeed's `_set_distributed_vars`.

`CPUDeepSpeedStrategy` skips 1 and 2 and passes the local rank in 3; everything else (ZeRO stages,
the init context, checkpoints, offload) is Lightning's and DeepSpeed's own code. It also turns off
DeepSpeed's shared-memory all-reduce op, which `init_distributed` would otherwise compile with g++ on
first use (about 2 minutes): ZeRO's collectives do not use it (only inference all-reduce does), and
`deepspeed.ops.__compatible_ops__` is the one switch `build_shm_op` reads.

`fit_two_ranks` runs `python -m lightning_modules fit` with `--trainer.devices=2` and Lightning's own
subprocess launcher (the way users run it) through `run_cli`: its own process group, a hard timeout,
and the whole group killed as soon as rank 0 exits (or the timeout passes), so a rank stuck in a
rendezvous or a collective can never hang the test session. Use in a config:

    trainer:
      accelerator: cpu
      devices: 2
      strategy: {class_path: deepspeed_cpu.CPUDeepSpeedStrategy, init_args: {stage: 3, param_persistence_threshold: 0}}

with `cli_env()` as the environment (`DS_ACCELERATOR=cpu`, `tests/` on `PYTHONPATH`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from lightning.fabric.utilities.seed import reset_seed

TESTS = Path(__file__).resolve().parent
STRATEGY = "deepspeed_cpu.CPUDeepSpeedStrategy"  # class_path: `tests/` is on PYTHONPATH in `fit_two_ranks`
CRASH_RANK0_ENV = "PREFOPT_TEST_CRASH_RANK0"  # set: rank 0 raises before the rendezvous (the never-hang test)


def disable_shm_comm() -> None:
    """Make DeepSpeed's torch backend skip its shared-memory op (a g++ build on first use) and use gloo only."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the dict persists: `build_shm_op` reads it


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeed strategy with the CUDA-only checks removed, for gloo processes on CPU (tests only).

    Takes `DeepSpeedStrategy`'s arguments as they are, plus `param_persistence_threshold`
    (`stage3_param_persistence_threshold`) and `force_ds_cpu_optimizer` (`zero_force_ds_cpu_optimizer`),
    which Lightning's arguments do not reach.
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, *, param_persistence_threshold: int | None = None,
                 force_ds_cpu_optimizer: bool | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if param_persistence_threshold is not None:
            self.config.setdefault("zero_optimization", {})["stage3_param_persistence_threshold"] = \
                param_persistence_threshold
        if force_ds_cpu_optimizer is not None:
            self.config["zero_force_ds_cpu_optimizer"] = force_ds_cpu_optimizer

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA check; calls setup_distributed

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy.setup_distributed without `_validate_device_index_selection` (CUDA indices)
        reset_seed()
        self.set_world_ranks()
        if self.global_rank == 0 and os.environ.get(CRASH_RANK0_ENV):  # tests: rank 0 dies before the rendezvous
            raise RuntimeError(f"{CRASH_RANK0_ENV} is set: rank 0 stops before the process group is up")
        disable_shm_comm()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),  # a CPU device has no index
            config=self.config, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()), dist_init_required=False)
        return engine, deepspeed_optimizer

    def _initialize_deepspeed_inference(self, model) -> None:
        import deepspeed

        original = deepspeed.initialize

        def initialize(*, args, **kwargs):  # the parent builds the inference config; only device_rank differs
            return original(args=argparse.Namespace(device_rank=self.local_rank), **kwargs)

        deepspeed.initialize = initialize
        try:
            super()._initialize_deepspeed_inference(model)
        finally:
            deepspeed.initialize = original


def zero_strategy(stage: int, *, persistence_threshold: int | None = 0, **init_args: Any) -> dict[str, Any]:
    """A `trainer.strategy` for the CLI: `CPUDeepSpeedStrategy` at ZeRO `stage` with `DeepSpeedStrategy` arguments.

    `persistence_threshold=0` keeps every parameter of the tiny test model partitioned under ZeRO-3, as a
    7B model's are (DeepSpeed's default, 1e5 elements, would keep a tiny model whole on every rank).
    Offloading with a torch optimizer needs `force_ds_cpu_optimizer=False` (else DeepSpeedCPUAdam, a C++ build).
    """
    if stage == 3 and persistence_threshold is not None:
        init_args["param_persistence_threshold"] = persistence_threshold
    return {"class_path": STRATEGY, "init_args": {"stage": stage, **init_args}}


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    pid: int  # rank 0's pid = its process group's id


    def tail(self, n: int = 4000) -> str:
        return f"exit {self.returncode} after {self.seconds:.0f}s\n--- stderr ---\n{self.stderr[-n:]}"


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CPU DeepSpeed run: DeepSpeed's CPU accelerator, no CUDA, `tests/` importable."""
    path = os.pathsep.join(p for p in [str(TESTS), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": "", "PL_DISABLE_FORK": "1",
            "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def run_cli(args: list[str], cwd: Path, *, timeout: float = 240, env: dict[str, str] | None = None) -> Run:
    """`python -m lightning_modules <args>` in a new process group; whatever happens, no rank outlives it.

    Lightning's launcher starts rank 1 as a child of rank 0, in rank 0's process group. The call waits
    for rank 0 only (output goes to files, so a surviving rank holding a pipe cannot block it), then
    SIGKILLs the group: a rank left waiting for a rendezvous or a collective after rank 0 exited is
    ended at once, and on `timeout` both are.
    """
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lightning_modules", *args], cwd=cwd, env=env or cli_env(),
                                stdout=out, stderr=err, text=True, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_group(proc.pid)
            proc.wait()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if timed_out:
        stderr += f"\n[deepspeed_cpu] killed the process group after {timeout:.0f}s"
    return Run(-signal.SIGKILL if timed_out else proc.returncode, stdout, stderr, time.monotonic() - start, proc.pid)


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def group_alive(pgid: int) -> bool:
    """True while any process of the group `pgid` exists (zombies included until reaped)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def fit_two_ranks(config: Path, out: Path, strategy: dict[str, Any] | str, *, export: Path | None = None,
                  callbacks: list[dict[str, Any]] = (), extra: list[str] = (), devices: int = 2,
                  timeout: float = 240) -> Run:
    """A short `fit` of `config` on `devices` CPU processes under `strategy`, exporting to `export` if given.

    The config's own callbacks are replaced by `callbacks` (+ `ExportPretrained`); no validation, logger,
    checkpoints or progress bar unless `extra` / `callbacks` bring them back; SGD at a constant learning
    rate on unshuffled data (as `tests/test_ddp.py`), so that runs under different strategies compare.
    """
    strategy_arg = strategy if isinstance(strategy, str) else json.dumps(strategy)
    callbacks = list(callbacks) + ([] if export is None else [{"class_path": "callbacks.ExportPretrained",
                                                               "init_args": {"dirpath": str(export)}}])
    args = [
        "fit", "--config", str(config), "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
        f"--trainer.strategy={strategy_arg}", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        f"--trainer.enable_checkpointing={str(any('ModelCheckpoint' in c['class_path'] for c in callbacks)).lower()}",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.callbacks={json.dumps(callbacks)}", "--data.init_args.shuffle=false",
        "--model.init_args.optimizer=torch.optim.SGD", "--model.init_args.optimizer.lr=0.5",
        "--model.init_args.lr_scheduler=lightning_modules.optim.ConstantWithWarmup",
        *extra,
    ]
    return run_cli(args, out, timeout=timeout)


def fit_strategy_file(config: Path, strategy_file: Path, cwd: Path, *, devices: int = 2, steps: int = 3,
                      extra: list[str] = (), timeout: float = 300, env: dict[str, str] | None = None) -> Run:
    """`fit --config <config> --config <strategy_file>` as a GPU user types it, on `devices` CPU processes.

    Only `--trainer.accelerator=cpu`, `--trainer.devices`, `--trainer.max_steps` and `extra` (a smaller batch,
    a DeepSpeed strategy's class_path swapped to `STRATEGY`) are added: the config's callbacks, logger and
    run directory stay. Runs through `run_cli` (hard `timeout`, the process group killed at the end).
    """
    return run_cli(["fit", "--config", str(config), "--config", str(strategy_file), "--trainer.accelerator=cpu",
                    f"--trainer.devices={devices}", f"--trainer.max_steps={steps}",
                    "--trainer.enable_progress_bar=false", *extra], cwd, timeout=timeout, env=env)
