"""Printing for runs: one rank-0 print (`print0` / `warn0`), one progress line (`Progress`), and the
one way a user's mistake is reported (`UserError`, `run_main`).

Everything minispin tells the user goes to stderr from rank 0 only, so N ranks print one line, not N;
stdout is left to results (tables, the run summary JSON, `print_result`).

User errors (bad data, settings, paths; `UserError` and its subclasses DataError, ConfigError, ...) are
printed ONCE as one plain line "error: ..." without a traceback, by rank 0 - or, when only some ranks
see the error, by the first rank that does - and the process exits non-zero (2 for usage errors, 1
otherwise); the ranks that do not report exit quietly with the same code. `--debug` or MINISPIN_DEBUG=1
shows the traceback. Plain torchrun adds its own "ChildFailedError" block when a rank exits non-zero;
`--nproc_per_node N` (minispin.distributed.launch) starts the ranks without it.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, TypeVar

from . import distributed as dist
from .errors import UserError

__all__ = ["UserError", "print0", "warn0", "print_result", "run_main", "debug_enabled", "Progress"]

T = TypeVar("T")
DEBUG_ENV = "MINISPIN_DEBUG"


def _printing_rank() -> bool:
    """Rank 0 of the job (by the process group, or by torchrun's environment before / after it)."""
    return dist.is_main() if dist.is_initialized() else dist.launch_rank() == 0


def print0(message: str, *, prefix: str = "") -> None:
    """One line on stderr, printed by rank 0 only (`prefix`: e.g. "run" -> "[run] message")."""
    if _printing_rank():
        print(f"[{prefix}] {message}" if prefix else message, file=sys.stderr, flush=True)


def print_result(result: Any) -> None:
    """The run's result as one JSON line on stdout, rank 0 only."""
    if _printing_rank():
        print(json.dumps(result), flush=True)


def debug_enabled(argv: list[str] | None = None) -> bool:
    """The debug switch: `--debug` among the options or MINISPIN_DEBUG=1."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in (argv or [])


def _job_marker() -> Path | None:
    """A file the ranks of one torchrun job (on one host) share to report an error once: named by the
    launcher's pid and start time (so a later job never sees it); None outside torchrun."""
    if not dist.launched_by_torchrun() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    parent = os.getppid()
    try:
        started = Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        started = "0"
    job = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return Path(tempfile.gettempdir()) / f"minispin-error-{job}-{parent}-{started}"


def _claim_report() -> bool:
    """True for the one rank that reports: rank 0 at once, another rank only when no rank has claimed
    the report within a second (rank 0 usually sees the same error)."""
    marker = _job_marker()
    if marker is None:
        return True
    if dist.launch_rank() != 0:
        time.sleep(1.0)
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return True
    except FileExistsError:
        return False
    except OSError:
        return dist.launch_rank() == 0


def _reported_elsewhere() -> bool:
    marker = _job_marker()
    return marker is not None and marker.exists()


def run_main(main: Callable[[], T], argv: list[str] | None = None) -> T:
    """Run a command-line entry point: a UserError becomes one "error: ..." line (printed once over all
    ranks, no traceback unless the debug switch is on) and exit code 2 (usage) or 1; an unexpected error
    keeps its traceback, except on a rank whose failure follows an error another rank already reported."""
    debug = debug_enabled(argv)
    try:
        return main()
    except UserError as e:
        if _claim_report():
            if debug:
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr, flush=True)
        _exit(e.exit_code)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException:
        if not debug and _reported_elsewhere():  # e.g. a collective broken by the reporting rank's exit
            _exit(1)
        raise
    raise AssertionError("unreachable")


def _exit(code: int) -> None:
    if not (dist.launched_by_torchrun() or dist.is_initialized()):
        raise SystemExit(code)  # one plain process: a normal exit (and a caller such as runpy may catch it)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)  # no teardown of a half-finished process group: the launcher sees the code at once


def warn0(message: str, *, prefix: str = "") -> None:
    """A warning line on stderr, rank 0 only."""
    print0(f"warning: {message}", prefix=prefix)


def _duration(seconds: float) -> str:
    seconds = int(max(0.0, seconds) + 0.5)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """One progress line on stderr (rank 0): done/total, rate, ETA, and "resumed from N" when the work
    started past 0. Redrawn in place on a terminal (at most every `every_s` seconds), else printed every
    `every` units and at the end."""

    def __init__(self, total: int, label: str, *, enabled: bool = True, start: int = 0, unit: str = "",
                 every: int = 10, every_s: float = 0.5):
        self.total, self.label, self.start, self.unit = total, label, start, unit
        self.every, self.every_s = max(1, every), every_s
        self.enabled = enabled and dist.is_main()
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()
        self.done, self.text, self.tokens, self.drawn = start, "", None, False

    def line(self, now: float | None = None) -> str:
        """The current line (also what the tests read)."""
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        rate = (self.done - self.start) / elapsed
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"[{self.label}] {self.done}/{self.total}{unit}"]
        if self.done > self.start:
            parts.append(f"{rate:.3g}{unit or ' it'}/s")
            if self.done < self.total:
                parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        if self.tokens is not None:
            parts.append(f"{self.tokens} tokens | {self.tokens / elapsed:,.0f} tok/s")
        if self.start:
            parts.append(f"resumed from {self.start}")
        if self.text:
            parts.append(self.text)
        return " | ".join(parts)

    def update(self, done: int, text: str = "", *, tokens: int | None = None, force: bool = False) -> None:
        """Record progress (`tokens`: tokens so far, shown with their rate) and redraw / print the line."""
        self.done, self.text, self.tokens = done, text, tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if force or done == self.total or now - self.last >= self.every_s or not self.drawn:
                self.last = now
                sys.stderr.write("\r" + self.line(now)[:200] + "\033[K")
                sys.stderr.flush()
                self.drawn = True
        elif force or done == self.total or done % self.every == 0:
            print(self.line(now), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self.drawn:
            sys.stderr.write("\r" + self.line()[:200] + "\033[K\n")
            sys.stderr.flush()
