"""Reading SFT, SPIN and preference data into normalised records.

Every row becomes an `Example` (prompt messages + real answer + generated answer, for SFT/SPIN) or a
`PreferenceExample` (prompt + chosen + rejected, for DPO-style data). A row's `index` is its position
in the source (counted across all files of a directory, in read order); it is the identity used to
resume generation and to merge generated rows back in source order.

Row formats, detected per row (or forced with ``format=``):

SFT / SPIN (`read_examples`):
  "spin"            {"real": [..., {"role": "assistant", ...}], "generated": [...]}  - the public SPIN
                    layout. Prompt = the messages before the last (assistant) turn of `real`; real =
                    that turn's content; generated = last assistant content of `generated`, where an
                    empty/None answer (or no `generated` column) means "not generated yet" (None).
                    Careful: an empty generation therefore reads back as None too. The turns before
                    it must match the prompt of `real` (system turns aside: the public generator
                    drops them), else the row is an error - it catches misaligned merges.
                    Optional "generated_ids" (the sampled token ids of the generated answer, as the
                    generation job writes them) -> Example.generated_ids, and "samples_ids" (one id
                    list per entry of "samples") stays in `extra`; training uses these ids as they
                    are. Rows without them (older versions) are re-encoded from their text, with a
                    one-line note per file read.
  "ultrachat"       {"messages": [...], "prompt"?, "prompt_id"?} - only the first user turn (with the
                    system turns before it) and the first assistant turn right after it are used.
  "alpaca"          {"instruction", "input"?, "output", "system"?, "history"?} - user content =
                    instruction + "\\n\\n" + input when input is non-blank (blank parts are left out);
                    history = [[user, assistant], ...] turns placed before it.
  "prompt_response" {"prompt": str | messages, "response" | "completion" | "answer": str, "system"?}

Preferences (`read_preferences`):
  "trl"             {"prompt"?, "chosen", "rejected"} - strings, or message lists. With message lists
                    the prompt may be implicit: the conversation before the final assistant turn,
                    which must be the same in chosen and rejected.
  "sharegpt"        {"conversations": [{"from": "human"|"gpt"|"system", "value"}...],
                    "chosen": {"from": "gpt", "value"}, "rejected": {...}, "system"?}
  "spin"            a SPIN row read as a pair: chosen = real, rejected = generated.

Messages may be written {"role", "content"} or sharegpt-style {"from", "value"} anywhere; roles are
normalised to system/user/assistant and content must be a string. Numeric judge-score columns
(names starting with "score_" or ending in "_score", and SPPO's chosen_probs*) are collected into
`scores`; all other unused columns are kept in `extra`.

Files: .json (one JSON array of row objects), .jsonl (one object per line), .parquet (needs the
optional pyarrow: ``pip install pyarrow`` or ``pip install minispin[parquet]``). A directory means
all its *.parquet / *.jsonl / *.json files (not recursive; a folder without any but with a `data/`
subfolder, as a Hugging Face dataset download has, means that subfolder) in sorted name order. A
directory whose file names start with several split names (train_sft-*, test_sft-*) needs a split,
rather than reading them all: ``split="train"``
keeps the files whose name contains "train" as a whole word, e.g. train_prefs-00000-of-00001.parquet,
train-*.jsonl, my_train.json, but not pretrain.json. Note "train" matches train_sft AND train_gen
(UltraChat200k): pass the full split name ("train_sft") there.

Bad rows raise `DataError` (a `minispin.log.UserError` naming the file, the 1-based line of a .jsonl
file or the 1-based row of a .json/.parquet file, and the key), or with ``on_error="skip"`` are left
out and listed in the result's ``skipped`` (and summarised in one logged warning) - never dropped
silently. With format "auto" a file's format is the one its first row shows, so a later row that lacks
that format's key is reported as missing THAT key. Unreadable files (invalid JSON, not UTF-8, not
parquet) always raise, naming the line.
"""
from __future__ import annotations

import importlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import UserError

log = logging.getLogger("minispin.data")

DATA_SUFFIXES = (".parquet", ".jsonl", ".json")
EXAMPLE_FORMATS = ("spin", "ultrachat", "alpaca", "prompt_response")
PREFERENCE_FORMATS = ("trl", "sharegpt", "spin")
ROLES = ("system", "user", "assistant")
FROM_TO_ROLE = {"human": "user", "gpt": "assistant", "system": "system",
                "user": "user", "assistant": "assistant"}
ANSWER_KEYS = ("response", "completion", "answer")
SPPO_PROB_KEYS = ("chosen_probs", "chosen_probs_win", "chosen_probs_lose")
PYARROW_HINT = "pip install pyarrow (or pip install minispin[parquet])"

Message = dict[str, str]


# ----------------------------------------------------------------------------- records and errors

@dataclass(frozen=True)
class Example:
    """One SFT/SPIN pair. prompt ends with the last user turn; generated is None until generated."""
    index: int
    prompt: list[Message]
    real: str  # "" only when read with require_real=False from a row without an answer
    generated: str | None
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, float] | None = None
    generated_ids: list[int] | None = None  # the sampled token ids of `generated` (None: text only)

    @property
    def prompt_text(self) -> str:
        """Content of the last user turn (what a plain instruction template would show)."""
        return self.prompt[-1]["content"]


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair (DPO/SPPO): the chosen answer is preferred over the rejected one."""
    index: int
    prompt: list[Message]
    chosen: str
    rejected: str
    source: str
    scores: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedRow:
    """A row left out by on_error="skip": where it was and why."""
    index: int
    source: str
    reason: str


class ReadResult(list):
    """The records read (a plain list) plus `skipped`: the rows left out with on_error="skip"."""

    def __init__(self, records=(), skipped=(), n_rows: int = 0):
        super().__init__(records)
        self.skipped: list[SkippedRow] = list(skipped)
        self.n_rows = n_rows  # source rows looked at (after `limit`)


class DataError(UserError):
    """A data file or row is unusable. The message names the file, where in it (`where`: "line 15" of a
    .jsonl file, "row 15 (1-based)"; default: the row of `index`, which is 0-based) and the key."""

    def __init__(self, reason: str, *, source: str | None = None, index: int | None = None,
                 key: str | None = None, where: str | None = None):
        self.reason, self.source, self.index, self.key = reason, source, index, key
        self.where = where if where is not None else (f"row {index + 1} (1-based)" if index is not None else None)
        parts = [str(source)] if source is not None else []
        if self.where is not None:
            parts.append(self.where)
        if key is not None:
            parts.append(f"key {key!r}")
        super().__init__(": ".join(parts + [reason]))


class _RowError(Exception):
    """Raised inside row parsers; turned into DataError with the file and index by the read loop."""

    def __init__(self, key: str | None, reason: str):
        super().__init__(reason)
        self.key, self.reason = key, reason


# ----------------------------------------------------------------------------- files and rows

def data_files(path: str | Path, split: str | None = None) -> list[Path]:
    """The files `path` stands for: itself, or a directory's data files in sorted order (see module doc)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files and (path / "data").is_dir():  # a Hugging Face dataset snapshot: <repo>/data/*.parquet
            return data_files(path / "data", split)
        if not files:
            raise DataError(f"no {'/'.join('*' + s for s in DATA_SUFFIXES)} files in directory",
                            source=str(path))
        if split is not None:
            matching = [p for p in files if _name_has_split(p.name, split)]
            if not matching:
                splits = sorted({s for s in map(_split_of_name, (p.name for p in files)) if s is not None})
                fix = f"set --split to one of {', '.join(splits)}" if splits else "leave out --split"
                raise DataError(f"no file name contains split {split!r} (files: "
                                f"{', '.join(p.name for p in files)}); {fix}", source=str(path))
            files = matching
        else:
            splits = sorted({s for s in map(_split_of_name, (p.name for p in files)) if s is not None})
            if len(splits) > 1:  # never mix e.g. test_sft rows into training silently
                raise DataError(f"the directory holds several splits ({', '.join(splits)}); choose one with "
                                f"--split (split=...), e.g. --split {splits[-1]}", source=str(path))
        return files
    if not path.exists():
        raise DataError("no such file or directory", source=str(path))
    if path.suffix not in DATA_SUFFIXES:
        raise DataError(f"unsupported file type {path.suffix!r} (expected one of {DATA_SUFFIXES})",
                        source=str(path))
    if split is not None:
        raise DataError(f"a split ({split!r}) only chooses among the files of a folder, and this is one file: "
                        "leave out --split (split=None), or point --data at the folder", source=str(path))
    return [path]


