"""The hardware setups of `configs/strategy/`: each composes onto any experiment as the last `--config`.

For every strategy file and every experiment (the quickstart DPO and SFT configs and all of
`configs/experiments/`), `fit --print_config` of the experiment with the strategy file stacked on top
must parse, show every value the strategy file writes, and leave every other key of the experiment
as it was. A typo in any key of a strategy file must stop the CLI (exit 2, naming the key); this is
checked on broken copies of each file. The trainer and model are also built on CPU (only `accelerator`
swapped, since Lightning refuses DeepSpeed and bitsandbytes' GPU kernels without CUDA), and for
DeepSpeed the config dict that `fit` would hand to `deepspeed.initialize` goes through DeepSpeed's own
parser, as in `tests/test_refdpo_configs.py`. Nothing here trains on a GPU; the memory fit of each
setup is argued in `docs/memory.md`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.runtime.config import DeepSpeedConfig
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, MixedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from test_configs import REPO, write_localized

from lightning_modules.cli import main
from lightning_modules.models.adapters import LoraSpec

FOLDER = REPO / "configs/strategy"
FILES = sorted(FOLDER.glob("*.yaml"))
EXPERIMENTS = [REPO / "configs/quickstart/dpo.yaml", REPO / "configs/quickstart/sft.yaml",
               *sorted((REPO / "configs/experiments").glob("*.yaml"))]
QUICKSTART_DPO = REPO / "configs/quickstart/dpo.yaml"
CPU = {"trainer": {"accelerator": "cpu"}}  # the only change for building on this machine

# What each file must resolve to, written out independently of the files.
EXPECTED: dict[str, dict[str, Any]] = {
    "zero3_8gpu_bf16.yaml": {
        "trainer.accelerator": "gpu", "trainer.devices": 8, "trainer.precision": "bf16-mixed",
        "trainer.strategy.class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
        "trainer.strategy.init_args.stage": 3, "trainer.strategy.init_args.offload_optimizer": False,
        "trainer.strategy.init_args.offload_parameters": False,
        "model.init_args.dtype": "bfloat16", "model.init_args.gradient_checkpointing": True,
    },
    "a100_offload.yaml": {
        "trainer.accelerator": "gpu", "trainer.devices": 1, "trainer.precision": "bf16-mixed",
        "trainer.strategy.class_path": "lightning.pytorch.strategies.DeepSpeedStrategy",
        "trainer.strategy.init_args.stage": 3, "trainer.strategy.init_args.offload_optimizer": True,
        "trainer.strategy.init_args.offload_parameters": True, "trainer.strategy.init_args.pin_memory": True,
        "model.init_args.dtype": "bfloat16", "model.init_args.gradient_checkpointing": True,
        "model.init_args.optimizer.class_path": "deepspeed.ops.adam.DeepSpeedCPUAdam",
        "model.init_args.optimizer.init_args.adamw_mode": True,
    },
    "ddp.yaml": {
        "trainer.accelerator": "gpu", "trainer.devices": 8, "trainer.precision": "bf16-mixed",
        "trainer.strategy.class_path": "lightning.pytorch.strategies.DDPStrategy",
        "trainer.strategy.init_args.gradient_as_bucket_view": True,
        "model.init_args.dtype": "float32", "model.init_args.gradient_checkpointing": True,
    },
    "single_gpu_lora_4bit_reference.yaml": {
        "trainer.accelerator": "gpu", "trainer.devices": 1, "trainer.precision": "bf16-mixed",
        "trainer.strategy": "auto",
        "model.init_args.dtype": "bfloat16", "model.init_args.gradient_checkpointing": True,
        "model.init_args.lora.r": 32, "model.init_args.lora.alpha": 16, "model.init_args.lora.base_quantization": "4bit",
    },
}
STRATEGY_CLASS = {"zero3_8gpu_bf16.yaml": DeepSpeedStrategy, "a100_offload.yaml": DeepSpeedStrategy,
                  "ddp.yaml": DDPStrategy, "single_gpu_lora_4bit_reference.yaml": SingleDeviceStrategy}


def name(path: Path) -> str:
    return path.relative_to(REPO / "configs").as_posix()


def leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for every leaf of a nested mapping (a list is one leaf)."""
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def get(config: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        config = config[key]
    return config


def written(path: Path) -> dict[str, Any]:
    """The leaves a strategy file writes, as dotted paths."""
    return leaves(yaml.safe_load(path.read_text()))


@pytest.fixture
def no_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning_modules"])  # `main(args)` must not see pytest's argv


PRINTED: dict[tuple[str, ...], dict[str, Any]] = {}


def print_config(*configs: Path, capsys) -> dict[str, Any]:
    """`fit --config A --config B ... --print_config`, parsed (cached: each is printed once per session)."""
    key = tuple(str(c) for c in configs)
    if key not in PRINTED:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", *(arg for c in configs for arg in ("--config", str(c))), "--print_config"])
        out, err = capsys.readouterr()
        assert exit_info.value.code in (0, None), err
        PRINTED[key] = yaml.safe_load(out)
    return PRINTED[key]


def test_every_strategy_file_is_described_here():
    assert {p.name for p in FILES} == set(EXPECTED) == set(STRATEGY_CLASS)


@pytest.mark.parametrize("path", FILES, ids=name)
def test_strategy_file_holds_only_hardware_keys(path):
    """Only trainer hardware keys and a few model keys: nothing that would change an experiment's recipe."""
    config = yaml.safe_load(path.read_text())
    assert set(config) == {"trainer", "model"}
    assert set(config["trainer"]) <= {"accelerator", "devices", "num_nodes", "strategy", "precision"}
    assert set(config["model"]) == {"init_args"}  # no class_path: it composes onto DPO and SFT alike
    assert set(config["model"]["init_args"]) <= {"dtype", "gradient_checkpointing", "lora", "optimizer"}
    text = path.read_text()
    assert f"--config configs/strategy/{path.name}" in text  # the header says how to compose it
    lines = text.splitlines()
    for above, line in zip(["#", *lines], lines):  # every value is explained, on its line or just above it
        if ":" in line and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            key = line.split(":")[0].strip()
            commented = "#" in line or above.lstrip().startswith("#")
            assert commented or key in ("class_path", "init_args"), f"{path.name}: uncommented key {key!r}"


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=name)
@pytest.mark.parametrize("path", FILES, ids=name)
def test_strategy_composes_onto_experiment(path, experiment, capsys, no_argv):
    """experiment + strategy parses; every value of the file wins; every other key of the experiment stays."""
    alone = print_config(experiment, capsys=capsys)
    composed = print_config(experiment, path, capsys=capsys)

    mine = written(path)
    for key, value in mine.items():
        actual = get(composed, key)
        if isinstance(value, str) and value.startswith("${"):  # an interpolation: resolved against the experiment
            value = get(composed, value.removeprefix("${").removesuffix("}"))
        assert actual == value, key
    for key, value in EXPECTED[path.name].items():  # and they are the values this test expects
        assert get(composed, key) == value, key

    # Everything the strategy file does not touch is the experiment's, unchanged (model, data, recipe).
    # A subclass spec the file replaces (a strategy or optimizer class_path) is replaced as a whole.
    touched = set(mine)
    touched |= {key.rpartition(".")[0] for key in touched if key.endswith(".class_path")}
    kept = {key: value for key, value in leaves(alone).items()
            if not any(key == t or key.startswith(t + ".") or t.startswith(key + ".") for t in touched)}
    assert kept, "nothing compared"
    changed = {key: (value, get(composed, key)) for key, value in kept.items() if get(composed, key) != value}
    assert not changed, changed
    assert composed["data"] == alone["data"]
    assert composed["model"]["class_path"] == alone["model"]["class_path"]
    assert composed["model"]["init_args"]["model_name_or_path"] == alone["model"]["init_args"]["model_name_or_path"]
    if "model.init_args.optimizer.class_path" in mine:  # a swapped optimizer class keeps the experiment's lr
        assert composed["model"]["init_args"]["optimizer"]["init_args"]["lr"] == \
            alone["model"]["init_args"]["optimizer"]["init_args"]["lr"]


