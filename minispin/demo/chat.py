"""The demo: SPIN on a real chat model (SmolLM2-135M-Instruct) with real instruction data, on CPU in minutes.

    python -m minispin.demo                 # -> runs/demo_chat (re-running continues; finished stages are reused)
    python -m minispin.demo --seeds 3       # seeds 0..2 in runs/demo_chat_seeds/seed<s>, summary seeds.md
    python -m minispin.demo --small         # the reduced size the test suite runs

Stages, all through minispin's driver (`minispin.spin`: resume, progress lines, summaries, HF folders):
1. data       Alpaca rows shipped with minispin (data/alpaca_en_demo.json, Apache-2.0, from LLaMA-Factory), split
              ONCE (split seed fixed, whatever --seed) into training prompts and held-out prompts no stage trains on
2. start      the pinned model (`minispin.pinned.SMOLLM2`, a GGUF fetched from the package registry), "SFT" in
              the paper's sense; its own sampled answers to the held-out prompts are generated once and kept
3. continued  SFT on the training prompts' real answers (the paper's baseline), same lr and epochs as SPIN
4. SPIN       iterations 0..T-1 from the start model (iteration 1 also trains on iteration 0's pairs)
Per stage, on the held-out prompts: mean per-token log p(real answer), mean per-token log p(the start model's
sampled answer) and their gap, each with its paired-bootstrap difference from the start model
(`minispin.stats`); 3 held-out prompts answered (greedy) by the start model and the last iterate; figures
by `minispin.report`.

Settings, fixed before any held-out result was looked at, scaled down from the paper's (lr 5e-7, batch 64,
50k prompts, 2 epochs, max length 1024), so that the whole demo fits 10 minutes on 2 CPU cores: 24 training
prompts, 1 epoch at global batch 8 (3 optimizer steps; 6 in iteration 1, which adds iteration 0's pairs),
RMSProp at lr 5e-5 (the paper's 5e-7 for ~1,500 steps per iteration; 3 steps at 5e-7 would not move the
model), beta 0.1 (the paper's), answers of at most 96 new tokens (T 0.7, top-p 0.9), max length 256, 32
held-out prompts. SPIN iterations 0 and 1: the only setting changed after a result was seen (seed 0's
iteration 0), because the measured 4 min 41 s from a fresh clone left room for iteration 1 within the
10 minutes (`--iterations 1` runs iteration 0 only).
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..checkpoint import load_model
from ..errors import UserError
from ..driver import RunConfig, spin
from ..eval import make_table, write_table
from ..heldout import answer_logprobs, greedy_answers
from ..generation_job import GenerationConfig
from ..io import atomic_write_json
from ..log import print0, run_main
from ..pinned import SMOLLM2, fetch
from ..sampler import generate
from ..report import write_report
from ..stats import mean_interval, mean_se, paired_bootstrap
from ..tokenizer import load_tokenizer
from ..training import TrainConfig
from .run import add_common_options, check_settings, launch_if_asked, publish_results

DATA = Path(__file__).resolve().parent / "data" / "alpaca_en_demo.json"
SPLIT_SEED = 1234  # the train / held-out split never depends on --seed: seeds vary sampling and data order
METRICS = ("logp_real", "logp_generated", "gap")
LABELS = {"logp_real": "log p(real)", "logp_generated": "log p(start's sample)", "gap": "gap (real - sample)"}
_say = functools.partial(print0, prefix="demo")


@dataclass
class ChatDemoConfig:
    """Sizes and hyperparameters of the real-model demo (see the module docstring for why these values)."""

    model: str = ""  # "" = the pinned SmolLM2-135M-Instruct GGUF (fetched once); or any model folder / .gguf
    n_train: int = 24  # training prompts (SFT and SPIN alike)
    n_heldout: int = 32  # held-out prompts: evaluation only
    iterations: int = 2  # SPIN iterations 0 and 1 (iteration 1: about 3 more minutes on 2 cores)
    lr: float = 5e-5
    beta: float = 0.1
    epochs: float = 1
    batch_size: int = 8  # global
    micro_batch_size: int = 4
    max_length: int = 256
    max_prompt_length: int = 96
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.9
    max_answer_chars: int = 400  # rows whose real answer or prompt is longer are not used (no truncation)
    seed: int = 0

    @classmethod
    def small(cls, **overrides: Any) -> "ChatDemoConfig":
        """The test suite's size: the same pipeline on a handful of prompts (numbers not meaningful)."""
        values = dict(n_train=4, n_heldout=4, iterations=1, batch_size=2, micro_batch_size=2, max_length=96,
                      max_prompt_length=48, max_new_tokens=8, max_answer_chars=160)
        values.update(overrides)
        return cls(**values)