_SPLIT_NAME = re.compile(r"^((?:train|test|validation|valid|val|dev|eval)(?:_[A-Za-z0-9]+)*)(?:[-.]|$)")


def _split_of_name(name: str) -> str | None:
    """The split a data file's name starts with ("train_sft-00000-of-00003.parquet" -> "train_sft",
    "test.jsonl" -> "test"), or None."""
    m = _SPLIT_NAME.match(name)
    return m.group(1) if m else None


def _name_has_split(name: str, split: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(split)}(?![A-Za-z0-9])", name) is not None


def iter_rows(path: str | Path, split: str | None = None) -> Iterator[tuple[int, str, dict]]:
    """Yield (index, file, row) for every row of `path`; index counts across files in read order."""
    for index, file, _, row in _located_rows(path, split):
        yield index, file, row


def _located_rows(path: str | Path, split: str | None) -> Iterator[tuple[int, str, str, dict]]:
    """(index, file, where in the file: "line 7" / "row 7 (1-based)", row) for every row of `path`."""
    index = 0
    for file in data_files(path, split):
        for where, row in _iter_file_rows(file):
            yield index, str(file), where, row
            index += 1


def load_rows(path: str | Path, split: str | None = None) -> list[dict]:
    """All rows of `path` as plain dicts, in source order (list position = row index)."""
    return [row for _, _, row in iter_rows(path, split)]


def _iter_file_rows(file: Path) -> Iterator[tuple[str, dict]]:
    if file.suffix == ".jsonl":
        rows: Iterator[tuple[str, Any]] = _iter_jsonl(file)
    else:
        source = _iter_parquet(file) if file.suffix == ".parquet" else _load_json_array(file)
        rows = ((f"row {k} (1-based)", row) for k, row in enumerate(source, 1))
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object per row, got {type(row).__name__}", source=str(file),
                            where=where)
        yield where, row


def _not_utf8(file: Path, data: bytes, e: UnicodeDecodeError, line: int | None = None) -> DataError:
    """A non-UTF-8 byte, located by its line (and column) rather than a byte offset."""
    start = data.rfind(b"\n", 0, e.start) + 1
    line = line if line is not None else data.count(b"\n", 0, e.start) + 1
    return DataError(f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at column {e.start - start + 1}); "
                     "save the file as UTF-8", source=str(file))


def _load_json_array(file: Path) -> list:
    data = file.read_bytes()
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _not_utf8(file, data, e) from None
    except json.JSONDecodeError as e:
        hint = " (JSON lines? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise DataError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}",
                        source=str(file)) from None
    if not isinstance(obj, list):
        what = f"an object with keys {sorted(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"expected a JSON array of row objects, got {what}", source=str(file))
    return obj


def _iter_jsonl(file: Path) -> Iterator[tuple[str, Any]]:
    with open(file, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(file, raw, e, line=line_no) from None
            if not line.strip():
                continue
            try:
                yield f"line {line_no}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"line {line_no}: invalid JSON: {e.msg} (column {e.colno})",
                                source=str(file)) from None


