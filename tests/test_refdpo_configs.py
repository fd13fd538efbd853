"""The RefDPO configs (`configs/refdpo/`): the original grid exactly, its hyperparameters, DeepSpeed ZeRO-3.

Lightning runs DeepSpeed only on CUDA GPUs, so the strategy is checked without one: it is built from
each file's `trainer.strategy.init_args`, turned into the dict `deepspeed.initialize` would receive
(`DeepSpeedStrategy._format_config`, as `fit` does), and that dict is parsed by DeepSpeed's own config
class. The whole trainer is also built through the CLI with only `accelerator` switched to cpu.
`tests/test_configs.py` instantiates the same files with every GPU setting swapped out.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deepspeed.runtime.config import DeepSpeedConfig
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy
from omegaconf import OmegaConf

from lightning_modules.cli import main

REPO = Path(__file__).resolve().parents[1]
FOLDER = REPO / "configs/refdpo"
FILES = sorted(FOLDER.rglob("*.yaml"))
IDS = [p.relative_to(FOLDER).as_posix() for p in FILES]
SINGLE_A100 = FOLDER / "mistral_single_a100_beta_0.01.yaml"

# The original grid (seed 002 README and SPEC section 7), written out independently of generate.py.
MISTRAL, TULU2 = "HuggingFaceH4/mistral-7b-sft-beta", "allenai/tulu-2-7b"
DPO_BETAS = (10, 1, 0.1, 0.05, 0.02, 0.01, 0.005)
STRONGER_REFERENCE_BETAS = (10, 1, 0.1, 0.01, 0.005)
EXPECTED_RUNS = {  # (policy, yale-nlp/RefDPO config, model.reference, β) of every 8-GPU run
    *((MISTRAL, "mistral", "precomputed", b) for b in DPO_BETAS),  # RQ1
    *((TULU2, "tulu2", "precomputed", b) for b in DPO_BETAS),
    *((MISTRAL, "mistral", "none", b) for b in (100, 10, 1)),  # RQ2: posterior probability (reference-free)
    (MISTRAL, "mistral_prior", "precomputed", 0.01),  # RQ2: likelihood (unconditional reference log-probs)
    *((policy, data, "precomputed", b) for policy in (MISTRAL, TULU2) for data in ("mistralv2", "llama3")
      for b in STRONGER_REFERENCE_BETAS),  # RQ3: stronger references
}
PAIRS_PER_STEP = 32  # 4 pairs per GPU x 8 GPUs


def load(path: Path) -> dict[str, Any]:
    """The YAML with its `${...}` interpolations resolved, as the CLI resolves them (e.g. the DeepSpeed batch size)."""
    return OmegaConf.to_container(OmegaConf.create(yaml.safe_load(path.read_text())), resolve=True)


def run_key(config: dict[str, Any]) -> tuple[str, str, str, float]:
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    return model["model_name_or_path"], data["name"], model["reference"], model["beta"]


def load_generator():
    spec = importlib.util.spec_from_file_location("refdpo_generate", FOLDER / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def deepspeed_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(strategy init_args as written, the DeepSpeed config dict Lightning derives from them)."""
    trainer = config["trainer"]
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    init_args = trainer["strategy"]["init_args"]
    strategy = DeepSpeedStrategy(**init_args, precision_plugin=DeepSpeedPrecision(trainer["precision"]))
    strategy._format_config()  # adds bf16 from the precision; batch/clip keys need a trainer (see the CLI test)
    return init_args, strategy.config


# ---------------------------------------------------------------- the grid


def test_generated_files_are_committed_and_current():
    generate = load_generator()
    files = generate.render_all()
    for relpath, text in files.items():
        path = FOLDER / relpath
        assert path.exists(), f"{relpath} missing: run python configs/refdpo/generate.py"
        assert path.read_text() == text, f"{relpath} is stale: run python configs/refdpo/generate.py"
    assert set(IDS) == {p for p in files if p.endswith(".yaml")}  # no hand-written YAML besides
    assert generate.main(["--check"]) == 0


