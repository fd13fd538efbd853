"""OnPolicyModule: sampling rounds, pairs with the right reference log-probs, sample reuse, mixing, resume.

Everything runs on the session's tiny synthetic-task model; the reward is the synthetic task's own
(or a length reward), so samples really differ in reward.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from datamodules import PreferenceDataModule
from datamodules.tokenize import IGNORE_INDEX, load_tokenizer
from datamodules.utils.errors import UserInputError
from lightning_modules.dpo import DPOModule
from lightning_modules.logprobs import sequence_logps
from lightning_modules.objectives import AWR, RWR, BoNNegative, FilteredBC, Reinforce, Sigmoid
from lightning_modules.onpolicy.module import OnPolicyModule
from lightning_modules.onpolicy.sampler import Sampling, prompt_ids_of, sample_responses
from lightning_modules.rewards import MinLength, ModeLength, Synthetic
from resume_helper import assert_resumes_exactly

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)
SAMPLING = Sampling(num_samples=3, max_new_tokens=8)


def make_dm(assets: Path, **kwargs) -> PreferenceDataModule:
    return PreferenceDataModule(str(assets / "data/prefs"), str(assets / "model"),
                                **{"batch_size": 4, "eval_batch_size": 4, "max_length": 64, "return_prompts": True,
                                   "shuffle": False, **kwargs})


def module(assets: Path, **kwargs) -> OnPolicyModule:
    options = {"reward": Synthetic(), "sampling": SAMPLING, "optimizer": ADAMW, **kwargs}
    return OnPolicyModule(str(assets / "model"), **options)


def fit(module_: L.LightningModule, dm: PreferenceDataModule, steps: int = 3) -> list[float]:
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[Record()])
    trainer.fit(module_, datamodule=dm)
    return losses


@pytest.fixture(scope="module")
def batch(assets: Path) -> dict:
    dm = make_dm(assets)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_samples_are_seeded_laid_out_and_cut_at_eos(assets: Path, batch) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets / "model")
    tokenizer = load_tokenizer(str(assets / "model"))
    prompts = prompt_ids_of(batch)
    assert all(batch["chosen_input_ids"][i, :len(p)].tolist() == p for i, p in enumerate(prompts))
    draw = functools.partial(sample_responses, model, prompts, SAMPLING, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    first, again, other = draw(seed=1), draw(seed=1), draw(seed=2)
    assert first.responses == again.responses and first.responses != other.responses
    assert first.input_ids.shape[0] == len(prompts) * 3
    for row, response in enumerate(first.responses):
        prompt = prompts[row // 3]  # rows p·n + j are prompt p's samples
        assert first.input_ids[row, :len(prompt)].tolist() == prompt
        labelled = first.labels[row][first.labels[row] != IGNORE_INDEX].tolist()
        assert labelled == response and 1 <= len(response) <= SAMPLING.max_new_tokens
        assert tokenizer.eos_token_id not in response[:-1]  # cut right after the first EOS
        assert int(first.attention_mask[row].sum()) == len(prompt) + len(response)


def test_round_pairs_carry_the_reference_log_probs_of_their_samples(assets: Path, batch) -> None:
    """Each pair's reference log-probs are the reference's, on that very sample, computed unpadded one by one."""
    policy = module(assets, pairs="all", reward=MinLength(max_length=8, unit="words"))
    policy.configure_model()
    policy._trainer = None
    with torch.no_grad():  # make the reference differ from the policy, so a mix-up would show
        for p in policy.reference.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.datamodule = make_dm(assets)  # what sample_round reads: tokenizer
    trainer.datamodule.setup("fit")
    policy.trainer = trainer
    round_, metrics = policy.sample_round(batch, index=0, seed=3)
    n = round_.num_samples
    for p, c, r in zip(round_.pairs.prompt.tolist(), round_.pairs.chosen.tolist(), round_.pairs.rejected.tolist()):
        assert round_.rewards[p, c] > round_.rewards[p, r]
        for j in (c, r):
            row = p * n + j
            length = int(round_.attention_mask[row].sum())
            with torch.no_grad():
                logits = policy.reference.model(input_ids=round_.input_ids[row:row + 1, :length]).logits
            expected = sequence_logps(logits, round_.labels[row:row + 1, :length])[0]
            torch.testing.assert_close(round_.ref_logps[p, j], expected[0], atol=1e-5, rtol=0)
    assert 0 < metrics["samples/pairs_kept"] <= 1
    assert metrics["samples/reward_mean"] == pytest.approx(float(round_.rewards.mean()))


def test_reuse_samples_once_per_iterations_per_batch(assets: Path) -> None:
    policy = module(assets, iterations_per_batch=2)
    fit(policy, make_dm(assets), steps=5)
    assert policy.rounds_sampled == 3  # steps 1-2, 3-4, 5
    assert policy.round.uses == 1 and policy.round.index == 2


class RecordingReinforce(Reinforce):
    """Reinforce that records, per call, the mean reward of its samples and the running baseline it was given
    (in a class attribute: the instance's attributes are the objective's options)."""

    calls: list[tuple[float, float]] = []

    def __call__(self, logps, rewards, ref_logps=None, **kwargs):
        self.calls.append((float(rewards.mean()), kwargs["running_baseline"]))
        return super().__call__(logps, rewards, ref_logps, **kwargs)


def test_running_baseline_steps_once_per_round_not_per_reuse(assets: Path) -> None:
    """Reuse 2: a round's steps share one baseline, the EMA of the rounds before it (round 0: its own mean), and the
    EMA folds in each round once: after rounds 0 and 1 it is 0.9·m0 + 0.1·m1, not 0.81·m0 + 0.19·m1."""
    objective = RecordingReinforce(baseline="running")
    objective.calls.clear()
    policy = module(assets, objective=objective, iterations_per_batch=2, reward=MinLength(max_length=8))
    fit(policy, make_dm(assets), steps=4)
    (m0, b0), (m0_again, b1), (m1, b2), (m1_again, b3) = objective.calls
    assert (m0_again, m1_again) == (m0, m1) and m0 != m1  # steps 2 and 4 reuse the round of steps 1 and 3
    assert [b0, b1, b2, b3] == pytest.approx([m0, m0, m0, m0], abs=1e-6)
    assert policy.baseline.value == pytest.approx(0.9 * m0 + 0.1 * m1, abs=1e-6)


def test_mixing_ratio_one_trains_exactly_as_offline_dpo(assets: Path) -> None:
    """m = 1: the on-policy term has weight 0, so the run is offline DPO on the same batches, loss for loss
    (sampling draws from its own seeded generator and leaves the training RNG alone)."""
    mixed = fit(module(assets, mixing_ratio=1.0), make_dm(assets))
    offline = fit(DPOModule(str(assets / "model"), optimizer=ADAMW), make_dm(assets))
    assert mixed == pytest.approx(offline, abs=1e-6, rel=0)
    assert mixed[0] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("objective", [FilteredBC(), BoNNegative(negatives="mean"), RWR(), AWR(),
                                       Reinforce(baseline="running")], ids=lambda o: type(o).__name__)
def test_every_sampled_objective_trains(assets: Path, objective) -> None:
    losses = fit(module(assets, objective=objective, reward=MinLength(max_length=8)), make_dm(assets), steps=2)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_bad_settings_are_named(assets: Path) -> None:
    with pytest.raises(UserInputError, match="model.reward"):
        OnPolicyModule(str(assets / "model"))
    with pytest.raises(UserInputError, match="model.reference='cached'"):
        module(assets, reference="cached")
    with pytest.raises(UserInputError, match="model.iterations_per_batch=0"):
        module(assets, iterations_per_batch=0)
    with pytest.raises(UserInputError, match="return_prompts"):
        fit(module(assets), make_dm(assets, return_prompts=False), steps=1)


def test_on_policy_training_resumes_exactly(assets: Path, tmp_path: Path) -> None:
    """A checkpoint in the middle of a round (reuse 3, checkpoint every 4 steps) holds the round's samples, the
    round counter, the running baseline and the reward's state (ModeLength's mode, estimated from the SFT
    policy at fit start): the resumed run trains on exactly the same samples with the same rewards."""
    assert_resumes_exactly(lambda: module(assets, objective=Reinforce(baseline="running"), iterations_per_batch=3,
                                          reward=ModeLength(max_length=8, num_prompts=4, samples_per_prompt=2)),
                           lambda: make_dm(assets), tmp_path, steps=8, every=4)
    losses = assert_resumes_exactly(lambda: module(assets, iterations_per_batch=3, reward=MinLength(max_length=8)),
                                    lambda: make_dm(assets), tmp_path / "dpo", steps=8, every=4)
    assert len(set(losses.values())) > 1 and all(v > 0 for v in losses.values())  # real pairs, not zero losses


@pytest.mark.slow
def test_zero3_sampling_equals_ddp(assets: Path, tmp_path: Path) -> None:
    """On-policy DPO on 2 CPU processes: each rank samples its own prompts with its own seed; under ZeRO-3
    (every weight partitioned, `generate` with synced ranks) the run equals the DDP run."""
    from deepspeed_cpu import fit_two_ranks, zero_strategy
    from safetensors.torch import load_file
    from test_configs import REPO, write_localized

    config = write_localized(REPO / "configs/quickstart/dpo.yaml", assets, tmp_path)
    extra = ["--model.class_path=lightning_modules.onpolicy.OnPolicyModule", "--model.init_args.objective=Sigmoid",
             "--model.init_args.reward={class_path: lightning_modules.rewards.MinLength, init_args: {max_length: 8}}",
             "--model.init_args.sampling={num_samples: 3, max_new_tokens: 8}", "--model.init_args.reference=live",
             "--data.init_args.return_prompts=true", "--data.init_args.batch_size=2", "--trainer.max_steps=3"]
    exports = {}
    for name, strategy in (("ddp", "ddp"), ("zero3", zero_strategy(3))):
        export = tmp_path / f"export_{name}"
        run = fit_two_ranks(config, tmp_path, strategy, export=export, extra=extra)
        assert run.returncode == 0, f"{name}: {run.tail()}"
        exports[name] = load_file(export / "model.safetensors")
    initial = load_file(assets / "model/model.safetensors")
    assert max((exports["ddp"][k] - initial[k]).abs().max().item() for k in initial) > 1e-3
    for key, value in exports["ddp"].items():
        torch.testing.assert_close(exports["zero3"][key], value, atol=1e-5, rtol=0, msg=key)


def test_reward_model_scores_the_samples_and_texts_reach_tensorboard(assets: Path, tmp_path: Path) -> None:
    """An HF sequence-classification reward model (tiny, random, its own copy of the tokenizer) scores each round;
    the round's texts, their rewards and the sample metrics are in the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from lightning_modules.rewards import RewardModel
    from lightning_modules.runtime import RunLogger

    folder = tmp_path / "reward_model"
    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, initializer_range=1.0)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    policy = module(assets, reward=RewardModel(str(folder)), log_samples_every=1)
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=RunLogger(root_dir=str(tmp_path / "runs")),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1)
    trainer.fit(policy, datamodule=make_dm(assets))
    rewards = policy.round.rewards
    assert rewards.shape == (4, 3) and len(set(rewards.flatten().tolist())) > 1  # a real model: distinct scores
    events = EventAccumulator(str(tmp_path / "runs" / "latest"), size_guidance={"tensors": 0}).Reload()
    texts = [e for e in events.Tensors("train/samples/text_summary")]
    assert [e.step for e in texts] == [0, 1]  # one per round
    assert "reward" in texts[0].tensor_proto.string_val[0].decode()
    assert {"train/samples/reward_mean", "train/samples/pairs_kept", "train/kl"} <= set(events.Tags()["scalars"])