def import_pyarrow_parquet():
    """Import pyarrow.parquet lazily, with an install hint when it is missing."""
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError as e:
        raise ImportError(f"reading/writing parquet files needs pyarrow: {PYARROW_HINT}") from e


def _iter_parquet(file: Path) -> Iterator[dict]:
    pq = import_pyarrow_parquet()
    try:
        parquet_file = pq.ParquetFile(file)
        for batch in parquet_file.iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        if isinstance(e, DataError):
            raise
        raise DataError(f"cannot read parquet: {e}", source=str(file)) from None


# ----------------------------------------------------------------------------- field parsing

def _type(value: Any) -> str:
    return type(value).__name__


def _messages(value: Any, key: str, *, none_content_ok: bool = False) -> list[Message]:
    """Validate a message list and normalise it to [{"role", "content"}] with system/user/assistant."""
    if not isinstance(value, list):
        raise _RowError(key, f"expected a list of messages, got {_type(value)}")
    return [_message(m, f"{key}[{i}]", none_content_ok) for i, m in enumerate(value)]


def _message(m: Any, key: str, none_content_ok: bool = False) -> Message:
    if not isinstance(m, dict):
        raise _RowError(key, f"expected a message dict, got {_type(m)}")
    if "role" in m:
        role, content, content_key = m["role"], m.get("content"), "content"
        if role not in ROLES:
            raise _RowError(f"{key}.role", f"unknown role {role!r} (expected one of {ROLES})")
    elif "from" in m:
        role, content, content_key = FROM_TO_ROLE.get(m["from"]), m.get("value"), "value"
        if role is None:
            raise _RowError(f"{key}.from", f"unknown sender {m['from']!r} "
                                           f"(expected one of {sorted(FROM_TO_ROLE)})")
    else:
        raise _RowError(key, f"message has neither 'role' nor 'from' (keys: {sorted(m)})")
    if content is None and none_content_ok:
        content = ""
    if not isinstance(content, str):
        raise _RowError(f"{key}.{content_key}", f"content must be a string, got {_type(content)}")
    return {"role": role, "content": content}


def _check_prompt(prompt: list[Message], key: str) -> list[Message]:
    if not prompt:
        raise _RowError(key, "empty prompt (no messages)")
    if prompt[-1]["role"] != "user":
        raise _RowError(key, f"prompt must end with a user turn, ends with {prompt[-1]['role']!r}")
    if not prompt[-1]["content"].strip():
        raise _RowError(key, "empty prompt (last user turn is blank)")
    return prompt


def _string(row: dict, key: str, *, required: bool = True, nonblank: bool = False) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise _RowError(key, "missing")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise _RowError(key, f"expected a string, got {_type(value)}")
    if nonblank and not value.strip():
        raise _RowError(key, "empty")
    return value


def _answer(text: str | None, key: str, required: bool) -> str:
    if text is None or not text.strip():
        if required:
            raise _RowError(key, "missing or empty answer")
        return "" if text is None else text
    return text


def _is_score_key(key: str) -> bool:
    return key.startswith("score_") or key.endswith("_score") or key in SPPO_PROB_KEYS


def _scores(row: dict) -> dict[str, float] | None:
    scores = {}
    for key, value in row.items():
        if not _is_score_key(key) or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _RowError(key, f"score must be a finite number, got {value!r}")
        scores[key] = float(value)
    return scores or None


def _extra(row: dict, used: set[str]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in used and not _is_score_key(k)}


# ----------------------------------------------------------------------------- SFT / SPIN rows

def detect_example_format(row: dict) -> str:
    """Which SFT/SPIN format a row is in (see module doc); raises _RowError when none fits."""
    if "real" in row:
        return "spin"
    if "messages" in row:
        return "ultrachat"
    if "instruction" in row:
        return "alpaca"
    if "chosen" in row or "rejected" in row or "conversations" in row:
        raise _RowError(None, "this is a preference row (chosen/rejected); use read_preferences")
    if "prompt" in row:
        return "prompt_response"
    raise _RowError(None, f"cannot detect the row format from its keys {sorted(row)[:12]}")


