"""minispin.methods.adaptive (CPU, no model): the tau rule at its boundary, and the adaptive pairs' label
smoothing and per-source counts."""
from __future__ import annotations

from minispin.methods import (FLIPPED, KEPT, SMOOTHED, JudgeConfig, adaptive_decision, adaptive_pairs,
                              summarize_pairs)
from methods_helpers import ex


def test_adaptive_tau_boundary_exactly_tau_is_trusted():
    tau = 5.0
    assert adaptive_decision(7.0, 2.0, tau) == KEPT  # margin exactly 5 -> trusted, real preferred
    assert adaptive_decision(2.0, 7.0, tau) == FLIPPED  # margin exactly 5 -> trusted, generated preferred
    assert adaptive_decision(2.0, 6.75, tau) == SMOOTHED  # margin 4.75 < 5
    assert adaptive_decision(0.25, 0.5, 0.25) == FLIPPED  # exact binary fractions: margin == tau
    assert adaptive_decision(3.0, 3.0, 0.0) == KEPT  # tau 0 trusts every pair; a tie is kept
    assert adaptive_decision(10.0, 0.0, float(1e9)) == SMOOTHED


def test_adaptive_pairs_smoothing_and_counts():
    judge = JudgeConfig(tau=5.0, smoothing=0.2)
    scores = [(9.0, 1.0), (1.0, 9.0), (5.0, 7.0), (7.0, 2.0), (2.0, 7.0), (4.0, 4.0), (0.0, 4.9)]
    examples = [ex(i, f"r{i}", f"g{i}", {"score_real": a, "score_generated": b}, source=("iter1" if i < 4 else "iter0"))
                for i, (a, b) in enumerate(scores)]
    pairs = adaptive_pairs(examples, judge)
    expected = [KEPT, FLIPPED, SMOOTHED, KEPT, FLIPPED, SMOOTHED, SMOOTHED]
    assert [p.extra["decision"] for p in pairs] == expected
    for p, d, i in zip(pairs, expected, range(7)):
        if d == FLIPPED:
            assert (p.chosen, p.rejected) == (f"g{i}", f"r{i}")
        else:  # kept and smoothed pairs keep SPIN's orientation
            assert (p.chosen, p.rejected) == (f"r{i}", f"g{i}")
        assert p.label_smoothing == (0.2 if d == SMOOTHED else 0.0)
    stats = summarize_pairs(pairs)
    assert {k: stats[k] for k in ("pairs", "trusted", "kept", "flipped", "smoothed")} == \
        {"pairs": 7, "trusted": 4, "kept": 2, "flipped": 2, "smoothed": 3}
    assert stats["by_source"]["iter1"] == {"pairs": 4, "kept": 2, "flipped": 1, "smoothed": 1, "trusted": 3}
    assert stats["by_source"]["iter0"] == {"pairs": 3, "kept": 0, "flipped": 1, "smoothed": 2, "trusted": 1}
