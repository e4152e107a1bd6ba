"""Peer benchmark on the real model: minispin.generate vs HF generate, and minispin's DPO training job vs
TRL's DPOTrainer, same prompts, pairs and settings.

    python benchmarks/bench_peers.py            # generation + 64 pairs, 3 repeats of each (over an hour on 2 CPU cores)
    python benchmarks/bench_peers.py --small    # batches 1 and 4, 16 new tokens, 16 pairs, 1 repeat: a smoke run
    python benchmarks/bench_peers.py --jobs generate            # only the generation half

Generation (`--jobs generate`): benchmarks/bench_generate.py's `compare_with_hf` in this process: the first
alpaca prompts (chat template, the same token ids to both), batch 1 and 32, greedy and T 0.7 / top-p 0.9,
exactly `--new-tokens` new tokens per prompt on both sides, the two libraries back to back in each repeat
(alternating which goes first); ratios of minispin's tok/s to HF's per repeat.

Needs the optional extras transformers, trl (and their datasets, accelerate, gguf). The model is
SmolLM2-135M-Instruct: the pinned GGUF (`minispin.pinned.fetch`) converted once to an HF folder by
`minispin.convert` (`--model-dir`, default `smollm2-hf` next to minispin's cache), fp32, on the CPU.

Pairs: alpaca prompts (tests/fixtures/data/alpaca_en_demo.json) whose real answer and the model's own
sampled answer (`minispin.generate`, T 0.7, top-p 0.9, seed 0; generated once and cached in
`--work-dir`) both fit `--max-length` with the prompt, so neither trainer truncates anything. Both jobs
read the same TRL-format JSONL file (conversational prompt / chosen / rejected) and train one epoch:
global batch 8 pairs, micro-batch 4 (TRL: per-device 4 x 2 accumulation steps), max length 384, RMSProp,
lr 5e-7, beta 0.1, sigmoid loss, reference log-probs precomputed once (TRL: precompute_ref_log_probs,
batch 8), fp32, no full activation checkpointing (`--activation-checkpointing` turns it on for both),
and both save the trained model at the end.

    minispin: python -m minispin --method dpo --model DIR --data pairs.jsonl ...  (the user's command)
    TRL:      this file with --trl-job (DPOTrainer(...).train(), then save_model)

Each job runs in a child process of its own; its wall time is the whole job (start to exit: imports,
loading, tokenization, reference pass, training, saving) and its peak memory is the child's peak RSS
(os.wait4's ru_maxrss). Jobs alternate (minispin first in even repeats, TRL first in odd ones) so a
change of machine load hits both. tokens/s counts the tokens of both rows of every pair (prompt +
answer, minispin's tokenization) once per job. Printed: each run, then min / median / max of each
figure and of the per-repeat ratios (speed = TRL wall / minispin wall; memory = minispin peak / TRL
peak); a full run appends the table to benchmarks/RESULTS.md with versions and the exact command.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_generate import alpaca_prompts, compare_with_hf  # noqa: E402

ALPACA = REPO / "tests" / "fixtures" / "data" / "alpaca_en_demo.json"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
JOBS = ("generate", "minispin", "trl")  # generate: minispin.generate vs HF generate; the other two train


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="16 pairs, 1 repeat, no RESULTS.md row (a smoke run)")
    p.add_argument("--pairs", type=int, default=None, help="number of pairs (default 64; --small 16)")
    p.add_argument("--repeats", type=int, default=None, help="runs of each job (default 3; --small 1)")
    p.add_argument("--model-dir", default=None, help="HF folder of the model (default: smollm2-hf next to "
                                                     "minispin's cache, converted from the pinned GGUF if missing)")
    p.add_argument("--work-dir", default=None, help="cached pairs and the jobs' run folders "
                                                    "(default: bench_peers in minispin's cache)")
    p.add_argument("--batch", type=int, default=8, help="global batch (pairs per optimizer step)")
    p.add_argument("--micro", type=int, default=4, help="pairs per forward")
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--max-prompt-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads of each job")
    p.add_argument("--activation-checkpointing", action="store_true", help="full activation checkpointing in both")
    p.add_argument("--jobs", default=",".join(JOBS), help=f"which jobs to run (comma list of {', '.join(JOBS)})")
    p.add_argument("--gen-batches", default=None, help="generation batch sizes (default 1,32; --small 1,4)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per prompt (default 96; --small 16)")
    p.add_argument("--results", default=None, help="append the table here (default: benchmarks/RESULTS.md for a "
                                                  "full run, none for --small)")
    p.add_argument("--no-results", action="store_true", help="do not write a RESULTS.md row")
    p.add_argument("--trl-job", action="store_true", help=argparse.SUPPRESS)  # the TRL child process
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.pairs = args.pairs or (16 if args.small else 64)
    args.repeats = args.repeats or (1 if args.small else 3)
    args.jobs = [j.strip() for j in args.jobs.split(",") if j.strip()]
    if unknown := set(args.jobs) - set(JOBS):
        p.error(f"--jobs: unknown {sorted(unknown)}; choose from {', '.join(JOBS)}")
    args.train_jobs = [j for j in args.jobs if j != "generate"]
    try:
        args.gen_batches = [int(b) for b in (args.gen_batches or ("1,4" if args.small else "1,32")).split(",")]
    except ValueError:
        p.error(f"--gen-batches: expected comma-separated integers, got {args.gen_batches!r}")
    args.new_tokens = args.new_tokens or (16 if args.small else 96)
    if args.batch % args.micro:
        p.error(f"--batch {args.batch} must be a multiple of --micro {args.micro}")
    return args


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the model and the pairs

def model_folder(args) -> Path:
    """The HF folder of SmolLM2-135M-Instruct; converted once from the pinned GGUF with `minispin.convert`
    if missing (atomic: a killed conversion never leaves half a folder). transformers loads it with the
    same logits as its own GGUF loading (tests/test_convert.py); transformers 5.25 itself refuses to save a
    model it loaded from GGUF."""
    from minispin import pinned
    from minispin.convert import convert

    folder = Path(args.model_dir) if args.model_dir else pinned.cache_dir().parent / "smollm2-hf"
    if not all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json")):
        gguf = pinned.fetch()
        note(f"converting {gguf.name} to an HF folder at {folder} (minispin.convert, fp32)")
        folder.parent.mkdir(parents=True, exist_ok=True)
        convert(gguf, folder)
    return folder


def pairs_file(args, model_dir: Path, work: Path) -> Path:
    """The benchmark's pairs as a TRL-format JSONL file, generated once per model and settings."""
    fingerprint = {"model": json.loads((model_dir / "config.json").read_text()),
                   "weights_bytes": (model_dir / "model.safetensors").stat().st_size,
                   "pairs": args.pairs, "max_length": args.max_length, "max_prompt_length": args.max_prompt_length}
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    path = work / f"pairs-{args.pairs}-{key}.jsonl"
    if not path.is_file():
        rows = generate_pairs(args, model_dir)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
    return path


