"""The resumable, distributed generation job: SFT prompts in, SPIN-format rows out, each exactly once.

`run_generation_job(model, tokenizer, examples, out_path, config)`:
- examples: a list of `minispin.data.Example`, or a path read with `read_examples` (UltraChat200k,
  SPIN, Alpaca or prompt/response rows; .json/.jsonl/.parquet). Prompts are encoded by
  `minispin.sampler.encode_prompt` with ONE template (config.template: None/"chat" = the tokenizer's
  chat template, "spin" = "### Instruction: ...", or a Jinja string); training uses the same function.
- Each rank takes the examples at positions p with p % world == rank (positions in index order) and
  appends finished rows to its own part file `<out>.part-RRRRR-of-WWWWW.jsonl` in fsynced chunks
  (`minispin.io.ChunkedJsonlWriter`). A re-run after a crash (kill -9 at any moment) skips the
  indices already in ANY part file (whatever world size wrote it), so every row is generated once.
- After a barrier rank 0 merges the parts in source (index) order into `out_path` atomically
  (`minispin.io.merge_parts`, which checks every expected index is there exactly once), writes the
  optional parquet copy, then removes the parts. An existing `out_path` means "done": a re-run
  returns at once.
- `<out>.job.json` records the settings that change the output (sampling, template, seed, ...); a
  re-run with different settings is refused instead of mixing two generations in one file.
- Malformed rows (reader errors, prompts the template cannot render, empty prompts) are skipped and
  listed in `<out>.skipped.jsonl` plus a warning (config.on_error="skip"), or raise DataError ("raise").
- Output rows: {"real": [...msgs, assistant real], "generated": [...msgs, assistant sample], "index",
  "generated_ids"}, plus "samples": [K texts] and "samples_ids": [K id lists] when num_samples > 1
  (sample k seeded by (seed, index, k); "generated" is sample 0). Texts are decoded without special
  tokens, without the stop token, not stripped. The ids are the sampled tokens training uses for the
  generated answer (`sample_answer`): ending with the stop token when the sample stopped at one; as
  sampled when cut at max_new_tokens; for a stop string, the whole tokens before it plus EOS (the
  answer ended there, like a real answer ends with its end of turn).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence


from . import distributed as dist
from .config import ConfigError, records_given
from .data import DataError, Example, load_rows, read_examples, to_spin_row
from .io import ChunkedJsonlWriter, merge_parts, read_jsonl_part, write_rows_file
from .log import Progress, warn0
from .runs import check_manifest, part_files, part_path, read_manifest, remove_parts
from .sampler import GeneratedSequence, completion_text, encode_prompt, iter_generate_tokens, tokenizer_stop_ids
from .tokenizer import check_tokenizer_fits


# Settings that change the generated rows; a resumed job must use the same ones.
_RESULT_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "num_samples", "template",
                "max_prompt_length", "stop", "skip_special_tokens")


@records_given
@dataclass
class GenerationConfig:
    """Settings of a generation job (SPIN's recipe: max_new_tokens 256, prompts of at most 512 tokens)."""
    # may change between a run and its resume (minispin.config): samples do not depend on them
    RESUME_FREE: ClassVar[tuple[str, ...]] = ("progress", "batch_size", "compile", "chunk_size", "keep_parts")
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0
    num_samples: int = 1  # K samples per prompt (SPPO uses 5); rows get "samples" when K > 1
    template: str | None = None  # None/"chat": tokenizer chat template; "spin": "### Instruction: ..."
    max_prompt_length: int = 512  # prompts keep their END (and a leading BOS), see encode_prompt
    stop: list[str] = field(default_factory=list)  # extra stop strings (EOS always stops)
    skip_special_tokens: bool = True
    batch_size: int = 64  # decode slots per rank
    chunk_size: int = 64  # rows per appended, fsynced chunk of the part file
    on_error: str = "skip"  # malformed rows: "skip" (report in <out>.skipped.jsonl) or "raise"
    input_format: str = "auto"  # when `examples` is a path: read_examples(format=..., split=..., limit=...)
    split: str | None = None
    limit: int | None = None
    parquet: bool = False  # also write <out stem>.parquet
    compile: bool = False  # torch.compile + CUDA graph for the decode step (CUDA)
    progress: bool = True  # status line on stderr, rank 0
    keep_parts: bool = False  # keep the part files after the merge

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise', got {self.on_error!r}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"bad sampling settings: temperature {self.temperature} (must be >= 0), top_p "
                             f"{self.top_p} (in (0, 1]), top_k {self.top_k} (>= 0)")
        for name in ("batch_size", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]


