"""The on-policy study's comparisons: rewards at a query budget, curves over seeds, and the verdict sentences.

"Clearly" higher means: the mean exceeds the other's by more than a gap and by two standard errors of the
difference. Methods are any objects with `name`, `on_policy` and `negative_gradient` (`onpolicy_study.StudyMethod`).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Protocol

from lightning_modules.studies.multiref_study import mean_std


class StudyMethod(Protocol):
    name: str
    on_policy: bool
    negative_gradient: bool


def reward_at(run: dict[str, Any], queries: float, start: float) -> float:
    """A run's greedy reward at the last validation that had spent at most `queries` (the SFT reward before any)."""
    spent = [p["reward"] for p in run["curve"] if p["queries"] <= queries]
    return spent[-1] if spent else start


def mean_curve(runs: list[dict[str, Any]], start: float) -> tuple[list[float], list[float]]:
    """Queries and reward averaged over seeds, validation by validation, from the SFT point (0, start)."""
    points = range(min(len(r["curve"]) for r in runs))
    return ([0.0] + [statistics.fmean(r["curve"][i]["queries"] for r in runs) for i in points],
            [start] + [statistics.fmean(r["curve"][i]["reward"] for r in runs) for i in points])


def clearly_above(a: list[float], b: list[float], gap: float) -> bool:
    """Mean of a exceeds mean of b by more than `gap` and by more than two standard errors of the difference."""
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    return mean_a - mean_b > max(gap, 2 * math.sqrt(std_a**2 / len(a) + std_b**2 / len(b)))


def relation(a: list[float], b: list[float], gap: float) -> str:
    """How a compares with b: 'clearly higher', 'clearly lower' or 'no clear difference' (see `clearly_above`)."""
    return ("clearly higher" if clearly_above(a, b, gap) else "clearly lower" if clearly_above(b, a, gap)
            else "no clear difference")


def best(values: dict[str, list[float]], group: list[StudyMethod]) -> str:
    """The name of the method of `group` with the highest mean."""
    return max(group, key=lambda m: statistics.fmean(values[m.name])).name


def compare(values: dict[str, list[float]], group: list[StudyMethod], other: list[StudyMethod], gap: float) -> str:
    """'<best of group> 0.950 vs <best of other> 0.900 (+0.050, clearly higher)', for one variant and budget."""
    a, b = best(values, group), best(values, other)
    mean_a, mean_b = statistics.fmean(values[a]), statistics.fmean(values[b])
    return f"{a} {mean_a:.3f} vs {b} {mean_b:.3f} ({mean_a - mean_b:+.3f}, {relation(values[a], values[b], gap)})"


def verdicts(values: dict[str, dict[str, dict[str, list[float]]]], methods: list[StudyMethod],
             budgets: dict[str, int], gap: float) -> dict[str, str]:
    """The findings, computed from the per-seed rewards `values[budget][variant][method]`, one sentence each.

    `budgets`: {budget: reward queries} to state, keys of `values` ("final": the end of training). Per variant:
    the best on-policy method against the best offline one at each budget, and the on-policy methods clearly
    above every offline one at the end; with a negative gradient against maximum likelihood only, among the
    on-policy and among the offline methods. With both variants, `answer`: the paper's claim (on-policy
    clearly higher on `unaligned`, no clear difference on `aligned`), best against best at the end.
    """
    online, offline = [m for m in methods if m.on_policy], [m for m in methods if not m.on_policy]
    final, out = values["final"], {}
    for v in final:
        at = "; ".join(f"{'at the end' if budget == 'final' else 'early'} ({queries:,} queries): "
                       f"{compare(values[budget][v], online, offline, gap)}" for budget, queries in budgets.items())
        above = [m.name for m in online if all(clearly_above(final[v][m.name], final[v][o.name], gap) for o in offline)]
        out[v] = (f"{v}, best on-policy vs best offline: {at}. On-policy methods clearly above every offline method "
                  f"at the end: {', '.join(above) if above else 'none'} (of {len(online)}).")
        lines = [f"{source} " + compare(final[v], [m for m in group if m.negative_gradient],
                                        [m for m in group if not m.negative_gradient], gap)
                 for source, group in (("on-policy", online), ("offline", offline))
                 if len({m.negative_gradient for m in group}) == 2]
        if lines:
            out[f"{v}_negative_gradient"] = (f"{v}, with a negative gradient vs maximum likelihood only, at the end: "
                                             + "; ".join(lines) + ".")
    if {"aligned", "unaligned"} <= final.keys():
        gaps = {}
        for v in ("aligned", "unaligned"):
            a, b = final[v][best(final[v], online)], final[v][best(final[v], offline)]
            gaps[v] = f"{statistics.fmean(a) - statistics.fmean(b):+.3f}, {relation(a, b, gap)}"
        higher, small = gaps["unaligned"].endswith("clearly higher"), gaps["aligned"].endswith("no clear difference")
        out["answer"] = ("Does on-policy sampling reach clearly higher reward than offline Pref-FT and DPO on the "
                         f"unaligned reward? {'Yes' if higher else 'No'} (best vs best at the end: "
                         f"{gaps['unaligned']}). Is the gap small on the aligned reward? {'Yes' if small else 'No'} "
                         f"({gaps['aligned']}).")
    return out
