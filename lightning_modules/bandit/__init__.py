"""The on-policy study's categorical bandit (SPEC section 5); its environment is `datamodules.bandit`.

    policy.py   `BanditPolicy` (the paper's MLP, contexts → action log-probs), the exact KL / entropy /
                expected reward of a categorical policy, seeded sampling, and the pre-fit to π_data
    module.py   `BanditModule`: offline or on-policy rounds of N sampled actions per context, any
                sampled or pairwise objective, the resume contract
"""

from lightning_modules.bandit.module import BanditModule
from lightning_modules.bandit.policy import BanditPolicy, entropy, expected_reward, fit_to, kl_to, sample_actions

__all__ = ["BanditModule", "BanditPolicy", "entropy", "expected_reward", "fit_to", "kl_to", "sample_actions"]