def _sidecar(out_path: Path, what: str) -> Path:
    return out_path.with_name(f"{out_path.name}.{what}")


def _parquet_copy(out_path: Path) -> Path | None:
    return None if out_path.suffix == ".parquet" else out_path.with_suffix(".parquet")


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return read_jsonl_part(path)
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return load_rows(path)


def _finish_extras(out_path: Path, config: GenerationConfig) -> None:
    """After the final file exists: the parquet copy (if asked and missing), then leftover parts/job file."""
    copy = _parquet_copy(out_path)
    if config.parquet and copy is not None and not copy.exists():
        write_rows_file(copy, _read_rows(out_path))
    if not config.keep_parts:
        remove_parts(out_path)
    _sidecar(out_path, "job.json").unlink(missing_ok=True)


def _load_examples(examples: Any, config: GenerationConfig) -> tuple[list[Example], list[dict]]:
    if isinstance(examples, (str, os.PathLike)):
        result = read_examples(examples, format=config.input_format, split=config.split, limit=config.limit,
                               on_error=config.on_error)
        skipped = [{"index": s.index, "source": s.source, "reason": s.reason} for s in result.skipped]
        return list(result), skipped
    # a ReadResult (read_examples with on_error="skip") carries the rows its reader left out
    skipped = [{"index": s.index, "source": s.source, "reason": s.reason} for s in getattr(examples, "skipped", [])]
    examples = list(examples)
    for e in examples:
        if not isinstance(e, Example):
            raise TypeError(f"examples must be minispin.data.Example records or a path, got {type(e).__name__}")
    return examples, skipped


def _check_unique(examples: list[Example]) -> None:
    seen: dict[int, Example] = {}
    for e in examples:
        if e.index in seen:
            raise DataError("two examples have the same index; the index is the row identity used to "
                            "resume and merge", source=e.source, index=e.index)
        seen[e.index] = e


def _check_template(tokenizer: Any, template: str | None) -> None:
    """A template that cannot render even a plain user turn is a setting error (same on every rank),
    not a problem of each row: refuse it instead of reporting every row as malformed."""
    try:
        encode_prompt(tokenizer, [{"role": "user", "content": "Hello"}], template)
    except Exception as err:
        raise ValueError(f"the prompt template {template!r} cannot render a plain user message: {err}") from err


def _encode_share(tokenizer: Any, share: list[Example], config: GenerationConfig
                  ) -> tuple[list[tuple[Example, list[int]]], list[dict]]:
    """Encode the prompts; rows that cannot be rendered are skipped (reported) or raise."""
    ok, skipped = [], []
    for e in share:
        try:
            if not e.prompt:
                raise ValueError("the prompt has no messages")
            ids = encode_prompt(tokenizer, e.prompt, config.template, config.max_prompt_length)
            if not ids:
                raise ValueError("the rendered prompt is empty (no tokens)")
        except (ValueError, TypeError, KeyError) as err:
            if config.on_error == "raise":
                raise DataError(f"cannot encode the prompt: {err}", source=e.source, index=e.index) from err
            skipped.append({"index": e.index, "source": e.source, "reason": f"cannot encode the prompt: {err}"})
            continue
        ok.append((e, ids))
    return ok, skipped


