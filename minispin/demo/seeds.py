"""The demo over several seeds (`python -m minispin.demo.toy --seeds K`): mean ± standard error per stage.

One demo run on 600 questions has a standard error of about 2 points, and runs differ across machines
and thread counts by about as much; a conclusion about SPIN needs more than one seed. Seed s (s = seed,
seed+1, ...) changes the model init, the SFT data order and SPIN's sampling (the task and its test
questions stay the same); each seed is a full run in <out>/seed<s> (a finished seed is read back, not
recomputed), and <out>/seeds.json + seeds.md hold the summary (the plateau regime: its results in
<out>/seed<s>/plateau, its summary in <out>/plateau_seeds.json + .md):
- per stage: exact match, per skill and mean log p(real), as mean ± SE over the seeds (SE = sample
  standard deviation / sqrt(K));
- per stage: the difference from SFT of the same seed (same questions), as mean ± SE over the seeds
  with a 95% t interval, and in how many seeds the paired bootstrap interval lay above / below 0;
- plateau regime: the SFT epoch curve's best epoch and the mechanism metrics per iteration, mean ± SE.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import distributed as dist
from ..io import atomic_write_json, atomic_write_text
from ..log import print0
from ..stats import format_mean_se, mean_interval, mean_se, paired_bootstrap
from . import task as demo_task
from .run import finished_results

_say = functools.partial(print0, prefix="seeds")


def with_seed(config: Any, seed: int) -> Any:
    """`config` (a DemoConfig, or a config holding one as `.demo`) with another seed."""
    if hasattr(config, "demo"):
        return dataclasses.replace(config, demo=dataclasses.replace(config.demo, seed=seed))
    return dataclasses.replace(config, seed=seed)


def _summary(values: Sequence[float]) -> dict[str, Any]:
    mean, se = mean_se(values)
    return {"mean": mean, "se": None if math.isnan(se) else se, "values": list(values)}


def aggregate_seeds(runs: Sequence[dict[str, Any]], baseline: str = "sft") -> dict[str, Any]:
    """Mean ± SE over seeds of every stage (by stage name, in the first run's order; a stage missing in some
    seeds is summarized over those that have it) and of its per-seed difference from `baseline`."""
    if not runs:
        raise ValueError("aggregate_seeds: no runs")
    names: list[str] = []
    for r in runs:
        names += [s["stage"] for s in r["stages"] if s["stage"] not in names]
    out = []
    for name in names:
        have = [(r, next(s for s in r["stages"] if s["stage"] == name)) for r in runs
                if any(s["stage"] == name for s in r["stages"])]
        base = [next(s for s in r["stages"] if s["stage"] == baseline) for r, _ in have]
        row: dict[str, Any] = {
            "stage": name, "label": have[0][1]["label"], "seeds": len(have),
            "exact_match": _summary([s["exact_match"] for _, s in have]),
            "exact_match_by_skill": {k: _summary([s["exact_match_by_skill"][k] for _, s in have])
                                     for k in have[0][1]["exact_match_by_skill"]},
            "mean_logprob": _summary([s["mean_logprob"] for _, s in have])}
        if name != baseline:
            diffs = [s["exact_match"] - b["exact_match"] for (_, s), b in zip(have, base)]
            row["vs_baseline"] = _summary(diffs)
            if len(diffs) >= 2:
                _, low, high = mean_interval(diffs)
                row["vs_baseline"].update(low=low, high=high)
            paired = [next(x for x in r["stats"] if x["stage"] == s["label"])["vs_baseline"] for r, s in have]
            row["seeds_above"] = sum(p["low"] > 0 for p in paired)  # paired bootstrap interval above 0
            row["seeds_below"] = sum(p["high"] < 0 for p in paired)
        out.append(row)
    return {"baseline": baseline, "seeds": [_seed_of(r) for r in runs], "stages": out}


def compare_stages(runs: Sequence[dict[str, Any]], baseline: str, other: str) -> dict[str, Any]:
    """Stage `other` minus stage `baseline` (stage names) in every seed: mean ± SE over seeds with a 95% t
    interval, and in how many seeds the paired bootstrap interval over the questions lies above / below 0."""
    stage = lambda r, name: next(s for s in r["stages"] if s["stage"] == name)  # noqa: E731
    diffs, above, below = [], 0, 0
    for r in runs:
        a, b = stage(r, baseline), stage(r, other)
        p = paired_bootstrap(a["correct"], b["correct"])
        diffs.append(p.difference)
        above, below = above + (p.low > 0), below + (p.high < 0)
    out = dict(_summary(diffs), baseline=baseline, stage=other, seeds_above=above, seeds_below=below)
    if len(diffs) >= 2:
        _, out["low"], out["high"] = mean_interval(diffs)
    return out


def _seed_of(results: dict[str, Any]) -> int:
    config = results["config"]
    return config["demo"]["seed"] if "demo" in config else config["seed"]


def aggregate_mechanism(runs: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Mean ± SE over seeds of each iteration's mechanism metrics (plateau runs' "mechanism")."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, rows in runs[0]["mechanism"].items():
        out[name] = []
        for i, row in enumerate(rows):
            keys = [k for k, v in row.items() if isinstance(v, float) and k not in ("lr", "beta")]
            entry = {"iteration": i, "lr": row["lr"], "beta": row.get("beta")}
            entry.update({k: _summary([r["mechanism"][name][i][k] for r in runs]) for k in keys})
            out[name].append(entry)
    return out


def _pm(summary: dict[str, Any], digits: int = 3) -> str:
    return format_mean_se(summary["values"], digits)


def format_seeds(summary: dict[str, Any]) -> str:
    """The summary as markdown tables (stages; then, for the plateau regime, the mechanism metrics)."""
    k = len(summary["seeds"])
    stages = summary["stages"]
    skills = [x for x in demo_task.SKILLS if x in stages[0]["exact_match_by_skill"]]
    lines = [f"Mean ± standard error over {k} seeds ({', '.join(map(str, summary['seeds']))}); difference from SFT "
             "of the same seed with its 95% t interval over seeds; 'above / below': seeds whose paired bootstrap "
             "interval (same questions) lies above / below 0.", "",
             "| stage | exact match | vs SFT | 95% CI (seeds) | above / below | " + " | ".join(skills)
             + " | mean log p(real) |", "|---" * (6 + len(skills)) + "|"]
    for s in stages:
        v = s.get("vs_baseline")
        diff = "-" if v is None else f"{v['mean']:+.3f} ± " + ("n/a" if v["se"] is None else f"{v['se']:.3f}")
        ci = f"[{v['low']:+.3f}, {v['high']:+.3f}]" if v is not None and "low" in v else "-"
        counts = f"{s['seeds_above']} / {s['seeds_below']}" if v is not None else "-"
        label = s["label"] + ("" if s["seeds"] == k else f" ({s['seeds']} seeds)")
        lines.append(f"| {label} | {_pm(s['exact_match'])} | {diff} | {ci} | {counts} | "
                     + " | ".join(_pm(s["exact_match_by_skill"][x]) for x in skills)
                     + f" | {_pm(s['mean_logprob'], 2)} |")
    if "mechanism" in summary:
        lines += ["", "Training steps per iteration (pair-weighted mean over the iteration's steps; from iteration 1 "
                  "SPIN also trains on the previous iteration's pairs), mean ± SE over seeds:", ""]
        for name, rows in summary["mechanism"].items():
            keys = [x for x in rows[0] if isinstance(rows[0][x], dict)]
            lines += [f"| {name} iter | lr | beta | " + " | ".join(keys) + " |", "|---" * (3 + len(keys)) + "|"]
            for r in rows:
                beta = "-" if name != "spin" or r["beta"] is None else f"{r['beta']:g}"
                lines.append(f"| {r['iteration']} | {r['lr']:g} | {beta} | "
                             + " | ".join(_pm(r[x], 2 if x.startswith("logps") else 4) for x in keys) + " |")
            lines.append("")
    if "spin_vs_continued_sft" in summary:
        lines += ["SPIN iteration t minus continued SFT iteration t (same seed, same questions, the same lr "
                  "schedule), mean ± SE over seeds:", "", "| iter | SPIN - continued SFT | 95% CI (seeds) | above / below |",
                  "|---|---|---|---|"]
        for i, c in enumerate(summary["spin_vs_continued_sft"]):
            se = "n/a" if c["se"] is None else f"{c['se']:.3f}"
            ci = f"[{c['low']:+.3f}, {c['high']:+.3f}]" if "low" in c else "-"
            lines.append(f"| {i} | {c['mean']:+.3f} ± {se} | {ci} | {c['seeds_above']} / {c['seeds_below']} |")
        lines.append("")
    if "best_epoch" in summary:
        lines += [f"SFT epochs on the fixed set: best epoch {_pm(summary['best_epoch'], 1)} (per seed: "
                  + ", ".join(str(int(e)) for e in summary["best_epoch"]["values"]) + "; epoch 0 = the demo's SFT). "
                  "Validation exact match by epoch:", ""] + [f"- {c}" for c in summary["curves"]]
    return "\n".join(lines).rstrip()


def run_seeds(out: Path, configs: Sequence[Any], run_one: Callable[[Path, Any, str, int], dict[str, Any]],
              device: str, world_size: int, *, results_in: str = "", name: str = "seeds") -> dict[str, Any]:
    """Each config (one per seed) as a run in <out>/seed<s> (finished ones, whose results are in
    <out>/seed<s>/<results_in>, read back), then the summary (<out>/<name>.json and .md, printed). Call on
    every rank of an initialized process group."""
    t_start = time.perf_counter()
    runs, computed = [], 0
    for config in configs:
        run_dir = out / f"seed{_seed_of({'config': dataclasses.asdict(config)})}"
        done = dist.broadcast_json(finished_results(run_dir / results_in, config) if dist.is_main() else None)
        if done is not None:
            _say(f"{run_dir}: finished earlier, read back")
            runs.append(done)
            continue
        runs.append(run_one(run_dir, config, device, world_size))
        computed += 1
    summary = aggregate_seeds(runs)
    if all("mechanism" in r for r in runs):
        summary["mechanism"] = aggregate_mechanism(runs)
        summary["best_epoch"] = _summary([float(r["best_epoch"]) for r in runs])
        summary["spin_vs_continued_sft"] = [compare_stages(runs, f"continued_sft_iter{i}", f"spin_iter{i}")
                                            for i in range(len(runs[0]["mechanism"]["spin"]))]
        summary["curves"] = [f"seed {_seed_of(r)}: " + ", ".join(f"{c['val_exact_match']:.3f}" for c in r["epoch_curve"])
                             for r in runs]
    summary["seconds_per_seed"] = [r["seconds_this_run"] for r in runs]
    summary["seconds_this_run"] = round(time.perf_counter() - t_start, 1)
    summary["seeds_computed_this_run"] = computed
    table = format_seeds(summary)
    summary["table"] = table
    if dist.is_main():
        atomic_write_json(out / f"{name}.json", summary)
        atomic_write_text(out / f"{name}.md", table + "\n")
        print("\n" + table + "\n", flush=True)
        _say(f"{len(runs)} seeds ({computed} computed now) in {summary['seconds_this_run']:.0f}s; "
             f"summary in {out / (name + '.md')}")
    dist.barrier()
    return summary
