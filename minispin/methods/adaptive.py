"""The adaptive judge-or-noise rule: trust the judge where its margin is at least tau, else keep the SPIN
pair and train it with label smoothing."""
from __future__ import annotations

from typing import Any, Sequence

from ..collate import Pair
from .counts import FLIPPED, SMOOTHED
from .judge import JudgeConfig, _pair_scores, judge_decision
from .spin import spin_pair

def adaptive_decision(score_real: float, score_generated: float, tau: float) -> str:
    """The adaptive judge-or-noise rule: margin |s_real - s_generated| >= tau (exactly tau included) ->
    trust the judge (FLIPPED if it prefers the generated answer, else KEPT); below tau -> SMOOTHED."""
    if abs(score_real - score_generated) >= tau:
        return judge_decision(score_real, score_generated)
    return SMOOTHED



def adaptive_pairs(examples: Sequence[Any], judge: JudgeConfig | None = None) -> list[Pair]:
    """Adaptive judge-or-noise pairs: trusted pairs (margin >= tau) follow the judge with no label
    smoothing; the others keep SPIN's orientation with label smoothing judge.smoothing."""
    judge = judge or JudgeConfig()
    pairs = []
    for e in examples:
        s = _pair_scores(e, judge)
        decision = adaptive_decision(*s, judge.tau)
        smoothing = judge.smoothing if decision == SMOOTHED else 0.0
        pairs.append(spin_pair(e, flip=decision == FLIPPED, label_smoothing=smoothing, decision=decision, scores=s))
    return pairs
