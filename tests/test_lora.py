"""LoRA policies: exact at init, only adapters train, the reference is the base model with adapters off."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from callbacks.export_pretrained import export_pretrained
from datamodules import PreferenceDataModule
from lightning_modules.dpo import DPOModule
from datamodules.utils.errors import UserInputError
from lightning_modules.logprobs import concatenated_forward
from lightning_modules.models.adapters import LoraSpec, LoRALinear, adapters_disabled, apply_lora, merged_copy
from lightning_modules.references.providers import AdapterOffReference

SPEC = LoraSpec(r=4, alpha=8.0)


@pytest.fixture(scope="module")
def batch(assets: Path) -> dict:
    dm = PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"), batch_size=4, shuffle=False)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def base_model(assets: Path):
    return AutoModelForCausalLM.from_pretrained(assets / "model").eval()


def test_fresh_adapters_change_nothing_and_only_they_train(assets, batch) -> None:
    base, adapted = base_model(assets), apply_lora(base_model(assets), SPEC)
    ids = batch["chosen_input_ids"]
    torch.testing.assert_close(adapted(ids).logits, base(ids).logits, rtol=0, atol=0)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    layers = [m for m in adapted.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 7 * adapted.config.num_hidden_layers  # q k v o gate up down in every block
    with pytest.raises(UserInputError, match="target_modules"):
        apply_lora(base_model(assets), LoraSpec(target_modules=("nope",)))


def test_lora_dpo_reference_is_the_base_model_without_a_copy(assets, batch) -> None:
    module = DPOModule(str(assets / "model"), lora=SPEC, beta=0.1)
    module.configure_model()
    assert isinstance(module.reference, AdapterOffReference)
    assert list(module.reference.parameters()) == []  # no second copy of the weights
    n_params = sum(p.numel() for p in module.parameters())
    n_base = sum(p.numel() for p in base_model(assets).parameters())
    n_lora = sum(p.numel() for n, p in module.named_parameters() if "lora_" in n)
    assert n_params == n_base + n_lora
    loss, _ = module.model_step(batch, "train")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference at step 0

    optimizer = torch.optim.SGD([p for p in module.policy.parameters() if p.requires_grad], lr=1.0)
    module.policy.train()
    loss.backward()
    optimizer.step()
    assert module.policy.training  # the reference pass restores the policy's mode
    ref_chosen, _ = module.reference(batch)
    base_chosen = concatenated_forward(base_model(assets), batch).chosen_logps
    policy_chosen = concatenated_forward(module.policy.eval(), batch).chosen_logps
    torch.testing.assert_close(ref_chosen, base_chosen, rtol=0, atol=1e-5)  # adapters off == the base model
    assert (policy_chosen - base_chosen).abs().max() > 1e-4  # the adapters did move the policy


def test_merged_export_loads_as_a_plain_model(assets, batch, tmp_path) -> None:
    model = apply_lora(base_model(assets), SPEC)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            torch.nn.init.normal_(layer.lora_B, std=0.02)
    ids = batch["chosen_input_ids"]
    expected = model(ids).logits
    export_pretrained(model, None, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not any(isinstance(m, LoRALinear) for m in reloaded.modules())
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-4, atol=1e-5)
    with adapters_disabled(model):
        torch.testing.assert_close(model(ids).logits, base_model(assets)(ids).logits, rtol=0, atol=0)
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # merging copied, it did not change the model
    assert not any(isinstance(m, LoRALinear) for m in merged_copy(model).modules())


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
    for name, param in module.policy.named_parameters():
        if "lora_" not in name:
            torch.testing.assert_close(param, base[name.replace(".base.", ".")], rtol=0, atol=0, msg=name)
    assert module.reference.forward_calls == 3
