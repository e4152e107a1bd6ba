"""The training loop: SPIN (pairwise loss against a frozen reference) or continued SFT, on one process
or many (torchrun), with FSDP2.

How it runs
- Model: `PolicyHead` wraps the Transformer so that one forward goes input ids -> final hidden states
  -> only the response positions -> fused `linear_logprobs` (never [tokens, vocab] logits) -> per-token
  log-probs. Under a process group each DecoderLayer and then the root are `fully_shard`ed (FSDP2) with
  fp32 master weights and, on CUDA, MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32).
  On one GPU without torchrun we start a one-rank process group and take the same FSDP2 path (bf16
  compute, fp32 masters, identical numerics to multi-GPU). On CPU without torchrun the model is a plain
  fp32 module (same math, no FSDP). On CPU under torchrun (gloo) FSDP2 is used as well.
- Reference: the reference is the frozen model at the start of the iteration, so every pair's summed
  reference log-probs are computed ONCE (`reference_logprobs`: one no-grad pass, each rank its share,
  resumable part files merged into one file keyed by pair index) before training; no second model.
- Batches: each optimizer step takes `global_batch_size` pairs of a seeded per-epoch permutation; they
  are sorted by length and cut into micro-batches spread round-robin over ranks (every rank gets the
  same number; empty slots run as zero-weight dummies so FSDP collectives match). A micro-batch is one
  concatenated forward of chosen + rejected rows. The loss is the mean over the step's pairs.
- Optimizer: RMSProp without weight decay (paper), or AdamW; linear warmup over `warmup_ratio` of the
  steps then linear decay to 0; gradient clipping. One host sync per optimizer step (metrics + NaN check).
- Metrics: one JSON line per step in `<run_dir>/metrics.jsonl` (rank 0) and a one-line status on stderr.
  A NaN/inf loss or gradient norm stops the run before the optimizer step (`TrainingDiverged`), so the
  last saved checkpoint is the last good state.
- Resume: `<run_dir>/train_state/` (saved every `save_steps` steps and at the end, atomically) holds the
  fp32 weights and the optimizer state as safetensors (optimizer tensors named
  "state.<param>.<key>") and a JSON file with the step, data order, RNG states and param groups.
  No pickle anywhere. Re-running `train` with the same run_dir continues from there.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .. import distributed as dist
from ..collate import (Pair, TokenizedPair, TruncationReport, collate_pairs, epoch_permutation, plan_steps,
                       tokenize_pairs)
from ..config import resume_free_names
from ..io import atomic_write_text
from ..log import Progress, print0, warn0
from ..model import Transformer
from ..runs import changed_settings, describe_changes
from ..tensorboard import TensorBoardSink
from ..tokenizer import check_tokenizer_fits
from .config import TrainConfig, TrainResult
from .optim import build_optimizer, lr_at
from .policy import prepare_policy
from .reference import reference_logprobs
from .state import load_train_state, read_train_state_json, save_train_state
from .step import optimizer_step

# warn when more than this fraction of the pairs is truncated (the loss then sees cut answers / prompts)
TRUNCATION_WARN_FRACTION = 0.1

def _ref_of(pairs: Sequence[Pair], ref_logps: dict | None) -> dict[int, tuple[float, float]] | None:
    if ref_logps is not None:
        return ref_logps
    if pairs and all(p.ref_chosen is not None and p.ref_rejected is not None for p in pairs):
        return {p.index: (p.ref_chosen, p.ref_rejected) for p in pairs}
    return None


def _check_pairs(pairs: Sequence[Pair], config: TrainConfig) -> None:
    if not pairs:
        raise ValueError("train: no pairs to train on")
    seen = set()
    for p in pairs:
        if p.index in seen:
            raise ValueError(f"train: two pairs have index {p.index}; pair indexes must be unique")
        seen.add(p.index)
        if config.objective == "pairwise" and p.rejected is None:
            raise ValueError(f"train: pair {p.index} has no rejected (generated) answer; method 'spin' needs one")


def _epoch_orders(num_pairs: int, config: TrainConfig) -> list[list[int]]:
    """Per-epoch permutations (the last one cut short for fractional epochs)."""
    orders = []
    remaining = config.epochs
    e = 0
    while remaining > 1e-9:
        perm = epoch_permutation(num_pairs, config.seed, e)
        if remaining < 1:
            perm = perm[: max(1, int(round(remaining * num_pairs)))]
        orders.append(perm)
        remaining -= 1
        e += 1
    return orders


def train(model: Transformer | str | os.PathLike, tokenizer: Any, pairs: Sequence[Pair],
          config: TrainConfig | None = None, *, run_dir: str | os.PathLike | None = None,
          ref_logps: dict[int, tuple[float, float]] | None = None,
          tokenized: Sequence[TokenizedPair] | None = None,
          on_phase: Callable[[str], None] | None = None) -> TrainResult:
    """Train `model` (a Transformer, or an HF checkpoint folder) on `pairs` with SPIN's loss (or SFT).

    Works as a plain call in one process (notebooks) and under torchrun (call it on every rank).
    Reference log-probs come from `ref_logps` ({pair index: (chosen, rejected)}), from the pairs'
    ref_chosen/ref_rejected, or are computed here with one no-grad pass of the model before training.
    run_dir: metrics.jsonl, reference_logps.jsonl and the resumable train_state/ go there; re-running
    with the same run_dir resumes. on_phase("reference" / "train") is called as each phase starts.
    Returns a TrainResult (see `save_trained_model` to write an HF folder).
    """
    on_phase = on_phase or (lambda phase: None)
    config = config or TrainConfig()
    pairs = list(pairs)
    _check_pairs(pairs, config)
    info = dist.init_distributed(config.device, single_process_group=_wants_group(config))
    dist.seed_everything(config.seed)
    run = _RunFiles(Path(run_dir)) if run_dir is not None else None
    policy = prepare_policy(model, config, info)
    check_tokenizer_fits(tokenizer, policy.model.config.vocab_size, model if isinstance(model, (str, Path)) else
                         "being trained")
    tokenized, report = _tokenize_and_check(pairs, tokenized, tokenizer, policy.model.config, config)
    refs = None
    if config.needs_reference:
        refs = _ref_of(pairs, ref_logps)
        if refs is None:
            on_phase("reference")
            refs = reference_logprobs(policy, tokenized, config, run and run.reference, info.device)
    orders, plan = _plan(tokenized, config, info.world_size)
    optimizer = build_optimizer(policy, config)
    start_step = _resume(policy, optimizer, run, config, num_pairs=len(tokenized), orders=orders,
                         total_steps=len(plan))

    on_phase("train")
    batches = _MicroBatches(tokenized, {p.index: p for p in pairs}, refs, sft=config.objective == "sft",
                            share_prefix=config.neftune_alpha == 0)
    log = _StepLog(run, config, start_step, len(plan))
    history: list[dict] = []
    saved_step = start_step if start_step else None  # the step of the train state on disk
    try:
        for step in range(start_step, len(plan)):
            t0 = time.perf_counter()
            lr = lr_at(step, len(plan), config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            sums, grad_norm = optimizer_step(policy, optimizer, batches.of(plan[step], info.rank), config,
                                             device=info.device, where=f"step {step + 1}/{len(plan)}",
                                             last_good=_last_good(run, saved_step, config))
            history.append(log(_metrics(step + 1, sums, config, lr, grad_norm, time.perf_counter() - t0)))
            if run is not None and (step + 1 == len(plan) or
                                    (config.save_steps > 0 and (step + 1) % config.save_steps == 0)):
                save_train_state(policy, optimizer, run.state, {
                    "step": step + 1, "total_steps": len(plan), "num_pairs": len(tokenized), "data_order": orders,
                    "world_size": info.world_size, "config": asdict(config)})
                saved_step = step + 1
            dist.kill_point("train", step=step + 1)
    finally:
        log.close()
    return TrainResult(model=policy.model, policy=policy, steps=len(plan), history=history,
                       metrics_path=run and run.metrics, truncation=report)


def _tokenize_and_check(pairs: Sequence[Pair], tokenized: Sequence[TokenizedPair] | None, tokenizer: Any,
                        model_config: Any, config: TrainConfig) -> tuple[list[TokenizedPair], TruncationReport | None]:
    """The pairs as token rows (tokenized here unless given, with the truncation report), checked against
    the model's positions; a warning when they do not fill one global batch."""
    report = None
    if tokenized is None:
        report = TruncationReport()
        tokenized = tokenize_pairs(pairs, tokenizer, template=config.template, max_length=config.max_length,
                                   max_prompt_length=config.max_prompt_length, vocab_size=model_config.vocab_size,
                                   report=report)
        _report_truncation(report, config)
    tokenized = list(tokenized)
    _check_positions(tokenized, model_config.max_position_embeddings)
    if len(tokenized) < config.global_batch_size:
        warn0(f"{len(tokenized)} pairs, fewer than one global batch ({config.global_batch_size}): every step "
              f"trains on all {len(tokenized)} pairs (a smaller --global_batch_size keeps more steps)",
              prefix="train")
    return tokenized, report


