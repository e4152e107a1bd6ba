"""Atomic and resumable file writing: no reader ever sees a half-written result file.

- atomic_write_bytes / _text / _json: write a temp file next to the target, fsync it, os.replace it
  over the target, fsync the directory. A crash leaves the old file or the new one, never a mix.
- atomic_replace_dir: move a finished directory (a checkpoint) into place.
- ChunkedJsonlWriter: the resumable generation log. Rows (each with an integer key, the source
  `index`) are appended in fsynced chunks to a partial .jsonl file; reopening it after a crash or a
  kill -9 drops a torn last line and tells which keys are `done`; a key is never written twice.
- merge_parts / ChunkedJsonlWriter.finalize: check every expected key is there exactly once and
  write the final file (.jsonl, .json or .parquet) in key order, atomically. A final file that
  exists is therefore complete: the generation job may treat it as "done".

The lowest leaf: imports nothing from minispin (the kill -9 tests load this file alone in each child,
without torch), so it reports repairs through logging ("minispin.io"), not minispin.log.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

log = logging.getLogger("minispin.io")

_UMASK = os.umask(0o022)  # read once (the only way is to set it), so temp files get normal permissions
os.umask(_UMASK)


class CorruptFileError(ValueError):
    """A partial .jsonl file holds a bad line before good ones: not a crash tail, refuse to guess."""


class MergeError(ValueError):
    """Part files do not add up to the expected rows (missing, unexpected or conflicting keys)."""


# ----------------------------------------------------------------------------- atomic files

def with_path(error: OSError, path: str | os.PathLike) -> OSError:
    """The same OSError naming `path` (os.write / fsync errors such as disk full carry no file name)."""
    if error.filename is not None or error.errno is None:  # named already, or a message of our own
        return error
    what = (error.strerror or str(error)) + (" (disk full)" if error.errno == errno.ENOSPC else "")
    return type(error)(error.errno, f"{what} while writing {path}", str(path))


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so that a rename or a new file in it survives a power loss."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_with(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(temp_path) for a temp file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK
        os.fchmod(fd, mode)
        os.close(fd)
        fd = -1
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.filename is None:
            raise with_path(e, path) from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (temp file + fsync + rename + directory fsync)."""
    data = memoryview(data)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic_write_with(path, write)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Replace `path` with `text` atomically."""
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Replace `path` with `obj` as JSON (UTF-8, trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def _normal_permissions(root: Path) -> None:
    """Give a staged directory the permissions of a directory made with mkdir (tempfile.mkdtemp makes it
    0700, and some writers, e.g. safetensors, create 0600 files): what a checkpoint folder written by
    other tools has, so that other users / jobs allowed by the umask can read it."""
    os.chmod(root, 0o777 & ~_UMASK)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o777 & ~_UMASK)
        for name in filenames:
            file = os.path.join(dirpath, name)
            if not os.path.islink(file):
                os.chmod(file, (os.stat(file).st_mode & 0o777) | (0o666 & ~_UMASK))


def _aside_dir(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def recover_replaced_dir(final_dir: str | os.PathLike) -> bool:
    """Undo a crash inside atomic_replace_dir: if `final_dir` is missing but `final_dir.old` exists,
    move the old one back. Returns True when something was restored. Call before loading."""
    final = Path(final_dir)
    aside = _aside_dir(final)
    if aside.is_dir() and not final.exists():
        try:
            os.rename(aside, final)
        except FileNotFoundError:  # another process (rank) restored it first
            return False
        fsync_dir(final.parent)
        return True
    return False


def atomic_replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move the finished directory `tmp_dir` to `final_dir` (same filesystem), replacing it.

    Files are fsynced first. An existing `final_dir` is renamed to `final_dir.old`, the new one
    renamed in, then the old one removed; if the second rename fails the old one is put back. A crash
    between the renames leaves only `final_dir.old`; `recover_replaced_dir` (also called here)
    restores it.
    """
    tmp, final = Path(tmp_dir), Path(final_dir)
    if not tmp.is_dir():
        raise FileNotFoundError(f"{tmp}: not a directory")
    recover_replaced_dir(final)
    aside = _aside_dir(final)
    if aside.exists():  # a stale leftover next to a good final dir
        shutil.rmtree(aside)
    _normal_permissions(tmp)
    _fsync_tree(tmp)
    had_final = final.exists()
    if had_final:
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if had_final:
            os.rename(aside, final)
        raise
    fsync_dir(final.parent)
    if tmp.parent != final.parent:
        fsync_dir(tmp.parent)
    if had_final:
        shutil.rmtree(aside)


