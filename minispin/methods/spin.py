"""SPIN and continued SFT: the paper's schedule and the pair builders (chosen = the real answer,
rejected = the model's generated answer; SFT: the real answer only)."""
from __future__ import annotations

from typing import Any, Sequence

from ..collate import Pair

# The paper's schedule (REFERENCE.md section 1): iterations 0-3 of zephyr-7b-sft-full.
PAPER_SCHEDULE: list[dict[str, Any]] = [
    {"lr": 5e-7, "beta": 0.1},
    {"lr": 5e-7, "beta": 0.1},
    {"lr": 1e-7, "beta": 0.1},
    {"lr": 1e-7, "beta": 5.0},
]


def spin_pair(example: Any, *, flip: bool = False, label_smoothing: float | None = None,
              decision: str | None = None, scores: tuple[float, float] | None = None) -> Pair:
    """A SPIN pair (chosen = real, rejected = generated), or the flipped pair (chosen = generated)."""
    generated = example.generated if example.generated is not None else ""
    generated_ids = getattr(example, "generated_ids", None)  # the sampled ids travel with the answer
    chosen, rejected = (generated, example.real) if flip else (example.real, generated)
    chosen_ids, rejected_ids = (generated_ids, None) if flip else (None, generated_ids)
    extra: dict[str, Any] = {}
    if decision is not None:
        extra["decision"] = decision
    if scores is not None:
        extra["score_real"], extra["score_generated"] = scores
    return Pair(index=example.index, prompt=list(example.prompt), chosen=chosen, rejected=rejected,
                label_smoothing=label_smoothing, source=example.source, extra=extra,
                chosen_ids=chosen_ids, rejected_ids=rejected_ids)




def spin_pairs(examples: Sequence[Any], config: Any = None) -> list[Pair]:
    """SPIN: chosen = the real (human) answer, rejected = the model's generated answer (an empty sample
    is a sample)."""
    return [spin_pair(e) for e in examples]


def sft_pairs(examples: Sequence[Any], config: Any = None) -> list[Pair]:
    """Continued SFT: only the real answer."""
    return [Pair(index=e.index, prompt=list(e.prompt), chosen=e.real, rejected=None, source=e.source)
            for e in examples]
