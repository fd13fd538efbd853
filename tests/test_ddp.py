"""DDP on CPU (gloo, 2 processes) takes the same step as one process on the union of the two shards.

One SGD step of DPO with 2 ranks × 4 pairs must give the same weights as 1 process × 8 pairs: DDP
averages the ranks' gradients of their mean losses, which equals the gradient of the mean over all
8 pairs. The sampler shards without shuffling (rank r gets pairs r, r+2, ...), so both runs see the
same 8 pairs; per-sequence log-probs do not depend on the padding length, so batch shapes may differ.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_configs import REPO, write_localized


def fit_one_step(config: Path, out: Path, devices: int, batch_size: int) -> Path:
    export = out / f"export_{devices}"
    args = [
        sys.executable, "-m", "lightning_modules", "fit", "--config", str(config),
        f"--trainer.devices={devices}", "--trainer.strategy=" + ("ddp" if devices > 1 else "auto"),
        "--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks=[{{class_path: callbacks.ExportPretrained, init_args: {{dirpath: {export}}}}}]",
        f"--data.init_args.batch_size={batch_size}", "--data.init_args.shuffle=false",
        "--model.init_args.optimizer=torch.optim.SGD", "--model.init_args.optimizer.lr=0.5",
        "--model.init_args.lr_scheduler=lightning_modules.optim.ConstantWithWarmup",
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PL_DISABLE_FORK": "1"}
    result = subprocess.run(args, cwd=out, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return export


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(assets: Path, tmp_path: Path) -> None:
    config = write_localized(REPO / "configs/quickstart/dpo.yaml", assets, tmp_path)
    single = load_file(fit_one_step(config, tmp_path, devices=1, batch_size=8) / "model.safetensors")
    ddp = load_file(fit_one_step(config, tmp_path, devices=2, batch_size=4) / "model.safetensors")
    initial = load_file(assets / "model/model.safetensors")

    assert single.keys() == ddp.keys()
    moved = max((single[k] - initial[k]).abs().max().item() for k in single)
    assert moved > 1e-3  # the step did something
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], atol=2e-6, rtol=1e-5, msg=key)
