"""The built-in demo: the whole SPIN pipeline on CPU in minutes, with no model or data to download.

    python -m minispin.demo.toy                 # 2 torchrun ranks on CPU, results in ./runs/demo
    python -m minispin.demo.toy --nproc 1       # one process
    python -m minispin.demo.toy --small         # the reduced size the test suite runs (~20 seconds)
    python -m minispin.demo.toy --seeds 5       # seeds 0..4, mean ± standard error (minispin.demo.seeds)
    python -m minispin.demo.toy --regime plateau   # SFT at its plateau first (minispin.demo.plateau)

Stages (each skipped when its output exists, so re-running with the same --out continues):
1. task       a small task with checkable answers (`minispin.demo.task`: reverse / sort letters, add two
              numbers, as chat) and a character-level tokenizer, generated deterministically
2. init       a random tiny Llama (LlamaForCausalLM, 4 layers, hidden 128, ~0.8M parameters) saved as an
              HF safetensors folder with the tokenizer files, loaded from then on like any real model
3. SFT        supervised fine-tuning from scratch through minispin's training loop (the driver's "sft"
              method), deliberately short so that the model is only partly right
4. continued  the paper's baseline: one more SFT epoch on the SPIN prompts' real answers
5. SPIN       iterations 0..T-1 from the SFT model (`minispin.spin`): generate, pair with the real
              answers, reference log-probs, train; iteration t >= 1 also trains on iteration t-1's pairs
After each model: held-out exact-match accuracy of greedy answers and the mean summed log-prob of
the real answers (`minispin.heldout`), printed as a table and written to <out>/results.json with the
per-question results; the table gives each stage's 95% Wilson interval and its paired-bootstrap
difference from SFT over the same questions (`minispin.stats`).

Hyperparameters are chosen for a ~0.8M-parameter model trained from scratch, NOT the paper's 7B
recipe (RMSProp, lr 5e-7/1e-7, beta 0.1/5.0, batch 64; see examples/spin_zephyr.py for that):
AdamW everywhere, global batch 32; SFT from scratch at lr 3e-3 for one epoch of 19,200 examples (600
steps, decayed to 0); continued SFT and SPIN at lr 3e-5 (about the paper's SPIN/SFT lr ratio of 1/40),
beta 0.1, 2 epochs per SPIN iteration on 1,024 prompts (2,048 pairs from iteration 1 with mixing),
generation at temperature 1 with at most 12 new tokens. The SPIN lr and beta were picked in a small
sweep (lr 3e-5 / 1e-4 / 3e-4, beta 0.1 / 1) on a separate validation set, not on the demo's test set;
larger lrs made SPIN worse than the SFT model on this task.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed as dist
from ..checkpoint import load_model, save_model
from ..data import read_examples
from ..driver import RunConfig, spin
from ..eval import table_from_demo, write_table
from ..heldout import answer_logprobs, exact_match_per_question, greedy_answers
from ..generation_job import GenerationConfig
from ..io import atomic_write_json, atomic_write_text
from ..log import print0
from ..model import ModelConfig, Transformer
from ..runs import check_manifest, describe_changes
from ..stats import format_stage_table, stage_table
from ..tokenizer import load_tokenizer
from ..training import TrainConfig
from . import task as demo_task

@dataclass
class DemoConfig:
    """Sizes and hyperparameters of the demo (defaults: the full demo, ~2 minutes on 2 CPU cores)."""

    n_train: int = 19200  # SFT examples, one epoch (600 steps of 32)
    n_test: int = 600  # held-out questions
    n_spin: int = 1024  # SPIN prompts: the first n_spin SFT examples (the paper reuses SFT prompts too)
    iterations: int = 2
    # model
    num_layers: int = 4
    hidden_size: int = 128
    intermediate_size: int = 384
    num_heads: int = 4
    num_kv_heads: int = 2
    # training
    batch_size: int = 32  # global, over ranks
    sft_lr: float = 3e-3
    continued_lr: float = 3e-5
    spin_lr: float = 3e-5
    spin_beta: float = 0.1
    spin_epochs: float = 2
    temperature: float = 1.0
    max_new_tokens: int = 12
    seed: int = 0

    @classmethod
    def small(cls, **overrides: Any) -> "DemoConfig":
        """The reduced size for CI: same pipeline, numbers not meaningful."""
        values = dict(n_train=1600, n_test=96, n_spin=128, num_layers=2, hidden_size=64, intermediate_size=192,
                      spin_epochs=1)
        values.update(overrides)
        return cls(**values)


# ----------------------------------------------------------------------------- helpers

_say = functools.partial(print0, prefix="demo")  # the demo's status lines, rank 0


def _paths(out: Path) -> dict[str, Path]:
    return {"task": out / "task", "init": out / "init", "sft": out / "sft", "continued_sft": out / "continued_sft",
            "spin": out / "spin", "eval": out / "eval"}


def check_settings(out: Path, config: Any, kind: str = "demo") -> str | None:
    """Rank 0: record a demo run's settings (a dataclass) in <out>/<kind>_config.json; an error message when
    `out` holds a run made with other ones."""
    changed = check_manifest(out / f"{kind}_config.json", asdict(config))
    if changed:
        return (f"{out} holds a {kind} run with other settings ({describe_changes(changed)}); use another --out "
                "or the same options")
    return None


def make_task(out: Path, config: DemoConfig) -> dict[str, Path]:
    """Stage 1 (rank 0): task data + tokenizer, unless already there."""
    paths = {"train": out / "train_sft.jsonl", "test": out / "test_sft.jsonl", "tokenizer": out / "tokenizer"}
    if not all(p.exists() for p in paths.values()) or not (paths["tokenizer"] / "tokenizer.json").is_file():
        demo_task.write_task(out, demo_task.TaskConfig(n_train=config.n_train, n_test=config.n_test))
    return paths


def init_model(out: Path, tokenizer_dir: Path, config: DemoConfig) -> Path:
    """Stage 2 (rank 0): a random tiny Llama saved with the tokenizer files, unless already there."""
    if (out / "config.json").is_file():
        return out
    tok = load_tokenizer(tokenizer_dir)
    model_config = ModelConfig(
        vocab_size=tok.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, architecture="LlamaForCausalLM", torch_dtype="float32",
        bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(config.seed)
    model = Transformer(model_config)
    with torch.no_grad():  # GPT-2/Llama-style init: N(0, 0.02) for every matrix, ones for the norms
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    extra = [tokenizer_dir / n for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")]
    save_model(model, out, extra_files=[str(p) for p in extra if p.is_file()])
    return out


def run_settings(config: DemoConfig) -> dict[str, Any]:
    """The demo's run-level RunConfig settings (prompts of at most 24 tokens, the demo's seed)."""
    return dict(max_prompt_length=24, seed=config.seed)


def train_config(config: DemoConfig, device: str, **overrides: Any):
    """The demo's TrainConfig (AdamW, tiny lengths); shared by every stage and by minispin.demo.methods."""
    values = dict(optimizer="adamw", adam_beta2=0.98, weight_decay=0.0, global_batch_size=config.batch_size,
                  micro_batch_size=config.batch_size, max_length=48, warmup_ratio=0.1,
                  max_grad_norm=1.0, save_steps=100, status_every=100, device=device)
    values.update(overrides)
    return TrainConfig(**values)