# ----------------------------------------------------------------------------- data and settings

def _prompt_text(row: dict[str, str]) -> str:
    return row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")


def split_rows(config: ChatDemoConfig) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(training rows, held-out rows) of the shipped Alpaca data: short rows only, one fixed shuffle."""
    rows = [r for r in json.loads(DATA.read_text(encoding="utf-8"))
            if len(r["output"]) <= config.max_answer_chars and len(_prompt_text(r)) <= config.max_answer_chars]
    random.Random(SPLIT_SEED).shuffle(rows)
    if len(rows) < config.n_train + config.n_heldout:
        raise SystemExit(f"error: {DATA} has {len(rows)} usable rows, fewer than n_train + n_heldout")
    return rows[config.n_heldout: config.n_heldout + config.n_train], rows[: config.n_heldout]


def write_data(out: Path, config: ChatDemoConfig) -> dict[str, Path]:
    """Rank 0: <out>/data/train.json and heldout.json (Alpaca rows), rewritten only when missing."""
    train, heldout = split_rows(config)
    paths = {"train": out / "data" / "train.json", "heldout": out / "data" / "heldout.json"}
    for path, rows in ((paths["train"], train), (paths["heldout"], heldout)):
        if not path.is_file() or json.loads(path.read_text(encoding="utf-8")) != rows:
            atomic_write_json(path, rows)
    return paths


def start_model(config: ChatDemoConfig) -> str:
    return config.model or str(fetch(SMOLLM2))


def train_config(config: ChatDemoConfig, device: str) -> TrainConfig:
    return TrainConfig(optimizer="rmsprop", global_batch_size=config.batch_size,
                       micro_batch_size=config.micro_batch_size, max_length=config.max_length,
                       epochs=config.epochs, warmup_ratio=0.1, save_steps=4, status_every=1, device=device)


def generation_config(config: ChatDemoConfig) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                            top_p=config.top_p, batch_size=32, chunk_size=32)


def run_stage(model: str, data: Path, out: Path, config: ChatDemoConfig, device: str, method: str) -> list[Path]:
    """Continued SFT (`method` "sft", one iteration) or SPIN (T iterations) through the driver; its models."""
    iterations = 1 if method == "sft" else config.iterations
    result = spin(RunConfig(
        model=model, data=str(data), output_dir=str(out), method=method,
        iterations=[{"lr": config.lr, "beta": config.beta}] * iterations, mix_previous=True, save_dtype="float32",
        max_prompt_length=config.max_prompt_length, seed=config.seed, train=train_config(config, device),
        generation=generation_config(config)))
    return result.models


# ----------------------------------------------------------------------------- evaluation

def _examples(rows: list[dict[str, str]], answers: list[str] | None = None) -> list[tuple[str, str]]:
    return [(_prompt_text(r), r["output"] if answers is None else a)
            for r, a in zip(rows, answers or [None] * len(rows))]


def start_samples(model: str, heldout: list[dict[str, str]], out: Path, config: ChatDemoConfig,
                  device: str) -> list[str]:
    """The start model's own sampled answer to every held-out prompt: generated once (rank 0), then kept."""
    path = out / "eval" / "start_samples.json"
    if dist.is_main() and not path.is_file():
        net, tok = load_model(model, dtype=torch.float32, device=device), load_tokenizer(model)
        done = generate(net, tok, [[{"role": "user", "content": p}] for p, _ in _examples(heldout)],
                        max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                        seed=config.seed, max_prompt_length=config.max_prompt_length, progress=True)
        atomic_write_json(path, [c.text for c in done])
    dist.barrier()
    return json.loads(path.read_text(encoding="utf-8"))


def _per_token(values: list[tuple[float, int]]) -> list[float]:
    return [total / max(1, n) for total, n in values]


def evaluate_stage(name: str, label: str, model: str | Path, heldout: list[dict[str, str]], samples: list[str],
                   out: Path, config: ChatDemoConfig, device: str) -> dict[str, Any]:
    """Per held-out prompt: per-token log p(real), log p(start's sample), gap; cached in eval/<name>.json."""
    path = out / "eval" / f"{name}.json"
    if dist.all_ranks_true(path.is_file()):
        return json.loads(path.read_text(encoding="utf-8"))
    start = time.perf_counter()
    net, tok = load_model(model, dtype=torch.float32, device=device), load_tokenizer(model)
    kw = dict(batch_size=8, distributed=True, max_prompt_length=config.max_prompt_length)
    real = _per_token(answer_logprobs(net, tok, _examples(heldout), **kw))
    sampled = _per_token(answer_logprobs(net, tok, _examples(heldout, samples), **kw))
    shown = greedy_answers(net, tok, _examples(heldout[:3]), max_new_tokens=config.max_new_tokens,
                           max_prompt_length=config.max_prompt_length)
    result = {"stage": name, "label": label, "model": str(model), "n": len(heldout), "logp_real": real,
              "logp_generated": sampled, "gap": [r - s for r, s in zip(real, sampled)], "answers": shown,
              "eval_seconds": round(time.perf_counter() - start, 1)}
    if dist.is_main():
        atomic_write_json(path, result)
    dist.barrier()
    return result


