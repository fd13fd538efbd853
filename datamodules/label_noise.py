"""Label-flip noise for preference pairs: swap chosen and rejected in a seeded, order-free share of the pairs.

`PreferenceDataModule(label_noise=0.2)` flips about 20 % of the *training* pairs (validation and test keep
their labels, so they still measure the true preference). Whether a pair flips depends only on the seed and
the pair's two token sequences (not on its position, the batch size or the number of ranks), so reruns and
resumed runs flip the same pairs. Every `*chosen*` column is swapped with its `*rejected*` twin (token ids,
labels, reference log-probs and counts), and `label_flipped` records the net flip (1.0 / 0.0): a pair the
source already marked flipped (the synthetic task's own `label_flipped` column) and flipped again is clean.
"""

from __future__ import annotations

import zlib
from typing import Any

FLAG = "label_flipped"


def flips(item: dict[str, Any], rate: float, seed: int) -> bool:
    """Whether this pair is flipped at `rate` under `seed` (the same for the pair with its sides swapped)."""
    sides = sorted([tuple(item["chosen_input_ids"]), tuple(item["rejected_input_ids"])])
    return zlib.crc32(repr((seed, sides)).encode()) / 2**32 < rate


def swap_sides(item: dict[str, Any]) -> dict[str, Any]:
    """The item with every `*chosen*` column exchanged for its `*rejected*` twin, and `label_flipped` toggled."""
    out = dict(item)
    for key in item:
        if "chosen" in key:
            twin = key.replace("chosen", "rejected")
            out[key], out[twin] = item[twin], item[key]
    out[FLAG] = 1.0 - float(item.get(FLAG, 0.0))
    return out


def add_label_noise(items: list[dict[str, Any]], rate: float, seed: int) -> list[dict[str, Any]]:
    """`items` with the pairs chosen by `flips` swapped; every item gets a `label_flipped` float."""
    return [swap_sides(item) if flips(item, rate, seed) else {**item, FLAG: float(item.get(FLAG, 0.0))}
            for item in items]