def _split_last_assistant(msgs: list[Message], key: str) -> tuple[list[Message], str | None]:
    """(messages before the final assistant turn, its content); (msgs, None) without one."""
    if msgs and msgs[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1]["content"]
    if any(m["role"] == "assistant" for m in msgs):
        raise _RowError(key, "must end with the assistant turn (turns follow the last answer)")
    return msgs, None


def _without_system(msgs: list[Message]) -> list[Message]:
    return [m for m in msgs if m["role"] != "system"]


def _token_ids(value: Any, key: str) -> list[int]:
    """A list of token ids (non-negative ints) from a row."""
    if not isinstance(value, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                       for t in value):
        raise _RowError(key, f"expected a list of token ids (integers >= 0), got {value!r:.80}")
    return [int(t) for t in value]


def _parse_spin(row, require_real):
    real_msgs = _messages(row["real"], "real")
    prompt, real = _split_last_assistant(real_msgs, "real")
    _check_prompt(prompt, "real")
    real = _answer(real, "real", require_real)
    generated = None
    if row.get("generated") is not None:
        gen_msgs = _messages(row["generated"], "generated", none_content_ok=True)
        gen_prompt, generated = _split_last_assistant(gen_msgs, "generated")
        if gen_msgs and _without_system(gen_prompt) != _without_system(prompt):
            raise _RowError("generated", "the prompt in 'generated' differs from the prompt in 'real'")
        generated = generated or None
    if row.get("samples_ids") is not None:
        ids = row["samples_ids"]
        if not isinstance(ids, list):
            raise _RowError("samples_ids", f"expected one token-id list per sample, got {_type(ids)}")
        for k, sample in enumerate(ids):
            _token_ids(sample, f"samples_ids[{k}]")
        samples = row.get("samples")
        if not isinstance(samples, list) or len(samples) != len(ids):
            raise _RowError("samples_ids", "needs a 'samples' list of the same length")
    return prompt, real, generated, {"real", "generated", "generated_ids"}


def _parse_ultrachat(row, require_real):
    msgs = _messages(row["messages"], "messages")
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
    if first_user is None:
        raise _RowError("messages", "no user turn")
    if any(m["role"] != "system" for m in msgs[:first_user]):
        raise _RowError("messages", "turns before the first user turn must be system turns")
    prompt = _check_prompt(msgs[:first_user + 1], "messages")
    answer = None
    if first_user + 1 < len(msgs):
        if msgs[first_user + 1]["role"] != "assistant":
            raise _RowError(f"messages[{first_user + 1}]", "expected the assistant answer to the "
                                                           f"first user turn, got {msgs[first_user + 1]['role']!r}")
        answer = msgs[first_user + 1]["content"]
    return prompt, _answer(answer, f"messages[{first_user + 1}]", require_real), None, {"messages"}


def _system_turn(row: dict) -> list[Message]:
    system = _string(row, "system", required=False)
    return [{"role": "system", "content": system}] if system and system.strip() else []


def _parse_alpaca(row, require_real):
    instruction = _string(row, "instruction")
    extra_input = _string(row, "input", required=False) or ""
    user = "\n\n".join(part for part in (instruction, extra_input) if part.strip())
    if not user:
        raise _RowError("instruction", "empty prompt (instruction and input are blank)")
    history = []
    if row.get("history") is not None:
        if not isinstance(row["history"], list):
            raise _RowError("history", f"expected a list of [user, assistant] pairs, got {_type(row['history'])}")
        for i, pair in enumerate(row["history"]):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                raise _RowError(f"history[{i}]", "expected a [user, assistant] pair of strings")
            history += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = _system_turn(row) + history + [{"role": "user", "content": user}]
    real = _answer(_string(row, "output", required=require_real), "output", require_real)
    return prompt, real, None, {"instruction", "input", "output", "system", "history"}


