"""Every method on the built-in demo task: SFT, continued SFT, SPIN, judge-SPIN, noise-SPIN, adaptive,
SPPO and DPO, compared on held-out exact-match accuracy over iterations (CPU, no downloads).

    python -m minispin.demo.methods                      # 2 torchrun ranks on CPU -> runs/demo_methods
    python -m minispin.demo.methods --methods spin,sppo   # a subset
    python -m minispin.demo.methods --small              # the reduced size the test suite runs
    python -m minispin.demo.methods --seeds 3             # seeds 0..2 -> runs/demo_methods_seeds/seed<s>, seeds.md

Setup (everything deterministic in the seed; see docs/methods.md for the numbers):
- The task, tiny Llama and SFT model are the built-in demo's (`minispin.demo.toy`: reverse / sort letters,
  add two numbers; SFT deliberately short so the model is partly right).
- Self-play data: the first `n_spin` SFT prompts. Their real answers carry LABEL NOISE: a fraction
  `label_noise` (default 0.2) is replaced by a near miss (a sum off by 1-9, two letters swapped) - the
  seeds' "labelling issue" (the real answer is not always the better one) made measurable.
- The judge / preference scorer (`demo_judge`, used by judge-SPIN, adaptive and SPPO) knows the task:
  score 10 for an exactly right answer, else 4 x closeness in [0, 4] (sums: 1 - |error| / 10, floored
  at 0; letters: the fraction of positions that match the right answer). So a right answer beats any
  wrong one by a margin >= 6 and two wrong answers differ by < 4: with tau = 5 the adaptive rule trusts
  exactly the pairs where one answer is right, and smooths the rest.
- DPO trains on a fixed preference file: chosen = the (noisy) real answer, rejected = a near miss of
  the right answer (another one than the noise used), no generation.
- Every method starts from the same SFT model with the same learning rate / beta / epochs as the demo's
  SPIN and runs `iterations` iterations; each iteration's model is evaluated on the same held-out set.
"""
from __future__ import annotations

import argparse
import functools
import json
import random
import re
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..config import replace as replace_config
from ..driver import RunConfig, spin
from ..eval import table_from_demo, write_table
from ..io import atomic_write_text
from ..log import print0
from ..methods import JudgeConfig
from ..runs import check_manifest, describe_changes, write_manifest
from ..stats import format_stage_table
from . import run as demo_run
from . import task as demo_task
from .seeds import run_seeds, with_seed

ALL_METHODS = ("continued_sft", "spin", "judge_spin", "noise_spin", "adaptive", "sppo", "dpo")
LABELS = {"continued_sft": "continued SFT", "spin": "SPIN", "judge_spin": "judge-SPIN", "noise_spin": "noise-SPIN",
          "adaptive": "adaptive", "sppo": "SPPO", "dpo": "DPO"}
JUDGE = "minispin.demo.methods:demo_judge"


@dataclass
class MethodsDemoConfig:
    """The demo's sizes (`demo`) plus the methods' settings."""

    demo: demo_run.DemoConfig = field(default_factory=demo_run.DemoConfig)
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    label_noise: float = 0.2  # fraction of the self-play prompts whose real answer is a near miss
    noise_label_smoothing: float = 0.1  # noise-SPIN: eps
    neftune_alpha: float = 5.0  # noise-SPIN: NEFTune alpha
    tau: float = 5.0  # adaptive
    smoothing: float = 0.1  # adaptive: eps_small
    sppo_samples: int = 5  # K
    sppo_eta: float = 1000.0  # eta = 1 / beta
    sppo_temperature: float = 0.7
    sppo_top_p: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.demo, dict):
            self.demo = demo_run.DemoConfig(**self.demo)
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
        if not 0 <= self.label_noise <= 1:
            raise ValueError(f"label_noise must be in [0, 1], got {self.label_noise}")


# ----------------------------------------------------------------------------- the judge

def closeness(prediction: str, answer: str) -> float:
    """How close a wrong answer is to the right one, in [0, 1] (see the module doc)."""
    pred = prediction.strip()
    if answer.isdigit():
        if not re.fullmatch(r"\d{1,6}", pred):
            return 0.0
        return max(0.0, 1.0 - abs(int(pred) - int(answer)) / 10.0)
    if not pred:
        return 0.0
    same = sum(a == b for a, b in zip(pred, answer))
    return same / max(len(pred), len(answer))


def demo_score(question: str, response: str) -> float:
    """10 for the right answer, else 4 x closeness (a deterministic judge that knows the task)."""
    answer = demo_task.answer_of(question)
    if response.strip() == answer:
        return 10.0
    return 4.0 * closeness(response, answer)


