"""Beyond plain SPIN: DPO, judge-relabelled SPIN, noise, the adaptive judge-or-noise rule, and SPPO.

Every method runs through the one iteration driver (`minispin.spin`), the same training loop and the
same fused pair-loss kernel; a method only decides which pairs to train on and with which per-pair
label smoothing / SPPO targets. This module holds those decisions as plain functions (unit-tested on
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
            (SpinConfig.generate = False); freshly generated answers always need a function or command.
For judge_spin the judge sees [real, generated] in that order. Scores are computed once per iteration,
each rank scoring its share of the prompts, and cached in <iteration>/judge_scores/ (resumable; a
cached row whose texts changed is an error, not silently reused).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
import shlex
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .collate import Pair

if TYPE_CHECKING:  # pragma: no cover
    from .spin import SpinConfig

__all__ = [
    "JudgeConfig", "Scorer", "load_scorer", "score_prompts", "attach_judge_scores", "attach_sample_scores",
    "judge_decision", "adaptive_decision", "spin_pair", "judge_pairs", "adaptive_pairs", "dpo_pairs",
    "win_rate_matrix", "SppoChoice", "sppo_choice", "sppo_pairs", "decision_counts", "summarize_pairs",
    "describe_counts",
    "neftune_noise", "row_lengths", "neftune", "read_preference_data", "read_prompts",
    "DPO_SCHEDULE", "SPPO_SCHEDULE", "noise_schedule", "KEPT", "FLIPPED", "SMOOTHED", "SPPO_DECISION",
]

# Per-pair decisions, stored in Pair.extra["decision"] and counted per iteration.
KEPT, FLIPPED, SMOOTHED = "kept", "flipped", "smoothed"
SPPO_DECISION, SPPO_TIED, SPPO_PRECOMPUTED = "sppo", "sppo_tied", "sppo_precomputed"
SAMPLE_SCORES = "sample_scores"  # Example.extra key of SPPO sample scores (also the default data column)

# Default iteration schedules of the methods whose recipe differs from SPIN's (REFERENCE.md sections 1, 3).
DPO_SCHEDULE: list[dict[str, Any]] = [{"lr": 5e-7, "beta": 0.1, "epochs": 1}]
SPPO_SCHEDULE: list[dict[str, Any]] = [
    {"lr": 5e-7, "beta": 1e-3, "epochs": 1, "loss": "sppo", "mix_previous": False,
     "generation.num_samples": 5, "generation.temperature": 0.7, "generation.top_p": 0.9}
    for _ in range(3)]


def noise_schedule(schedule: Sequence[dict[str, Any]], label_smoothing: float = 0.1,
                   neftune_alpha: float = 5.0) -> list[dict[str, Any]]:
    """A schedule with noise added to every iteration (label smoothing eps and NEFTune alpha)."""
    return [dict(d, label_smoothing=label_smoothing, neftune_alpha=neftune_alpha) for d in schedule]


@dataclass
class JudgeConfig:
    """Where judge / preference scores come from, and the adaptive rule's settings."""

    function: str | None = None  # "module:function" or "file.py:function": f(prompt messages, [responses]) -> [scores]
    command: str | None = None  # command line reading JSON lines on stdin, writing scores on stdout
    timeout_s: float | None = None  # per command call (None: no limit)
    prompts_per_call: int = 256  # prompts per command call / per cached chunk
    real_column: str = "score_real"  # data columns used when no function/command is given
    generated_column: str = "score_generated"
    samples_column: str = SAMPLE_SCORES  # SPPO: a list of scores aligned with the "samples" column
    tau: float = 5.0  # adaptive: trust the judge when |score_real - score_generated| >= tau (report: "e.g. > 5")
    smoothing: float = 0.1  # adaptive: label smoothing eps_small of the pairs under the margin

    def __post_init__(self) -> None:
        if self.function is not None and self.command is not None:
            raise ValueError("judge: give judge.function or judge.command, not both")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"judge.function must be 'module:function' or 'file.py:function', got {self.function!r}")
        if self.prompts_per_call < 1:
            raise ValueError(f"judge.prompts_per_call must be >= 1, got {self.prompts_per_call}")
        if not math.isfinite(self.tau) or self.tau < 0:
            raise ValueError(f"judge.tau must be a finite number >= 0, got {self.tau}")
        if not 0 <= self.smoothing <= 0.5:
            raise ValueError(f"judge.smoothing must be in [0, 0.5], got {self.smoothing}")

    @property
    def configured(self) -> bool:
        """A function or command computes the scores (else they come from data columns)."""
        return self.function is not None or self.command is not None

    @property
    def spec(self) -> str:
        return f"function {self.function}" if self.function else f"command {self.command!r}"


