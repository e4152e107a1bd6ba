"""minispin.methods.counts (CPU, no model): the status phrase of judge, adaptive and SPPO pair counts."""
from __future__ import annotations

from minispin.methods import JudgeConfig, adaptive_pairs, judge_pairs, sppo_pairs, summarize_pairs
from methods_helpers import ex


def test_describe_counts_status_line():
    from minispin.methods import describe_counts

    judge = summarize_pairs(judge_pairs([ex(0, scores={"score_real": 1.0, "score_generated": 2.0}),
                                         ex(1, scores={"score_real": 2.0, "score_generated": 1.0}, source="iter1")]))
    assert describe_counts(judge) == "judge flipped 1 of 2 pairs; kept 1; iter0: 1/1 flipped; iter1: 0/1 flipped"
    adaptive = summarize_pairs(adaptive_pairs([ex(0, scores={"score_real": 1.0, "score_generated": 2.0})],
                                              JudgeConfig(tau=5.0)))
    assert describe_counts(adaptive) == "judge flipped 0 of 1 pairs; trusted 0, smoothed 1"
    sppo = summarize_pairs(sppo_pairs([ex(0, samples=["a", "b"], sample_scores=[1.0, 1.0])]))
    assert describe_counts(sppo) == "1 SPPO pairs, 1 with all scores tied"
