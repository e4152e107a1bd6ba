"""Per-pair decisions (stored in Pair.extra["decision"]) and their per-iteration counts and status phrase."""
from __future__ import annotations

from typing import Any, Sequence

from ..collate import Pair

KEPT, FLIPPED, SMOOTHED = "kept", "flipped", "smoothed"
SPPO_DECISION, SPPO_TIED, SPPO_PRECOMPUTED = "sppo", "sppo_tied", "sppo_precomputed"
SAMPLE_SCORES = "sample_scores"  # Example.extra key of SPPO sample scores (also the default data column)



def decision_counts(pairs: Sequence[Pair]) -> dict[str, int]:
    """{decision: number of pairs} (+ "pairs" and, when any judge decision was made, "trusted")."""
    counts: dict[str, int] = {"pairs": len(pairs)}
    for p in pairs:
        d = (p.extra or {}).get("decision")
        if d is not None:
            counts[d] = counts.get(d, 0) + 1
    if any(k in counts for k in (KEPT, FLIPPED, SMOOTHED)):
        for k in (KEPT, FLIPPED, SMOOTHED):
            counts.setdefault(k, 0)
        counts["trusted"] = counts[KEPT] + counts[FLIPPED]
    return counts


def summarize_pairs(pairs: Sequence[Pair]) -> dict[str, Any]:
    """Counts over all of an iteration's pairs and per source (e.g. "iter1" new, "iter0" mixed in)."""
    by_source: dict[str, list[Pair]] = {}
    for p in pairs:
        by_source.setdefault(p.source or "", []).append(p)
    out: dict[str, Any] = decision_counts(pairs)
    if len(by_source) > 1:
        out["by_source"] = {s: decision_counts(ps) for s, ps in by_source.items()}
    return out


def describe_counts(stats: dict[str, Any]) -> str:
    """One status-line phrase for summarize_pairs' counts."""
    n = stats.get("pairs", 0)
    parts = []
    if "trusted" in stats:
        parts.append(f"judge flipped {stats[FLIPPED]} of {n} pairs")
        parts.append(f"trusted {stats['trusted']}, smoothed {stats[SMOOTHED]}" if stats[SMOOTHED]
                     else f"kept {stats[KEPT]}")
    if SPPO_DECISION in stats or SPPO_TIED in stats or SPPO_PRECOMPUTED in stats:
        parts.append(f"{n} SPPO pairs, {stats.get(SPPO_TIED, 0)} with all scores tied"
                     + (f", {stats[SPPO_PRECOMPUTED]} precomputed" if stats.get(SPPO_PRECOMPUTED) else ""))
    for source, sub in (stats.get("by_source") or {}).items():
        if "trusted" in sub:
            parts.append(f"{source}: {sub[FLIPPED]}/{sub['pairs']} flipped"
                         + (f", {sub[SMOOTHED]} smoothed" if sub.get(SMOOTHED) else ""))
    return "; ".join(parts) or f"{n} pairs"
