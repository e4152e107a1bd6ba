"""Beyond plain SPIN: DPO, judge-relabelled SPIN, noise, the adaptive judge-or-noise rule, and SPPO.

Every method runs through the one iteration driver (`minispin.spin`), the same training loop and the
same fused pair-loss kernel; a method only decides which pairs to train on and with which per-pair
label smoothing / SPPO targets. This package holds the `Method` registry (`register_method`,
`get_method`) and, one module per family, those decisions as plain functions (unit-tested on
hand-checked cases) plus the plumbing they need:

  dpo         preference rows (TRL prompt/chosen/rejected, sharegpt conversations/chosen/rejected) ->
              pairs as they are; no generation; reference = the starting model (precomputed log-probs).
  judge_spin  SPIN pairs (real vs generated); a judge scores both answers and the pair is FLIPPED
              (generated becomes chosen) when it scores the generated answer strictly higher.
  noise       label smoothing eps of the sigmoid pair loss (TrainConfig.label_smoothing) and/or NEFTune
              noise on the input embeddings of training forwards (TrainConfig.neftune_alpha, see
              `neftune_noise`); options of any pairwise method. "noise_spin" = SPIN with both on.
  adaptive    per pair, margin m = |s_real - s_generated|: m >= tau -> trust the judge (flip when it
              prefers the generated answer, else keep; no smoothing); m < tau -> keep the SPIN pair but
              train it with label smoothing eps_small (`JudgeConfig.smoothing`). A margin of exactly tau
              is trusted.
  sppo        K samples per prompt (only the samples: the real answer is not a candidate), scores s_i
              from the preference scorer, P[i][j] = sigmoid(s_i - s_j) (0.5 on the diagonal),
              chosen w = argmax s, rejected l = argmin s (the first such index; when all scores tie, l is
              the first index other than w), targets P_win = mean_j P[w][j] and P_lose = mean_j P[l][j]
              (j over all K, diagonal included, as in SPPO's published data), loss
              ((lw - eta (P_win - 1/2))^2 + (ll - eta (P_lose - 1/2))^2) / 2 with eta = 1/beta
              (the pair-loss kernel's "sppo" mode). Precomputed chosen_probs_win / chosen_probs_lose
              columns (SPPO's data layout) are used as they are.

Judges / preference scorers (`JudgeConfig`; no network access is built in):
  function  "package.module:function" or "path/to/file.py:function", called as
            function(prompt_messages, [response, ...]) -> [score, ...] (higher = better), once per prompt.
  command   a command line (split like a shell would, no shell) started once per chunk of prompts; it
            reads JSON lines {"index": i, "prompt": [messages], "responses": [texts]} on stdin and writes
            one line per input, in order, on stdout: a JSON list of scores, or {"index": i, "scores": [...]}.
  columns   with neither, scores come from the data: score columns of each row (judge_spin / adaptive:
            `real_column` / `generated_column`, e.g. "score_real" / "score_generated"; SPPO:
            `samples_column`, a list aligned with "samples", or chosen_probs_win / chosen_probs_lose).
            Columns describe the answers IN the data, so they serve runs that train on those answers
            (RunConfig.generate = False); freshly generated answers always need a function or command.
For judge_spin the judge sees [real, generated] in that order. Scores are computed once per iteration,
each rank scoring its share of the prompts, and cached in <iteration>/judge_scores/ (resumable; a
cached row whose texts changed is an error, not silently reused).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from .. import log
from ..collate import Pair
from ..config import ConfigError
from .adaptive import adaptive_decision, adaptive_pairs
from .counts import (FLIPPED, KEPT, SAMPLE_SCORES, SMOOTHED, SPPO_DECISION, SPPO_PRECOMPUTED, SPPO_TIED,
                     decision_counts, describe_counts, summarize_pairs)
from .dpo import DPO_SCHEDULE, DataSettings, dpo_pairs, read_preference_data
from .judge import (JudgeConfig, Scorer, attach_judge_scores, judge_decision, judge_pairs, load_scorer,
                    score_prompts)
from .noise import neftune, neftune_noise, noise_schedule, position_row_lengths
from .spin import PAPER_SCHEDULE, sft_pairs, spin_pair, spin_pairs
from .sppo import SPPO_SCHEDULE, SppoChoice, attach_sample_scores, read_prompts, sppo_choice, sppo_pairs, win_rate_matrix

__all__ = [
    "Method", "RunSettings", "METHODS", "register_method", "get_method",
    "JudgeConfig", "Scorer", "load_scorer", "score_prompts", "attach_judge_scores", "attach_sample_scores",
    "judge_decision", "adaptive_decision", "spin_pair", "spin_pairs", "sft_pairs", "judge_pairs", "adaptive_pairs",
    "dpo_pairs", "win_rate_matrix", "SppoChoice", "sppo_choice", "sppo_pairs", "decision_counts",
    "summarize_pairs", "describe_counts", "neftune_noise", "position_row_lengths", "neftune", "read_preference_data",
    "read_prompts", "PAPER_SCHEDULE", "DPO_SCHEDULE", "SPPO_SCHEDULE", "noise_schedule", "KEPT", "FLIPPED",
    "SMOOTHED", "SPPO_DECISION", "SPPO_TIED", "SPPO_PRECOMPUTED", "SAMPLE_SCORES",
]


class RunSettings(DataSettings, Protocol):
    """What a method reads of the run's settings (RunConfig has them; methods never import the driver)."""
    judge: JudgeConfig
    generate: bool


