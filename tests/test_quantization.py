"""8-bit / 4-bit (nf4) reference models through bitsandbytes on CPU: storage, memory and log-prob fidelity."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

from datamodules import PreferenceDataModule  # noqa: E402
from datamodules.utils.errors import UserInputError  # noqa: E402
from lightning_modules.logprobs import PairLogps, concatenated_forward  # noqa: E402
from lightning_modules.models.quantization import (  # noqa: E402
    load_reference_model,
    model_memory_bytes,
    quantized_linear_count,
)

LEVELS = ("none", "8bit", "4bit")


@pytest.fixture(scope="module")
def batch(assets: Path) -> dict[str, torch.Tensor]:
    data = PreferenceDataModule(path=str(assets / "data/prefs"), tokenizer_name_or_path=str(assets / "model"))
    data.setup("fit")
    return next(iter(data.train_dataloader()))


@pytest.fixture(scope="module")
def models(assets: Path) -> dict[str, torch.nn.Module]:
    # device="cpu": the CPU backend is what these tests pin down (the default would pick a GPU if any).
    return {q: load_reference_model(str(assets / "model"), quantization=q, device="cpu") for q in LEVELS}


@pytest.fixture(scope="module")
def logps(models, batch) -> dict[str, PairLogps]:
    with torch.no_grad():
        return {q: concatenated_forward(model, batch) for q, model in models.items()}


def per_token_deviation(out: PairLogps, base: PairLogps) -> torch.Tensor:
    """(2B,) |Δ logp| / response tokens of every chosen and rejected sequence."""
    delta = torch.cat([out.chosen_logps - base.chosen_logps, out.rejected_logps - base.rejected_logps]).abs()
    return delta / torch.cat([base.chosen_counts, base.rejected_counts]).clamp(min=1)


@pytest.mark.parametrize("quantization", LEVELS)
def test_reference_is_frozen_and_in_eval_mode(models, quantization):
    model = models[quantization]
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("quantization, dtype, bytes_per_weight", [("8bit", torch.int8, 1.0),
                                                                    ("4bit", torch.uint8, 0.5)])
def test_linear_weights_are_stored_quantized(models, quantization, dtype, bytes_per_weight):
    import bitsandbytes as bnb

    layer_type = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
    model = models[quantization]
    quantized, total = quantized_linear_count(model)
    assert quantized == total - 1  # every linear layer but the output head (tied to the float embedding)
    for name, layer in model.named_modules():
        if isinstance(layer, torch.nn.Linear) and name != "lm_head":
            assert isinstance(layer, layer_type), name
            assert layer.weight.dtype == dtype, name
            stored = layer.weight.numel() * layer.weight.element_size()
            assert stored == layer.out_features * layer.in_features * bytes_per_weight, name
    assert model.lm_head.weight.dtype == torch.float32


def test_memory_counts_quantization_statistics(models):
    """Float: params + buffers. 8-bit: 1 byte per linear weight + a float32 scale per output row."""
    float_model, int8_model = models["none"], models["8bit"]
    assert model_memory_bytes(float_model) == float_model.get_memory_footprint()
    linears = [m for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    weights = sum(m.out_features * m.in_features for m in linears)
    rows = sum(m.out_features for m in linears)
    assert model_memory_bytes(int8_model) == model_memory_bytes(float_model) - 3 * weights + 4 * rows


def test_quantized_memory_is_smaller(models):
    """Tiny model (34k params, 40% in the float embedding): 8-bit ≈ 0.57 of float32, 4-bit ≈ 0.49."""
    full = model_memory_bytes(models["none"])
    ratio_8 = model_memory_bytes(models["8bit"]) / full
    ratio_4 = model_memory_bytes(models["4bit"]) / full
    assert 0.45 < ratio_8 < 0.65
    assert 0.35 < ratio_4 < ratio_8


@pytest.mark.parametrize("quantization, bound", [("8bit", 2e-3), ("4bit", 3e-2)])
def test_logps_close_to_float32_but_not_identical(logps, quantization, bound):
    """Mean |Δ logp| per response token vs float32, nats.

    Measured on the seeded tiny model: 8-bit 1.6e-4 (max 3e-4), 4-bit 3.8e-3 (max 9.5e-3), against
    |logp| ≈ 6.0 per token (near-uniform over 431 tokens). The bounds leave ~10x margin and are still
    far below a 0.1-nat shift that would move DPO margins; 4-bit (also bf16 activations on CPU) must
    deviate more than 8-bit, and both must deviate (quantization really happened).
    """
    deviation = per_token_deviation(logps[quantization], logps["none"])
    assert deviation.mean() < bound
    assert deviation.mean() > 1e-5
    assert torch.isfinite(logps[quantization].chosen_logps).all()
    if quantization == "4bit":
        assert deviation.mean() > per_token_deviation(logps["8bit"], logps["none"]).mean()


def test_unknown_quantization_names_the_config_key(assets):
    with pytest.raises(UserInputError, match="model.reference_quantization"):
        load_reference_model(str(assets / "model"), quantization="2bit")  # type: ignore[arg-type]


def test_missing_bitsandbytes_is_a_user_error(assets, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(UserInputError, match="model.reference_quantization.*bitsandbytes"):
        load_reference_model(str(assets / "model"), quantization="4bit")


@pytest.mark.parametrize("level", ["8bit", "4bit"])
def test_dpo_module_with_a_quantized_live_reference(assets, level) -> None:
    """`model.reference_quantization` loads the frozen reference quantized; the step loss stays near ln 2."""
    import math

    from datamodules import PreferenceDataModule
    from lightning_modules.dpo import DPOModule

    module = DPOModule(str(assets / "model"), reference_quantization=level)
    module.configure_model()
    assert quantized_linear_count(module.reference.model)[0] > 0
    assert all(not p.requires_grad for p in module.reference.parameters())
    dm = PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"), batch_size=4)
    dm.setup("fit")
    loss, metrics = module.model_step(next(iter(dm.train_dataloader())), "train")
    assert loss.item() != pytest.approx(math.log(2), abs=1e-7)  # the reference really is a different (quantized) model
    assert loss.item() == pytest.approx(math.log(2), abs=0.05)  # ... but close to the policy it was made from
    assert not any(p.grad is not None for p in module.reference.parameters())




def test_multi_reference_module_with_quantized_live_references(assets) -> None:
    """K = 2 live references in 8-bit: both quantized, frozen, and scored into (B, 2) columns near the float ones."""
    from datamodules import PreferenceDataModule
    from lightning_modules.logprobs import sequence_logps
    from lightning_modules.multiref import MultiReferenceModule

    module = MultiReferenceModule(str(assets / "model"), reference="live", reference_quantization="8bit",
                                  live_references=[str(assets / "model")] * 2)
    module.configure_model()
    assert all(quantized_linear_count(ref.model)[0] > 0 for ref in module.reference.references)
    dm = PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"), batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    columns = module.reference.columns(batch)
    assert columns["ref_chosen_logps"].shape == (4, 2)
    assert torch.equal(columns["ref_chosen_counts"][:, 0], (batch["chosen_labels"][:, 1:] != -100).sum(-1))
    with torch.no_grad():
        exact = module.policy(input_ids=batch["chosen_input_ids"],  # the float policy is the float reference
                              attention_mask=batch["chosen_attention_mask"]).logits
    float_logps = sequence_logps(exact, batch["chosen_labels"])[0]
    torch.testing.assert_close(columns["ref_chosen_logps"][:, 0], float_logps, atol=0.5, rtol=0.02)
    assert not torch.equal(columns["ref_chosen_logps"][:, 0], float_logps)  # really the quantized model


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    """A tiny Llama whose down_proj (in_features 128: two 64-weight blocks per row) takes bnb's fused CPU kernel."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("wide") / "model"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_4bit_state_dict_round_trip(wide_model) -> None:
    """`state_dict()` (each checkpoint) leaves a CPU 4-bit model intact, and loads strictly into a fresh one.

    bnb 0.50.2 alone fails both: saving a layer repacked for the fused AVX512-BF16 kernel scrambles its
    absmax blocks (logits moved by 2e-2 on this model), and loading rejects the absmax /
    code-book keys it saved.
    """
    import bitsandbytes.functional as F

    model = load_reference_model(str(wide_model), quantization="4bit", device="cpu")
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        logits = model(ids).logits
        assert getattr(down.weight.quant_state, "packing_format_for_cpu", False) == F.has_avx512bf16()
        state = model.state_dict()
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=0)
    fresh = load_reference_model(str(wide_model), quantization="4bit", device="cpu")
    key = "model.layers.0.mlp.down_proj.weight.absmax"
    fresh.load_state_dict({**state, key: state[key] * 2}, strict=True)
    torch.testing.assert_close(fresh.model.layers[0].mlp.down_proj.weight.quant_state.absmax, state[key] * 2)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, logits, rtol=0, atol=1e-6)  # the kernel's bf16 absmax kept
