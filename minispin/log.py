"""Printing for runs: one rank-0 print (`print0` / `warn0`) and one progress line (`Progress`).

Everything minispin tells the user goes to stderr from rank 0 only, so N ranks print one line, not N;
stdout is left to results (tables, the run summary JSON).
"""
from __future__ import annotations

import sys
import time

from . import distributed as dist


def print0(message: str, *, prefix: str = "") -> None:
    """One line on stderr, printed by rank 0 only (`prefix`: e.g. "spin" -> "[spin] message")."""
    if dist.is_main():
        print(f"[{prefix}] {message}" if prefix else message, file=sys.stderr, flush=True)


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
