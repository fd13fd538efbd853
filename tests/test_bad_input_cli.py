"""Bad model / checkpoint / option input to the CLI: one `error: ...` paragraph naming the key, exit 2.

In-process through `lightning_modules.cli.main` (as `tests/test_cli.py` does): a `SystemExit` is the
process's exit status, any other exception the traceback a user would see. No test reaches the
Hugging Face Hub (conftest sets HF_HUB_OFFLINE=1; the unreachable-Hub case replaces the socket probe).
One subprocess (slow) measures the console noise of a real `fit` + export.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import datamodules.tokenize as tokenize
from datamodules.utils.errors import UserInputError
from lightning_modules import cli as cli_module
from lightning_modules.cli import main
from lightning_modules.models import loading
from test_cli import cli_env, run_main  # noqa: F401  (cli_env is a fixture)
from test_configs import localize, write_localized

REPO = Path(__file__).resolve().parents[1]
SFT_YAML = REPO / "configs/quickstart/sft.yaml"
DPO_YAML = REPO / "configs/quickstart/dpo.yaml"
QUIET = ["--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false"]


def one_paragraph(err: str) -> str:
    """The `error:` paragraph of stderr (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in err
    paragraphs = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(paragraphs) == 1, err
    return paragraphs[0]


# ---- 1. model / tokenizer paths -------------------------------------------------------------


@pytest.mark.parametrize("config, path", [(DPO_YAML, "runs/nope/export"), (SFT_YAML, "./missing-model"),
                                          (SFT_YAML, "some/deep/folder")])
def test_missing_local_model_path(config, path, assets, tmp_path, cli_env, capsys, monkeypatch):
    """DPO before SFT has run: the path names no folder. Was: exit 1, four chained tracebacks ("Repo id must be...")."""
    config = write_localized(config, assets, tmp_path)
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(["fit", "--config", str(config), *QUIET,
                               f"--model.init_args.model_name_or_path={path}"], capsys)
    assert status == 2
    line = one_paragraph(err)
    assert f"model.model_name_or_path='{path}'" in line and "no such folder" in line


def test_missing_quickstart_export_names_the_step_that_writes_it(assets, tmp_path, cli_env, capsys, monkeypatch):
    """The quickstart DPO's model is the export of configs/quickstart/sft.yaml (under its run root): say so."""
    config = write_localized(DPO_YAML, assets, tmp_path)
    sft_export = yaml.safe_load(DPO_YAML.read_text())["model"]["init_args"]["model_name_or_path"]
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(["fit", "--config", str(config), *QUIET,
                               f"--model.init_args.model_name_or_path={sft_export}"], capsys)
    assert status == 2
    assert "python -m lightning_modules fit --config configs/quickstart/sft.yaml" in one_paragraph(err)


def test_missing_reference_path_names_its_key(assets, tmp_path, cli_env, capsys, monkeypatch):
    config = write_localized(DPO_YAML, assets, tmp_path)
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(["fit", "--config", str(config), *QUIET, "--model.init_args.reference=live",
                               "--model.init_args.reference_name_or_path=runs/nope/reference"], capsys)
    assert status == 2
    assert "model.reference_name_or_path='runs/nope/reference'" in one_paragraph(err)


def test_uncached_hub_id_while_offline(assets, tmp_path, cli_env, capsys):
    """A hub id that is not in the cache, with HF_HUB_OFFLINE=1 (conftest). Was: exit 1, OSError traceback."""
    config = write_localized(SFT_YAML, assets, tmp_path)
    status, _, err = run_main(["fit", "--config", str(config), *QUIET,
                               "--model.init_args.model_name_or_path=someorg/no-such-model"], capsys)
    assert status == 2
    line = one_paragraph(err)
    assert "'someorg/no-such-model'" in line and "HF_HUB_OFFLINE" in line and "local folder" in line


@pytest.mark.parametrize("load, key", [(loading.load_causal_lm, "model.model_name_or_path"),
                                       (tokenize.load_tokenizer, "data.tokenizer_name_or_path")])
def test_loaders_name_the_key(load, key, tmp_path):
    with pytest.raises(UserInputError, match=rf"^{key}='{tmp_path}/nope': no such folder"):
        load(str(tmp_path / "nope"))
    with pytest.raises(UserInputError, match=r"HF_HUB_OFFLINE"):
        load("someorg/no-such-model")


@pytest.fixture
def online_without_network(monkeypatch):
    """Offline mode off, no proxy, and a socket probe that fails as it does with no network (nothing is sent)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def no_network(address, timeout=None):
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr("socket.create_connection", no_network)

    def forbidden(*args, **kwargs):
        raise AssertionError("from_pretrained reached: it would spend ~25 s per file in retries")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", forbidden)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", forbidden)


@pytest.mark.parametrize("load", [loading.load_causal_lm, tokenize.load_tokenizer])
def test_unreachable_hub_fails_fast(load, online_without_network):
    """Was: 5 retries (1+2+4+8+8 s) per file before the OSError, ~46 s for the tokenizer alone."""
    start = time.perf_counter()
    with pytest.raises(UserInputError, match=r"'someorg/no-such-model'.*cannot be reached.*local folder"):
        load("someorg/no-such-model")
    assert time.perf_counter() - start < 5


# ---- 2. --ckpt_path -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_setup(assets, tmp_path_factory) -> tuple[Path, Path]:
    """(a localized SFT config, a real Lightning checkpoint of one step of it)."""
    out = tmp_path_factory.mktemp("ckpt")
    config = write_localized(SFT_YAML, assets, out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lightning_modules"])
        cli = main(["fit", "--config", str(config), *QUIET, "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                    "--data.init_args.batch_size=4"])
    cli.trainer.save_checkpoint(out / "good.ckpt")
    return config, out / "good.ckpt"


def test_valid_checkpoint_is_accepted_and_read_in_full_once(sft_setup, cli_env, monkeypatch):
    """Lightning's CLI reads a checkpoint for hyperparameters before its restore reads it: that read is mmapped."""
    config, checkpoint = sft_setup
    calls = []
    load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("mmap", False))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    cli = main(["validate", "--config", str(config), *QUIET, "--trainer.limit_val_batches=1",
                f"--ckpt_path={checkpoint}"])
    assert cli.trainer.callback_metrics["val/loss"] > 0
    assert calls.count(False) == 1, calls  # the restore; the hyperparameter read (first) is memory-mapped
    assert calls[0] is True


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_truncated_checkpoint(subcommand, sft_setup, tmp_path, cli_env, capsys):
    """Was: exit 1, "PytorchStreamReader failed reading zip archive: failed finding central directory"."""
    config, checkpoint = sft_setup
    data = checkpoint.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    status, _, err = run_main([subcommand, "--config", str(config), *QUIET, f"--ckpt_path={truncated}"], capsys)
    assert status == 2
    line = one_paragraph(err)
    assert f"ckpt_path='{truncated}'" in line and "truncated" in line


