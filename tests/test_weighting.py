"""Multi-reference weighting strategies against hand-computed α (SPEC section 4), their state, and their extremes.

The example batch (K = 3 references, B = 2 pairs): summed log-probs and each reference's own token counts,

    chosen    [[-4, -6, -10], [-4, -3, -4]]   counts [[2, 2, 4], [1, 3, 4]]   -> per token [[-2, -3, -2.5], [-4, -1, -1]]
    rejected  [[-6, -6,  -6], [-2, -6, -4]]   counts [[2, 3, 2], [1, 3, 2]]   -> per token [[-3, -2, -3],   [-2, -2, -2]]

so d = |chosen − rejected| = [[1, 1, 0.5], [2, 1, 1]] and c = [chosen > rejected] = [[1, 0, 1], [0, 1, 1]].
"""

from __future__ import annotations

import pytest
import torch

from datamodules.utils.errors import UserInputError
from lightning_modules.multiref import (ARWC, STRATEGIES, SWCW, TSW, VAW, VDW, Fixed, SWCWOneHot, normalized,
                                         reference_signals)

BATCH = {
    "ref_chosen_logps": torch.tensor([[-4.0, -6.0, -10.0], [-4.0, -3.0, -4.0]]),
    "ref_rejected_logps": torch.tensor([[-6.0, -6.0, -6.0], [-2.0, -6.0, -4.0]]),
    "ref_chosen_counts": torch.tensor([[2, 2, 4], [1, 3, 4]]),
    "ref_rejected_counts": torch.tensor([[2, 3, 2], [1, 3, 2]]),
}
SIGNALS = reference_signals(*BATCH.values())


class Context:
    """A one-process `WeightingContext`; `others` adds other ranks' contributions to every all-reduce."""

    def __init__(self, validation=(SIGNALS,), accuracies=(), others=None):
        self.num_references = 3
        self.validation, self.accuracies, self.others = list(validation), list(accuracies), others
        self.accuracy_calls: list[list[int]] = []

    def all_reduce_sum(self, tensor):
        return tensor + (self.others.pop(0) if self.others else 0)

    def validation_signals(self):
        return iter(self.validation)

    def validation_size(self):
        return sum(s.margins.shape[0] for s in self.validation)

    def validation_accuracy(self, indices):
        self.accuracy_calls.append(list(indices))
        return self.accuracies.pop(0)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-6)


def test_signals_by_hand():
    close(SIGNALS.margins, [[1, 1, 0.5], [2, 1, 1]])
    close(SIGNALS.agrees, [[1, 0, 1], [0, 1, 1]])


def test_arwc_vdw_vaw_fixed_by_hand():
    context = Context()
    close(ARWC().alphas(SIGNALS, training=True, context=context), [[0.4, 0.4, 0.2], [0.5, 0.25, 0.25]])
    vdw, vaw = VDW(), VAW()
    vdw.prepare(context), vaw.prepare(context)
    close(vdw.alphas(SIGNALS, training=True, context=context), [6 / 13, 4 / 13, 3 / 13])
    close(vaw.alphas(SIGNALS, training=True, context=context), [0.25, 0.25, 0.5])
    close(Fixed([2, 1, 1]).alphas(SIGNALS, training=True, context=context), [0.5, 0.25, 0.25])
    with pytest.raises(UserInputError, match="weights has 2 values.*K=3"):
        Fixed([1, 1]).alphas(SIGNALS, training=True, context=context)
    with pytest.raises(UserInputError, match="non-negative"):
        Fixed([1, -1, 1])


def test_swcw_uses_only_the_previous_batch_and_starts_uniform():
    context, swcw, onehot = Context(), SWCW(), SWCWOneHot()
    close(swcw.alphas(SIGNALS, training=True, context=context), [1 / 3] * 3)  # step 0: uniform
    close(onehot.alphas(SIGNALS, training=True, context=context), [1 / 3] * 3)
    other = reference_signals(*(v.flip(-1) for v in BATCH.values()))  # a different batch: references reversed
    close(swcw.alphas(other, training=True, context=context), [0.45, 0.325, 0.225])  # mean ARWC row of batch 1
    close(onehot.alphas(other, training=True, context=context), [1, 0, 0])  # mean d of batch 1 = [1.5, 1, 0.75]
    close(swcw.alphas(SIGNALS, training=True, context=context), [0.225, 0.325, 0.45])  # batch 2 (reversed)
    close(swcw.alphas(other, training=False, context=context), [0.45, 0.325, 0.225])  # from batch 3 = SIGNALS
    close(swcw.alphas(SIGNALS, training=False, context=context), [0.45, 0.325, 0.225])  # validation changed nothing


