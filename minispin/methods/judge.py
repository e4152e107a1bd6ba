"""Judges and preference scorers (a user function or command; no network built in), their per-rank
resumable score cache, judge-relabelled SPIN (flip when the judge prefers the generated answer)."""
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch

from .. import distributed as dist
from ..config import records_given
from ..collate import Pair
from ..io import ChunkedJsonlWriter, read_jsonl_part
from ..runs import part_files, part_path
from .counts import FLIPPED, KEPT, SAMPLE_SCORES
from .spin import spin_pair

SCORES_FILE = "scores.jsonl"  # the cache's part files are <cache_dir>/scores.jsonl.part-RRRRR-of-WWWWW.jsonl

@records_given
@dataclass
class JudgeConfig:
    """Where judge / preference scores come from, and the adaptive rule's settings."""
    # may change between a run and its resume (minispin.config): cached scores are kept per prompt
    RESUME_FREE: ClassVar[tuple[str, ...]] = ("timeout_s", "prompts_per_call")

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
    judge.prompts_per_call, appending them to its own part file <cache_dir>/scores.jsonl.part-RRRRR-of-WWWWW.jsonl (fsynced); rows
    already in any part file are not scored again (resume after a kill; any world size). Every rank then
    reads all parts. A cached row whose prompt/responses differ from the item is refused (stale cache).
    Call on every rank under torchrun.
    """
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
        for part in part_files(cache_dir / SCORES_FILE):
            for row in read_jsonl_part(part):
                i = row["index"]
                if i in digests and row.get("digest") != digests[i]:
                    raise ValueError(f"{part}: cached judge scores of row {i} are for other texts (stale "
                                     f"cache from another generation?); delete {cache_dir} to score again")
                found[i] = [float(x) for x in row["scores"]]
        return found

    rank, world = dist.get_rank(), dist.get_world_size()
    done = read_cache()
    dist.barrier()  # every rank has read the cache before anyone appends
    mine = [it for pos, it in enumerate(items) if pos % world == rank and it[0] not in done]
    if mine:
        if log:
            log(f"judge ({judge.spec}): scoring {len(mine)} prompt(s) on rank {rank}")
        with ChunkedJsonlWriter(part_path(cache_dir / SCORES_FILE, rank, world)) as writer:
            for start in range(0, len(mine), judge.prompts_per_call):
                chunk = mine[start: start + judge.prompts_per_call]
                scores = scorer(chunk)
                writer.write_rows([{"index": i, "digest": digests[i], "scores": s}
                                   for (i, _, _), s in zip(chunk, scores)])
                dist.kill_point("judge", rows=writer.rows_written)
    dist.barrier()
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




def judge_decision(score_real: float, score_generated: float) -> str:
    """Judge-relabelled SPIN: FLIPPED when the judge scores the generated answer strictly higher, else KEPT
    (a tie keeps SPIN's assumption that the real answer is better)."""
    return FLIPPED if score_generated > score_real else KEPT



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
