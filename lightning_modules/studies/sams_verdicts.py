"""The SamS study's comparisons and verdict sentences, computed from the per-seed numbers.

    values[noise][metric][method]   per-seed final values; metric: val_accuracy or generation_reward
    flips[noise][method]            {"selected": [...], "chance": [...]}: per seed, the share of flipped-label
                                    pairs among the selected pairs and in the whole batch, averaged over steps

`noise` is a label such as "20%". "Clearly" higher means what it means in the on-policy study
(`onpolicy_verdicts.clearly_above`): the means differ by more than a gap and by two standard errors of the
difference. The three methods the paper compares are named by a `PaperMethods`.
"""

from __future__ import annotations

import statistics
from typing import NamedTuple

from lightning_modules.studies.multiref_study import mean_std
from lightning_modules.studies.onpolicy_verdicts import clearly_above, relation

METRICS = {"val_accuracy": "val reward accuracy", "generation_reward": "generation reward"}
Values = dict[str, dict[str, dict[str, list[float]]]]
Flips = dict[str, dict[str, dict[str, list[float]]]]


class PaperMethods(NamedTuple):
    """The study's names for the paper's three arms: DPO, DPO on a random 50 %, DPO + SamS at ratio 0.5."""

    dpo: str
    random: str
    sams: str


def versus(values: dict[str, list[float]], a: str, b: str, gap: float) -> str:
    """'sams_50 0.912 vs random_50 0.905 (+0.007, no clear difference)'."""
    mean_a, mean_b = statistics.fmean(values[a]), statistics.fmean(values[b])
    return f"{a} {mean_a:.3f} vs {b} {mean_b:.3f} ({mean_a - mean_b:+.3f}, {relation(values[a], values[b], gap)})"


def comparisons(values: Values, paper: PaperMethods, gap: float) -> dict[str, str]:
    """Per noise level, one sentence: SamS vs random-50 %, SamS vs DPO and random-50 % vs DPO, on each metric."""
    out = {}
    for noise, per_metric in values.items():
        parts = [f"{label}: " + "; ".join(versus(per_metric[metric], a, b, gap) for a, b in
                                          ((paper.sams, paper.random), (paper.sams, paper.dpo),
                                           (paper.random, paper.dpo)))
                 for metric, label in METRICS.items()]
        out[noise] = f"{noise} flipped labels, " + ". ".join(parts) + "."
    return out


def fewer_flipped(flips: Flips, gap: float) -> str:
    """'Does SamS pick fewer flipped pairs than chance?', answered per noise level > 0 and method with a scheduler."""
    lines = []
    for noise, per_method in flips.items():
        cells = []
        for method, shares in per_method.items():
            (sel, sel_std), (chance, chance_std) = mean_std(shares["selected"]), mean_std(shares["chance"])
            word = ("clearly fewer" if clearly_above(shares["chance"], shares["selected"], gap) else "clearly more"
                    if clearly_above(shares["selected"], shares["chance"], gap) else "no clear difference")
            cells.append(f"{method} {sel:.3f} ± {sel_std:.3f} vs chance {chance:.3f} ± {chance_std:.3f} "
                         f"({sel - chance:+.3f}, {word})")
        lines.append(f"At {noise} flipped labels, the share of flipped pairs among those trained on: "
                     + "; ".join(cells))
    if not lines:
        return "Does SamS pick fewer flipped pairs than chance? Not measured: no noise level above 0."
    return "Does SamS pick fewer flipped pairs than chance? " + ". ".join(lines) + "."


def tally(cells: list[tuple[str, str]], word: str) -> tuple[str, int]:
    """('Yes' | 'Partly' | 'No', count): how many of the (cell, relation) pairs have relation `word`."""
    count = sum(rel == word for _, rel in cells)
    return ("Yes" if count == len(cells) else "No" if count == 0 else "Partly"), count


def answer(values: Values, paper: PaperMethods, gap: float) -> str:
    """The paper's claim (SamS above DPO, random-50 % below it) against every noise level × metric, plainly.

    Reproduced: SamS clearly above DPO on every noise level and metric; partly: on some; not: on none.
    """
    def cells(a: str, b: str) -> list[tuple[str, str]]:
        out = []
        for noise, per_metric in values.items():
            for metric, label in METRICS.items():
                x, y = per_metric[metric][a], per_metric[metric][b]
                diff = statistics.fmean(x) - statistics.fmean(y)
                out.append((f"{noise} {label} {diff:+.3f} ({relation(x, y, gap)})", relation(x, y, gap)))
        return out

    def said(question: str, found: list[tuple[str, str]], word: str) -> str:
        verdict, count = tally(found, word)
        texts = "; ".join(text for text, _ in found)
        return f"{question} {verdict}: {word} on {count} of {len(found)} (noise level × metric): {texts}."

    over_random, over_dpo = cells(paper.sams, paper.random), cells(paper.sams, paper.dpo)
    random_below = cells(paper.random, paper.dpo)
    claim, count = tally(over_dpo, "clearly higher")
    status = {"Yes": "reproduced", "Partly": f"partly reproduced ({count} of {len(over_dpo)})",
              "No": "not reproduced"}[claim]
    below, _ = tally(random_below, "clearly lower")
    baseline = {"Yes": "holds", "Partly": "holds in part", "No": "does not hold"}[below]
    return " ".join([
        said(f"Does SamS ({paper.sams}) beat random-50% ({paper.random}) here?", over_random, "clearly higher"),
        said(f"Does it beat DPO ({paper.dpo})?", over_dpo, "clearly higher"),
        said("Is random-50% below DPO, as in the paper?", random_below, "clearly lower"),
        f"The paper's claim that SamS beats DPO is {status} here; its finding that random-50% is worse than DPO "
        f"{baseline}."])


def verdicts(values: Values, flips: Flips, paper: PaperMethods, gap: float) -> dict[str, str]:
    """Every finding, one sentence each: per noise level (its comparisons), `flipped`, and `answer`."""
    return {**comparisons(values, paper, gap), "flipped": fewer_flipped(flips, gap),
            "answer": answer(values, paper, gap)}