def _parse_prompt_response(row, require_real):
    if isinstance(row.get("prompt"), list):
        prompt = _check_prompt(_messages(row["prompt"], "prompt"), "prompt")
    else:
        prompt = _system_turn(row) + [{"role": "user", "content": _string(row, "prompt", nonblank=True)}]
    answer_key = next((k for k in ANSWER_KEYS if k in row), ANSWER_KEYS[0])
    real = _answer(_string(row, answer_key, required=require_real), answer_key, require_real)
    return prompt, real, None, {"prompt", "system", *ANSWER_KEYS}


_EXAMPLE_PARSERS = {"spin": _parse_spin, "ultrachat": _parse_ultrachat, "alpaca": _parse_alpaca,
                    "prompt_response": _parse_prompt_response}
_REQUIRED_KEY = {"spin": "real", "ultrachat": "messages", "alpaca": "instruction", "prompt_response": "prompt",
                 "trl": "chosen", "sharegpt": "conversations"}


def parse_example(row: dict, index: int, source: str, *, format: str = "auto",
                  require_real: bool = True, require_generated: bool = False) -> Example:
    """Normalise one SFT/SPIN row; raises DataError naming source, index and key."""
    if format != "auto" and format not in EXAMPLE_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {EXAMPLE_FORMATS}, got {format!r}")
    try:
        fmt = detect_example_format(row) if format == "auto" else format
        if _REQUIRED_KEY[fmt] not in row:
            raise _RowError(_REQUIRED_KEY[fmt], f"missing (format {fmt!r})")
        prompt, real, generated, used = _EXAMPLE_PARSERS[fmt](row, require_real)
        if require_generated and generated is None:
            raise _RowError("generated", "no generated answer (empty or missing)")
        ids = row.get("generated_ids") if fmt == "spin" else None
        return Example(index=index, prompt=prompt, real=real, generated=generated, source=source,
                       extra=_extra(row, used), scores=_scores(row),
                       generated_ids=_token_ids(ids, "generated_ids") if ids is not None else None)
    except _RowError as e:
        raise DataError(e.reason, source=source, index=index, key=e.key) from None


# ----------------------------------------------------------------------------- preference rows

def detect_preference_format(row: dict) -> str:
    """Which preference format a row is in (see module doc); raises _RowError when none fits."""
    if "conversations" in row:
        return "sharegpt"
    if "chosen" in row or "rejected" in row:
        return "trl"
    if "real" in row:
        return "spin"
    raise _RowError(None, f"not a preference row (no chosen/rejected) - keys {sorted(row)[:12]}")


def _answer_side(value: Any, key: str) -> tuple[list[Message] | None, str]:
    """chosen/rejected as (conversation before the answer or None, answer text)."""
    if isinstance(value, str):
        return None, value
    msgs = [_message(value, key)] if isinstance(value, dict) else _messages(value, key)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise _RowError(key, "must end with an assistant turn")
    return (msgs[:-1] or None), msgs[-1]["content"]


