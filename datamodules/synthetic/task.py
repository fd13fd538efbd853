"""The synthetic instruction task of the embedded default: prompts, demonstrator, rewards, rows.

Two prompt families, words separated by single spaces:

- ``count {a} to {b}`` with ``a`` in 0..39 and length ``n = b - a + 1`` in 3..6; target
  ``"a a+1 ... b"``.
- ``repeat {word} {n} times`` with ``n`` in 2..5 and ``word`` from :data:`WORDS`; target
  ``"word word ... word"`` (``n`` times).

The demonstrator is a noisy teacher: it drops the last element with probability
``early_stop_prob`` and then appends :data:`FILLER` with probability ``filler_prob``. With the
defaults its mode (what greedy decoding of a well-fitted SFT model produces) is
``target + " hope this helps"``, which is *not* the optimum of either reward, so SFT alone is
clearly suboptimal and preference optimization has something to fix (SPEC section 9).

Rewards are programs of ``(prompt, response)`` in [0, 1]:

- ``aligned``: positional word match against the target (optimum = target, which the
  demonstrator produces 28% of the time with the defaults);
- ``unaligned`` (``min_length``, SPEC section 5): ``max(0, 1 - words / max_words)``, optimum =
  the empty response, which the demonstrator never produces (a low-likelihood optimum).

Pure Python (no torch): everything is seeded through :mod:`hashlib`, never Python's ``hash()``.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Literal, Mapping

Split = Literal["train", "validation", "test"]
Variant = Literal["aligned", "unaligned"]
SPLITS: tuple[str, ...] = ("train", "validation", "test")
VARIANTS: tuple[str, ...] = ("aligned", "unaligned")
WORDS: tuple[str, ...] = (
    "cat", "dog", "sun", "car", "hat", "cup", "box", "pen", "egg", "map", "key", "bed",
    "bus", "fan", "jar", "owl", "pig", "fox", "bee", "cow", "ant", "toy", "net", "bag",
)  # fmt: skip
FILLER = "hope this helps"
TEST_FRACTION = 0.15  # approximate share of prompts held out as `test` (by stable hash)
MAX_RESAMPLES = 20  # draws per prompt to find two demonstrations with different rewards


@lru_cache(maxsize=1)
def all_prompts() -> Mapping[str, str]:
    """Every task prompt mapped to its target answer (read-only, 256 entries)."""
    table: dict[str, str] = {}
    for a in range(40):
        for n in range(3, 7):
            table[f"count {a} to {a + n - 1}"] = " ".join(str(i) for i in range(a, a + n))
    for word in WORDS:
        for n in range(2, 6):
            table[f"repeat {word} {n} times"] = " ".join([word] * n)
    return MappingProxyType(table)


def is_test_prompt(prompt: str) -> bool:
    """Whether ``prompt`` is held out: first 8 bytes of its sha256, mod 10_000, below 15%."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") % 10_000
    return bucket < TEST_FRACTION * 10_000


def target_of(prompt: str) -> str:
    """The correct answer to ``prompt``; raises ``ValueError`` naming it if it is not a task prompt."""
    try:
        return all_prompts()[prompt]
    except KeyError:
        raise ValueError(
            f"not a synthetic-task prompt: {prompt!r} (expected 'count A to B' or "
            f"'repeat WORD N times', single spaces)"
        ) from None


def aligned_reward(prompt: str, response: str) -> float:
    """Positional word match ``matches / max(len(target), len(response))`` (words split on whitespace).

    ``matches`` counts positions ``i`` with ``response[i] == target[i]``; an empty response
    scores 0. Example: target ``3 4 5 6``, response ``3 4 5 6 hope this helps`` -> 4/7.
    """
    target_words, response_words = target_of(prompt).split(), response.split()
    if not response_words:
        return 0.0
    matches = sum(r == t for r, t in zip(response_words, target_words))
    return matches / max(len(target_words), len(response_words))


def min_length_reward(response: str, max_words: int = 16) -> float:
    """``max(0, 1 - len(words) / max_words)``: shorter is better, the empty response is optimal."""
    return max(0.0, 1.0 - len(response.split()) / max_words)


def task_reward(prompt: str, response: str, variant: Variant = "aligned", max_words: int = 16) -> float:
    """Reward of ``response`` to ``prompt`` under ``variant``; ``unaligned`` ignores the prompt."""
    if variant == "aligned":
        return aligned_reward(prompt, response)
    if variant == "unaligned":
        return min_length_reward(response, max_words)
    raise ValueError(f"unknown reward variant {variant!r}; expected one of {VARIANTS}")


def demonstrate(
    prompt: str, rng: random.Random, early_stop_prob: float = 0.2, filler_prob: float = 0.65
) -> str:
    """One noisy demonstration: the target, maybe without its last word, maybe plus :data:`FILLER`.

    Always draws exactly two numbers from ``rng`` so row streams stay aligned across settings.
    """
    words = target_of(prompt).split()
    stop_early, add_filler = rng.random() < early_stop_prob, rng.random() < filler_prob
    if stop_early:
        words = words[:-1]  # targets have >= 2 words, so at least one remains
    if add_filler:
        words = words + FILLER.split()
    return " ".join(words)