def _check_positions(encoded: list[tuple[Example, list[int]]], config: GenerationConfig, positions: int) -> None:
    """Every rank: prompt + max_new_tokens must fit the model's positions (checked over all ranks' longest
    prompts, so every rank raises the same error before any row is generated)."""
    longest = max(((len(ids), e.index) for e, ids in encoded), default=(0, -1))
    length, index = max(tuple(x) for x in dist.all_gather_json(list(longest)))
    if length + config.max_new_tokens > positions:
        raise ConfigError(f"example {index + 1} (1-based) of the data: its prompt ({length} tokens) + max_new_tokens ({config.max_new_tokens}) "
                         f"exceeds the model's {positions} positions (max_position_embeddings); lower "
                         "--max_new_tokens or --max_prompt_length")


def _job_settings(config: GenerationConfig, n_examples: int) -> dict:
    settings = {k: getattr(config, k) for k in _RESULT_KEYS}
    settings["examples"] = n_examples
    return settings


def _check_job_file(out_path: Path, settings: dict) -> str | None:
    """Rank 0: record the settings of a new job, or compare with those of the job being resumed."""
    path = _sidecar(out_path, "job.json")
    if read_manifest(path) is None and part_files(out_path) and not path.exists():
        return (f"{out_path}: part files exist but no {path.name}; cannot tell which settings made them. "
                f"Delete {out_path.name}.part-* to start over")
    changed = check_manifest(path, settings)
    if changed:
        return (f"{out_path}: resuming a generation job started with other settings ({', '.join(changed)}: "
                f"{ {k: a for k, (a, _) in changed.items()} } -> { {k: b for k, (_, b) in changed.items()} }); use "
                f"the same settings, or delete {path.name} and the part files {out_path.name}.part-* to start over")
    return None


def run_generation_job(model: Any, tokenizer: Any, examples: Sequence[Example] | str | os.PathLike,
                       out_path: str | os.PathLike, config: GenerationConfig | None = None) -> Path:
    """Generate one SPIN row per example (resumable, distributed-aware); returns the final file's path.

    Call it on every rank (torchrun) or in one process. `out_path` ends in .jsonl (or .json/.parquet).
    """
    config = config or GenerationConfig()
    out_path = Path(out_path)
    rank, world = dist.get_rank(), dist.get_world_size()

    if dist.all_ranks_true(out_path.exists()):
        if rank == 0:
            _finish_extras(out_path, config)
        dist.barrier()
        return out_path

    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    _check_template(tokenizer, config.template)
    examples, skipped = _load_examples(examples, config)
    examples = sorted(examples, key=lambda e: e.index)
    _check_unique(examples)
    share = [e for p, e in enumerate(examples) if p % world == rank]
    encoded, my_skipped = _encode_share(tokenizer, share, config)  # checked before anything is written
    _check_positions(encoded, config, model.config.max_position_embeddings)
    error = _check_job_file(out_path, _job_settings(config, len(examples))) if rank == 0 else None
    error = dist.broadcast_json(error)
    if error:
        raise ValueError(error)

    # Rows already written by an earlier run, in any part file (an earlier run may have had another
    # world size). Parts of the current world size that other ranks append to hold only their shares.
    done: set[int] = set()
    own_part = part_path(out_path, rank, world)
    for part in part_files(out_path):
        if part != own_part:
            done.update(row["index"] for row in read_jsonl_part(part))
    with ChunkedJsonlWriter(own_part) as writer:
        done |= writer.done
        todo = [(e, ids) for e, ids in encoded if e.index not in done]
        _generate_rows(model, tokenizer, todo, writer, config, rank, world)

    all_skipped = [s for per_rank in dist.all_gather_json(my_skipped) for s in per_rank]
    dist.barrier()
    if rank == 0:
        skipped = sorted(skipped + all_skipped, key=lambda s: s["index"])
        skipped_path = _sidecar(out_path, "skipped.jsonl")
        if skipped:
            write_rows_file(skipped_path, skipped)
            shown = "; ".join(f"row {s['index']}: {s['reason']}" for s in skipped[:3])
            warn0(f"{out_path}: skipped {len(skipped)} malformed rows (listed in {skipped_path}): {shown}"
                  + (" ..." if len(skipped) > 3 else ""), prefix="generate")
        skipped_idx = {s["index"] for s in skipped}
        expected = {e.index for e in examples} - skipped_idx
        # every expected index exactly once, or MergeError (e.g. parts left by a job over other input)
        merge_parts(part_files(out_path), out_path, expected_keys=expected)
        _finish_extras(out_path, config)
    dist.barrier()
    return out_path