# ----------------------------------------------------------------------------- resumable jsonl

def _row_key(row: Any, key: str, where: str) -> int:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a dict row, got {type(row).__name__}")
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: row key {key!r} must be an integer, got {value!r}")
    return value


def _scan_jsonl(path: Path, key: str) -> tuple[list[dict], int, int]:
    """Parse a partial .jsonl file: (rows, length of the good prefix in bytes, file size).

    The good prefix ends after the last newline-terminated line that parses. Anything after it (a
    torn last line, or undecodable lines left at the end by a crash) is not part of the data. An
    undecodable line followed by good lines is corruption: CorruptFileError.
    """
    rows: list[dict] = []
    good_end = offset = 0
    bad_line: int | None = None
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            offset += len(line)
            if not line.endswith(b"\n"):
                break  # torn last line
            if not line.strip():
                if bad_line is None:
                    good_end = offset
                continue
            try:
                row = json.loads(line)
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                if bad_line is None:
                    bad_line = line_no
                continue
            if bad_line is not None:
                raise CorruptFileError(f"{path}: line {bad_line} is not valid JSON but later lines "
                                       f"are (line {line_no}); refusing to repair")
            try:
                _row_key(row, key, f"{path}: line {line_no}")
            except ValueError as e:
                raise CorruptFileError(str(e)) from None
            rows.append(row)
            good_end = offset
    return rows, good_end, offset


def read_jsonl_part(path: str | os.PathLike, *, key: str = "index") -> list[dict]:
    """The complete rows of a partial/part .jsonl file, ignoring a torn tail (file not modified)."""
    rows, good_end, size = _scan_jsonl(Path(path), key)
    if size > good_end:
        log.warning("%s: ignoring %d bytes of incomplete last line(s)", path, size - good_end)
    return rows


class ChunkedJsonlWriter:
    """Append-only, crash-safe log of generated rows, keyed by an integer source index.

    Opening repairs a torn tail (truncates to the last complete line) and fills `done` with the keys
    already written. write_rows appends one chunk (one os.write loop + fsync). Rows whose key is
    already done are ignored, so re-running a shard never duplicates rows. One process per file:
    an exclusive flock is held while open. Use as a context manager or call close().
    """

    def __init__(self, path: str | os.PathLike, *, key: str = "index"):
        self.path = Path(path)
        self.key = key
        self.path.parent.mkdir(parents=True, exist_ok=True)
        existed = self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            self._lock()
            if not existed:
                fsync_dir(self.path.parent)
            rows, good_end, size = _scan_jsonl(self.path, key)
            self.truncated_bytes = size - good_end  # bytes of torn tail dropped on open
            if self.truncated_bytes:
                log.warning("%s: dropping %d bytes of incomplete last line(s)", self.path,
                            self.truncated_bytes)
                os.ftruncate(self._fd, good_end)
                os.fsync(self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self._size = good_end
        self.done: set[int] = set()
        self.duplicates_on_disk = 0  # only possible if the file was edited by hand
        for row in rows:
            k = row[key]
            self.duplicates_on_disk += k in self.done
            self.done.add(k)
        self.rows_written = 0  # by this writer
        self.rows_ignored = 0  # offered again with a key already done

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"{self.path} is open for writing in another process") from None

    def write_rows(self, rows: Iterable[dict]) -> int:
        """Append the rows whose key is not done yet as one fsynced chunk; returns how many."""
        if self._fd < 0:
            raise ValueError(f"{self.path}: writer is closed")
        lines, keys = [], set()
        for row in rows:
            k = _row_key(row, self.key, str(self.path))
            if k in self.done or k in keys:
                self.rows_ignored += 1
                continue
            keys.add(k)
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        if not lines:
            return 0
        data = memoryview("".join(lines).encode("utf-8"))
        n_bytes = len(data)
        try:
            while data:
                data = data[os.write(self._fd, data):]
            os.fsync(self._fd)
        except BaseException as e:  # e.g. disk full: cut the half chunk off so the file stays clean
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass
            if isinstance(e, OSError):
                raise with_path(e, self.path) from e
            raise
        self._size += n_bytes
        self.done |= keys
        self.rows_written += len(keys)
        return len(keys)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ChunkedJsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def finalize(self, final_path: str | os.PathLike, *, expected_keys: set[int] | None = None,
                 order: Sequence[int] | None = None, remove_part: bool = False) -> "MergeReport":
        """Close and write this file's rows to `final_path` in key order (or `order`), atomically."""
        self.close()
        return merge_parts([self.path], final_path, expected_keys, key=self.key, order=order,
                           remove_parts=remove_part)