def generation_config(config: DemoConfig):
    """The demo's GenerationConfig (short answers, the demo's temperature)."""
    return GenerationConfig(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                            batch_size=128, chunk_size=256, progress=False)


def run_sft(model: Path, data: Path, out: Path, config: DemoConfig, device: str, *, lr: float,
            limit: int | None, seed: int | None = None) -> Path:
    """SFT (from scratch, or continued) through the iteration driver's "sft" method; returns the model.
    `seed`: this run's seed instead of the demo's (e.g. the data order of one plateau epoch)."""
    settings = run_settings(config)
    if seed is not None:
        settings["seed"] = seed
    result = spin(RunConfig(
        model=str(model), data=str(data), output_dir=str(out), method="sft", limit=limit, num_iterations=1,
        iterations=[{"lr": lr, "epochs": 1}], save_dtype="float32", **settings,
        train=train_config(config, device), generation=generation_config(config)))
    return result.final_model


def run_spin(model: Path, data: Path, out: Path, config: DemoConfig, device: str) -> list[Path]:
    """SPIN iterations 0..T-1 from `model` through the iteration driver; returns each iteration's model."""
    result = spin(RunConfig(
        model=str(model), data=str(data), output_dir=str(out), method="spin", limit=config.n_spin,
        iterations=[{"lr": config.spin_lr, "beta": config.spin_beta}] * config.iterations, mix_previous=True,
        save_dtype="float32",
        **run_settings(config), train=train_config(config, device, epochs=config.spin_epochs),
        generation=generation_config(config)))
    return result.models