def demo_judge(prompt: list[dict[str, str]], responses: list[str]) -> list[float]:
    """The judge / preference scorer of the demo task: `demo_score` of every response (judge.function)."""
    question = prompt[-1]["content"]
    return [demo_score(question, r) for r in responses]


# ----------------------------------------------------------------------------- data

def near_miss(question: str, rng: random.Random, avoid: tuple[str, ...] = ()) -> str:
    """A plausible wrong answer, never one of `avoid`: a sum off by 1-9, or the right letters with two
    neighbours swapped (or, when no swap gives a new answer, one letter changed)."""
    answer = demo_task.answer_of(question)
    avoid = set(avoid) | {answer}
    if answer.isdigit():
        value = int(answer)
        options = [str(value + d) for d in range(-9, 10) if value + d >= 0 and str(value + d) not in avoid]
        return rng.choice(options)
    swaps = []
    for i in range(len(answer) - 1):
        letters = list(answer)
        letters[i], letters[i + 1] = letters[i + 1], letters[i]
        if "".join(letters) not in avoid:
            swaps.append("".join(letters))
    if swaps:
        return rng.choice(swaps)
    i = rng.randrange(len(answer))
    options = [answer[:i] + c + answer[i + 1:] for c in string.ascii_lowercase]
    return rng.choice([o for o in options if o not in avoid])


def write_method_data(task_train: Path, out: Path, n_spin: int, label_noise: float, seed: int) -> dict[str, Path]:
    """<out>/spin_data.jsonl (the first n_spin SFT rows, a fraction label_noise of real answers replaced by
    near misses; "noisy": true marks them) and <out>/preferences.jsonl (DPO rows). Atomic, deterministic."""
    paths = {"spin": out / "spin_data.jsonl", "preferences": out / "preferences.jsonl"}
    if all(p.is_file() for p in paths.values()):
        return paths
    rows = []
    with open(task_train, encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) == n_spin:
                break
    rng = random.Random(seed * 7919 + 17)
    noisy = set(rng.sample(range(len(rows)), round(label_noise * len(rows))))
    spin_rows, pref_rows = [], []
    for i, row in enumerate(rows):
        question = row["messages"][0]["content"]
        right = demo_task.answer_of(question)
        real = near_miss(question, rng) if i in noisy else right
        spin_rows.append({**row, "noisy": i in noisy,
                          "messages": [row["messages"][0], {"role": "assistant", "content": real}]})
        rejected = near_miss(question, rng, avoid=(real,))
        pref_rows.append({"prompt": question, "chosen": real, "rejected": rejected})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(paths["spin"], "".join(json.dumps(r) + "\n" for r in spin_rows))
    atomic_write_text(paths["preferences"], "".join(json.dumps(r) + "\n" for r in pref_rows))
    return paths


# ----------------------------------------------------------------------------- runs

def method_config(name: str, sft_model: Path, data: dict[str, Path], out: Path, config: MethodsDemoConfig,
                  device: str):
    """The RunConfig of one method on the demo (what examples/<method>.py would run at paper scale)."""
    d = config.demo
    base = {"lr": d.spin_lr, "beta": d.spin_beta}

    def schedule(entry: dict[str, Any]) -> list[dict[str, Any]]:  # the same settings in every iteration
        return [entry] * d.iterations

    kw: dict[str, Any] = dict(
        model=str(sft_model), data=str(data["spin"]), output_dir=str(out / name),
        save_dtype="float32", mix_previous=True, **demo_run.run_settings(d),
        train=demo_run.train_config(d, device, epochs=d.spin_epochs), generation=demo_run.generation_config(d))
    judge = JudgeConfig(function=JUDGE, tau=config.tau, smoothing=config.smoothing)
    if name == "continued_sft":
        return RunConfig(method="sft", iterations=schedule({"lr": d.continued_lr}), **kw)
    if name == "spin":
        return RunConfig(method="spin", iterations=schedule(base), **kw)
    if name == "judge_spin":
        return RunConfig(method="judge_spin", iterations=schedule(base), judge=judge, **kw)
    if name == "noise_spin":
        noisy = dict(base, label_smoothing=config.noise_label_smoothing, neftune_alpha=config.neftune_alpha)
        return RunConfig(method="spin", iterations=schedule(noisy), **kw)
    if name == "adaptive":
        return RunConfig(method="adaptive", iterations=schedule(base), judge=judge, **kw)
    if name == "sppo":
        kw["mix_previous"] = False  # SPPO trains on each iteration's own pairs, K samples of its own
        kw["generation"] = replace_config(kw["generation"], num_samples=config.sppo_samples,
                                          temperature=config.sppo_temperature, top_p=config.sppo_top_p)
        return RunConfig(method="sppo", judge=judge, iterations=schedule({
            "lr": d.spin_lr, "beta": 1.0 / config.sppo_eta, "loss": "sppo"}), **kw)
    if name == "dpo":
        kw["data"] = str(data["preferences"])
        return RunConfig(method="dpo", iterations=schedule(base), **kw)
    raise ValueError(f"unknown method {name!r}")