@dataclass(frozen=True)
class Method:
    """A training method: whether each iteration generates, the loss family, and the pair builder;
    optionally its data reader, a scoring step before the pairs are built, a summary of the pairs,
    a default schedule and a fixed loss type."""
    name: str
    needs_generation: bool
    objective: str  # TrainConfig.objective: "pairwise" (any loss type) | "sft"
    build_pairs: Callable[[Sequence[Any], RunSettings], list[Pair]]
    # (config, warn) -> records; None: read_examples (SFT / SPIN rows)
    read_data: Callable[[RunSettings, Callable[[str], None]], list] | None = None
    # (records, config, cache dir) -> records with judge scores attached; called on every rank
    prepare: Callable[[list, RunSettings, Path], list] | None = None
    summarize: Callable[[list[Pair]], dict] | None = None  # per-iteration counts of the pair decisions
    schedule: list[dict[str, Any]] | None = None  # default iterations (None: SPIN's paper schedule)
    loss: str | None = None  # TrainConfig.loss this method needs (e.g. "sppo")
    needs_scorer: bool = False  # generated answers need a judge / preference scorer (function or command)


def _log(message: str) -> None:
    log.print0(message, prefix="run")


def _prepare_judge(examples: list, config: RunSettings, cache: Path) -> list:
    return attach_judge_scores(examples, config.judge, cache, log=_log)


def _prepare_samples(examples: list, config: RunSettings, cache: Path) -> list:
    return attach_sample_scores(examples, config.judge, cache, log=_log)


def _read_sppo_data(config: RunSettings, warn: Callable[[str], None]) -> list:
    return read_prompts(config, warn) if config.generate else read_preference_data(config, warn)


METHODS: dict[str, Method] = {
    "spin": Method("spin", needs_generation=True, objective="pairwise", build_pairs=spin_pairs),
    "sft": Method("sft", needs_generation=False, objective="sft", build_pairs=sft_pairs),
    "dpo": Method("dpo", needs_generation=False, objective="pairwise", build_pairs=lambda ex, c: dpo_pairs(ex),
                  read_data=read_preference_data, schedule=DPO_SCHEDULE),
    "judge_spin": Method("judge_spin", needs_generation=True, objective="pairwise",
                         build_pairs=lambda ex, c: judge_pairs(ex, c.judge), prepare=_prepare_judge,
                         summarize=summarize_pairs, needs_scorer=True),
    "noise_spin": Method("noise_spin", needs_generation=True, objective="pairwise", build_pairs=spin_pairs,
                         schedule=noise_schedule(PAPER_SCHEDULE)),
    "adaptive": Method("adaptive", needs_generation=True, objective="pairwise",
                       build_pairs=lambda ex, c: adaptive_pairs(ex, c.judge), prepare=_prepare_judge,
                       summarize=summarize_pairs, needs_scorer=True),
    "sppo": Method("sppo", needs_generation=True, objective="pairwise",
                   build_pairs=lambda ex, c: sppo_pairs(ex, c.judge), read_data=_read_sppo_data,
                   prepare=_prepare_samples, summarize=summarize_pairs, schedule=SPPO_SCHEDULE, loss="sppo",
                   needs_scorer=True),
}


def register_method(method: Method) -> None:
    """Add a method (e.g. judge-relabelled SPIN, SPPO) without touching the loop."""
    METHODS[method.name] = method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"--method {name!r} is not a method; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
