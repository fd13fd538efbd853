"""LoRA / QLoRA policies (peft): exact at init, only adapters train, the reference is the base with adapters off."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from callbacks.export_pretrained import ExportPretrained, export_pretrained
from datamodules import PreferenceDataModule
from datamodules.utils.errors import UserInputError
from lightning_modules.dpo import DPOModule
from lightning_modules.logprobs import concatenated_forward
from lightning_modules.models.adapters import LoraSpec, adapters_disabled, apply_lora, merged_copy, \
    merged_state_dict
from lightning_modules.references.providers import AdapterOffReference

SPEC = LoraSpec(r=4, alpha=8.0)
QLORA = LoraSpec(r=4, alpha=8.0, base_quantization="4bit")


@pytest.fixture(scope="module")
def batch(assets: Path) -> dict:
    dm = PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"), batch_size=4, shuffle=False)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def base_model(assets: Path):
    return AutoModelForCausalLM.from_pretrained(assets / "model").eval()


def base_name(peft_name: str) -> str:
    """`base_model.model.X.q_proj.base_layer.weight` (peft) → `X.q_proj.weight` (the plain model)."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def test_fresh_adapters_change_nothing_and_only_they_train(assets, batch) -> None:
    base, adapted = base_model(assets), apply_lora(base_model(assets), SPEC)
    assert isinstance(adapted, PeftModel)
    ids = batch["chosen_input_ids"]
    torch.testing.assert_close(adapted(ids).logits, base(ids).logits, rtol=0, atol=0)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    layers = [m for m in adapted.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 7 * adapted.config.num_hidden_layers  # q k v o gate up down in every block
    assert all((m.lora_B["default"].weight == 0).all() for m in layers)  # B = 0: the update starts at zero
    with pytest.raises(UserInputError, match="target_modules"):
        apply_lora(base_model(assets), LoraSpec(target_modules=("nope",)))


def test_lora_dpo_reference_is_the_base_model_without_a_copy(assets, batch) -> None:
    module = DPOModule(str(assets / "model"), lora=SPEC, beta=0.1)
    module.configure_model()
    assert isinstance(module.policy, PeftModel)
    assert isinstance(module.reference, AdapterOffReference)
    assert list(module.reference.parameters()) == []  # no second copy of the weights
    n_params = sum(p.numel() for p in module.parameters())
    n_base = sum(p.numel() for p in base_model(assets).parameters())
    n_lora = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    assert n_lora == sum(4 * (m.in_features + m.out_features) for m in module.policy.modules()
                         if isinstance(m, LoraLayer))  # r (in + out) per adapted layer
    assert n_params == n_base + n_lora
    loss, _ = module.model_step(batch, "train")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference at step 0

    optimizer = torch.optim.SGD([p for p in module.policy.parameters() if p.requires_grad], lr=1.0)
    module.policy.train()
    loss.backward()
    optimizer.step()
    assert module.policy.training  # the reference pass restores the policy's mode
    ref_chosen, _ = module.reference(batch)
    assert module.policy.training and all(m.training for m in module.policy.modules())
    base_chosen = concatenated_forward(base_model(assets), batch).chosen_logps
    policy_chosen = concatenated_forward(module.policy.eval(), batch).chosen_logps
    torch.testing.assert_close(ref_chosen, base_chosen, rtol=0, atol=1e-5)  # adapters off == the base model
    assert (policy_chosen - base_chosen).abs().max() > 1e-4  # the adapters did move the policy


def test_merged_export_loads_as_a_plain_model(assets, batch, tmp_path) -> None:
    model = apply_lora(base_model(assets), SPEC)
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(param, std=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = batch["chosen_input_ids"]
    expected = model(ids).logits
    export_pretrained(model, None, tmp_path / "export")
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert "config.json" in files and not any(f.startswith("adapter_") for f in files)  # no adapter files
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not any(isinstance(m, LoraLayer) for m in reloaded.modules())
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-5)
    # merging copied: the live model still has its adapters, unmerged, and every weight as before
    assert isinstance(model, PeftModel) and any(isinstance(m, LoraLayer) for m in model.modules())
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLayer))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, before[name], rtol=0, atol=0, msg=name)
    with adapters_disabled(model):
        torch.testing.assert_close(model(ids).logits, base_model(assets)(ids).logits, rtol=0, atol=0)
    assert not any(isinstance(m, LoraLayer) for m in merged_copy(model).modules())


def test_adapters_depend_on_the_seed_only(assets) -> None:
    """The same seed gives the same A whatever the RNG drew before (strategies draw differently while
    loading), another seed another A, and B = 0."""
    torch.manual_seed(0)
    first = {n: p.detach().clone() for n, p in apply_lora(base_model(assets), SPEC, seed=7).named_parameters()
             if "lora_" in n}
    torch.rand(1000)  # another position in the stream
    second = dict(apply_lora(base_model(assets), SPEC, seed=7).named_parameters())
    other = dict(apply_lora(base_model(assets), SPEC, seed=8).named_parameters())
    for name, value in first.items():
        assert torch.equal(second[name], value), name
        assert (value == 0).all() if ".lora_B." in name else value.abs().max() > 0
    a = next(n for n in first if ".lora_A." in n)
    assert not torch.equal(other[a], first[a])


