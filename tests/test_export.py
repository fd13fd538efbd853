"""A tiny `fit` of the quickstart SFT config through the CLI, and what its callbacks leave behind.

`ExportPretrained` must write a folder that `from_pretrained` loads into the trained policy (same
logits as the module, and as the last `ModelCheckpoint` restored with `load_from_checkpoint`, which
calls `configure_model` before loading the state dict); `MetricsJSON` must hold the logged metrics,
and the TensorBoard logger the training loss per step.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from callbacks import export_pretrained
from lightning_modules.cli import main
from lightning_modules.sft import SFTModule
from test_configs import localize

REPO = Path(__file__).resolve().parents[1]
STEPS = 3


def tiny_sft_config(assets: Path, out: Path) -> Path:
    """The quickstart SFT config on the test assets, writing under `out`, generating little."""
    config = localize(yaml.safe_load((REPO / "configs/quickstart/sft.yaml").read_text()), assets, out)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("GenerationReward"):
            callback["init_args"].update(num_prompts=4, max_new_tokens=8)
    path = out / "sft.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    """The fitted CLI and its output folder (`<out>/runs/demo/...`, as the config lays it out)."""
    out = tmp_path_factory.mktemp("fit")
    args = ["fit", "--config", str(tiny_sft_config(assets, out)),
            f"--trainer.max_steps={STEPS}", f"--trainer.limit_train_batches={STEPS}", "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
            "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning_modules"])
        cli = main(args)
    assert cli.trainer.global_step == STEPS
    return cli, out / "runs/demo"


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.fixture(scope="module")
def probe(assets) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    return tokenizer(["<|user|>\ncount 1 to 3\n<|assistant|>\n1 2 3</s>\n"], return_tensors="pt").input_ids


@pytest.mark.slow
def test_export_loads_as_the_trained_policy(run, assets, probe):
    cli, demo = run
    export = demo / "sft/export"
    exported = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(assets / "model").get_vocab()
    assert tokenizer.chat_template == cli.datamodule.tokenizer.chat_template

    expected = logits(cli.model.policy, probe)
    torch.testing.assert_close(logits(exported, probe), expected, rtol=0, atol=0)
    initial = logits(AutoModelForCausalLM.from_pretrained(assets / "model"), probe)
    assert not torch.allclose(initial, expected)  # the export is the trained policy, not the initial one
    assert not any(p.name.endswith((".tmp", ".old")) for p in export.parent.iterdir())


@pytest.mark.slow
def test_last_checkpoint_restores_the_exported_policy(run, assets, probe):
    _, demo = run
    checkpoint = demo / "sft/checkpoints/last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == STEPS
    # no saved hyperparameters: the model path is given again; configure_model loads the *initial*
    # weights from it, and the checkpoint's state dict then replaces them
    restored = SFTModule.load_from_checkpoint(checkpoint, model_name_or_path=str(assets / "model"))
    exported = AutoModelForCausalLM.from_pretrained(demo / "sft/export")
    torch.testing.assert_close(logits(restored.policy, probe), logits(exported, probe), rtol=0, atol=0)


@pytest.mark.slow
def test_metrics_json_and_tensorboard(run):
    _, demo = run
    metrics = json.loads((demo / "sft/metrics.json").read_text())
    assert metrics["step"] == STEPS
    assert 0.0 <= metrics["val/generation/reward"] <= 1.0
    assert math.isfinite(metrics["val/loss"]) and metrics["val/loss"] > 0

    events = EventAccumulator(str(demo / "tensorboard/sft"))
    events.Reload()
    assert {"train/loss", "val/loss", "val/generation/reward"} <= set(events.Tags()["scalars"])
    train_loss = events.Scalars("train/loss")
    assert [e.step for e in train_loss] == list(range(STEPS))  # log_every_n_steps=1
    # MetricsJSON keeps the last logged value; TensorBoard stores float32
    assert metrics["train/loss"] == pytest.approx(train_loss[-1].value, rel=1e-6)
    assert metrics["val/generation/reward"] == pytest.approx(events.Scalars("val/generation/reward")[-1].value, rel=1e-6)


# ---- export_pretrained on its own ------------------------------------------------------------


def test_export_pretrained_replaces_an_existing_folder(assets, tmp_path, probe):
    model = AutoModelForCausalLM.from_pretrained(assets / "model")
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    target = tmp_path / "export"
    target.mkdir()
    (target / "stale.txt").write_text("from an older run")
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)  # tied to the embeddings; any change tells old from new

    assert export_pretrained(model, tokenizer, target) == target
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no export.tmp / export.old left
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(target), probe), logits(model, probe),
                               rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(target).get_vocab() == tokenizer.get_vocab()


def test_export_pretrained_keeps_the_old_folder_when_saving_fails(tmp_path):
    class FailingModel:
        def save_pretrained(self, path):
            Path(path).mkdir()
            (Path(path) / "config.json").write_text("{half written")
            raise OSError("disk full")

    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        export_pretrained(FailingModel(), None, target)
    assert (target / "config.json").read_text() == "{}"
    assert not (tmp_path / "export.old").exists()