def typo_copies(path: Path) -> list[tuple[str, str, str]]:
    """(what, broken YAML, text the error must name): every key of the file misspelt, plus two bad values."""
    config = yaml.safe_load(path.read_text())
    copies = []

    def misspell(node: Any, trail: tuple[str, ...]) -> None:
        if not isinstance(node, dict):
            return
        for key in list(node):
            if key in ("class_path", "init_args"):  # structure, not options (a bad class_path is tested below)
                misspell(node[key], trail + (key,))
                continue
            broken = yaml.safe_load(path.read_text())
            parent = get(broken, ".".join(trail)) if trail else broken
            parent[key + "_typo"] = parent.pop(key)
            copies.append((".".join(trail + (key,)), yaml.safe_dump(broken, sort_keys=False), key + "_typo"))
            misspell(node[key], trail + (key,))

    misspell(config, ())
    bad_precision = yaml.safe_load(path.read_text())
    bad_precision["trainer"]["precision"] = "bf16-mixd"
    copies.append(("trainer.precision value", yaml.safe_dump(bad_precision), "bf16-mixd"))
    strategy = config["trainer"]["strategy"]
    if isinstance(strategy, dict):
        bad_class = yaml.safe_load(path.read_text())
        bad_class["trainer"]["strategy"]["class_path"] = strategy["class_path"] + "x"
        copies.append(("trainer.strategy.class_path value", yaml.safe_dump(bad_class), strategy["class_path"] + "x"))
    return copies