# ----------------------------------------------------------------------------- judges and scorers

# A scorer takes a list of (index, prompt messages, responses) and returns one score list per item.
Scorer = Callable[[list[tuple[int, list[dict[str, str]], list[str]]]], list[list[float]]]


def _import_function(spec: str) -> Callable[..., Any]:
    """'package.module:function' or 'path/to/file.py:function' -> the function (user code, run as given)."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"judge function {spec!r}: expected 'module:function' or 'file.py:function'")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"judge function {spec!r}: no such file {path}")
        module_name = f"_minispin_judge_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]}"
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ImportError(f"judge function {spec!r}: cannot import module {where!r} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"judge function {spec!r}: {where!r} has no callable {name!r}")
    return fn


def _as_scores(value: Any, n: int, where: str) -> list[float]:
    """Check a judge's answer: n finite numbers."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # numpy
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: expected a list of {n} scores, got {type(value).__name__} {value!r:.100}")
    if len(value) != n:
        raise ValueError(f"{where}: expected {n} scores (one per response), got {len(value)}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ValueError(f"{where}: scores must be finite numbers, got {v!r}")
        out.append(float(v))
    return out


def _function_scorer(spec: str) -> Scorer:
    fn = _import_function(spec)

    def score(items):
        out = []
        for index, prompt, responses in items:
            try:
                value = fn(prompt, list(responses))
            except Exception as e:
                raise RuntimeError(f"judge {spec} failed on row {index}: {type(e).__name__}: {e}") from e
            out.append(_as_scores(value, len(responses), f"judge {spec}, row {index}"))
        return out
    return score


def _command_scorer(command: str, timeout_s: float | None) -> Scorer:
    argv = shlex.split(command)
    if not argv:
        raise ValueError("judge.command is empty")

    def score(items):
        if not items:
            return []
        text = "".join(json.dumps({"index": i, "prompt": p, "responses": list(r)}, ensure_ascii=False) + "\n"
                       for i, p, r in items)
        try:
            done = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=timeout_s)
        except FileNotFoundError:
            raise FileNotFoundError(f"judge command {command!r}: {argv[0]!r} not found") from None
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"judge command {command!r} did not answer {len(items)} prompts within "
                               f"{timeout_s}s (judge.timeout_s)") from None
        if done.returncode != 0:
            raise RuntimeError(f"judge command {command!r} exited with status {done.returncode}: "
                               f"{done.stderr.strip()[-500:]}")
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        if len(lines) != len(items):
            raise ValueError(f"judge command {command!r}: {len(items)} prompts in, {len(lines)} result lines out "
                             "(expected one JSON line per input line, in order)")
        out = []
        for k, (line, (index, _, responses)) in enumerate(zip(lines, items)):
            where = f"judge command {command!r}, output line {k + 1} (row {index})"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e}): {line[:100]!r}") from None
            if isinstance(value, dict):
                if value.get("index", index) != index:
                    raise ValueError(f"{where}: answers row {value.get('index')!r}; lines must follow the input order")
                value = value.get("scores")
            out.append(_as_scores(value, len(responses), where))
        return out
    return score


