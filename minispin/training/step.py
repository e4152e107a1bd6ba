"""One optimizer step on one screen (nanoGPT's train.py shape): for each micro-batch, forward -> per-sequence
log-probs -> loss -> backward, and its metric sums from those same per-sequence values; then all-reduce of
the sums, gradient clipping, the step's one host sync, the NaN/inf check, the update."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from .. import distributed as dist
from ..collate import PairBatch
from .config import TrainConfig, TrainingDiverged
from .losses import pair_loss
from .policy import fused_kernels


def batch_loss(policy: nn.Module, batch: PairBatch, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one micro-batch: (loss, per-row summed log-probs [R] fp32, detached).

    SPIN family: the mean pair loss over the batch's pairs (minispin.training.losses) of the fused
    per-sequence sums. SFT: -sum of the chosen tokens' log-probs (the step divides by its token count).
    """
    _, sequence_logps = fused_kernels()
    token_logps = policy(batch.input_ids, batch.position_ids, batch.packed, batch.token_index, batch.labels)
    if config.objective == "sft":
        seq = sequence_logps(token_logps.detach(), batch.seq_index, batch.num_rows, check_values=False)
        return -token_logps.sum(), seq
    seq = sequence_logps(token_logps, batch.seq_index, 2 * batch.num_pairs, check_values=False)
    smoothing = batch.label_smoothing if batch.label_smoothing is not None else config.label_smoothing
    loss = pair_loss(seq, None if config.reference_free else batch.ref_logps, config.beta, config.loss, smoothing,
                     batch.targets, check_values=False)
    return loss, seq.detach()


def optimizer_step(policy: nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: Iterable[tuple[PairBatch, float]], config: TrainConfig, *,
                   device: torch.device, where: str = "step", last_good: str = "") -> tuple[dict[str, float], float]:
    """One optimizer step over (micro-batch, weight) pairs (weight = its share of the step's loss; 0 = a dummy
    that only keeps FSDP collectives in step). Exactly one host sync, after the backward passes.

    Returns ({STEP_SUMS name: sum over the step's pairs}, grad norm before clipping). Raises
    TrainingDiverged before updating.
    """
    world = dist.get_world_size()
    sums = StepSums(device)
    for batch, weight in micro_batches:
        if device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        loss, seq = batch_loss(policy, batch, config)
        (loss * (weight * world)).backward()
        if weight:
            sums.add_batch(loss.detach() * weight, seq, batch, config)
    sums.all_reduce()
    grad_norm = _clip(policy, config.max_grad_norm)
    named, gn = sums.read(grad_norm)  # the step's one host sync
    if not (math.isfinite(named["loss"]) and math.isfinite(gn)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"{where}: loss {named['loss']} / grad norm {gn} is not finite; stopped before "
                               f"applying it ({last_good}). Lower the learning rate or check the data")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return named, gn


def _clip(policy: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients' global norm to max_norm (<= 0: no clipping); the norm before clipping."""
    params = [p for p in policy.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


# Per-step sums, each a named slot of ONE float64 tensor so that a step all-reduces them in one collective.
STEP_SUMS = ("loss", "rewards_real", "rewards_generated", "margins", "correct", "logps_real", "logps_generated",
             "pairs", "tokens", "response_tokens")


class StepSums:
    """The named metric sums of one optimizer step, packed in one tensor on the device (no host sync)."""

    slot = {name: i for i, name in enumerate(STEP_SUMS)}

    def __init__(self, device: torch.device):
        self.packed = torch.zeros(len(STEP_SUMS), dtype=torch.float64, device=device)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        self.packed[self.slot[name]] += value

    def add_batch(self, weighted_loss: torch.Tensor, seq: torch.Tensor, batch: PairBatch,
                  config: TrainConfig) -> None:
        """One micro-batch's loss share, counts, and, from the per-sequence log-probs `seq` the loss saw, its
        log-probs and rewards beta (pi - ref) in float64 (SPIN's logged metrics)."""
        P = batch.num_pairs
        self.add("loss", weighted_loss.double())
        self.add("pairs", P)
        self.add("tokens", batch.num_tokens)
        self.add("response_tokens", batch.labels.numel())
        if config.objective == "sft":
            self.add("logps_real", seq[:P].sum().double())
            return
        real, gen = seq[:P].double(), seq[P:2 * P].double()
        if batch.ref_logps is not None and not config.reference_free:
            ref = batch.ref_logps.double()
            r_real, r_gen = config.beta * (real - ref[:P]), config.beta * (gen - ref[P:])
        else:
            r_real, r_gen = config.beta * real, config.beta * gen
        self.add("rewards_real", r_real.sum())
        self.add("rewards_generated", r_gen.sum())
        self.add("margins", (r_real - r_gen).sum())
        self.add("correct", (r_real > r_gen).double().sum())
        self.add("logps_real", real.sum())
        self.add("logps_generated", gen.sum())

    def all_reduce(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            torch.distributed.all_reduce(self.packed)

    def read(self, grad_norm: torch.Tensor) -> tuple[dict[str, float], float]:
        """({name: sum}, grad norm) on the host, in one transfer."""
        *values, gn = torch.cat([self.packed, grad_norm.to(self.packed).view(1)]).tolist()
        return dict(zip(STEP_SUMS, values)), gn