def _pair_stats(run_dir: Path) -> list[dict[str, Any]]:
    """Per-iteration pair counts the driver wrote (flipped / trusted / smoothed / SPPO ties)."""
    path = run_dir / "pair_stats.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def markdown_tables(results: dict[str, Any]) -> str:
    """Exact match per method and iteration, per skill at the last iteration, and the pair counts."""
    sft = results["sft"]
    iters = max((len(r["iterations"]) for r in results["methods"].values()), default=0)
    head = "| method | " + " | ".join(["SFT (start)"] + [f"iter {t}" for t in range(iters)]) + " |"
    lines = ["Held-out exact match (greedy answers, %d questions):" % sft["n_test"], "", head,
             "|" + "---|" * (iters + 2)]
    lines.append(f"| SFT | {sft['exact_match']:.3f} |" + " |" * iters)
    for name, r in results["methods"].items():
        cells = [f"{e['exact_match']:.3f}" for e in r["iterations"]] + [""] * (iters - len(r["iterations"]))
        lines.append(f"| {LABELS[name]} | {sft['exact_match']:.3f} | " + " | ".join(cells) + " |")
    skills = list(demo_task.SKILLS)
    lines += ["", "Last iteration, by skill, and the mean summed log-prob of the right answers:", "",
              "| method | " + " | ".join(skills) + " | mean log p(right) | train+gen s/iter |",
              "|" + "---|" * (len(skills) + 3)]
    rows = [("SFT", sft, sft.get("train_seconds", 0.0))] + \
        [(LABELS[n], r["iterations"][-1], r["seconds"] / max(1, len(r["iterations"])))
         for n, r in results["methods"].items() if r["iterations"]]
    for label, e, secs in rows:
        by_skill = e["exact_match_by_skill"]
        lines.append(f"| {label} | " + " | ".join(f"{by_skill.get(s, float('nan')):.3f}" for s in skills)
                     + f" | {e['mean_logprob']:.3f} | {secs:.0f} |")
    lines += ["", "Every stage with its 95% interval (Wilson) and its paired difference from SFT over the same "
              "questions (paired bootstrap, 95%):", "", "```", format_stage_table(results["stats"], "SFT"), "```"]
    stats = [(n, s) for n, r in results["methods"].items() for s in r.get("pair_stats", [])]
    if stats:
        lines += ["", "Pairs per iteration (new + mixed-in previous iteration's):", "",
                  "| method | iter | pairs | kept | flipped | smoothed | SPPO ties |", "|---|---|---|---|---|---|---|"]
        for n, s in stats:
            c = s.get("counts", s)
            lines.append(f"| {LABELS[n]} | {s.get('iteration', '')} | {c.get('pairs', '')} | {c.get('kept', '')} | "
                         f"{c.get('flipped', '')} | {c.get('smoothed', '')} | {c.get('sppo_tied', '')} |")
    return "\n".join(lines)


def run_methods_demo(out: Path, config: MethodsDemoConfig, device: str = "cpu") -> dict[str, Any]:
    """Run (or continue) the comparison; call on every rank. Returns the results (also in <out>/results.json)."""
    info = dist.init_distributed(device)
    try:
        return methods_stages(out, config, device, info.world_size)
    finally:
        dist.shutdown(info)