def _parse_trl(row):
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise _RowError(key, "missing")
    chosen_prefix, chosen = _answer_side(row["chosen"], "chosen")
    rejected_prefix, rejected = _answer_side(row["rejected"], "rejected")
    if chosen_prefix is not None and rejected_prefix is not None and chosen_prefix != rejected_prefix:
        raise _RowError("rejected", "chosen and rejected continue different conversations")
    implicit = chosen_prefix if chosen_prefix is not None else rejected_prefix
    explicit = row.get("prompt")
    if explicit is None:
        if implicit is None:
            raise _RowError("prompt", "missing (and chosen/rejected hold no conversation to take it from)")
        prompt = implicit
    elif isinstance(explicit, str):
        if not explicit.strip():
            raise _RowError("prompt", "empty")
        if implicit is not None:  # e.g. UltraFeedback: prompt string + full conversations
            if implicit[-1]["role"] != "user" or implicit[-1]["content"].strip() != explicit.strip():
                raise _RowError("prompt", "differs from the last user turn in chosen/rejected")
            prompt = implicit
        else:
            prompt = _system_turn(row) + [{"role": "user", "content": explicit}]
    else:
        prompt = _messages(explicit, "prompt")
        if implicit is not None and implicit != prompt:
            raise _RowError("prompt", "differs from the conversation in chosen/rejected")
    return _check_prompt(prompt, "prompt"), chosen, rejected, {"prompt", "chosen", "rejected", "system"}


def _parse_sharegpt(row):
    prompt = _messages(row["conversations"], "conversations")
    if not any(m["role"] == "system" for m in prompt):
        prompt = _system_turn(row) + prompt
    _check_prompt(prompt, "conversations")
    answers = []
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if value is None:
            raise _RowError(key, "missing")
        if isinstance(value, str):
            answers.append(value)
        else:
            message = _message(value, key)
            if message["role"] != "assistant":
                raise _RowError(key, f"expected an assistant ('gpt') answer, got role {message['role']!r}")
            answers.append(message["content"])
    return prompt, answers[0], answers[1], {"conversations", "chosen", "rejected", "system"}


def _parse_spin_pair(row):
    prompt, real, generated, used = _parse_spin(row, require_real=True)
    if generated is None:
        raise _RowError("generated", "no generated answer (empty or missing)")
    return prompt, real, generated, used


_PREFERENCE_PARSERS = {"trl": _parse_trl, "sharegpt": _parse_sharegpt, "spin": _parse_spin_pair}


def parse_preference(row: dict, index: int, source: str, *, format: str = "auto") -> PreferenceExample:
    """Normalise one preference row; raises DataError naming source, index and key."""
    if format != "auto" and format not in PREFERENCE_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {PREFERENCE_FORMATS}, got {format!r}")
    try:
        fmt = detect_preference_format(row) if format == "auto" else format
        if _REQUIRED_KEY.get(fmt, "real") not in row:
            raise _RowError(_REQUIRED_KEY.get(fmt, "real"), f"missing (format {fmt!r})")
        prompt, chosen, rejected, used = _PREFERENCE_PARSERS[fmt](row)
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise _RowError(key, "empty answer")
        return PreferenceExample(index=index, prompt=prompt, chosen=chosen, rejected=rejected,
                                 source=source, scores=_scores(row), extra=_extra(row, used))
    except _RowError as e:
        raise DataError(e.reason, source=source, index=index, key=e.key) from None


# ----------------------------------------------------------------------------- readers