@dataclass
class MergeReport:
    """What merge_parts wrote."""
    path: str
    rows: int
    duplicates_dropped: int  # exact duplicate rows seen across parts and left out
    torn_bytes_ignored: int  # incomplete tail bytes in the parts, not used


def _describe_keys(keys: set[int], limit: int = 20) -> str:
    shown = sorted(keys)[:limit]
    return f"{len(keys)} keys: {shown}" + (" ..." if len(keys) > limit else "")


def merge_parts(part_paths: Sequence[str | os.PathLike], final_path: str | os.PathLike,
                expected_keys: set[int] | None = None, *, key: str = "index",
                order: Sequence[int] | None = None, remove_parts: bool = False) -> MergeReport:
    """Merge part files (one per rank) into `final_path`, rows in ascending key order (or `order`).

    Every expected key must appear exactly once: missing or unexpected keys, or one key with two
    different rows, raise MergeError and nothing is written. Exact duplicates are dropped (counted
    and logged). The final file (.jsonl, .json or .parquet) is written atomically.
    """
    by_key: dict[int, dict] = {}
    duplicates, torn, conflicts = 0, 0, set()
    for part in part_paths:
        part = Path(part)
        if not part.is_file():
            raise MergeError(f"{part}: part file missing")
        rows, good_end, size = _scan_jsonl(part, key)
        torn += size - good_end
        for row in rows:
            k = row[key]
            if k not in by_key:
                by_key[k] = row
            elif by_key[k] == row:
                duplicates += 1
            else:
                conflicts.add(k)
    if conflicts:
        raise MergeError(f"{final_path}: rows with the same key differ, {_describe_keys(conflicts)}")
    if expected_keys is not None:
        expected = set(expected_keys)
        missing, unexpected = expected - by_key.keys(), by_key.keys() - expected
        if missing or unexpected:
            raise MergeError(f"{final_path}: parts do not match the expected keys; missing "
                             f"{_describe_keys(missing)}; unexpected {_describe_keys(set(unexpected))}")
    if order is None:
        ordered = sorted(by_key)
    else:
        ordered = list(order)
        if len(ordered) != len(by_key) or set(ordered) != by_key.keys():
            raise MergeError(f"{final_path}: `order` is not a permutation of the keys in the parts")
    if duplicates:
        log.warning("%s: dropped %d exact duplicate rows while merging", final_path, duplicates)
    if torn:
        log.warning("%s: ignored %d bytes of incomplete lines in the parts", final_path, torn)
    write_rows_file(final_path, [by_key[k] for k in ordered])
    if remove_parts:
        for part in part_paths:
            os.unlink(part)
    return MergeReport(str(final_path), len(ordered), duplicates, torn)


def write_rows_file(path: str | os.PathLike, rows: list[dict]) -> None:
    """Write rows atomically as .jsonl (one object per line), .json (an array) or .parquet (pyarrow)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif path.suffix == ".json":
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(rows, f, ensure_ascii=False)
                f.write("\n")
    elif path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("writing parquet files needs pyarrow: pip install pyarrow "
                              "(or pip install minispin[parquet])") from e
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))
        # one array per column over all rows (from_pylist would take the columns of row 0 only)
        table = pa.table({c: pa.array([row.get(c) for row in rows]) for c in columns})

        def write(tmp):
            pq.write_table(table, tmp)
    else:
        raise ValueError(f"{path}: unsupported output type {path.suffix!r} (.jsonl, .json, .parquet)")
    _atomic_write_with(path, write)