def generate_pairs(args, model_dir: Path) -> list[dict]:
    """The first alpaca rows whose prompt and real answer fit, answered by the model itself; kept where
    the sampled answer fits too (a few tokens of slack: TRL keeps the template's newline after <|im_end|>)."""
    import torch

    import minispin
    from minispin.collate import tokenize_answer

    tok = minispin.load_tokenizer(model_dir)
    budget = args.max_length - args.max_prompt_length - 4
    candidates = []
    for e in minispin.read_examples(ALPACA):
        prompt_ids, real_ids = tokenize_answer(tok, e.prompt, e.real)
        if len(prompt_ids) <= args.max_prompt_length and len(real_ids) <= budget:
            candidates.append(e)
        if len(candidates) >= args.pairs + args.pairs // 8 + 2:  # a few spares for answers that do not fit
            break
    note(f"generating the model's answers to {len(candidates)} alpaca prompts (cached afterwards)")
    model = minispin.load_model(model_dir, dtype=torch.float32, device="cpu")
    outs = minispin.generate(model, tok, [e.prompt for e in candidates], max_new_tokens=budget - 4,
                             temperature=0.7, top_p=0.9, seed=0, batch_size=len(candidates))
    rows = []
    for e, out in zip(candidates, outs):
        if out.text.strip() and len(tokenize_answer(tok, e.prompt, out.text)[1]) <= budget:
            rows.append({"prompt": e.prompt, "chosen": [{"role": "assistant", "content": e.real}],
                         "rejected": [{"role": "assistant", "content": out.text}]})
    if len(rows) < args.pairs:
        raise SystemExit(f"only {len(rows)} of the {len(candidates)} generated pairs fit --max-length "
                         f"{args.max_length}; ask for fewer --pairs")
    return rows[: args.pairs]