@pytest.mark.parametrize("path", FILES, ids=name)
def test_a_typo_in_a_strategy_file_fails(path, tmp_path, capsys, no_argv):
    """A broken copy of the file (any key misspelt, or a bad value) stops the CLI with exit 2 naming it."""
    copies = typo_copies(path)
    assert len(copies) >= len(written(path))
    for what, text, named in copies:
        broken = tmp_path / path.name
        broken.write_text(text)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(QUICKSTART_DPO), "--config", str(broken), "--print_config"])
        _, err = capsys.readouterr()
        assert exit_info.value.code == 2, what
        assert named in err, (what, err)


@pytest.mark.parametrize("path", FILES, ids=name)
def test_trainer_and_model_build_on_cpu(path, assets, tmp_path, no_argv, monkeypatch):
    """The quickstart DPO config with the strategy file and `accelerator: cpu`: the objects `fit` would use."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded weights"))
    experiment = write_localized(QUICKSTART_DPO, assets, tmp_path)
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(yaml.safe_dump(CPU))
    cli = main(["--config", str(experiment), "--config", str(path), "--config", str(cpu)], run=False)
    trainer, model, expected = cli.trainer, cli.model, EXPECTED[path.name]

    assert type(trainer.strategy) is STRATEGY_CLASS[path.name]
    assert trainer.num_devices == expected["trainer.devices"]
    assert trainer.precision_plugin.precision == "bf16-mixed"
    assert model.dtype_name == expected["model.init_args.dtype"] and model.gradient_checkpointing is True
    assert model.policy is None  # nothing loaded while building
    if path.name == "single_gpu_lora_4bit_reference.yaml":
        assert model.lora == LoraSpec(r=32, alpha=16, base_quantization="4bit")
        assert model.reference_mode == "live"  # so configure_model's reference is the 4-bit base, adapters off
    else:
        assert model.lora is None
    if type(trainer.strategy) is DDPStrategy:  # (DeepSpeedStrategy subclasses DDPStrategy)
        assert isinstance(trainer.precision_plugin, MixedPrecision)
        assert trainer.strategy._ddp_kwargs["gradient_as_bucket_view"] is True
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        assert isinstance(trainer.precision_plugin, DeepSpeedPrecision)
        check_deepspeed_config(trainer, model, expected, batch_size=cli.datamodule.batch_size,
                               monkeypatch=monkeypatch)


def check_deepspeed_config(trainer, model, expected: dict[str, Any], batch_size: int, monkeypatch) -> None:
    """What fit runs before deepspeed.initialize, then DeepSpeed's own parser on the result."""
    model.trainer = trainer
    trainer.strategy.connect(model)
    trainer.strategy._format_config()
    ds = trainer.strategy.config
    zero = ds["zero_optimization"]
    assert zero["stage"] == expected["trainer.strategy.init_args.stage"] and ds["bf16"] == {"enabled": True}
    assert ds["train_micro_batch_size_per_gpu"] == batch_size  # the ${data.init_args.batch_size} interpolation
    assert ds["gradient_accumulation_steps"] == trainer.accumulate_grad_batches
    assert ("offload_param" in zero) == expected["trainer.strategy.init_args.offload_parameters"]
    assert ("offload_optimizer" in zero) == expected["trainer.strategy.init_args.offload_optimizer"]
    parsed = DeepSpeedConfig(ds)
    assert parsed.zero_optimization_stage == 3 and parsed.bfloat16_config.enabled
    zero3 = parsed.zero_config  # DeepSpeed's ZeRO-3 defaults that the files' comments describe
    assert (zero3.param_persistence_threshold, zero3.prefetch_bucket_size, zero3.max_live_parameters) == (1e5, 5e7, 1e9)
    if parsed.zero_config.offload_optimizer is not None and parsed.zero_force_ds_cpu_optimizer:
        # ZeRO-Offload refuses a torch optimizer: the file swaps in DeepSpeedCPUAdam, with the experiment's lr.
        # Build it with its C++ op stubbed out (that op compiles for minutes): the class and arguments are checked.
        received: dict[str, Any] = {}
        monkeypatch.setattr(DeepSpeedCPUAdam, "__init__", lambda self, params, **kwargs: received.update(kwargs))
        optimizer = model.optimizer_factory([torch.nn.Parameter(torch.zeros(2))])
        assert type(optimizer) is DeepSpeedCPUAdam
        assert received["adamw_mode"] is True and received["lr"] == 3.0e-5  # the quickstart's lr