def test_swcw_averages_the_global_batch_over_ranks():
    """Rank 0 holds pair 0, rank 1 pair 1: the stored vector is the mean over both, as on one process."""
    first, second = (reference_signals(*(v[i:i + 1] for v in BATCH.values())) for i in (0, 1))
    rank1_summary = torch.cat([normalized(second.margins).sum(0), torch.tensor([1.0])])
    rank0 = SWCW()
    rank0.alphas(first, training=True, context=Context(others=[rank1_summary]))
    close(rank0.alphas(first, training=False, context=Context()), [0.45, 0.325, 0.225])


def test_tsw_posterior_updates_and_survives_a_round_trip():
    context = Context(validation=[SIGNALS] * 20, accuracies=[0.5, 0.75, 0.5, 0.25, 0.5, 0.5])
    tsw = TSW(prior=5.0, subset_size=8, seed=3)
    tsw.prepare(context)
    arms = []
    for improved in (True, False, False):
        tsw.before_step(context)
        alphas = tsw.alphas(SIGNALS, training=True, context=context)
        assert alphas.sum() == 1 and alphas.max() == 1  # one-hot: single-reference DPO against the drawn arm
        arms.append(int(alphas.argmax()))
        tsw.after_step(context)
        assert tsw.last_reward == float(improved)
    a, b = [5.0] * 3, [5.0] * 3
    for arm, improved in zip(arms, (True, False, False)):
        (a if improved else b)[arm] += 1
    assert tsw.a.tolist() == a and tsw.b.tolist() == b
    assert all(len(call) == 8 and len(set(call)) == 8 for call in context.accuracy_calls)
    assert context.accuracy_calls[0] == context.accuracy_calls[1]  # before and after the step: the same pairs
    close(tsw.alphas(SIGNALS, training=False, context=context), normalized(torch.tensor(a) / (torch.tensor(a) + torch.tensor(b))).tolist())

    resumed = TSW(prior=5.0, subset_size=8, seed=3)
    resumed.load_state_dict(tsw.state_dict())
    draws = []
    for strategy in (tsw, resumed):
        strategy.before_step(Context(validation=[SIGNALS] * 20, accuracies=[0.5]))
        draws.append((strategy.arm, strategy.subset))
    assert draws[0] == draws[1]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_state_round_trip_restores_every_strategy(name):
    """After two training batches, a strategy restored from `state_dict` gives the same α from then on."""
    make = {"fixed": lambda: Fixed([1, 2, 3]), "tsw": lambda: TSW(subset_size=4)}.get(name, STRATEGIES[name])
    context = Context(validation=[SIGNALS] * 4, accuracies=[0.5] * 100)
    original = make()
    original.prepare(context)
    for _ in range(2):
        original.before_step(context)
        original.alphas(SIGNALS, training=True, context=context)
        original.after_step(context)
    restored = make()
    restored.load_state_dict(original.state_dict())
    assert restored.prepared
    for strategy in (original, restored):
        strategy.before_step(context)
    other = reference_signals(*(v.flip(-1) for v in BATCH.values()))
    torch.testing.assert_close(restored.alphas(other, training=True, context=context),
                               original.alphas(other, training=True, context=context), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_references_give_finite_alphas(dtype):
    """Log-probs of −3000 next to −0.5, a reference scoring every pair alike, K = 7 with one far off, in bf16."""
    k = 7
    chosen = torch.full((4, k), -0.5, dtype=dtype)
    rejected = torch.full((4, k), -0.7, dtype=dtype)
    chosen[:, 1], rejected[:, 1] = -3000.0, -3000.0  # scores every pair identically: d = 0
    chosen[:, 6], rejected[:, 6] = -0.5, -3000.0  # far off from the rest
    counts = torch.ones(4, k, dtype=torch.long)
    signals = reference_signals(chosen, rejected, counts, counts)
    same = reference_signals(chosen[:, :1].expand(4, k), chosen[:, :1].expand(4, k), counts, counts)  # all d = 0
    context = Context(validation=[signals, same], accuracies=[0.5] * 10)
    for name, cls in STRATEGIES.items():
        strategy = Fixed([1.0] * k) if name == "fixed" else cls()
        context.num_references = k
        strategy.prepare(context)
        strategy.before_step(context)
        for batch in (signals, same, signals):
            alphas = strategy.alphas(batch, training=True, context=context)
            assert torch.isfinite(alphas).all() and (alphas >= 0).all(), name
            torch.testing.assert_close(alphas.sum(-1), torch.ones_like(alphas.sum(-1)), rtol=0, atol=1e-5)
        strategy.after_step(context)
    close(ARWC().alphas(same, training=True, context=context)[0], [1 / k] * k)  # all references agree: uniform