def stage_rows(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each stage's means and, after the first (the start model), paired-bootstrap differences from it."""
    rows = []
    for s in stages:
        row: dict[str, Any] = {"stage": s["stage"], "label": s["label"]}
        for m in METRICS:
            row[m] = sum(s[m]) / len(s[m])
            if s is not stages[0]:
                row[f"{m}_vs_start"] = asdict(paired_bootstrap(stages[0][m], s[m], seed=0))
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], n: int) -> str:
    head = "| stage | " + " | ".join(f"{LABELS[m]} | vs start [95% CI]" for m in METRICS) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(METRICS))]
    for r in rows:
        cells = [r["label"]]
        for m in METRICS:
            v = r.get(f"{m}_vs_start")
            cells += [f"{r[m]:.3f}", "-" if v is None else
                      f"{v['difference']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\n(mean per-token log-probs over {n} held-out prompts; 95% intervals: paired "
                               "bootstrap over the prompts)")


def format_answers(stages: list[dict[str, Any]], heldout: list[dict[str, str]]) -> str:
    first, last = stages[0], stages[-1]
    parts = []
    for i, row in enumerate(heldout[: len(first["answers"])]):
        parts.append(f"### Held-out prompt {i + 1}: {_prompt_text(row)}\n\n**{first['label']}:** "
                     f"{first['answers'][i].strip()}\n\n**{last['label']}:** {last['answers'][i].strip()}")
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- the pipeline

def chat_stages(out: Path, config: ChatDemoConfig, device: str, world_size: int) -> dict[str, Any]:
    """Every stage of one demo run in `out` (on every rank of an initialized process group)."""
    t_start = time.perf_counter()
    model = start_model(config) if dist.is_main() else None
    model = dist.broadcast_json(model)
    # the start model's resolved path is a setting too: a run folder made from a model cached elsewhere
    # is refused here, in the demo's words, before the driver's own check of each stage
    error = dist.broadcast_json(check_settings(out, replace(config, model=model)) if dist.is_main() else None)
    if error:
        raise UserError(error)
    if dist.is_main():
        write_data(out, config)
    dist.barrier()
    train_rows, heldout = split_rows(config)
    train_file = out / "data" / "train.json"
    _say(f"run dir {out}; {world_size} rank(s) on {device}; seed {config.seed}; start model {model}; "
         f"{len(train_rows)} training / {len(heldout)} held-out prompts")
    samples = start_samples(model, heldout, out, config, device)
    evaluate = functools.partial(evaluate_stage, heldout=heldout, samples=samples, out=out, config=config,
                                 device=device)
    stages = [evaluate("start", "start (SFT)", model)]
    _say(f"continued SFT: {len(train_rows)} real answers, lr {config.lr:g}, {config.epochs:g} epoch(s)")
    [continued] = run_stage(model, train_file, out / "continued_sft", config, device, "sft")
    stages.append(evaluate("continued_sft", "continued SFT", continued))
    _say(f"SPIN: {config.iterations} iteration(s), lr {config.lr:g}, beta {config.beta:g}")
    for t, iterate in enumerate(run_stage(model, train_file, out / "spin", config, device, "spin")):
        stages.append(evaluate(f"spin_iter{t}", f"SPIN iter {t}", iterate))
    return publish(out, config, stages, heldout, world_size, device, time.perf_counter() - t_start)


def publish(out: Path, config: ChatDemoConfig, stages: list[dict[str, Any]], heldout: list[dict[str, str]],
            world_size: int, device: str, seconds: float) -> dict[str, Any]:
    """results.json / results.md (table + side-by-side answers), eval_table.json for `minispin.report`."""
    rows = stage_rows(stages)
    table = format_table(rows, len(heldout)) + "\n\n" + format_answers(stages, heldout)
    results = {"config": asdict(config), "world_size": world_size, "device": device,
               "seconds_this_run": round(seconds, 1), "stages": stages, "rows": rows, "table": table}
    if dist.is_main():
        columns = [{"key": m, "label": LABELS[m], "metric": "mean per-token log-prob"} for m in METRICS]
        write_table(out, make_table(columns, [{"name": r["label"], "model": s["model"],
                                               "baseline": s["stage"] == "continued_sft",
                                               "scores": {m: r[m] for m in METRICS}}
                                              for r, s in zip(rows, stages)],
                                    source="minispin demo: held-out per-token log-probs",
                                    average=False, change=(1.0, "nats per token")))
        report = write_report(out)  # training curves of both runs + the held-out table, as PNG
        _say(f"figures: {', '.join(str(f) for f in report.files if f.suffix == '.png')}")
    publish_results(out, results, "results.md", _say)
    return results