def count_tokens(data: Path, model_dir: Path) -> int:
    """Tokens of both rows of every pair (prompt + answer), as minispin tokenizes them."""
    import minispin
    from minispin.collate import tokenize_answer

    tok = minispin.load_tokenizer(model_dir)
    total = 0
    for line in data.read_text().splitlines():
        row = json.loads(line)
        for side in ("chosen", "rejected"):
            prompt_ids, answer_ids = tokenize_answer(tok, row["prompt"], row[side][0]["content"])
            total += len(prompt_ids) + len(answer_ids)
    return total


# ----------------------------------------------------------------------------- the two jobs

def minispin_command(args, model_dir: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "minispin", "--method", "dpo", "--model", str(model_dir), "--data", str(data),
            "--out", str(out), "--global_batch_size", str(args.batch), "--micro_batch_size", str(args.micro),
            "--max_length", str(args.max_length), "--max_prompt_length", str(args.max_prompt_length),
            "--optimizer", "rmsprop", "--lr", str(args.lr), "--beta", str(args.beta), "--loss", "sigmoid",
            "--epochs", "1", "--device", "cpu", "--progress", "false",
            "--activation_checkpointing", str(args.activation_checkpointing).lower()]


def trl_command(args, model_dir: Path, data: Path, out: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--trl-job", "--model-dir", str(model_dir),
           "--data", str(data), "--out", str(out), "--batch", str(args.batch), "--micro", str(args.micro),
           "--max-length", str(args.max_length), "--lr", str(args.lr), "--beta", str(args.beta)]
    return cmd + (["--activation-checkpointing"] if args.activation_checkpointing else [])


def trl_job(args) -> None:
    """The TRL child: DPOTrainer on the same file and settings (fp32 on the CPU, precomputed reference)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    config = DPOConfig(
        output_dir=args.out, per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=args.batch // args.micro, max_length=args.max_length,
        learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0.1, optim="rmsprop", beta=args.beta,
        loss_type=["sigmoid"], precompute_ref_log_probs=True, precompute_ref_batch_size=2 * args.micro,
        num_train_epochs=1, max_grad_norm=1.0, seed=42, use_cpu=True, bf16=False, fp16=False,
        activation_checkpointing=args.activation_checkpointing, save_strategy="no", report_to=[],
        logging_steps=1, dataloader_num_workers=0, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(Path(args.out) / "model"))


def run_job(job: str, args, model_dir: Path, data: Path, run_dir: Path) -> dict:
    """Run one job in a child process of its own; its wall time and peak RSS (os.wait4)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    command = (minispin_command if job == "minispin" else trl_command)(args, model_dir, data, run_dir / "out")
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "PYTHONPATH": os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "HF_DATASETS_CACHE": str(run_dir / "hf_datasets"),  # fresh: TRL caches reference log-probs there
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
    log = run_dir / "log.txt"
    with open(log, "w") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=run_dir)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{job} job failed (exit {proc.returncode}); {log}:\n{tail}\ncommand: {shlex.join(command)}")
    return {"job": job, "wall_s": wall, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "command": shlex.join(command)}


# ----------------------------------------------------------------------------- summary and RESULTS.md