def test_missing_checkpoint(sft_setup, tmp_path, cli_env, capsys):
    """Was: exit 1, "FileNotFoundError: Checkpoint file not found" after loading the model."""
    config, _ = sft_setup
    missing = tmp_path / "runs/nope/last.ckpt"
    status, _, err = run_main(["fit", "--config", str(config), *QUIET, f"--ckpt_path={missing}"], capsys)
    assert status == 2
    assert f"ckpt_path='{missing}': no such file" in one_paragraph(err)


def test_checkpoint_check_does_not_load_it(sft_setup, tmp_path, monkeypatch):
    """The check reads the zip directory only: a big checkpoint is loaded once, by Lightning."""
    _, checkpoint = sft_setup

    def forbidden(*args, **kwargs):
        raise AssertionError("checkpoint loaded by the check")

    monkeypatch.setattr(torch, "load", forbidden)
    cli_module.check_checkpoint(str(checkpoint))  # no error
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(UserInputError, match="empty"):
        cli_module.check_checkpoint(str(empty))
    for special in ("last", "best", "hpc", "registry", "s3://bucket/x.ckpt", None):
        cli_module.check_checkpoint(special)


# ---- 3. a truncated model.safetensors --------------------------------------------------------


def test_truncated_safetensors(assets, tmp_path, cli_env, capsys):
    """Was: exit 1, "SafetensorError: Error while deserializing header: incomplete metadata"."""
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    config = write_localized(SFT_YAML, assets, tmp_path)
    status, _, err = run_main(["fit", "--config", str(config), *QUIET,
                               f"--model.init_args.model_name_or_path={model}"], capsys)
    assert status == 2
    line = one_paragraph(err)
    assert str(weights) in line and "truncated" in line and "re-export" in line