def split_rng(seed: int, split: str, purpose: str) -> random.Random:
    """A ``random.Random`` seeded by sha256 of ``(seed, split, purpose)``: stable across runs."""
    digest = hashlib.sha256(f"{seed}/{split}/{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class SyntheticTask:
    """The task with its demonstrator and reward; all rows are a pure function of the fields.

    Splits: ``test`` holds the ~15% of prompts selected by :func:`is_test_prompt` (never seen in
    training, the same for every seed); ``train`` holds the rest. ``validation`` rows are drawn
    from the *train* prompts with a different sampling seed (the split name is part of the
    seed), so they measure fit to the demonstrator, not generalisation to new prompts.
    """

    variant: Variant = "aligned"
    """Which reward scores responses: ``aligned`` (word match) or ``unaligned`` (min length)."""
    seed: int = 0
    """Seed of every sampled row (combined with the split name through sha256)."""
    early_stop_prob: float = 0.2
    """Probability that the demonstrator drops the answer's last element."""
    filler_prob: float = 0.65
    """Probability that the demonstrator appends ``" hope this helps"``."""
    max_words: int = 16
    """Length at which the ``unaligned`` reward reaches 0."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("early_stop_prob", "filler_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {self.max_words}")

    def prompts(self, split: Split) -> list[str]:
        """Sorted prompts of ``split`` (``validation`` shares the ``train`` prompts)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        held_out = split == "test"
        return sorted(p for p in all_prompts() if is_test_prompt(p) == held_out)

    def target(self, prompt: str) -> str:
        """The correct answer; ``ValueError`` naming ``prompt`` if it is not a task prompt."""
        return target_of(prompt)

    def demonstrate(self, prompt: str, rng: random.Random) -> str:
        """One demonstration from the noisy teacher (see :func:`demonstrate`)."""
        return demonstrate(prompt, rng, self.early_stop_prob, self.filler_prob)

    def mode(self, prompt: str) -> str:
        """The demonstrator's most likely response when ``filler_prob > 0.5 > early_stop_prob``."""
        return f"{target_of(prompt)} {FILLER}"

    def optimum(self, prompt: str) -> str:
        """A reward-maximising response: the target (``aligned``) or the empty string (``unaligned``)."""
        return target_of(prompt) if self.variant == "aligned" else ""

    def reward(self, prompt: str, response: str) -> float:
        """Reward in [0, 1] of ``response`` to ``prompt`` under this task's variant."""
        return task_reward(prompt, response, self.variant, self.max_words)

    def sft_rows(self, split: Split, n: int) -> list[dict[str, str]]:
        """``n`` demonstrations ``{"prompt", "response"}`` on uniformly drawn prompts of ``split``."""
        pool, rng = self.prompts(split), split_rng(self.seed, split, "sft")
        rows = []
        for _ in range(n):
            prompt = rng.choice(pool)
            rows.append({"prompt": prompt, "response": self.demonstrate(prompt, rng)})
        return rows

    def preference_rows(self, split: Split, n: int, label_noise: float = 0.1) -> list[dict]:
        """``n`` reward-labelled pairs of demonstrations, a share ``label_noise`` of them flipped.

        Per row: draw a prompt, draw two demonstrations until their rewards differ (at most
        :data:`MAX_RESAMPLES` tries, otherwise skip the prompt), order them by reward, then with
        probability ``label_noise`` swap them (``label_flipped=True``; the reward columns follow
        the swapped texts, so a flipped row has ``chosen_reward < rejected_reward``).
        """
        if not 0.0 <= label_noise <= 1.0:
            raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
        pool, rng = self.prompts(split), split_rng(self.seed, split, "prefs")
        rows: list[dict] = []
        skipped_in_a_row = 0
        while len(rows) < n:
            prompt = rng.choice(pool)
            for _ in range(MAX_RESAMPLES):
                a, b = self.demonstrate(prompt, rng), self.demonstrate(prompt, rng)
                ra, rb = self.reward(prompt, a), self.reward(prompt, b)
                if ra != rb:
                    break
            else:
                skipped_in_a_row += 1
                if skipped_in_a_row > 1000:
                    raise RuntimeError("demonstrations never differ in reward; check the probabilities")
                continue
            skipped_in_a_row = 0
            (chosen, rc), (rejected, rr) = sorted([(a, ra), (b, rb)], key=lambda t: -t[1])
            flipped = rng.random() < label_noise  # always drawn: same pairs for any label_noise
            if flipped:
                (chosen, rc), (rejected, rr) = (rejected, rr), (chosen, rc)
            rows.append({
                "prompt": prompt, "chosen": chosen, "rejected": rejected,
                "chosen_reward": rc, "rejected_reward": rr, "label_flipped": flipped,
            })  # fmt: skip
        return rows

    def prompt_rows(self, split: Split) -> list[dict[str, str]]:
        """One ``{"prompt"}`` row per prompt of ``split``, for generation and evaluation."""
        return [{"prompt": p} for p in self.prompts(split)]


class SyntheticReward:
    """Batched reward function over ``(prompt, response)`` lists, for evaluation and on-policy sampling."""

    def __init__(self, variant: Variant = "aligned", max_words: int = 16) -> None:
        """Build the reward.

        Args:
            variant: ``"aligned"`` (positional word match against the target) or
                ``"unaligned"`` (``min_length``: ``max(0, 1 - words / max_words)``).
            max_words: Response length (in words) at which the ``unaligned`` reward reaches 0.
        """
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant, self.max_words = variant, max_words

    def __call__(self, prompts: list, responses: list[str]) -> list[float]:
        """Rewards in [0, 1], one per ``(prompt, response)`` pair.

        A prompt is the raw instruction, or a message list whose last (user) turn is the instruction.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
        instructions = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
        return [task_reward(p, r, self.variant, self.max_words) for p, r in zip(instructions, responses)]

    def __repr__(self) -> str:
        return f"SyntheticReward(variant={self.variant!r}, max_words={self.max_words})"