def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def summarize(runs: list[dict], tokens: int, args) -> dict:
    by = {j: [r for r in runs if r["job"] == j] for j in args.train_jobs}
    out = {"tokens": tokens, "jobs": {}}
    for job, rs in by.items():
        out["jobs"][job] = {"wall_s": spread([r["wall_s"] for r in rs]),
                            "tokens_per_s": spread([tokens / r["wall_s"] for r in rs]),
                            "peak_rss_gb": spread([r["peak_rss_gb"] for r in rs])}
    if len(by) == 2:
        pairs = list(zip(by["minispin"], by["trl"]))
        out["speed_ratio"] = spread([t["wall_s"] / m["wall_s"] for m, t in pairs])  # TRL wall / minispin wall
        out["memory_ratio"] = spread([m["peak_rss_gb"] / t["peak_rss_gb"] for m, t in pairs])
    return out


def fmt(triple, digits=2) -> str:
    lo, med, hi = triple
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        out["minispin"] = commit + ("+changes" if dirty else "") if commit else "unknown"
    except OSError:
        out["minispin"] = "unknown"
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def generation_report(rows: list[dict], args) -> list[str]:
    """The generation table (minispin / HF tok/s per batch and setting) and its targets."""
    lines = [f"Generation: the first {max(args.gen_batches)} alpaca prompts, exactly {args.new_tokens} new tokens "
             "each, greedy and T 0.7 / top-p 0.9 (top-k off); minispin.generate and HF generate back to back "
             f"in one process per repeat, {args.repeats} repeat(s). Ratio: minispin tok/s / HF tok/s, median "
             "(min–max) over repeats.", "",
             "| batch | setting | minispin tok/s | HF tok/s | minispin / HF |", "|---|---|---|---|---|"]
    ratio = lambda r: (r["min"], r["median"], r["max"])  # noqa: E731
    for r in rows:
        if "setting" in r:
            lines.append(f"| {r['batch']} | {r['setting']} | {r['minispin_tok_s']} | {r['hf_tok_s']} | "
                         f"{fmt(ratio(r['minispin_over_hf']))} |")
    by = {(r["batch"], r.get("setting", "top_p/greedy")): r for r in rows}
    big, targets = max(args.gen_batches), []
    if (big, "top_p/greedy") in by:
        v = by[(big, "top_p/greedy")]["minispin_top_p_over_greedy"]["median"]
        targets.append(f"batch {big} top-p / greedy {v:.2f} (target ≥ 0.9: {'met' if v >= 0.9 else 'not met'})")
    if (big, "top_p") in by:
        v = by[(big, "top_p")]["minispin_over_hf"]["median"]
        targets.append(f"batch {big} top-p {v:.2f}× HF (target ≥ 1.3: {'met' if v >= 1.3 else 'not met'})")
    for setting in ("greedy", "top_p"):
        if (1, setting) in by:
            v = by[(1, setting)]["minispin_over_hf"]["median"]
            targets.append(f"batch 1 {setting} {v:.2f}× HF (target ≥ 1.0: {'met' if v >= 1.0 else 'not met'})")
    return lines + (["", "Targets (medians): " + "; ".join(targets) + "."] if targets else [])


