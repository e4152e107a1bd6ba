"""Shared run infrastructure: the settings manifest and per-rank part files, each written once.

Manifest: a run records the settings that decide its result in a JSON file when it starts; a resume
compares the settings it is given with the recorded ones and is refused with the changed keys
(`old -> new`), except for keys that do not change the result (`allowed`).

Part files: a resumable job over ranks appends its finished rows to one part file per rank next to
the final file, `<final>.part-RRRRR-of-WWWWW.jsonl`, and the parts are merged into `<final>` at the end.

Metrics: an iteration's metrics.jsonl (one JSON record per optimizer step, appended while training) read
back, also while it is being written (`read_metrics`), and summarised (`metrics_summary`) for the
driver's per-iteration summary and `python -m minispin.report`.

Run-directory lock: one job per run directory. Rank 0 holds an flock on `<run>/.lock` (with the holder's
pid, host and start time written in it) for the whole job; a second job stops at once naming the holder.
The kernel drops the flock when the holder dies, so a killed job never blocks the next one.

Content manifest: a phase is done when the sizes and blake2b digests of the files it wrote, recorded in
`<dir>/phases.json`, still match (a deleted or truncated file is named, never reported "done").
Input fingerprints: the data files a run reads are recorded (size + digest) when it starts; a resume
with a changed data file is refused, naming the file. Temp files and folders of interrupted minispin
writes are removed when a job starts (`remove_temp_files`).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from . import distributed as dist
from .errors import UserError
from .io import atomic_write_json


class RunError(UserError):
    """A run directory that cannot be used as asked: locked by another job, damaged outputs, changed inputs.
    (A ValueError, so callers that catch bad-input errors catch it too.)"""


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


# ----------------------------------------------------------------------------- run-directory lock

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive flock on <run>/.lock held by this process (rank 0) for a whole job; see `lock_run`."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock or raise RunError naming the job that holds it (pid, host, start time)."""
        import fcntl

        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise RunError(f"--output_dir {self.path.parent} is a file, not a folder: give a new or existing run "
                           "folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"{self.path.parent} is in use by another job ({self._holder()}); wait for it to end "
                           "or stop it, or use another --output_dir") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def _holder(self) -> str:
        for _ in range(20):  # the holder writes its info right after taking the lock
            try:
                info = json.loads(self.path.read_text(encoding="utf-8"))
                return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
            except (OSError, ValueError, KeyError, TypeError):
                time.sleep(0.05)
        return f"holder unknown: {self.path} holds no readable pid/host"

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the file drops the flock (the holder info stays, it is harmless)
            self._fd = -1

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_run(run_dir: str | os.PathLike) -> RunLock | None:
    """Every rank: rank 0 takes the run directory's lock, the others wait for the outcome; a refused lock
    raises RunError on every rank. Returns the lock (rank 0; None elsewhere): release() it when the job ends."""
    lock, error = None, None
    if dist.is_main():
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except (RunError, OSError) as e:
            lock, error = None, str(e)
    error = dist.broadcast_json(error)
    if error:
        raise RunError(error)
    return lock


# ----------------------------------------------------------------------------- temp files of interrupted writes

# minispin's own temp names: tempfile.mkdtemp(prefix=".<name>.tmp-") folders (checkpoint.save_model,
# training.state.save_train_state) and io's mkstemp(prefix=".<name>.", suffix=".tmp") files
_TEMP_DIR = re.compile(r"^\..+\.tmp-[A-Za-z0-9_]{8}$")
_TEMP_FILE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """minispin temp files and folders of interrupted writes anywhere under run_dir."""
    found = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        for name in list(dirnames):
            if _TEMP_DIR.match(name):
                found.append(Path(dirpath, name))
                dirnames.remove(name)
        found.extend(Path(dirpath, name) for name in filenames if _TEMP_FILE.match(name))
    return sorted(found)


def remove_temp_files(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what `temp_files` finds (call while holding the run's lock: nobody else writes there)."""
    found = temp_files(run_dir)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


# ----------------------------------------------------------------------------- content manifest

def file_digest(path: str | os.PathLike) -> dict[str, Any]:
    """{"size": bytes, "blake2b": hex digest} of one file (read in 4 MiB blocks)."""
    h = hashlib.blake2b(digest_size=32)
    size = 0
    with open(path, "rb") as f:
        while block := f.read(4 << 20):
            h.update(block)
            size += len(block)
    return {"size": size, "blake2b": h.hexdigest()}


def digest_files(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{path relative to root: file_digest}; a folder stands for every file under it."""
    root = Path(root)
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            out[os.path.relpath(f, root)] = file_digest(f)
    return out


def damaged_files(recorded: dict[str, dict[str, Any]], root: str | os.PathLike) -> list[str]:
    """What differs from a recorded digest_files result: ["<file>: missing" / "<file>: 1000 bytes, recorded
    2048" / "<file>: content changed (blake2b differs)"], empty when every file matches."""
    problems = []
    for rel, want in recorded.items():
        path = Path(root) / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path}: {size} bytes, recorded {want['size']}")
        elif file_digest(path)["blake2b"] != want["blake2b"]:
            problems.append(f"{path}: content changed (blake2b differs from the recorded digest)")
    return problems


PHASES_NAME = "phases.json"


def record_phase(folder: str | os.PathLike, phase: str, outputs: Iterable[str | os.PathLike]) -> None:
    """Rank 0: mark `phase` of `folder` done with the digests of the files it wrote (<folder>/phases.json)."""
    folder = Path(folder)
    phases = read_manifest(folder / PHASES_NAME) or {}
    phases[phase] = {"files": digest_files(outputs, folder)}
    atomic_write_json(folder / PHASES_NAME, phases)


def phase_done(folder: str | os.PathLike, phase: str) -> bool:
    """Whether `phase` of `folder` was recorded done and its files still match; damaged files raise
    RunError naming them (and how to redo the phase)."""
    folder = Path(folder)
    record = (read_manifest(folder / PHASES_NAME) or {}).get(phase)
    if record is None:
        return False
    problems = damaged_files(record["files"], folder)
    if problems:
        raise RunError(f"{folder}: the {phase} output is damaged: {'; '.join(problems[:5])}"
                       f"{' ...' if len(problems) > 5 else ''}. Restore the file(s), or delete them and their "
                       f"entry in {folder / PHASES_NAME} to redo the {phase} phase")
    return True


# ----------------------------------------------------------------------------- input fingerprints

def input_files(path: str | os.PathLike) -> list[Path]:
    """The files a data path stands for: the file, or every non-hidden file under a folder."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def fingerprint_inputs(paths: Iterable[str | os.PathLike]) -> dict[str, dict[str, Any]]:
    """{absolute file path: file_digest} of every input file."""
    return {str(f.resolve()): file_digest(f) for p in paths for f in input_files(p)}


def changed_inputs(recorded: dict[str, dict[str, Any]], current: dict[str, dict[str, Any]]) -> list[str]:
    """Input files that differ from their recorded fingerprint, worded: "<file>: changed (...)"."""
    problems = []
    for name in sorted(set(recorded) | set(current)):
        a, b = recorded.get(name), current.get(name)
        if a == b:
            continue
        if b is None:
            problems.append(f"{name}: missing now")
        elif a is None:
            problems.append(f"{name}: new file")
        else:
            size = f"same size, {a['size']} bytes" if a["size"] == b["size"] else f"{a['size']} -> {b['size']} bytes"
            problems.append(f"{name}: changed ({size}, other content)")
    return problems