# ----------------------------------------------------------------------------- several seeds

def summarize_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage and metric: mean ± SE over seeds of the value and of its difference from the start model
    (95% t interval over seeds; seeds whose paired-bootstrap interval lies above / below 0)."""
    out = []
    for k, row in enumerate(runs[0]["rows"]):
        per_seed = [r["rows"][k] for r in runs]
        entry: dict[str, Any] = {"label": row["label"]}
        for m in METRICS:
            entry[m] = mean_se([r[m] for r in per_seed])
            if f"{m}_vs_start" in row:
                diffs = [r[f"{m}_vs_start"] for r in per_seed]
                values = [d["difference"] for d in diffs]
                entry[f"{m}_vs_start"] = {
                    "mean_se": mean_se(values), "interval": mean_interval(values)[1:] if len(values) > 1 else None,
                    "above": sum(d["low"] > 0 for d in diffs), "below": sum(d["high"] < 0 for d in diffs)}
        out.append(entry)
    return {"seeds": [r["config"]["seed"] for r in runs], "stages": out}


def format_seeds(summary: dict[str, Any]) -> str:
    lines = ["| stage | " + " | ".join(f"{LABELS[m]} | vs start (95% CI over seeds; above / below 0)"
                                       for m in METRICS) + " |", "|" + "---|" * (1 + 2 * len(METRICS))]
    for s in summary["stages"]:
        cells = [s["label"]]
        for m in METRICS:
            cells.append(f"{s[m][0]:.3f} ± {s[m][1]:.3f}")
            d = s.get(f"{m}_vs_start")
            ci = "" if d is None or d["interval"] is None else \
                f" [{d['interval'][0]:+.3f}, {d['interval'][1]:+.3f}]"
            cells.append("-" if d is None else
                         f"{d['mean_se'][0]:+.3f} ± {d['mean_se'][1]:.3f}{ci}; {d['above']} / {d['below']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(seeds {summary['seeds']}: mean ± SE over seeds)"


def run_seeds(out: Path, config: ChatDemoConfig, seeds: list[int], device: str, world_size: int) -> dict[str, Any]:
    runs = [chat_stages(out / f"seed{s}", replace(config, seed=s), device, world_size) for s in seeds]
    summary = summarize_seeds(runs)
    summary["table"] = format_seeds(summary)
    summary["seconds_this_run"] = sum(r["seconds_this_run"] for r in runs)
    publish_results(out, summary, "seeds.md", _say)
    return summary


# ----------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minispin.demo", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--out", default=None, help="run folder (re-running with the same one continues); default "
                   "runs/demo_chat, with --seeds runs/demo_chat_seeds")
    p.add_argument("--model", default="", help="start model (a folder or .gguf); default the pinned "
                   f"{SMOLLM2.name} ({SMOLLM2.requirement})")
    p.add_argument("--iterations", type=int, default=None, help=f"SPIN iterations (default {ChatDemoConfig.iterations})")
    add_common_options(p, "SPIN's sampling and the training data order (the held-out split never changes)")
    p.set_defaults(nproc=1)  # one process with both cores' threads beats two ranks on this model on CPU
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.iterations is not None and args.iterations < 1:
        raise SystemExit("--iterations must be >= 1")
    code = launch_if_asked("minispin.demo", argv, args)
    if code is not None:
        return code
    overrides: dict[str, Any] = {"seed": args.seed, "model": args.model}
    if args.iterations is not None:
        overrides["iterations"] = args.iterations
    config = ChatDemoConfig.small(**overrides) if args.small else ChatDemoConfig(**overrides)
    out = Path(args.out or ("runs/demo_chat_seeds" if args.seeds else "runs/demo_chat"))

    def run() -> int:  # a user's mistake (a bad --model, a run folder made otherwise): one "error:" line
        info = dist.init_distributed(args.device)
        try:
            if args.seeds is None:
                chat_stages(out, config, args.device, info.world_size)
            else:
                run_seeds(out, config, [args.seed + k for k in range(args.seeds)], args.device, info.world_size)
        finally:
            dist.shutdown(info)
        return 0
    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
