"""Shared by the methods tests (CPU, no model): a SPIN example row with optional judge scores."""
from __future__ import annotations

from minispin.data import Example

PROMPT = [{"role": "user", "content": "What is 2+3?"}]


def ex(index: int, real: str = "5", generated: str = "6", scores: dict | None = None, source: str = "iter0",
       **extra) -> Example:
    return Example(index=index, prompt=list(PROMPT), real=real, generated=generated, source=source,
                   extra=dict(extra), scores=scores)