def test_merged_state_dict_equals_peft_merge(assets, batch) -> None:
    """The merge used for ZeRO-3 exports (from a full state dict, no model copy) equals peft's merge_and_unload."""
    model = apply_lora(base_model(assets), LoraSpec(r=4, alpha=8.0, target_modules=("q_proj", "down_proj")))
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(param, std=0.05)
    merged = merged_state_dict(model, model.state_dict())
    expected = merged_copy(model).state_dict()
    assert merged.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)
    plain = base_model(assets)
    assert sum(not torch.equal(merged[k], v) for k, v in plain.state_dict().items()) == 2 * plain.config.num_hidden_layers


def test_lora_training_leaves_the_base_weights_untouched(assets, tmp_path) -> None:
    dm = PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"), batch_size=4, val_split=None)
    module = DPOModule(str(assets / "model"), lora=SPEC,
                       optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in module.policy.named_parameters() if "lora_" in n}
    base = dict(base_model(assets).named_parameters())
    frozen = [(n, p) for n, p in module.policy.named_parameters() if "lora_" not in n]
    assert len(frozen) == len(base)
    for name, param in frozen:
        torch.testing.assert_close(param, base[base_name(name)], rtol=0, atol=0, msg=name)
    assert module.reference.forward_calls == 3


# ---- QLoRA: 4-bit nf4 base (bitsandbytes CPU backend), LoRA on top ----------------------------------------


def quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every bitsandbytes tensor of `model`: packed nf4 codes (uint8) and their per-block absmax."""
    import bitsandbytes as bnb

    state = {}
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            state[f"{name}.weight"] = layer.weight.data.clone()
            state[f"{name}.absmax"] = layer.weight.quant_state.absmax.clone()
    return state


class LossLog(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].item())


def test_qlora_trains_adapters_on_a_frozen_4bit_base(assets, batch, tmp_path) -> None:
    """DPO on one fixed batch, 8 AdamW steps (lr 1e-2): the loss leaves ln 2 and falls; nf4 storage is untouched.

    Measured on the tiny model: loss 0.6931 at the first step -> 0.6301 at the eighth (warmup-decay; the
    same run on the float base: 0.6253); the 4-bit base takes 68,288 bytes against 137,792
    in float32 (0.50: the float embedding / tied output head is 40% of this model's weights), plus
    17,408 bytes of float32 adapters.
    """
    bnb = pytest.importorskip("bitsandbytes")
    from lightning_modules.models.quantization import load_quantized_causal_lm, model_memory_bytes

    torch.manual_seed(0)  # the adapters' A init, hence the loss curve
    module = DPOModule(str(assets / "model"), lora=QLORA, beta=0.1,
                       optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2))
    log = LossLog()
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[log, ExportPretrained(str(tmp_path / "export"))])
    module.configure_model()  # before fit, to snapshot the freshly quantized base
    policy = module.policy
    assert isinstance(policy, PeftModel) and isinstance(module.reference, AdapterOffReference)
    base_layers = [m.base_layer for m in policy.modules() if isinstance(m, LoraLayer)]
    assert len(base_layers) == 14 and all(isinstance(m, bnb.nn.Linear4bit) for m in base_layers)
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.quant_type == "nf4" for m in base_layers)
    lora_bytes = sum(p.numel() * p.element_size() for n, p in policy.named_parameters() if "lora_" in n)
    assert model_memory_bytes(policy) - lora_bytes < 0.55 * model_memory_bytes(base_model(assets))
    before = quantized_state(policy)

    same_batch = torch.utils.data.DataLoader([batch] * 8, batch_size=None)  # the one batch, 8 times
    trainer.fit(module, train_dataloaders=same_batch)

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in policy.named_parameters() if "lora_" in n}
    assert log.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # fresh adapters: policy == its 4-bit base
    assert log.losses[-1] < log.losses[4] < log.losses[0] - 0.03  # still falling in the second half
    after = quantized_state(policy)
    assert after.keys() == before.keys()
    for name in before:  # bit-identical nf4 codes and absmax (bnb's CPU repacking never ran)
        assert torch.equal(after[name], before[name]), name

    # reference = adapters off = the 4-bit base model, loaded on its own
    base_4bit = load_quantized_causal_lm(str(assets / "model"), quantization="4bit", device="cpu",
                                         cpu_fused_kernel=False).eval()
    with torch.no_grad():
        expected = concatenated_forward(base_4bit, batch).chosen_logps
        policy_chosen = concatenated_forward(policy.eval(), batch).chosen_logps
    ref_chosen, _ = module.reference(batch)
    torch.testing.assert_close(ref_chosen, expected, rtol=0, atol=1e-5)
    assert (policy_chosen - ref_chosen).abs().max() > 1e-3  # ... while the policy moved

    # the export is a plain float model: dequantized nf4 base + merged adapters == the trained policy
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not any(isinstance(m, (LoraLayer, bnb.nn.Linear4bit)) for m in reloaded.modules())
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert not any(p.name.startswith("adapter_") for p in (tmp_path / "export").iterdir())
    ids = batch["chosen_input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, policy(ids).logits, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(t, after[n]) for n, t in quantized_state(policy).items())  # export left the policy as is

    # a checkpoint's state dict (4-bit base with bnb's statistics + adapters) loads strictly into a fresh module
    fresh = DPOModule(str(assets / "model"), lora=QLORA, beta=0.1)
    fresh.configure_model()
    fresh.load_state_dict(module.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.policy.eval()(ids).logits, policy(ids).logits, rtol=0, atol=0)