def methods_stages(out: Path, config: MethodsDemoConfig, device: str, world_size: int) -> dict[str, Any]:
    """SFT, then every method's iterations, in `out` (on every rank of an initialized process group). The
    results carry "stages" (sft, then "<method>_iter<t>") and their "stats" (interval rows), as a demo run's
    do, so that minispin.demo.seeds summarizes seeds of either."""
    t_start = time.perf_counter()
    d = config.demo
    paths = {"task": out / "task", "init": out / "init", "sft": out / "sft", "data": out / "methods_data",
             "eval": out / "eval"}
    if dist.is_main():
        _check_settings(out, config)
        task = demo_run.make_task(paths["task"], d)
        demo_run.init_model(paths["init"], task["tokenizer"], d)
        data = write_method_data(task["train"], paths["data"], d.n_spin, config.label_noise, d.seed)
    dist.barrier()
    data = {"spin": paths["data"] / "spin_data.jsonl", "preferences": paths["data"] / "preferences.jsonl"}
    test = paths["task"] / "test_sft.jsonl"
    _say(f"run dir {out}; {world_size} rank(s); seed {d.seed}; methods {', '.join(config.methods)}; "
         f"{d.n_spin} self-play prompts, label noise {config.label_noise:g}")

    t = time.perf_counter()
    sft_model = demo_run.run_sft(paths["init"], paths["task"] / "train_sft.jsonl", paths["sft"], d, device,
                                 lr=d.sft_lr, limit=None)
    sft = dict(demo_run.evaluate_stage("sft", sft_model, test, paths["eval"], device),
               train_seconds=round(time.perf_counter() - t, 1), label="SFT")
    _say(f"SFT: exact match {sft['exact_match']:.3f}")
    results: dict[str, Any] = {"config": asdict(config), "world_size": world_size, "device": device,
                               "sft": sft, "methods": {}}
    stages = [sft]
    for name in config.methods:
        t = time.perf_counter()
        cfg = method_config(name, sft_model, data, out, config, device)
        _say(f"{LABELS[name]}: {cfg.total_iterations} iteration(s)")
        models = spin(cfg).models
        seconds = time.perf_counter() - t
        evals = [dict(demo_run.evaluate_stage(f"{name}_iter{i}", m, test, paths["eval"], device),
                      label=f"{LABELS[name]} iter {i}") for i, m in enumerate(models)]
        stages += evals
        results["methods"][name] = {"seconds": round(seconds, 1), "iterations": evals,
                                    "pair_stats": _pair_stats(out / name)}
        if dist.is_main():  # the seeds' table of this method's run, for minispin.report
            write_table(out / name, table_from_demo([sft, *evals], demo_task.SKILLS))
        _say(f"{LABELS[name]}: exact match by iteration "
             + ", ".join(f"{e['exact_match']:.3f}" for e in evals) + f" ({seconds:.0f}s)")
    results["stages"] = stages
    results["stats"] = demo_run.interval_rows(stages)
    results["seconds_this_run"] = round(time.perf_counter() - t_start, 1)
    results["table"] = markdown_tables(results)
    demo_run.publish_results(out, results, "results.md", _say)
    return results


_say = functools.partial(print0, prefix="methods-demo")  # status lines, rank 0


def _check_settings(out: Path, config: MethodsDemoConfig) -> None:
    """Refuse to continue a run made with other settings (the method list may grow)."""
    path = out / "methods_demo_config.json"
    changed = check_manifest(path, asdict(config), allowed=("methods",))
    if changed:
        raise SystemExit(f"{out} holds a run with other settings ({describe_changes(changed)}); use another --out")
    write_manifest(path, asdict(config))  # the method list may grow


# ----------------------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minispin.demo.methods", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="run folder (re-running the same command continues); default "
                   "runs/demo_methods, with --seeds runs/demo_methods_seeds")
    p.add_argument("--methods", default=",".join(ALL_METHODS),
                   help="comma-separated subset of " + ",".join(ALL_METHODS))
    p.add_argument("--iterations", type=int, default=None, help="iterations per method (default 2)")
    p.add_argument("--label-noise", type=float, default=MethodsDemoConfig.label_noise)
    demo_run.add_common_options(p, "the model init, data order, label noise and sampling")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    code = demo_run.launch_if_asked("minispin.demo.methods", argv, args)
    if code is not None:
        return code
    overrides: dict[str, Any] = {"seed": args.seed}
    if args.iterations is not None:
        if args.iterations < 1:
            raise SystemExit("--iterations must be >= 1")
        overrides["iterations"] = args.iterations
    demo_config = demo_run.DemoConfig.small(**overrides) if args.small else demo_run.DemoConfig(**overrides)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        config = MethodsDemoConfig(demo=demo_config, methods=methods, label_noise=args.label_noise)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(args.out or ("runs/demo_methods_seeds" if args.seeds else "runs/demo_methods"))
    if args.seeds is None:
        run_methods_demo(out, config, args.device)
        return 0
    info = dist.init_distributed(args.device)
    try:
        run_seeds(out, [with_seed(config, args.seed + k) for k in range(args.seeds)], methods_stages, args.device,
                  info.world_size)
    finally:
        dist.shutdown(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