def test_grid_matches_the_original_exactly():
    eight_gpu = [load(p) for p in FILES if p != SINGLE_A100]
    runs = [run_key(c) for c in eight_gpu]
    assert len(runs) == len(set(runs)), "a run appears twice"
    assert set(runs) == EXPECTED_RUNS
    assert all(c["trainer"]["devices"] == 8 and c["trainer"]["accumulate_grad_batches"] == 1 for c in eight_gpu)


def test_single_a100_variant_is_the_best_mistral_run_with_cpu_offload():
    config = load(SINGLE_A100)
    assert run_key(config) == (MISTRAL, "mistral", "precomputed", 0.01)
    assert config["trainer"]["devices"] == 1 and config["trainer"]["accumulate_grad_batches"] == 8
    init_args = config["trainer"]["strategy"]["init_args"]
    assert init_args["stage"] == 3
    assert init_args["offload_optimizer"] is True and init_args["offload_parameters"] is True


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_original_hyperparameters(path):
    config = load(path)
    trainer, model, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    assert config["model"]["class_path"] == "lightning_modules.dpo.DPOModule"
    assert model["objective"] == "Sigmoid" and model["beta"] > 0
    assert model["dtype"] == "bfloat16" and model["gradient_checkpointing"] is True
    optimizer = model["optimizer"]
    assert optimizer["class_path"] in ("torch.optim.AdamW", "deepspeed.ops.adam.DeepSpeedCPUAdam")
    assert optimizer["init_args"].get("adamw_mode", True) is True  # DeepSpeedCPUAdam's decoupled (AdamW) mode
    assert optimizer["init_args"]["lr"] == 5e-7 and optimizer["init_args"]["weight_decay"] == 0.0
    assert model["lr_scheduler"] == {"class_path": "lightning_modules.optim.LinearWarmupDecay",
                                     "init_args": {"warmup_ratio": 0.1}}
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
    assert trainer["max_epochs"] == 3 and trainer["gradient_clip_val"] == 1.0
    assert data["batch_size"] == 4 and data["max_length"] == 2048
    assert trainer["devices"] * data["batch_size"] * trainer["accumulate_grad_batches"] == PAIRS_PER_STEP
    assert model["reference"] in ("precomputed", "none")


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_data_section_is_the_shared_data_config(path):
    """Same as configs/data/refdpo_<name>.yaml but for the batch size and the policy's insert_eos."""
    config = load(path)
    data = config["data"]
    shared = load(REPO / f"configs/data/refdpo_{data['init_args']['name']}.yaml")["data"]
    mine = dict(data["init_args"])
    assert mine.pop("batch_size") == 4
    assert mine.pop("insert_eos") is (config["model"]["init_args"]["model_name_or_path"] == MISTRAL)
    theirs = dict(shared["init_args"])
    theirs.pop("insert_eos")
    assert data["class_path"] == shared["class_path"] and mine == theirs


# ---------------------------------------------------------------- DeepSpeed


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_deepspeed_strategy_is_zero3_bf16(path):
    config = load(path)
    init_args, ds = deepspeed_config(config)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["train_micro_batch_size_per_gpu"] == config["data"]["init_args"]["batch_size"]
    # offload exactly as written: absent when off, on the CPU when on
    for written, key in (("offload_optimizer", "offload_optimizer"), ("offload_parameters", "offload_param")):
        if init_args.get(written, False):
            assert zero[key]["device"] == "cpu" and zero[key]["pin_memory"] is init_args.get("pin_memory", False)
        else:
            assert key not in zero
    # DeepSpeed's own parser accepts the dict (unknown keys and bad values raise) and reads it the same way
    parsed = DeepSpeedConfig({**ds, "gradient_accumulation_steps": config["trainer"]["accumulate_grad_batches"],
                              "gradient_clipping": config["trainer"]["gradient_clip_val"]})
    assert parsed.zero_optimization_stage == 3 and parsed.bfloat16_config.enabled
    assert (parsed.zero_config.offload_param is not None) == bool(init_args.get("offload_parameters"))
    assert (parsed.zero_config.offload_optimizer is not None) == bool(init_args.get("offload_optimizer"))
    # ZeRO-Offload refuses a torch optimizer unless zero_force_ds_cpu_optimizer is turned off
    if init_args.get("offload_optimizer") and parsed.zero_force_ds_cpu_optimizer:
        assert config["model"]["init_args"]["optimizer"]["class_path"] == "deepspeed.ops.adam.DeepSpeedCPUAdam"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_hardware_is_the_composable_strategy_file(path):
    """Each run repeats configs/strategy/zero3_8gpu_bf16.yaml (single A100: a100_offload.yaml) key for key."""
    setup = yaml.safe_load((REPO / "configs/strategy" / (
        "a100_offload.yaml" if path == SINGLE_A100 else "zero3_8gpu_bf16.yaml")).read_text())
    config = yaml.safe_load(path.read_text())  # as written: the `${...}` text must match too
    for key, value in setup["trainer"].items():
        assert config["trainer"][key] == value, key
    model = config["model"]["init_args"]
    for key, value in setup["model"]["init_args"].items():
        if key == "optimizer":  # the class and its options; lr and weight_decay are the original's
            assert model[key]["class_path"] == value["class_path"]
            assert value["init_args"].items() <= model[key]["init_args"].items()
        else:
            assert model[key] == value, key