def sample_answer(seq: GeneratedSequence, decode: Callable[[list[int]], str], eos_id: int | None
                  ) -> tuple[str, list[int]]:
    """(text, token ids) of one sample as stored: the text as `completion_text` gives it, and the ids
    training uses (see the module doc). A sample cut at a stop string keeps the longest run of whole
    tokens whose text is a prefix of the text before the stop string (its text is then their decoding,
    so ids and text always agree), then EOS."""
    text = completion_text(seq, decode)
    if seq.finish_reason != "stop_string":
        return text, list(seq.token_ids)
    ids = list(seq.token_ids)
    m = len(ids)
    while m > 0 and not text.startswith(decode(ids[:m])):
        m -= 1
    kept = ids[:m]
    return decode(kept), kept + ([eos_id] if eos_id is not None else [])


def _generate_rows(model: Any, tokenizer: Any, encoded: list[tuple[Example, list[int]]],
                   writer: ChunkedJsonlWriter, config: GenerationConfig, rank: int, world: int) -> None:
    """Sample K continuations of every encoded prompt and append finished rows in chunks."""
    K = config.num_samples
    jobs = [(j, k) for j in range(len(encoded)) for k in range(K)]
    decode = lambda t: tokenizer.decode(t, skip_special_tokens=config.skip_special_tokens)  # noqa: E731
    texts: dict[int, list[tuple[str, list[int]] | None]] = {}
    pending: list[dict] = []
    label = "generate" if world == 1 else f"generate rank {rank}/{world}"
    bar = Progress(len(encoded), label, enabled=config.progress, unit="prompts", every=max(1, len(encoded) // 10))
    prompts_done = tokens = 0

    def flush() -> None:
        if pending:
            writer.write_rows(pending)
            pending.clear()
            dist.kill_point("generate", rows=writer.rows_written)

    stream = iter_generate_tokens(
        model, [encoded[j][1] for j, _ in jobs], max_new_tokens=config.max_new_tokens,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, seed=config.seed,
        indices=[encoded[j][0].index for j, _ in jobs], sample_ids=[k for _, k in jobs],
        batch_size=config.batch_size, stop_token_ids=tokenizer_stop_ids(model, tokenizer),
        stop_strings=config.stop, decode=decode, compile=config.compile, progress=False,
        vocab_limit=len(tokenizer))
    for pos, seq in stream:
        j, k = jobs[pos]
        slot = texts.setdefault(j, [None] * K)
        slot[k] = sample_answer(seq, decode, tokenizer.eos_id)
        tokens += len(seq.token_ids)
        if any(t is None for t in slot):
            continue
        example = encoded[j][0]
        row = to_spin_row(example, slot[0][0], slot[0][1])
        if K > 1:
            row["samples"] = [text for text, _ in slot]
            row["samples_ids"] = [ids for _, ids in slot]
        del texts[j]
        pending.append(row)
        prompts_done += 1
        bar.update(prompts_done, tokens=tokens)
        if len(pending) >= config.chunk_size:
            flush()
    flush()
    bar.close()
