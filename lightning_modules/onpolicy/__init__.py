"""On-policy preference fine-tuning (SPEC section 5): sample from the current policy, score, train.

    module.py    `OnPolicyModule`: sampling rounds, sample reuse, offline mixing, logging, resume state
    sampler.py   `Sampling` settings and `sample_responses`: n seeded samples per prompt as training rows
    buffer.py    `SampleRound`: one round's samples, rewards, reference log-probs and pairs (checkpointed)
    pairs.py     `build_pairs` / `gather_pairs`: DPO / IPO pairs from N scored samples per prompt;
                 `RunningBaseline`: the EMA reward baseline of REINFORCE (`baseline="running"`)

The objectives on samples (filtered_bc, bon_negative, rwr, awr, reinforce) are in
`lightning_modules.objectives.sampled`; the pairwise ones (sigmoid, ipo, ...) train on the built pairs.
The reward functions are in `lightning_modules.rewards`.
"""

from lightning_modules.onpolicy.buffer import SampleRound
from lightning_modules.onpolicy.module import OnPolicyModule
from lightning_modules.onpolicy.pairs import PairMode, RunningBaseline, SampledPairs, build_pairs, gather_pairs
from lightning_modules.onpolicy.sampler import Sampling, sample_responses

__all__ = ["OnPolicyModule", "PairMode", "RunningBaseline", "SampleRound", "SampledPairs", "Sampling", "build_pairs",
           "gather_pairs", "sample_responses"]