def evaluate_stage(name: str, model_dir: Path, test_path: Path, eval_dir: Path, device: str, *,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Exact match (overall and per skill) and mean answer log-prob of one model; every rank takes a
    share of the test set. Cached in eval_dir/<name>.json (with `extra`, e.g. the stage's train time)."""
    path = eval_dir / f"{name}.json"
    if dist.all_ranks_true(path.is_file() and "correct" in json.loads(path.read_text())):
        return json.loads(path.read_text())  # (an older cache without per-question results is redone)
    start = time.perf_counter()
    model = load_model(model_dir, dtype=torch.float32, device=device)
    tokenizer = load_tokenizer(model_dir)
    examples = read_examples(test_path)
    hits = exact_match_per_question(model, tokenizer, examples, batch_size=128, distributed=True)
    logps = answer_logprobs(model, tokenizer, examples, batch_size=128, distributed=True)
    shown = examples[:6]  # a few answers to read (every rank; greedy, so the same answers)
    shown_answers = greedy_answers(model, tokenizer, shown, batch_size=len(shown))
    per_skill: dict[str, list[bool]] = {}
    for e, hit in zip(examples, hits):
        per_skill.setdefault(demo_task.skill_of(e.prompt[-1]["content"]), []).append(hit)
    result = {
        "stage": name, "model": str(model_dir), "n_test": len(examples),
        "exact_match": sum(hits) / len(hits),
        "exact_match_by_skill": {s: sum(v) / len(v) for s, v in sorted(per_skill.items())},
        "mean_logprob": sum(v for v, _ in logps) / len(logps),
        "mean_logprob_per_token": sum(v for v, _ in logps) / sum(n for _, n in logps),
        "correct": [int(h) for h in hits],  # per test question, in file order: intervals, paired differences
        "examples": [{"prompt": e.prompt[-1]["content"], "real": e.real, "generated": a}
                     for e, a in zip(shown, shown_answers)],
        "eval_seconds": round(time.perf_counter() - start, 2),
        **(extra or {}),
    }
    if dist.is_main():
        eval_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, result)
    dist.barrier()
    return result


def interval_rows(stages: list[dict[str, Any]], baseline: str = "SFT") -> list[dict[str, Any]]:
    """`minispin.stats.stage_table` of the evaluated stages: each stage's exact match with its 95% Wilson
    interval and its paired-bootstrap difference from `baseline` (a stage label) over the same questions."""
    return stage_table({s["label"]: s["correct"] for s in stages}, baseline)


def format_results(stages: list[dict[str, Any]], baseline: str = "SFT") -> str:
    """The printed results: exact match with intervals and paired differences, then skills and log-probs."""
    return (format_stage_table(interval_rows(stages, baseline), baseline) + "\n\n" + format_table(stages)
            + f"\n({stages[0]['n_test']} held-out questions; 95% intervals: Wilson for exact match, paired "
            f"bootstrap over the questions for the difference from {baseline})")


def format_table(rows: list[dict[str, Any]]) -> str:
    """Exact match per skill and the real answers' log-probs, as a fixed-width text table."""
    skills = [s for s in demo_task.SKILLS if any(s in r["exact_match_by_skill"] for r in rows)]
    head = ["stage", "exact match"] + skills + ["mean log p(real)", "per token"]
    body = [[r["label"], f"{r['exact_match']:.3f}"] + [f"{r['exact_match_by_skill'].get(s, float('nan')):.3f}"
                                                        for s in skills]
            + [f"{r['mean_logprob']:.3f}", f"{r['mean_logprob_per_token']:.3f}"] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the pipeline

def finished_results(out: Path, config: Any) -> dict[str, Any] | None:
    """The results of a finished run in `out` made with exactly `config` (a dataclass), else None."""
    path = out / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    return results if results.get("config") == json.loads(json.dumps(asdict(config))) else None


def demo_stages(out: Path, config: DemoConfig, device: str, world_size: int) -> dict[str, Any]:
    """Every stage of one demo run in `out` (on every rank of an initialized process group)."""
    t_start = time.perf_counter()
    paths = _paths(out)
    error = dist.broadcast_json(check_settings(out, config) if dist.is_main() else None)
    if error:
        raise SystemExit(f"error: {error}")
    _say(f"run dir {out}; {world_size} rank(s) on {device}; seed {config.seed}")

    t = time.perf_counter()
    if dist.is_main():
        task = make_task(paths["task"], config)
        init_model(paths["init"], task["tokenizer"], config)
    dist.barrier()
    task = {"train": paths["task"] / "train_sft.jsonl", "test": paths["task"] / "test_sft.jsonl"}
    _say(f"1-2/5 task + model: {config.n_train} train / {config.n_test} test questions, random "
         f"{config.num_layers}-layer Llama in {paths['init']} ({time.perf_counter() - t:.1f}s)")

    stages: list[dict[str, Any]] = []

    def evaluate(name: str, label: str, model_dir: Path, seconds: float) -> None:
        r = evaluate_stage(name, model_dir, task["test"], paths["eval"], device,
                           extra={"train_seconds": round(seconds, 2)})
        stages.append(dict(r, label=label))
        _say(f"{label}: exact match {r['exact_match']:.3f}, mean log p(real) {r['mean_logprob']:.3f} "
             f"({r.get('train_seconds', seconds):.1f}s train, {r['eval_seconds']:.1f}s eval)")

    t = time.perf_counter()
    _say(f"3/5 SFT from scratch: {config.n_train} examples, lr {config.sft_lr:g}")
    sft_model = run_sft(paths["init"], task["train"], paths["sft"], config, device, lr=config.sft_lr, limit=None)
    evaluate("sft", "SFT", sft_model, time.perf_counter() - t)

    t = time.perf_counter()
    _say(f"4/5 continued SFT: 1 epoch on the {config.n_spin} SPIN prompts' real answers, lr {config.continued_lr:g}")
    cont_model = run_sft(sft_model, task["train"], paths["continued_sft"], config, device,
                         lr=config.continued_lr, limit=config.n_spin)
    evaluate("continued_sft", "continued SFT", cont_model, time.perf_counter() - t)

    t = time.perf_counter()
    _say(f"5/5 SPIN: {config.iterations} iteration(s) on {config.n_spin} prompts, lr {config.spin_lr:g}, "
         f"beta {config.spin_beta:g}, {config.spin_epochs:g} epoch(s) each")
    spin_models = run_spin(sft_model, task["train"], paths["spin"], config, device)
    spin_seconds = (time.perf_counter() - t) / max(1, len(spin_models))
    for i, m in enumerate(spin_models):
        evaluate(f"spin_iter{i}", f"SPIN iter {i}", m, spin_seconds)

    results = write_results(out, config, stages, world_size, device, time.perf_counter() - t_start)
    if dist.is_main():
        write_table(out, table_from_demo(stages, demo_task.SKILLS))  # the seeds' table, for minispin.report
        _say(f"figures: python -m minispin.report {out}")
    dist.barrier()
    return results


def write_results(out: Path, config: Any, stages: list[dict[str, Any]], world_size: int, device: str,
                  seconds: float, notes: str = "", **extra: Any) -> dict[str, Any]:
    """results.json (config, stages with per-question results, interval rows, `extra`) and results.txt (the
    printed table, then `notes`) of one run; rank 0 writes and prints. Returns the results on every rank."""
    table = format_results(stages) + (f"\n\n{notes}" if notes else "")
    results = {"config": asdict(config), "world_size": world_size, "device": device,
               "seconds_this_run": round(seconds, 1), "stages": stages, "stats": interval_rows(stages),
               "table": table, **extra}
    publish_results(out, results, "results.txt", _say)
    return results


def publish_results(out: Path, results: dict[str, Any], table_file: str, say: Callable[[str], None]) -> None:
    """Rank 0: out/results.json, out/<table_file> (results["table"]), the table on stdout and a "done" line;
    every rank waits for it."""
    if dist.is_main():
        atomic_write_json(out / "results.json", results)
        atomic_write_text(out / table_file, results["table"] + "\n")
        print("\n" + results["table"] + "\n", flush=True)
        say(f"done in {results['seconds_this_run']:.0f}s; results in {out / table_file}")
    dist.barrier()


def add_common_options(p: argparse.ArgumentParser, seed_help: str) -> None:
    """The options every demo command line shares: ranks, size, seed(s), device."""
    p.add_argument("--nproc", type=int, default=2, help="processes (torchrun ranks); 1 = no torchrun")
    p.add_argument("--small", action="store_true", help="the reduced size used by the test suite")
    p.add_argument("--seed", type=int, default=0, help=f"seed of {seed_help} (the first one with --seeds)")
    p.add_argument("--seeds", type=int, default=None, help="run K seeds (seed, seed+1, ...) and print mean ± SE "
                   "(minispin.demo.seeds)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")


def launch_if_asked(module: str, argv: list[str], args: argparse.Namespace) -> int | None:
    """A demo command line (`add_common_options`) checked; with --nproc N > 1 outside torchrun: re-run
    `python -m module argv` as N ranks (minispin.distributed.launch) and return its exit code; else None
    (run here)."""
    if args.nproc < 1:
        raise SystemExit("--nproc must be >= 1")
    if args.seeds is not None and args.seeds < 1:
        raise SystemExit("--seeds must be >= 1")
    # Triton's CPU interpreter (a test-suite setting) would make the demo's kernels crawl; on CPU the
    # kernels take their plain-torch path without it (it is read when triton is first imported).
    if args.nproc > 1 and not dist.launched_by_torchrun():
        os.environ.pop("TRITON_INTERPRET", None)
        return dist.launch(args.nproc, ["-m", module, *argv])
    if args.device == "cpu" and "triton" not in sys.modules:
        os.environ.pop("TRITON_INTERPRET", None)
    return None