def _report_truncation(report: TruncationReport, config: TrainConfig) -> None:
    """One line per training call when pairs were cut; a warning above TRUNCATION_WARN_FRACTION."""
    if not report.pairs_cut:
        return
    text = report.describe(config.max_length, config.max_prompt_length)
    if report.pairs_cut > TRUNCATION_WARN_FRACTION * report.pairs:
        warn0(f"{text}; raise --max_length / --max_prompt_length to train on whole answers", prefix="train")
    else:
        print0(text, prefix="train")


def _check_positions(tokenized: Sequence[TokenizedPair], positions: int) -> None:
    """Every row must fit the model's positions (RoPE is built for max_position_embeddings)."""
    longest = max(tokenized, key=lambda t: t.length, default=None)
    if longest is not None and longest.length > positions:
        raise ValueError(f"pair {longest.index} is {longest.length} tokens long, beyond the model's {positions} "
                         f"positions (max_position_embeddings); set --max_length <= {positions}")


class _RunFiles:
    """Where train() keeps its files inside run_dir."""

    def __init__(self, run_dir: Path):
        self.metrics = run_dir / "metrics.jsonl"
        self.reference = run_dir / "reference_logps.jsonl"
        self.state = run_dir / "train_state"
        self.tensorboard = run_dir / "tensorboard"

    def append_metrics(self, record: dict) -> None:
        self.metrics.parent.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class _StepLog:
    """Where each step's record goes: metrics.jsonl and its TensorBoard copy (rank 0), and the status line."""

    def __init__(self, run: _RunFiles | None, config: TrainConfig, start_step: int, total_steps: int):
        self.run = run if dist.is_main() else None
        self.sft = config.objective == "sft"
        self.status = Progress(total_steps, "sft" if self.sft else "train", enabled=config.progress,
                               start=start_step, unit="steps", every=config.status_every)
        # a copy of metrics.jsonl; purge_step: a resumed run's re-run steps replace the old events
        self.sink = TensorBoardSink(self.run.tensorboard, purge_step=start_step + 1) \
            if config.tensorboard and self.run is not None else None

    def __call__(self, record: dict) -> dict:
        if self.run is not None:
            self.run.append_metrics(record)
            if self.sink is not None:
                self.sink(record)
        self.status.update(record["step"], _status_text(record, self.sft))
        return record

    def close(self) -> None:
        self.status.close()
        if self.sink is not None:
            self.sink.close()


