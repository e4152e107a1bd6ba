"""SPPO: K samples per prompt scored by the preference scorer, win-rate targets, chosen = argmax and
rejected = argmin of the scores (see the package docstring for the exact rule)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..collate import Pair
from ..data import DataError, Example, ReadResult, iter_rows, read_examples
from .counts import SPPO_DECISION, SPPO_PRECOMPUTED, SPPO_TIED
from .dpo import DataSettings, read_preference_data
from .judge import JudgeConfig, Scorer, _as_scores, score_prompts

SPPO_SCHEDULE: list[dict[str, Any]] = [
    {"lr": 5e-7, "beta": 1e-3, "epochs": 1, "loss": "sppo", "mix_previous": False,
     "generation.num_samples": 5, "generation.temperature": 0.7, "generation.top_p": 0.9}
    for _ in range(3)]



def _samples_of(example: Any) -> list[str] | None:
    samples = (getattr(example, "extra", None) or {}).get("samples")
    if samples is None:
        return None
    if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
        raise DataError("must be a list of strings", source=example.source, index=example.index, key="samples")
    return samples


def _has_precomputed_probs(example: Any) -> bool:
    scores = getattr(example, "scores", None) or {}
    return "chosen_probs_win" in scores and "chosen_probs_lose" in scores


def attach_sample_scores(examples: Sequence[Any], judge: JudgeConfig, cache_dir: str | Path | None = None, *,
                         scorer: Scorer | None = None, log: Callable[[str], None] | None = None) -> list[Any]:
    """SPPO: score the K samples of every example with the configured preference scorer and put them into
    example.extra[judge.samples_column] ("sample_scores"). Rows with precomputed chosen_probs_win/lose and
    no samples are left as they are; without a configured scorer the examples are returned unchanged
    (their data columns are used)."""
    if scorer is None and not judge.configured:
        return list(examples)
    items, positions = [], []
    for pos, e in enumerate(examples):
        samples = _samples_of(e)
        if samples is None and _has_precomputed_probs(e):
            continue
        if samples is None:
            samples = [e.chosen, e.rejected] if hasattr(e, "chosen") else None
        if samples is None:
            raise DataError("no 'samples' to score; SPPO generates K >= 2 samples per prompt "
                            "(generation.num_samples)", source=e.source, index=e.index)
        items.append((e.index, list(e.prompt), samples))
        positions.append(pos)
    scores = score_prompts(items, judge, cache_dir, scorer=scorer, log=log)
    out = list(examples)
    for pos, (index, _, samples) in zip(positions, items):
        e = out[pos]
        extra = dict(e.extra or {})
        extra[judge.samples_column] = scores[index]
        if "samples" not in extra:
            extra["samples"] = samples
        out[pos] = dataclasses.replace(e, extra=extra)
    return out



def read_prompts(config: DataSettings, warn: Callable[[str], None] | None = None) -> list[Any]:
    """SPPO's prompts (as `Example`s): SFT rows, prompt-only rows ({"prompt": ...}, no answer needed) or
    preference rows (chosen becomes the unused real answer); the answers in the data are not candidates."""
    first = next(iter_rows(config.data, config.split), (0, "", {}))[2]
    if config.data_format in ("trl", "sharegpt") or (
            config.data_format == "auto" and ("chosen" in first or "conversations" in first)):
        prefs = read_preference_data(config, warn)
        return ReadResult([Example(index=p.index, prompt=p.prompt, real=p.chosen, generated=None, source=p.source,
                                   extra=p.extra, scores=p.scores) for p in prefs], prefs.skipped, prefs.n_rows)
    return read_examples(config.data, format=config.data_format, split=config.split, limit=config.limit,
                         on_error=config.on_bad_row, warn=warn, require_real=False)




def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def win_rate_matrix(scores: Sequence[float]) -> list[list[float]]:
    """P[i][j] = sigmoid(s_i - s_j): the probability that response i beats j (0.5 on the diagonal)."""
    return [[_sigmoid(si - sj) for sj in scores] for si in scores]


@dataclass(frozen=True)
class SppoChoice:
    """The SPPO pair of one prompt: winner / loser indices and their probabilities."""
    winner: int
    loser: int
    prob_win: float  # mean_j P[w][j]   (SPPO's chosen_probs_win)
    prob_lose: float  # mean_j P[l][j]  (chosen_probs_lose)
    prob_winner_beats_loser: float  # P[w][l]  (chosen_probs)
    tied: bool  # every score equal


def sppo_choice(scores: Sequence[float]) -> SppoChoice:
    """Chosen = argmax, rejected = argmin of the scores (first index; if all tie, the loser is the first
    index other than the winner), with SPPO's targets from the win-rate matrix."""
    scores = [float(s) for s in scores]
    if len(scores) < 2:
        raise ValueError(f"SPPO needs at least 2 scored samples per prompt, got {len(scores)}")
    P = win_rate_matrix(scores)
    w = max(range(len(scores)), key=lambda i: (scores[i], -i))
    lo = min(range(len(scores)), key=lambda i: (scores[i], i))
    tied = scores[w] == scores[lo]
    if tied:
        lo = 1 if w == 0 else 0
    K = len(scores)
    return SppoChoice(w, lo, sum(P[w]) / K, sum(P[lo]) / K, P[w][lo], tied)