def _read(path, split, limit, on_error, warn, parse, detect, weak=()) -> ReadResult:
    """Parse every row with parse(row, index, source, format). `detect(row)` gives a row's format; the
    first good row of a file sets the file's format, by which a later bad row is judged when its own
    detection is only the `weak` fallback (an UltraChat row without `messages` still has a `prompt`,
    so it looks like a prompt/response row: it is reported as missing `messages`, not `response`)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    records, skipped, n_rows = [], [], 0
    file_format: dict[str, str] = {}
    for index, source, where, row in _located_rows(path, split):
        if limit is not None and index >= limit:
            break
        n_rows += 1
        try:
            records.append(parse(row, index, source, "auto"))
            if source not in file_format and _detected(detect, row) is not None:
                file_format[source] = _detected(detect, row)
            continue
        except DataError as e:
            error, note = e, ""
        fmt, own = file_format.get(source), _detected(detect, row)
        if fmt is not None and own != fmt and own in weak:  # judge the row by its file's format
            try:
                records.append(parse(row, index, source, fmt))
                continue
            except DataError as e:
                error = e
        if fmt is not None and own != fmt and repr(fmt) not in error.reason:
            note = f" (the rows above are in format {fmt!r})"
        error = DataError(error.reason + note, source=source, index=index, key=error.key, where=where)
        if on_error == "raise":
            raise error
        skipped.append(SkippedRow(index, source, str(error)))
    if skipped:
        first = "; ".join(s.reason for s in skipped[:3])
        (warn or log.warning)(f"skipped {len(skipped)} of {n_rows} rows of {path}: {first}"
                              + (" ..." if len(skipped) > 3 else ""))
    return ReadResult(records, skipped, n_rows)


def _detected(detect: Callable[[dict], str], row: dict) -> str | None:
    try:
        return detect(row)
    except _RowError:
        return None


def read_examples(path: str | Path, *, format: str = "auto", split: str | None = None,
                  limit: int | None = None, on_error: str = "raise", require_real: bool = True,
                  require_generated: bool = False,
                  warn: Callable[[str], None] | None = None) -> ReadResult:
    """Read SFT/SPIN rows from a file or directory as a list of `Example` (a `ReadResult`).

    limit: look at the first `limit` source rows only (indexes 0..limit-1, skipped ones included).
    on_error: "raise" -> DataError at the first bad row; "skip" -> leave it out, list it in
    result.skipped and call `warn` (default: logging warning) once with a summary.
    require_real: a missing/blank real answer is an error (False: read prompts only, real = "").
    require_generated: a missing/blank generated answer is an error (training on SPIN pairs).
    """
    if format != "auto" and format not in EXAMPLE_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {EXAMPLE_FORMATS}, got {format!r}")
    result = _read(path, split, limit, on_error, warn,
                   lambda row, index, source, fmt: parse_example(
                       row, index, source, format=format if format != "auto" else fmt, require_real=require_real,
                       require_generated=require_generated), detect_example_format, weak=("prompt_response",))
    text_only = sum(1 for e in result if (e.generated is not None and e.generated_ids is None)
                    or ("samples" in e.extra and "samples_ids" not in e.extra))
    if text_only:
        (warn or log.warning)(f"note: {text_only} of {len(result)} rows of {path} hold generated answers as text "
                              "only (no generated_ids/samples_ids, e.g. written by an older minispin); they are "
                              "re-encoded from the text, which may differ from the tokens that were sampled")
    return result


def read_preferences(path: str | Path, *, format: str = "auto", split: str | None = None,
                     limit: int | None = None, on_error: str = "raise",
                     warn: Callable[[str], None] | None = None) -> ReadResult:
    """Read preference rows (trl / sharegpt / spin) as a list of `PreferenceExample` (a `ReadResult`).

    limit, on_error and warn work as in `read_examples`.
    """
    if format != "auto" and format not in PREFERENCE_FORMATS:
        raise ValueError(f"format must be 'auto' or one of {PREFERENCE_FORMATS}, got {format!r}")
    return _read(path, split, limit, on_error, warn,
                 lambda row, index, source, fmt: parse_preference(
                     row, index, source, format=format if format != "auto" else fmt), detect_preference_format)


# ----------------------------------------------------------------------------- writer

def to_spin_row(example: Example, generated: str, generated_ids: list[int] | None = None) -> dict:
    """A row in the public SPIN layout (real/generated message lists) plus the source `index` and, when
    given, the generated answer's sampled token ids ("generated_ids")."""
    if not isinstance(generated, str):
        raise TypeError(f"generated must be a string, got {_type(generated)}")
    prompt = [{"role": m["role"], "content": m["content"]} for m in example.prompt]
    row = {
        "real": prompt + [{"role": "assistant", "content": example.real}],
        "generated": [dict(m) for m in prompt] + [{"role": "assistant", "content": generated}],
        "index": example.index,
    }
    if generated_ids is not None:
        row["generated_ids"] = [int(t) for t in generated_ids]
    return row
