"""`GenerationReward`: score the policy's greedy generations with a reward program during validation.

Logs `val/generation/reward` (mean reward) and `val/generation/length` (mean words per response),
and a few prompt → response samples as TensorBoard text.
"""

from __future__ import annotations

import lightning as L

from callbacks.heldout_generation import HeldOutGeneration
from lightning_modules.models.generation import RewardFn


class GenerationReward(HeldOutGeneration):
    """Greedy generations on held-out prompts, scored by `reward`, every validation epoch."""

    def __init__(self, reward: RewardFn, prompts_path: str, num_prompts: int = 64, max_new_tokens: int = 32,
                 num_samples_logged: int = 4):
        """Generation evaluation.

        Args:
            reward: callable (prompts, responses) -> rewards, e.g. datamodules.synthetic.SyntheticReward.
            prompts_path: JSONL file of {"prompt": ...} rows to generate from.
            num_prompts: how many of those prompts to use (the first N).
            max_new_tokens: generation budget per response.
            num_samples_logged: prompt/response pairs written to TensorBoard as text.
        """
        super().__init__(prompts_path, num_prompts, max_new_tokens)
        self.reward = reward
        self.num_samples_logged = num_samples_logged

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        responses = self.generate(trainer, pl_module)
        rewards = list(self.reward(self.prompts, responses))
        lengths = [len(r.split()) for r in responses]
        pl_module.log("val/generation/reward", sum(rewards) / len(rewards), sync_dist=True)
        pl_module.log("val/generation/length", sum(lengths) / len(lengths), sync_dist=True)
        experiment = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            lines = [f"**{p}** → `{r}` (reward {w:.2f})" for p, r, w in
                     zip(self.prompts, responses, rewards)][: self.num_samples_logged]
            experiment.add_text("val/generation/samples", "\n\n".join(lines), trainer.global_step)
