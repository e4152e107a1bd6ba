"""The demo's plateau regime (`python -m minispin.demo.toy --regime plateau`): the setting of SPIN's claim.

The paper's claim is about an SFT model at its plateau, where more SFT on the data no longer raises
held-out accuracy but self-play on the same prompts still does. This regime starts from the demo's SFT
model (stage 3 of `minispin.demo.toy`, shared: in a folder where the demo ran it is read back) and:
1. continues SFT on a FIXED set, the first `n_spin` task rows (the prompts SPIN will use), epoch after
   epoch at `plateau_lr` (each epoch one driver run from the previous epoch's model, a new data order, lr
   warmup + linear decay within the epoch) until the exact match on a validation split (`n_val` task
   questions outside the SFT data and the test set) has not risen for `patience` epochs (ties broken by
   the real answers' log-prob; epoch 0 = the demo's SFT model). The best epoch's model is "SFT" here; the
   last epoch trained ("SFT +k epochs") is evaluated too: continued SFT at that lr no longer helps;
2. continued SFT: `len(lr_scale)` iterations on the same prompts with SPIN's lr schedule and epochs (the
   same optimizer budget as SPIN; only the loss differs);
3. SPIN iterations 0-3 on the same prompts with the paper's schedule shape scaled to the toy: lr L, L,
   L/5, L/5 (paper: 5e-7, 5e-7, 1e-7, 1e-7), beta 0.1, 0.1, 0.1, 5.0, from iteration 1 also training on
   the previous iteration's pairs (mix_previous); L = the demo's SPIN lr.
Every model is scored on the demo's held-out test questions (exact match, its interval and the paired
difference from SFT); each iteration also reports the mechanism metrics of its training steps (rewards of
the real and generated answers, margins, accuracies, log-probs; from metrics.jsonl). Written to
<out>/plateau/. The settings were fixed before the first full run and not tuned on the test set.
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..driver import RunConfig, spin
from ..io import atomic_write_text
from ..log import print0
from . import run as demo_run
from . import task as demo_task
from .run import (DemoConfig, evaluate_stage, generation_config, init_model, make_task, run_settings, run_sft,
                  train_config, write_results)

# metrics.jsonl keys averaged per iteration (the loop's named step metrics)
MECHANISM_KEYS = ("loss", "rewards/real", "rewards/generated", "margins", "accuracies", "logps/real",
                  "logps/generated")

_say = functools.partial(print0, prefix="plateau")


@dataclass
class PlateauConfig:
    """The plateau regime's settings; `demo` is the demo whose SFT model it starts from (and whose model,
    batch, SPIN lr (L), sampling temperature, test set and seed it uses; its n_spin / iterations / beta /
    continued_lr fields belong to the demo's own stages)."""

    demo: DemoConfig = field(default_factory=DemoConfig)
    n_spin: int = 512  # the fixed set: the first n_spin task rows, for the SFT epochs, continued SFT and SPIN
    plateau_lr: float = 3e-4  # SFT epochs on the fixed set (a tenth of the demo's SFT lr)
    n_val: int = 200  # validation questions for early stopping
    max_epochs: int = 6
    patience: int = 2  # stop when validation exact match has not risen for this many epochs
    lr_scale: list[float] = field(default_factory=lambda: [1.0, 1.0, 0.2, 0.2])  # x demo.spin_lr per iteration
    betas: list[float] = field(default_factory=lambda: [0.1, 0.1, 0.1, 5.0])
    epochs_per_iteration: float = 1

    def __post_init__(self) -> None:
        if isinstance(self.demo, dict):
            self.demo = DemoConfig(**self.demo)
        if len(self.lr_scale) != len(self.betas) or not self.betas:
            raise ValueError(f"lr_scale and betas need one entry per iteration, got {self.lr_scale} and {self.betas}")
        if self.n_spin > self.demo.n_train:
            raise ValueError(f"n_spin ({self.n_spin}) must be <= the demo's n_train ({self.demo.n_train})")
        if self.max_epochs < 1 or self.patience < 1:
            raise ValueError("max_epochs and patience must be >= 1")

    @classmethod
    def small(cls, **demo_overrides: Any) -> "PlateauConfig":
        """The reduced size for CI: same pipeline, numbers not meaningful."""
        return cls(demo=DemoConfig.small(**demo_overrides), n_spin=64, n_val=48, max_epochs=2, patience=1,
                   lr_scale=[1.0, 0.2], betas=[0.1, 5.0])

    def schedule(self) -> list[dict[str, float]]:
        """The per-iteration overrides of SPIN (continued SFT takes the same lrs and epochs)."""
        return [{"lr": self.demo.spin_lr * s, "beta": b} for s, b in zip(self.lr_scale, self.betas)]


