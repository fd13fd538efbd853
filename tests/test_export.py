"""A tiny `fit` of the quickstart SFT config through the CLI, and what its callbacks leave behind.

`ExportPretrained` must write a folder that `from_pretrained` loads into the trained policy (same
logits as the module, and as the last `ModelCheckpoint` restored with `load_from_checkpoint`, which
calls `configure_model` before loading the state dict); `MetricsJSON` must hold the logged metrics,
and the TensorBoard logger the training loss per step.
"""

from __future__ import annotations

import importlib
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
    return cli, out / "runs/demo"  # the run directory is runs/demo/sft/latest (= version_0)


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
    export = demo / "sft/latest/export"
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
    checkpoint = demo / "sft/latest/checkpoints/last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == STEPS
    # no saved hyperparameters: the model path is given again; configure_model loads the *initial*
    # weights from it, and the checkpoint's state dict then replaces them
    restored = SFTModule.load_from_checkpoint(checkpoint, model_name_or_path=str(assets / "model"))
    exported = AutoModelForCausalLM.from_pretrained(demo / "sft/latest/export")
    torch.testing.assert_close(logits(restored.policy, probe), logits(exported, probe), rtol=0, atol=0)


@pytest.mark.slow
def test_metrics_json_and_tensorboard(run):
    _, demo = run
    metrics = json.loads((demo / "sft/latest/metrics.json").read_text())
    assert metrics["step"] == STEPS
    assert 0.0 <= metrics["val/generation/reward"] <= 1.0
    assert math.isfinite(metrics["val/loss"]) and metrics["val/loss"] > 0

    events = EventAccumulator(str(demo / "sft/latest"))
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
    content = [p for p in tmp_path.iterdir() if p.name != "export"]  # the folder the `export` link points at
    assert target.is_symlink() and len(content) == 1 and target.resolve() == content[0].resolve()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(target), probe), logits(model, probe),
                               rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(target).get_vocab() == tokenizer.get_vocab()


def test_export_pretrained_keeps_the_old_folder_when_saving_fails(tmp_path):
    class FailingModel:
        def save_pretrained(self, path):
            Path(path).mkdir(exist_ok=True)
            (Path(path) / "config.json").write_text("{half written")
            raise OSError("disk full")

    target = tmp_path / "export"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        export_pretrained(FailingModel(), None, target)
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # the half-written folder is removed


def test_a_crash_before_the_switch_leaves_the_previous_export_whole(assets, tmp_path, probe, monkeypatch):
    """Export twice; the second dies at the atomic switch: the first export is still complete and loads."""
    export_module = importlib.import_module("callbacks.export_pretrained")  # the package re-exports the function

    model = AutoModelForCausalLM.from_pretrained(assets / "model")
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    target = export_pretrained(model, tokenizer, tmp_path / "export")
    before = logits(AutoModelForCausalLM.from_pretrained(target), probe)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for a kill between writing the new files and the switch

    monkeypatch.setattr(export_module.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        export_pretrained(model, tokenizer, target)
    monkeypatch.undo()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(target), probe), before, rtol=0, atol=0)
    assert len([p for p in tmp_path.iterdir() if p.name != "export"]) == 1  # the new folder was cleaned up
    export_pretrained(model, tokenizer, target)  # and the next export replaces it
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(target), probe), logits(model, probe),
                               rtol=0, atol=0)
    assert len([p for p in tmp_path.iterdir() if p.name != "export"]) == 1


def test_export_files_are_readable_and_the_tokenizer_pads_right(assets, tmp_path):
    from datamodules.utils.files import default_file_mode

    model = AutoModelForCausalLM.from_pretrained(assets / "model")
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    tokenizer.padding_side = "left"  # as generation leaves it while it runs
    target = export_pretrained(model, tokenizer, tmp_path / "export")
    for file in target.iterdir():
        assert file.stat().st_mode & 0o777 == default_file_mode(), file.name
    assert AutoTokenizer.from_pretrained(target).padding_side == "right"
    assert tokenizer.padding_side == "left"  # the live tokenizer is left as it was