# ---------------------------------------------------------------- docs/memory.md


@pytest.mark.parametrize(("lr", "bf16_changed"), [(5e-7, 0.009), (1e-6, 0.019), (1e-5, 0.15), (1e-4, 0.84)])
def test_bf16_weights_drop_small_updates(lr, bf16_changed):
    """docs/memory.md §1, why ddp.yaml loads fp32 weights: AdamW steps on bf16 weights mostly round away."""
    changed = {}
    for dtype in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        weight = torch.nn.Parameter((torch.randn(1_000_000) * 0.02).to(dtype))
        optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=0.0)
        before = weight.detach().clone()
        for _ in range(10):
            weight.grad = torch.randn_like(weight)
            optimizer.step()
        changed[dtype] = (weight.detach() != before).float().mean().item()
    assert changed[torch.float32] > 0.999  # all but a handful
    assert changed[torch.bfloat16] == pytest.approx(bf16_changed, abs=0.005)


def checkpointed_bytes(num_layers: int, setup: str, tmp_path: Path, *, hidden: int = 128, r: int = 8) -> tuple[int, int]:
    """(bytes autograd saves in `concatenated_forward` under bf16 autocast, trainable parameters) of a small Mistral.

    `setup`: "fp32" (ddp.yaml's weights), "qlora" (4-bit base + LoRA) or "lora" (bf16 base + LoRA); gradient
    checkpointing on, as every configs/strategy file sets it.
    """
    from transformers import AutoModelForCausalLM, MistralConfig

    from lightning_modules.logprobs import concatenated_forward
    from lightning_modules.models.adapters import load_lora_policy

    vocab, pairs, seq_len = 1000, 2, 64
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                           num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=1,
                           max_position_embeddings=seq_len)
    folder = tmp_path / f"{setup}_{num_layers}"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    if setup == "fp32":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    else:
        spec = LoraSpec(r=r, alpha=16, base_quantization="4bit" if setup == "qlora" else "none")
        model = load_lora_policy(str(folder), spec, dtype="bfloat16", device="cpu")
    model.train()
    model.activation_checkpointing_enable()
    ids = torch.randint(0, vocab, (pairs, seq_len))
    batch = {f"{side}_{key}": value for side in ("chosen", "rejected")
             for key, value in (("input_ids", ids), ("attention_mask", torch.ones_like(ids)), ("labels", ids))}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        concatenated_forward(model, batch)
    return sum(saved.values()), sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize(("setup", "bytes_per_element"), [("fp32", 4), ("qlora", 4), ("lora", 2)])
def test_checkpointed_bytes_per_element(setup, bytes_per_element, tmp_path):
    """docs/memory.md §2: s, the bytes each checkpointed layer keeps per token and hidden unit, per setup.

    bf16 weights keep 2 B (tests/test_refdpo_configs.py); fp32 weights under autocast (ddp.yaml) and
    QLoRA (fp32 embeddings and norms, 4-bit layers returning their input's dtype) keep 4 B; LoRA on a
    bf16 base keeps 2 B. For LoRA, the adapter count is r·(in + out) summed over the seven projections.
    """
    hidden, r, tokens = 128, 8, 2 * 2 * 64
    (two, _), (four, trainable) = (checkpointed_bytes(n, setup, tmp_path, hidden=hidden, r=r) for n in (2, 4))
    assert four - two == 2 * tokens * hidden * bytes_per_element
    if setup != "fp32":
        d_kv, d_ff = hidden // 4, hidden * 7 // 2
        assert trainable == 4 * r * (2 * (hidden + hidden) + 2 * (hidden + d_kv) + 3 * (hidden + d_ff))