def write_val(path: Path, config: PlateauConfig) -> Path:
    """Rank 0: `n_val` validation questions outside the demo's SFT rows and test set, unless already there
    (the task's first rows and test set do not depend on n_train: make_rows draws the test set first)."""
    if path.is_file():
        return path
    d = config.demo
    train, test = demo_task.make_rows(demo_task.TaskConfig(n_train=d.n_train + 4 * config.n_val, n_test=d.n_test))
    seen = {r["prompt"] for r in train[: d.n_train]} | {r["prompt"] for r in test}
    val: list[dict[str, Any]] = []
    for row in train[d.n_train:]:
        if row["prompt"] not in seen and len(val) < config.n_val:
            seen.add(row["prompt"])
            val.append(row)
    if len(val) < config.n_val:
        raise RuntimeError(f"only {len(val)} distinct validation questions outside the SFT and test data")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in val))
    return path


def mechanism(run_dir: Path, iteration: int) -> dict[str, float]:
    """Pair-weighted means of the mechanism metrics over one iteration's optimizer steps (metrics.jsonl)."""
    rows = [json.loads(line) for line in (run_dir / f"iter{iteration}" / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    pairs = sum(r.get("pairs", 1) for r in rows)
    out = {k: sum(r[k] * r.get("pairs", 1) for r in rows) / pairs for k in MECHANISM_KEYS if all(k in r for r in rows)}
    return dict(out, steps=len(rows))


def _better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Epoch a beats epoch b: higher validation exact match, or as high and a likelier real answer (so that
    early epochs that are all at 0 exact match still count as progress)."""
    return (a["val_exact_match"], a["val_mean_logprob"]) > (b["val_exact_match"], b["val_mean_logprob"])


def plateau_stages(out: Path, config: PlateauConfig, device: str, world_size: int) -> dict[str, Any]:
    """The plateau regime for one seed: the demo's task, init and SFT in `out` (read back when there),
    then everything else in <out>/plateau (on every rank of an initialized process group; every step
    resumes from what is on disk). Returns the results (also <out>/plateau/results.json)."""
    t_start = time.perf_counter()
    d, pdir = config.demo, out / "plateau"
    error = dist.broadcast_json((demo_run.check_settings(out, d) or demo_run.check_settings(pdir, config, "plateau"))
                                if dist.is_main() else None)
    if error:
        raise SystemExit(f"error: {error}")
    if dist.is_main():
        task = make_task(out / "task", d)
        init_model(out / "init", task["tokenizer"], d)
        write_val(pdir / "val.jsonl", config)
    dist.barrier()
    train, val, test = out / "task" / "train_sft.jsonl", pdir / "val.jsonl", out / "task" / "test_sft.jsonl"
    eval_dir = pdir / "eval"
    _say(f"run dir {out}; seed {d.seed}; the demo's SFT, then SFT epochs on the first {config.n_spin} rows at lr "
         f"{config.plateau_lr:g} until {config.n_val} validation questions stop improving (patience "
         f"{config.patience}, at most {config.max_epochs} epochs)")
    model = run_sft(out / "init", train, out / "sft", d, device, lr=d.sft_lr, limit=None)  # the demo's stage 3

    # 1. SFT epochs on the fixed set until the validation exact match stops rising
    curve: list[dict[str, Any]] = []
    best = 0
    for epoch in range(config.max_epochs + 1):
        t = time.perf_counter()
        if epoch:
            model = run_sft(model, train, pdir / "sft_epochs" / f"epoch{epoch}", d, device, lr=config.plateau_lr,
                            limit=config.n_spin, seed=d.seed * 1000 + epoch)
        v = evaluate_stage(f"val_epoch{epoch}", model, val, eval_dir, device)
        curve.append({"epoch": epoch, "model": str(model), "val_exact_match": v["exact_match"],
                      "val_mean_logprob": v["mean_logprob"], "seconds": round(time.perf_counter() - t, 1)})
        if _better(curve[epoch], curve[best]):
            best = epoch
        _say(f"SFT epoch {epoch}: validation exact match {v['exact_match']:.3f}, mean log p(real) "
             f"{v['mean_logprob']:.3f} (best: epoch {best})")
        if epoch - best >= config.patience:
            break
    stopped = "patience" if len(curve) - 1 - best >= config.patience else "max_epochs"

    stages: list[dict[str, Any]] = []

    def evaluate(name: str, label: str, model_dir: Path) -> None:
        r = evaluate_stage(name, model_dir, test, eval_dir, device)
        stages.append(dict(r, label=label))
        _say(f"{label}: exact match {r['exact_match']:.3f}, mean log p(real) {r['mean_logprob']:.3f}")

    sft_model = Path(curve[best]["model"])
    evaluate("sft", "SFT", sft_model)
    if best > 0:
        evaluate("sft_demo", "SFT epoch 0 (demo)", Path(curve[0]["model"]))
    if len(curve) - 1 > best:
        evaluate("sft_more", f"SFT +{len(curve) - 1 - best} epochs", Path(curve[-1]["model"]))

    # 2-3. continued SFT and SPIN from the plateau model on the same prompts, the same lr schedule
    schedule = config.schedule()
    common = dict(model=str(sft_model), data=str(train), limit=config.n_spin, num_iterations=len(schedule),
                  save_dtype="float32", **run_settings(d), train=train_config(d, device, epochs=config.epochs_per_iteration),
                  generation=generation_config(d))
    runs = {"continued_sft": RunConfig(method="sft", output_dir=str(pdir / "continued_sft"),
                                        iterations=[{"lr": s["lr"]} for s in schedule], **common),
            "spin": RunConfig(method="spin", output_dir=str(pdir / "spin"), iterations=schedule, mix_previous=True,
                               **common)}
    mech: dict[str, list[dict[str, float]]] = {}
    for name, label in (("continued_sft", "continued SFT"), ("spin", "SPIN")):
        _say(f"{label}: {len(schedule)} iterations on {config.n_spin} prompts, lr "
             + ", ".join(f"{s['lr']:g}" for s in schedule)
             + ("; beta " + ", ".join(f"{s['beta']:g}" for s in schedule) if name == "spin" else ""))
        models = spin(runs[name]).models
        for i, m in enumerate(models):
            evaluate(f"{name}_iter{i}", f"{label} iter {i}", m)
        mech[name] = [dict(mechanism(pdir / name, i), iteration=i, **schedule[i]) for i in range(len(models))]

    return write_results(pdir, config, stages, world_size, device, time.perf_counter() - t_start,
                         notes=format_curve(curve, best, stopped) + "\n\n" + format_mechanism(mech),
                         epoch_curve=curve, best_epoch=best, stopped_by=stopped, mechanism=mech)


def format_curve(curve: list[dict[str, Any]], best: int, stopped: str) -> str:
    """The SFT epoch curve on the validation split, one line."""
    return ("SFT validation exact match by epoch: "
            + ", ".join(f"{c['epoch']}: {c['val_exact_match']:.3f}" for c in curve)
            + f" (epoch 0: the demo's SFT; best epoch {best}; stopped by {stopped.replace('_', ' ')})")


def format_mechanism(mech: dict[str, list[dict[str, float]]]) -> str:
    """Per-iteration mechanism metrics of one seed as a text table."""
    head = ["run", "iter", "lr", "beta"] + list(MECHANISM_KEYS)
    body = [[name, str(r["iteration"]), f"{r['lr']:g}", f"{r.get('beta', float('nan')):g}" if name == "spin" else "-"]
            + [f"{r[k]:.3f}" if k in r else "-" for k in MECHANISM_KEYS] for name, rows in mech.items() for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in [head] + body)