def test_load_causal_lm_names_a_truncated_safetensors_file(assets, tmp_path):
    """The same through `load_causal_lm` alone (the CLI checks the headers before anything loads)."""
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 10)
    assert loading.damaged_safetensors(model) == [weights]
    assert loading.damaged_safetensors(assets / "model") == []
    pattern = rf"^model.model_name_or_path='{model}': {weights} is truncated.*re-export"
    with pytest.raises(UserInputError, match=pattern):
        loading.load_causal_lm(str(model))


# ---- 4. unknown keys and wrong types lead with the key ----------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("--model.init_args.betaa=0.1",
     "error: model.init_args.betaa: no such option of lightning_modules.dpo.DPOModule (did you mean beta?)"),
    ("--model.init_args.beta=abc", "error: model.init_args.beta: expected a float, got 'abc'"),
    ("--trainer.max_stepz=3", "error: trainer.max_stepz: no such option (did you mean trainer.max_steps?)"),
    ("--trainer.max_steps=abc", "error: trainer.max_steps: expected an int, got 'abc'"),
    ("--data.init_args.overlength=foo",
     "error: data.init_args.overlength: expected one of 'truncate', 'drop', got 'foo'"),
    ("--model.init_args.dtype=float64",
     "error: model.init_args.dtype: expected one of 'float32', 'bfloat16', 'float16', got 'float64'"),
    ("--model.init_args.optimizer.init_args.lrr=1",
     "error: model.init_args.optimizer.init_args.lrr: no such option of torch.optim.AdamW (did you mean lr?)"),
    ("--model.init_args.lora.r=abc", "error: model.init_args.lora.init_args.r: expected an int, got 'abc'"),
    ("--model=lightning_modules.dpo.DPOModul",
     "error: model: no class lightning_modules.dpo.DPOModul (did you mean lightning_modules.dpo.DPOModule?)"),
    ("--model.init_args.objective=Sigmod", "error: model.init_args.objective: 'Sigmod' is not a class or import path "
                                           "(did you mean Sigmoid?)"),
    ("--seed_everything=abc", "error: seed_everything: expected a bool or an int, got 'abc'"),
    ("--model.init_args.optimizer.lr=abc",
     "error: model.init_args.optimizer.init_args.lr: expected a float, got 'abc'"),
    ("--model.init_args.optimizer=torch.optim.Adamw",
     "error: model.init_args.optimizer: no class torch.optim.Adamw (did you mean torch.optim.AdamW?)"),
    ("--model.init_args.generation=abc", "error: model.init_args.generation: expected a dict or null, got 'abc'"),
    ("--trainer.precision=17", "error: trainer.precision: expected one of 64, 32, 16, 'transformer-engine', "
                               "'transformer-engine-float16', '16-true', '16-mixed', 'bf16-true', 'bf16-mixed', "
                               "'32-true', '64-true', '64', '32', '16', 'bf16' or null, got '17'"),
])
def test_bad_option_leads_with_key_and_value(override, expected, assets, tmp_path, cli_env, capsys):
    """Was: `error: Parser key "model": Does not validate against any of the Union subtypes Subtypes: [...] ...`."""
    config = write_localized(DPO_YAML, assets, tmp_path)
    status, _, err = run_main(["fit", "--config", str(config), override], capsys)
    assert status == 2
    assert one_paragraph(err) == expected


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["model"]["init_args"].update(reductoin=c["model"]["init_args"].pop("reduction")),
     "error: model.init_args.reductoin: no such option of lightning_modules.sft.SFTModule (did you mean reduction?)"),
    (lambda c: c["trainer"].update(max_stepz=3),
     "error: trainer.max_stepz: no such option (did you mean trainer.max_steps?)"),
    (lambda c: c["data"]["init_args"].pop("path"), "error: data.init_args.path: required, not given"),
])
def test_bad_key_in_yaml_leads_with_key(edit, expected, assets, tmp_path, cli_env, capsys):
    config = yaml.safe_load(write_localized(SFT_YAML, assets, tmp_path).read_text())
    edit(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    status, _, err = run_main(["fit", "--config", str(path)], capsys)
    assert status == 2
    assert one_paragraph(err) == expected


def test_bad_sampling_settings_name_the_key(assets, tmp_path, cli_env, capsys):
    """The on-policy module's sampling settings (a dataclass) are checked at construction: one paragraph naming
    model.init_args.sampling, not jsonargparse's "Does not validate against any of the types"."""
    config = yaml.safe_load((REPO / "configs/studies/onpolicy-study/onpolicy.yaml").read_text())
    config["model"]["init_args"]["model_name_or_path"] = str(assets / "model")
    config["data"]["init_args"].update(path=str(assets / "data/prefs"), tokenizer_name_or_path=str(assets / "model"))
    path = tmp_path / "onpolicy.yaml"
    path.write_text(yaml.safe_dump(config))
    status, _, err = run_main(["fit", "--config", str(path), *QUIET, "--model.init_args.sampling.num_samples=1"],
                              capsys)
    assert status == 2
    line = one_paragraph(err)
    assert line.startswith("error: model.init_args.sampling=") and "num_samples >= 2" in line, line


def test_unrecognized_message_falls_back_to_the_concise_paragraph():
    message = 'Parser key "x":\n  Something new happened\n  Given value: 3'
    assert cli_module.lead_with_key(message, None) is None
    assert cli_module.concise(message) == 'Parser key "x": Something new happened'


# ---- 5. noise ---------------------------------------------------------------------------------


def test_gradient_checkpointing_uses_the_current_api(assets):
    from lightning_modules.sft import SFTModule

    module = SFTModule(model_name_or_path=str(assets / "model"), gradient_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.configure_model()
    assert module.policy.is_activation_checkpointing
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize("logger, message, dropped", [
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
     True),
    ("DeepSpeed", "Some other DeepSpeed warning", False),
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging and experiment tracking, ...",
     True),
    ("lightning.pytorch.utilities.rank_zero", "GPU available: False, used: False", False),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: x", True),
])
def test_noise_filters_are_narrow(logger, message, dropped):
    cli_module.quiet_known_noise()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    target = logging.getLogger(logger)
    target.addHandler(handler)
    try:
        target.warning(message)
    finally:
        target.removeHandler(handler)
    assert (not records) is dropped