def _plan(tokenized: Sequence[TokenizedPair], config: TrainConfig, world_size: int
          ) -> tuple[list[list[int]], list[list[list[list[int]]]]]:
    """(per-epoch data orders, [step][rank][micro-batch] -> positions in `tokenized`), cut at max_steps."""
    orders = _epoch_orders(len(tokenized), config)
    lengths = [t.length for t in tokenized]
    plan = [step for order in orders
            for step in plan_steps(order, lengths, config.global_batch_size, config.micro_batch_size, world_size)]
    if config.max_steps is not None:
        plan = plan[: config.max_steps]
    return orders, plan


def _resume(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, run: _RunFiles | None, config: TrainConfig,
            *, num_pairs: int, orders: list[list[int]], total_steps: int) -> int:
    """The step to start from: restore run_dir's train state when there is one (refusing a state saved for
    other data or settings) and drop metric lines of the steps that will run again; 0 on a fresh start."""
    if run is None:
        return 0
    saved = dist.broadcast_json(read_train_state_json(run.state) is not None if dist.is_main() else False)
    if not saved:
        if dist.is_main() and run.metrics.exists():
            run.metrics.unlink()  # a fresh start
        return 0
    meta = load_train_state(policy, optimizer, run.state)
    if meta["num_pairs"] != num_pairs or meta["total_steps"] != total_steps:
        raise ValueError(f"{run.state}: saved for {meta['num_pairs']} pairs / {meta['total_steps']} steps, "
                         f"but this run has {num_pairs} pairs / {total_steps} steps; "
                         "same data and config are needed to resume (or delete the folder)")
    if meta["data_order"] != orders:
        raise ValueError(f"{run.state}: the saved data order differs from this run's (seed/epochs changed?)")
    changed = changed_settings(meta["config"], asdict(config), allowed=resume_free_names(TrainConfig))
    if changed:
        raise ValueError(f"{run.state}: saved by a run with other settings ({describe_changes(changed)}); resume "
                         "with the same config (or delete the folder to start over)")
    if dist.is_main():
        _truncate_metrics(run.metrics, meta["step"])
    return meta["step"]