def report(summary: dict, args, meta: dict) -> str:
    """The RESULTS.md section: setup, versions, command, the generation and training tables, the ratios
    against the targets."""
    peers = " and ".join(name for name, ran in (("HF generate", summary["generation"]),
                                                 ("TRL's DPOTrainer", summary["jobs"])) if ran)
    lines = [f"## Peer benchmark: minispin vs {peers}, real model, CPU — {meta['date']}",
             "", f"- Machine: {meta['machine']}; {args.threads} threads per job; load average "
             f"{meta['load_before']} before, {meta['load_after']} after.",
             "- Software: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
             f"- Command: `{meta['command']}` ({meta['elapsed_min']:.0f} min).", ""]
    if summary["generation"]:
        lines += generation_report(summary["generation"], args) + [""]
    if not summary["jobs"]:
        return "\n".join(lines) + "\n"
    lines += [f"- Training setup: SmolLM2-135M-Instruct (fp32), {args.pairs} alpaca pairs (real answer vs the "
              f"model's own sample), one epoch, global batch {args.batch}, micro-batch {args.micro}, max length "
              f"{args.max_length}, RMSProp, β {args.beta}, sigmoid loss, reference log-probs precomputed, "
              f"full activation checkpointing {'on' if args.activation_checkpointing else 'off'} in both; "
              f"{summary['tokens']} tokens per epoch; {args.repeats} runs of each job, alternating.",
              "- Wall = the whole job in its own process (load, reference pass, training, save); peak = the "
              "process's peak RSS. Median (min–max) over the runs.", "",
              "| job | wall (s) | tokens/s | peak RSS (GB) |", "|---|---|---|---|"]
    names = {"minispin": "`python -m minispin --method dpo`", "trl": "TRL `DPOTrainer` (precompute_ref_log_probs)"}
    for job, s in summary["jobs"].items():
        lines.append(f"| {names[job]} | {fmt(s['wall_s'], 1)} | {fmt(s['tokens_per_s'], 1)} | {fmt(s['peak_rss_gb'])} |")
    if "speed_ratio" in summary:
        sp, mem = summary["speed_ratio"], summary["memory_ratio"]
        lines += ["", f"Speed, TRL wall / minispin wall per repeat: {fmt(sp)} (target ≥ 2: "
                      f"{'met' if sp[1] >= 2 else 'not met'}). Memory, minispin peak / TRL peak: {fmt(mem)} "
                      f"(target ≤ 0.6: {'met' if mem[1] <= 0.6 else 'not met'})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.trl_job:
        return trl_job(args)
    from minispin import pinned

    began = time.time()
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    work = Path(args.work_dir) if args.work_dir else pinned.cache_dir() / "bench_peers"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = model_folder(args)

    # --- generation: minispin.generate vs HF generate in this process (before training: its own memory) ---
    generation = []
    if "generate" in args.jobs:
        note(f"generation: batches {args.gen_batches}, {args.new_tokens} new tokens, {args.repeats} repeats")
        generation = compare_with_hf(model_dir, alpaca_prompts(max(args.gen_batches), ALPACA),
                                     batches=args.gen_batches, new_tokens=args.new_tokens, repeats=args.repeats,
                                     threads=args.threads)

    # --- training: minispin's DPO job vs TRL's DPOTrainer, alternating, each in a child process ---
    runs, tokens = [], 0
    if args.train_jobs:
        data = pairs_file(args, model_dir, work)
        tokens = count_tokens(data, model_dir)
        note(f"{args.pairs} pairs in {data}, {tokens} tokens; jobs {', '.join(args.train_jobs)}, "
             f"{args.repeats} repeats")
    for rep in range(args.repeats if args.train_jobs else 0):
        for job in (args.train_jobs if rep % 2 == 0 else args.train_jobs[::-1]):
            run = run_job(job, args, model_dir, data, work / "runs" / job)
            run["repeat"] = rep
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "command"}), flush=True)

    summary = summarize(runs, tokens, args)
    summary["generation"] = [r for r in generation if r["compare"] == "summary"]
    print(json.dumps({"summary": summary}), flush=True)
    meta = {"date": datetime.date.today().isoformat(), "machine": machine(), "versions": versions(),
            "load_before": load_before, "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "elapsed_min": (time.time() - began) / 60,
            "command": "python benchmarks/bench_peers.py" + ("" if argv is None and len(sys.argv) == 1 else
                                                             " " + shlex.join(argv if argv is not None else sys.argv[1:]))}
    text = report(summary, args, meta)
    note(text)
    target = None if args.no_results else (args.results or (None if args.small else str(RESULTS)))
    if target:
        with open(target, "a") as f:
            f.write("\n" + text)
        note(f"appended to {target}")


if __name__ == "__main__":
    main()