def load_scorer(judge: JudgeConfig) -> Scorer | None:
    """The scorer a JudgeConfig names (None when scores come from data columns)."""
    if judge.function is not None:
        return _function_scorer(judge.function)
    if judge.command is not None:
        return _command_scorer(judge.command, judge.timeout_s)
    return None


def _digest(prompt: list[dict[str, str]], responses: Sequence[str]) -> str:
    return hashlib.sha1(json.dumps([prompt, list(responses)], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def score_prompts(items: Sequence[tuple[int, list[dict[str, str]], list[str]]], judge: JudgeConfig,
                  cache_dir: str | Path | None = None, *, scorer: Scorer | None = None,
                  log: Callable[[str], None] | None = None) -> dict[int, list[float]]:
    """{index: scores} of every (index, prompt, responses) item, computed by the judge.

    With cache_dir: each rank scores its share (items at positions p % world == rank) in chunks of
    judge.prompts_per_call, appending them to its own part file <cache_dir>/rankR-of-W.jsonl (fsynced); rows
    already in any part file are not scored again (resume after a kill; any world size). Every rank then
    reads all parts. A cached row whose prompt/responses differ from the item is refused (stale cache).
    Call on every rank under torchrun.
    """
    from . import distributed as du
    from .io import ChunkedJsonlWriter, read_jsonl_part

    scorer = scorer or load_scorer(judge)
    if scorer is None:
        raise ValueError("score_prompts: no judge.function or judge.command configured")
    items = list(items)
    digests = {i: _digest(p, r) for i, p, r in items}
    if len(digests) != len(items):
        raise ValueError("score_prompts: two items share an index")
    if cache_dir is None:
        return {i: s for (i, _, _), s in zip(items, scorer(items))}

    cache_dir = Path(cache_dir)

    def read_cache() -> dict[int, list[float]]:
        found: dict[int, list[float]] = {}
        for part in sorted(cache_dir.glob("*.jsonl")) if cache_dir.is_dir() else []:
            for row in read_jsonl_part(part):
                i = row["index"]
                if i in digests and row.get("digest") != digests[i]:
                    raise ValueError(f"{part}: cached judge scores of row {i} are for other texts (stale "
                                     f"cache from another generation?); delete {cache_dir} to score again")
                found[i] = [float(x) for x in row["scores"]]
        return found

    rank, world = du.get_rank(), du.get_world_size()
    done = read_cache()
    du.barrier()  # every rank has read the cache before anyone appends
    mine = [it for pos, it in enumerate(items) if pos % world == rank and it[0] not in done]
    if mine:
        if log:
            log(f"judge ({judge.spec}): scoring {len(mine)} prompt(s) on rank {rank}")
        with ChunkedJsonlWriter(cache_dir / f"rank{rank:05d}-of-{world:05d}.jsonl") as writer:
            for start in range(0, len(mine), judge.prompts_per_call):
                chunk = mine[start: start + judge.prompts_per_call]
                scores = scorer(chunk)
                writer.write_rows([{"index": i, "digest": digests[i], "scores": s}
                                   for (i, _, _), s in zip(chunk, scores)])
                du.kill_point("judge", rows=writer.rows_written)
    du.barrier()
    found = read_cache()
    missing = [i for i, _, _ in items if i not in found]
    if missing:
        raise RuntimeError(f"{cache_dir}: no judge scores for rows {missing[:10]} after scoring")
    return {i: found[i] for i, _, _ in items}


def attach_judge_scores(examples: Sequence[Any], judge: JudgeConfig, cache_dir: str | Path | None = None, *,
                        scorer: Scorer | None = None, log: Callable[[str], None] | None = None) -> list[Any]:
    """judge_spin / adaptive: score [real, generated] of every example with the configured judge and put
    the two scores into example.scores[real_column / generated_column]. Without a configured judge the
    examples are returned as they are (their score columns are used)."""
    if scorer is None and not judge.configured:
        return list(examples)
    items = [(e.index, list(e.prompt), [e.real, e.generated if e.generated is not None else ""]) for e in examples]
    scores = score_prompts(items, judge, cache_dir, scorer=scorer, log=log)
    return [dataclasses.replace(e, scores={**(e.scores or {}), judge.real_column: scores[e.index][0],
                                           judge.generated_column: scores[e.index][1]})
            for e in examples]


def _samples_of(example: Any) -> list[str] | None:
    samples = (getattr(example, "extra", None) or {}).get("samples")
    if samples is None:
        return None
    if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
        raise ValueError(f"{example.source}: row {example.index}: 'samples' must be a list of strings")
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
            raise ValueError(f"{e.source}: row {e.index}: no 'samples' to score; SPPO generates K >= 2 samples "
                             "per prompt (generation.num_samples)")
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


# ----------------------------------------------------------------------------- judge-SPIN and adaptive

def judge_decision(score_real: float, score_generated: float) -> str:
    """Judge-relabelled SPIN: FLIPPED when the judge scores the generated answer strictly higher, else KEPT
    (a tie keeps SPIN's assumption that the real answer is better)."""
    return FLIPPED if score_generated > score_real else KEPT


def adaptive_decision(score_real: float, score_generated: float, tau: float) -> str:
    """The adaptive judge-or-noise rule: margin |s_real - s_generated| >= tau (exactly tau included) ->
    trust the judge (FLIPPED if it prefers the generated answer, else KEPT); below tau -> SMOOTHED."""
    if abs(score_real - score_generated) >= tau:
        return judge_decision(score_real, score_generated)
    return SMOOTHED


def spin_pair(example: Any, *, flip: bool = False, label_smoothing: float | None = None,
              decision: str | None = None, scores: tuple[float, float] | None = None) -> Pair:
    """A SPIN pair (chosen = real, rejected = generated), or the flipped pair (chosen = generated)."""
    generated = example.generated if example.generated is not None else ""
    chosen, rejected = (generated, example.real) if flip else (example.real, generated)
    extra: dict[str, Any] = {}
    if decision is not None:
        extra["decision"] = decision
    if scores is not None:
        extra["score_real"], extra["score_generated"] = scores
    return Pair(index=example.index, prompt=list(example.prompt), chosen=chosen, rejected=rejected,
                label_smoothing=label_smoothing, source=example.source, extra=extra)


def _pair_scores(example: Any, judge: JudgeConfig) -> tuple[float, float]:
    scores = example.scores or {}
    missing = [c for c in (judge.real_column, judge.generated_column) if c not in scores]
    if missing:
        raise ValueError(
            f"{example.source}: row {example.index}: no judge score {' / '.join(missing)}; configure "
            "judge.function or judge.command, or train on data whose rows carry the score columns "
            f"({judge.real_column}, {judge.generated_column}) with generate=false")
    return float(scores[judge.real_column]), float(scores[judge.generated_column])


def judge_pairs(examples: Sequence[Any], judge: JudgeConfig | None = None) -> list[Pair]:
    """Judge-relabelled SPIN pairs: flipped where the judge prefers the generated answer
    (Pair.extra["decision"] = "kept" / "flipped")."""
    judge = judge or JudgeConfig()
    pairs = []
    for e in examples:
        s = _pair_scores(e, judge)
        decision = judge_decision(*s)
        pairs.append(spin_pair(e, flip=decision == FLIPPED, decision=decision, scores=s))
    return pairs


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


# ----------------------------------------------------------------------------- DPO

def dpo_pairs(examples: Sequence[Any]) -> list[Pair]:
    """Preference rows (PreferenceExample: chosen / rejected) -> pairs as they are."""
    pairs = []
    for e in examples:
        if not hasattr(e, "chosen"):
            raise ValueError(f"{e.source}: row {e.index}: DPO needs preference rows (prompt/chosen/rejected or "
                             "conversations/chosen/rejected), got an SFT row")
        pairs.append(Pair(index=e.index, prompt=list(e.prompt), chosen=e.chosen, rejected=e.rejected,
                          source=e.source))
    return pairs


def read_prompts(config: "SpinConfig", warn: Callable[[str], None] | None = None) -> list[Any]:
    """SPPO's prompts (as `Example`s): SFT rows, prompt-only rows ({"prompt": ...}, no answer needed) or
    preference rows (chosen becomes the unused real answer); the answers in the data are not candidates."""
    from .data import Example, ReadResult, iter_rows, read_examples

    first = next(iter_rows(config.data, config.split), (0, "", {}))[2]
    if config.data_format in ("trl", "sharegpt") or (
            config.data_format == "auto" and ("chosen" in first or "conversations" in first)):
        prefs = read_preference_data(config, warn)
        return ReadResult([Example(index=p.index, prompt=p.prompt, real=p.chosen, generated=None, source=p.source,
                                   extra=p.extra, scores=p.scores) for p in prefs], prefs.skipped, prefs.n_rows)
    return read_examples(config.data, format=config.data_format, split=config.split, limit=config.limit,
                         on_error=config.on_bad_row, warn=warn, require_real=False)


def read_preference_data(config: "SpinConfig", warn: Callable[[str], None] | None = None) -> list[Any]:
    """The run's data read as preference rows (TRL / sharegpt / SPIN layouts; see minispin.data)."""
    from .data import PREFERENCE_FORMATS, read_preferences

    fmt = config.data_format if config.data_format in PREFERENCE_FORMATS else "auto"
    return read_preferences(config.data, format=fmt, split=config.split, limit=config.limit,
                            on_error=config.on_bad_row, warn=warn)


# ----------------------------------------------------------------------------- SPPO

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
                    raise ValueError(f"{e.source}: row {e.index}: {name} = {v} is not a probability")
            pairs.append(Pair(index=e.index, prompt=list(e.prompt), chosen=e.chosen, rejected=e.rejected,
                              targets=(p_win, p_lose), source=e.source, extra={"decision": SPPO_PRECOMPUTED}))
            continue
        if samples is None and hasattr(e, "chosen"):
            samples = [e.chosen, e.rejected]
        if samples is None:
            raise ValueError(f"{e.source}: row {e.index}: no 'samples'; SPPO needs K >= 2 samples per prompt "
                             "(set generation.num_samples, default 5 in SPPO's schedule)")
        if scores is None:
            raise ValueError(f"{e.source}: row {e.index}: the samples have no scores; configure judge.function or "
                             f"judge.command (the preference scorer), or give a {judge.samples_column!r} column")
        scores = _as_scores(scores, len(samples), f"{e.source}: row {e.index}: {judge.samples_column}")
        c = sppo_choice(scores)
        pairs.append(Pair(index=e.index, prompt=list(e.prompt), chosen=samples[c.winner], rejected=samples[c.loser],
                          targets=(c.prob_win, c.prob_lose), source=e.source,
                          extra={"decision": SPPO_TIED if c.tied else SPPO_DECISION, "winner": c.winner,
                                 "loser": c.loser, "chosen_probs": c.prob_winner_beats_loser,
                                 "chosen_probs_win": c.prob_win, "chosen_probs_lose": c.prob_lose}))
    return pairs


# ----------------------------------------------------------------------------- per-iteration counts

def decision_counts(pairs: Sequence[Pair]) -> dict[str, int]:
    """{decision: number of pairs} (+ "pairs" and, when any judge decision was made, "trusted")."""
    counts: dict[str, int] = {"pairs": len(pairs)}
    for p in pairs:
        d = (p.extra or {}).get("decision")
        if d is not None:
            counts[d] = counts.get(d, 0) + 1
    if any(k in counts for k in (KEPT, FLIPPED, SMOOTHED)):
        for k in (KEPT, FLIPPED, SMOOTHED):
            counts.setdefault(k, 0)
        counts["trusted"] = counts[KEPT] + counts[FLIPPED]
    return counts


def summarize_pairs(pairs: Sequence[Pair]) -> dict[str, Any]:
    """Counts over all of an iteration's pairs and per source (e.g. "iter1" new, "iter0" mixed in)."""
    by_source: dict[str, list[Pair]] = {}
    for p in pairs:
        by_source.setdefault(p.source or "", []).append(p)
    out: dict[str, Any] = decision_counts(pairs)
    if len(by_source) > 1:
        out["by_source"] = {s: decision_counts(ps) for s, ps in by_source.items()}
    return out


def describe_counts(stats: dict[str, Any]) -> str:
    """One status-line phrase for summarize_pairs' counts."""
    n = stats.get("pairs", 0)
    parts = []
    if "trusted" in stats:
        parts.append(f"judge flipped {stats[FLIPPED]} of {n} pairs")
        parts.append(f"trusted {stats['trusted']}, smoothed {stats[SMOOTHED]}" if stats[SMOOTHED]
                     else f"kept {stats[KEPT]}")
    if SPPO_DECISION in stats or SPPO_TIED in stats or SPPO_PRECOMPUTED in stats:
        parts.append(f"{n} SPPO pairs, {stats.get(SPPO_TIED, 0)} with all scores tied"
                     + (f", {stats[SPPO_PRECOMPUTED]} precomputed" if stats.get(SPPO_PRECOMPUTED) else ""))
    for source, sub in (stats.get("by_source") or {}).items():
        if "trusted" in sub:
            parts.append(f"{source}: {sub[FLIPPED]}/{sub['pairs']} flipped"
                         + (f", {sub[SMOOTHED]} smoothed" if sub.get(SMOOTHED) else ""))
    return "; ".join(parts) or f"{n} pairs"


# ----------------------------------------------------------------------------- NEFTune

def row_lengths(token_index: torch.Tensor, num_rows: int, row_len: int) -> torch.Tensor:
    """Length (prompt + answer tokens, no padding) of every right-padded row of a micro-batch, from the flat
    response-token positions (token_index = row * T + t, the state at t predicts the token at t + 1):
    the last predicting position + 2. Rows without response tokens get the full row length."""
    rows = torch.div(token_index, row_len, rounding_mode="floor")
    last = token_index - rows * row_len
    lengths = torch.zeros(num_rows, dtype=torch.int64, device=token_index.device)
    lengths = lengths.scatter_reduce(0, rows, last + 2, reduce="amax", include_self=True)
    return torch.where(lengths > 0, lengths, torch.full_like(lengths, row_len)).clamp(max=row_len)


def neftune_noise(embeddings: torch.Tensor, lengths: torch.Tensor, alpha: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """NEFTune noise for embeddings [B, T, d]: uniform(-1, 1) * alpha / sqrt(L_b * d) on the first L_b
    positions of row b (L_b = its non-padding length), zero on padding. fp32, same device."""
    B, T, d = embeddings.shape
    noise = torch.empty(B, T, d, dtype=torch.float32, device=embeddings.device)
    noise.uniform_(-1.0, 1.0, generator=generator)
    L = lengths.to(device=embeddings.device, dtype=torch.float32).clamp(min=1.0)
    scale = alpha / torch.sqrt(L * d)
    valid = torch.arange(T, device=embeddings.device)[None, :] < lengths.to(embeddings.device)[:, None]
    return noise * (scale[:, None, None] * valid[:, :, None])


@contextmanager
def neftune(embedding: torch.nn.Module, alpha: float, lengths: torch.Tensor,
            generator: torch.Generator | None = None) -> Iterator[None]:
    """While active, every forward of `embedding` (in training mode) adds `neftune_noise` to its output.
    For the training forward only: wrap the policy's forward with it, never the reference pass or
    generation."""
    def hook(module, args, output):
        if not module.training or alpha <= 0:
            return output
        return output + neftune_noise(output, lengths, alpha, generator).to(output.dtype)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