class _MicroBatches:
    """The step plan's micro-batches as (collated batch, weight): weight = the batch's share of the step's loss
    (its pairs / the step's pairs; SFT: 1 / the step's chosen tokens), 0 for an empty slot, which runs the
    step's first micro-batch as a dummy so that every rank joins the same collectives."""

    def __init__(self, tokenized: Sequence[TokenizedPair], by_index: dict[int, Pair], refs: dict | None, *,
                 sft: bool, share_prefix: bool):
        self.tokenized, self.by_index, self.refs, self.sft = tokenized, by_index, refs, sft
        self.share_prefix = share_prefix  # off under NEFTune: each row draws its own noise

    def of(self, step_plan: list[list[list[int]]], rank: int):
        """This rank's micro-batches of one step ([rank][micro-batch] -> positions in `tokenized`)."""
        items = [i for rank_mbs in step_plan for mb in rank_mbs for i in mb]
        step_tokens = sum(len(self.tokenized[i].chosen_ids) for i in items)  # SFT normaliser
        for mb in step_plan[rank]:
            chosen = [self.tokenized[i] for i in (mb or step_plan[0][0])]
            batch = collate_pairs(chosen, sft=self.sft, share_prefix=self.share_prefix,
                                  pairs=[self.by_index[t.index] for t in chosen], ref_logps=self.refs)
            weight = 0.0 if not mb else (1.0 / step_tokens if self.sft else batch.num_pairs / len(items))
            yield batch, weight


def _last_good(run: _RunFiles | None, saved_step: int | None, config: TrainConfig) -> str:
    """Where the last good state is, for the divergence message (only a state that exists is named)."""
    if run is None:
        return "no run_dir: nothing was saved"
    if saved_step is None:
        every = f"the first is written after step {config.save_steps}" if config.save_steps > 0 else \
            "save_steps 0: only at the end"
        return f"no train state saved yet in {run.state} ({every})"
    return f"the last good state, step {saved_step}, is in {run.state}"


def _wants_group(config: TrainConfig) -> bool:
    """One GPU without torchrun: a one-rank group so the FSDP2 mixed-precision path runs there too."""
    dev = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(dev).type == "cuda"


def _metrics(step: int, sums: dict[str, float], config: TrainConfig, lr: float, grad_norm: float,
             elapsed: float) -> dict:
    """One metrics.jsonl record: the step's sums as means over its pairs, plus lr, grad norm and speed."""
    n = max(sums["pairs"], 1.0)
    rec = {"step": step, "loss": sums["loss"]}
    if config.objective == "pairwise":
        rec.update({"rewards/real": sums["rewards_real"] / n, "rewards/generated": sums["rewards_generated"] / n,
                    "margins": sums["margins"] / n, "accuracies": sums["correct"] / n,
                    "logps/real": sums["logps_real"] / n, "logps/generated": sums["logps_generated"] / n})
    else:
        rec.update({"logps/real": sums["logps_real"] / n})
    rec.update({"lr": lr, "grad_norm": grad_norm, "pairs": int(sums["pairs"]), "tokens": int(sums["tokens"]),
                "tokens_per_s": sums["tokens"] / max(elapsed, 1e-9), "step_time_s": elapsed})
    return rec


def _status_text(r: dict, sft: bool) -> str:
    if sft:
        return f"loss {r['loss']:.4f} lr {r['lr']:.2e} gnorm {r['grad_norm']:.3f} {r['tokens_per_s']:.0f} tok/s"
    return (f"loss {r['loss']:.4f} margin {r['margins']:.4f} acc {r['accuracies']:.2f} lr {r['lr']:.2e} "
            f"gnorm {r['grad_norm']:.3f} {r['tokens_per_s']:.0f} tok/s")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step` (they are re-run after a resume)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a torn last line
    atomic_write_text(path, "".join(k + "\n" for k in keep))