@pytest.fixture
def no_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning_modules"])


@pytest.mark.parametrize("path", [FOLDER / "mistral/beta_0.01.yaml", SINGLE_A100], ids=["8_gpus", "single_a100"])
def test_cli_builds_the_deepspeed_trainer(path, tmp_path, no_argv):
    """The file as written but `accelerator: cpu`: the CLI's trainer carries the DeepSpeed config fit would use."""

    def outputs_under_tmp(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: outputs_under_tmp(v) for k, v in node.items()}
        if isinstance(node, list):
            return [outputs_under_tmp(v) for v in node]
        return str(tmp_path / node) if isinstance(node, str) and node.startswith("runs/") else node

    config = outputs_under_tmp(load(path))
    config["trainer"]["accelerator"] = "cpu"  # Lightning refuses DeepSpeed without CUDA only when fit starts
    local = tmp_path / "config.yaml"
    local.write_text(yaml.safe_dump(config, sort_keys=False))
    cli = main(["--config", str(local)], run=False)
    trainer = cli.trainer
    assert isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.num_devices == config["trainer"]["devices"]
    assert isinstance(trainer.precision_plugin, DeepSpeedPrecision)
    assert trainer.precision_plugin.precision == "bf16-mixed"
    cli.model.trainer = trainer
    trainer.strategy.connect(cli.model)
    trainer.strategy._format_config()  # what fit runs before deepspeed.initialize
    ds = trainer.strategy.config
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 1.0
    assert ds["gradient_accumulation_steps"] == config["trainer"]["accumulate_grad_batches"]
    pairs_per_step = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * trainer.num_devices
    assert pairs_per_step == PAIRS_PER_STEP


# ---------------------------------------------------------------- docs/memory.md


def saved_activation_bytes(num_layers: int, *, hidden: int, vocab: int, pairs: int, seq_len: int) -> int:
    """Bytes autograd keeps for backward in `concatenated_forward` of a bf16 Mistral with checkpointing."""
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from lightning_modules.logprobs import concatenated_forward

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                           num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=1,
                           max_position_embeddings=seq_len)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).train()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, vocab, (pairs, seq_len))
    batch = {f"{side}_{key}": value for side in ("chosen", "rejected")
             for key, value in (("input_ids", ids), ("attention_mask", torch.ones_like(ids)), ("labels", ids))}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage address -> bytes, so views of one tensor count once

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        concatenated_forward(model, batch)
    return sum(saved.values())


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")  # PolicyModule's call
def test_checkpointed_activations_match_the_formula():
    """docs/memory.md: each checkpointed layer keeps one bf16 hidden state per token; the head keeps the bf16 logits
    (the lean log-prob path saves no float32 copy of them)."""
    hidden, vocab, pairs, seq_len = 128, 1000, 2, 64
    tokens = 2 * pairs * seq_len  # chosen + rejected in one forward
    two, four = (saved_activation_bytes(n, hidden=hidden, vocab=vocab, pairs=pairs, seq_len=seq_len) for n in (2, 4))
    assert four - two == 2 * tokens * hidden * 2  # layers x sequences x seq_len x hidden x 2 B
    head = two - 2 * tokens * hidden * 2
    assert tokens * vocab * 2 <= head <= tokens * vocab * 2 + 16 * tokens * hidden  # bf16 logits + a few norms
