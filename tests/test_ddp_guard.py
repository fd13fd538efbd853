"""The non-finite guard under DDP (gloo, 2 processes): a NaN on one rank skips the step on every rank.

If the ranks decided alone, rank 0 would step while rank 1 skipped: DDP's gradient all-reduce would
then hang (caught by the timeout) or the ranks' weights would part. Instead the run where only rank
1's loss is NaN must end with exactly the weights of the run where both ranks' losses are NaN.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_configs import REPO, write_localized

TESTS = Path(__file__).resolve().parent


def fit_ddp(config: Path, out: Path, bad_ranks: list[int]) -> Path:
    """Three SGD steps of DPO on 2 ranks, batch 1 NaN on `bad_ranks`; returns the run directory."""
    args = [
        sys.executable, "-m", "lightning_modules", "fit", "--config", str(config),
        "--model.class_path=sabotage.NaNOnRanks", f"--model.init_args.bad_ranks={bad_ranks}",
        "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}",
        "--trainer.log_every_n_steps=1",
        f"--trainer.callbacks=[{{class_path: callbacks.ExportPretrained, init_args: {{dirpath: export}}}}, "
        f"{{class_path: callbacks.MetricsJSON, init_args: {{path: metrics.json}}}}]",
        "--data.init_args.batch_size=4", "--data.init_args.shuffle=false",
        "--model.init_args.optimizer=torch.optim.SGD", "--model.init_args.optimizer.lr=0.5",
        "--model.init_args.lr_scheduler=lightning_modules.optim.ConstantWithWarmup",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PL_DISABLE_FORK": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("PREFOPT_RUN_DIR", None)
    process = subprocess.Popen(args, cwd=out.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher and the rank it spawned
        process.communicate()
        pytest.fail(f"the 2-process run with NaN on ranks {bad_ranks} hung (killed after 300 s)")
    assert process.returncode == 0, stderr[-3000:]
    return out / "latest"


@pytest.mark.slow
def test_nan_on_one_rank_skips_the_step_on_both(assets: Path, tmp_path: Path) -> None:
    config = write_localized(REPO / "configs/quickstart/dpo.yaml", assets, tmp_path)
    one = fit_ddp(config, tmp_path / "one", bad_ranks=[1])
    both = fit_ddp(config, tmp_path / "both", bad_ranks=[0, 1])
    assert json.loads((one / "metrics.json").read_text())["train/skipped_steps"] == 1.0
    weights_one, weights_both = load_file(one / "export/model.safetensors"), load_file(both / "export/model.safetensors")
    initial = load_file(assets / "model/model.safetensors")
    assert max((weights_one[k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # steps 1 and 3 trained
    for key in weights_both:
        assert torch.isfinite(weights_one[key]).all(), key
        torch.testing.assert_close(weights_one[key], weights_both[key], rtol=0, atol=0, msg=key)
