"""Shared run infrastructure: the settings manifest and per-rank part files, each written once.

Manifest: a run records the settings that decide its result in a JSON file when it starts; a resume
compares the settings it is given with the recorded ones and is refused with the changed keys
(`old -> new`), except for keys that do not change the result (`allowed`).

Part files: a resumable job over ranks appends its finished rows to one part file per rank next to
the final file, `<final>.part-RRRRR-of-WWWWW.jsonl`, and the parts are merged into `<final>` at the end.

Metrics: an iteration's metrics.jsonl (one JSON record per optimizer step, appended while training) read
back, also while it is being written (`read_metrics`), and summarised (`metrics_summary`) for the
driver's per-iteration summary and `python -m minispin.report`.
"""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any, Iterable

from .io import atomic_write_json


def flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1} (nested dicts become dotted keys)."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def changed_settings(recorded: dict[str, Any], current: dict[str, Any],
                     allowed: Iterable[str] = ()) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (recorded value, current value)} of every setting that differs, in key order,
    leaving out `allowed` keys (and keys under an allowed prefix such as "methods")."""
    allowed = tuple(allowed)
    a = flatten(json.loads(json.dumps(recorded)))
    b = flatten(json.loads(json.dumps(current)))

    def free(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in allowed)

    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not free(k)}


def describe_changes(changes: dict[str, tuple[Any, Any]], limit: int | None = None) -> str:
    """"key: old -> new, ..." (the first `limit` of them)."""
    items = list(changes.items())[:limit]
    return ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in items)


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded settings, or None when there is no (readable) manifest."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def check_manifest(path: str | os.PathLike, settings: dict[str, Any], *, allowed: Iterable[str] = (),
                   record: bool = True) -> dict[str, tuple[Any, Any]]:
    """Compare `settings` with the manifest at `path`: returns the changed settings ({} when none or when
    there is no manifest yet). With record=True a missing manifest is written (atomically) and an
    unchanged one is left as it is. Rank 0 only; the caller words and raises the error."""
    recorded = read_manifest(path)
    if recorded is None:
        if record:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, settings)
        return {}
    return changed_settings(recorded, settings, allowed)


def write_manifest(path: str | os.PathLike, settings: dict[str, Any]) -> None:
    atomic_write_json(path, settings)


# ----------------------------------------------------------------------------- per-rank part files

def part_path(final: str | os.PathLike, rank: int, world: int) -> Path:
    """This rank's part file of `final`: <final>.part-RRRRR-of-WWWWW.jsonl."""
    final = Path(final)
    return final.with_name(f"{final.name}.part-{rank:05d}-of-{world:05d}.jsonl")


def part_files(final: str | os.PathLike) -> list[Path]:
    """Every part file of `final` (any world size), sorted."""
    return sorted(Path(p) for p in glob.glob(glob.escape(str(final)) + ".part-*-of-*.jsonl"))


def remove_parts(final: str | os.PathLike) -> None:
    for part in part_files(final):
        part.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- metrics.jsonl

def read_metrics(path: str | os.PathLike) -> tuple[list[dict[str, Any]], bool]:
    """The step records of a metrics.jsonl (none when it does not exist yet), and whether its last line
    was torn (a write in progress: skipped). A bad line before the last one is a ValueError naming the
    file and the 1-based line."""
    path = Path(path)
    if not path.is_file():
        return [], False
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    records: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                raise ValueError("no integer 'step'")
        except ValueError as e:
            if all(not rest.strip() for rest in lines[n:]):  # the last line
                return records, True
            raise ValueError(f"{path}: line {n} is not a metrics record ({e}); training rewrites this file "
                             "when it resumes, or delete the line") from None
        records.append(rec)
    return records, False


SUMMARY_METRICS = ("loss", "margins", "accuracies", "rewards/real", "rewards/generated", "logps/real",
                   "logps/generated", "tokens_per_s")


def metrics_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps, pairs seen and training seconds of an iteration's records, and each metric's mean over the
    last 10% of the steps (at least one; None when the records have no such metric)."""
    out: dict[str, Any] = {"steps": len(records), "last_step": records[-1]["step"] if records else 0,
                           "pairs_seen": sum(int(r.get("pairs", 0)) for r in records),
                           "train_seconds": sum(float(r.get("step_time_s", 0.0)) for r in records)}
    k = max(1, len(records) // 10)
    for key in SUMMARY_METRICS:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        out[key] = sum(values[-k:]) / len(values[-k:]) if values else None
    return out