def sppo_pairs(examples: Sequence[Any], judge: JudgeConfig | None = None) -> list[Pair]:
    """SPPO pairs with targets (P_win, P_lose) in Pair.targets: from scored samples (extra["samples"] +
    extra[judge.samples_column]) or from precomputed chosen_probs_win / chosen_probs_lose columns."""
    judge = judge or JudgeConfig()
    pairs = []
    for e in examples:
        extra = getattr(e, "extra", None) or {}
        samples = _samples_of(e)
        scores = extra.get(judge.samples_column)
        if samples is None and _has_precomputed_probs(e):
            p_win, p_lose = float(e.scores["chosen_probs_win"]), float(e.scores["chosen_probs_lose"])
            for name, v in (("chosen_probs_win", p_win), ("chosen_probs_lose", p_lose)):
                if not 0.0 <= v <= 1.0:
                    raise DataError(f"{v} is not a probability", source=e.source, index=e.index, key=name)
            pairs.append(Pair(index=e.index, prompt=list(e.prompt), chosen=e.chosen, rejected=e.rejected,
                              targets=(p_win, p_lose), source=e.source, extra={"decision": SPPO_PRECOMPUTED}))
            continue
        if samples is None and hasattr(e, "chosen"):
            samples = [e.chosen, e.rejected]
        if samples is None:
            raise DataError("no 'samples'; SPPO needs K >= 2 samples per prompt (set generation.num_samples, "
                            "default 5 in SPPO's schedule)", source=e.source, index=e.index)
        if scores is None:
            raise DataError("the samples have no scores; configure judge.function or judge.command (the "
                            f"preference scorer), or give a {judge.samples_column!r} column", source=e.source,
                            index=e.index)
        scores = _as_scores(scores, len(samples), f"{e.source}: row {e.index}: {judge.samples_column}")
        c = sppo_choice(scores)
        ids = extra.get("samples_ids") if "samples" in extra else None  # sampled ids, aligned with "samples"
        pairs.append(Pair(index=e.index, prompt=list(e.prompt), chosen=samples[c.winner], rejected=samples[c.loser],
                          chosen_ids=ids[c.winner] if ids else None, rejected_ids=ids[c.loser] if ids else None,
                          targets=(c.prob_win, c.prob_lose), source=e.source,
                          extra={"decision": SPPO_TIED if c.tied else SPPO_DECISION, "winner": c.winner,
                                 "loser": c.loser, "chosen_probs": c.prob_winner_beats_loser,
                                 "chosen_probs_win": c.prob_win, "chosen_probs_lose": c.prob_lose}))
    return pairs
