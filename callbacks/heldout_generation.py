"""`HeldOutGeneration`: the base of callbacks that generate greedily for held-out prompts at validation end."""

from __future__ import annotations

import lightning as L

from datamodules.prompts import load_prompts
from lightning_modules.models.generation import generate_with_datamodule


class HeldOutGeneration(L.Callback):
    """Loads the first `num_prompts` prompts of `prompts_path` once; `generate` answers them with the policy."""

    def __init__(self, prompts_path: str, num_prompts: int, max_new_tokens: int):
        self.prompts_path = prompts_path
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens
        self._prompts: list | None = None

    @property
    def prompts(self) -> list:
        if self._prompts is None:
            self._prompts = load_prompts(self.prompts_path, self.num_prompts)
        return self._prompts

    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[str]:
        """Greedy responses of `pl_module.policy` to `self.prompts`, rendered with the data module's template."""
        return generate_with_datamodule(trainer, pl_module.policy, self.prompts, max_new_tokens=self.max_new_tokens)