NOISE = ["Setting accelerator to CPU", "💡 Tip", "gemm_4bit_forward", "LeafSpec", "is deprecated"]


@pytest.mark.slow
def test_fit_and_export_print_no_known_noise(assets, tmp_path):
    """A real `python -m lightning_modules fit` with its export: none of the known noise lines."""
    config = localize(yaml.safe_load(SFT_YAML.read_text()), assets, tmp_path)
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"]
                                      if c["class_path"].endswith(("ExportPretrained", "ModelCheckpoint"))]
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "lightning_modules", "fit", "--config", str(path),
                             "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--data.init_args.batch_size=4",
                             "--trainer.enable_progress_bar=false", "--model.init_args.gradient_checkpointing=true"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "exported policy + tokenizer" in output
    assert not [line for line in output.splitlines() if any(noise in line for noise in NOISE)], output


# ---- 6. contradictory trainer settings (Lightning's MisconfigurationException) ------------------


def test_contradictory_trainer_settings_are_one_paragraph(assets, tmp_path, cli_env, capsys, monkeypatch):
    """`logger=false` with the config's LearningRateMonitor. Was: exit 1 and a MisconfigurationException traceback."""
    config = write_localized(DPO_YAML, assets, tmp_path)
    monkeypatch.chdir(tmp_path)
    status, _, err = run_main(["fit", "--config", str(config), "--trainer.logger=false", "--trainer.max_steps=1",
                               "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"], capsys)
    assert status == 2
    assert "LearningRateMonitor" in one_paragraph(err)


# ---- 7. a spawned rank never outlives its launcher ---------------------------------------------


@pytest.mark.slow
def test_spawned_rank_ends_when_its_launcher_dies(tmp_path):
    """A rank with LOCAL_RANK=1 (as Lightning's launcher starts it) is signalled when the launcher dies.

    Was: a rank-0 crash before the process group was up left rank 1 waiting 30 minutes for it.
    """
    child = ("import os, sys, time; os.environ['LOCAL_RANK'] = '1'\n"
             "from lightning_modules.cli.app import die_with_launcher\n"
             "die_with_launcher(); print(os.getpid(), flush=True); time.sleep(120)\n")
    parent = ("import subprocess, sys\n"
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, text=True)\n"
              "print(p.stdout.readline().strip(), flush=True)\n")  # the child is ready; the parent exits now
    result = subprocess.run([sys.executable, "-c", parent], cwd=REPO, capture_output=True, text=True, timeout=120)
    pid = int(result.stdout.strip())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return  # gone with its launcher
        time.sleep(0.2)
    os.kill(pid, 9)
    pytest.fail("the spawned rank outlived its launcher by 20 s")
