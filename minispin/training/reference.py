"""The reference pass: every pair's summed log-probs under the frozen start-of-iteration model, computed
once before training (each rank its share, resumable per-rank part files merged into one file)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .. import distributed as dist
from ..io import ChunkedJsonlWriter, merge_parts, read_jsonl_part
from ..log import Progress
from ..runs import part_files, part_path, remove_parts
from ..collate import TokenizedPair, collate_pairs, split_step
from ..model import Transformer
from .config import TrainConfig
from .policy import PolicyHead, fused_kernels

def _micro_plan(order: Sequence[int], lengths: Sequence[int], micro: int, world: int) -> list[list[list[int]]]:
    """[step][rank] -> one micro-batch per rank per step, longest first (the reference pass's plan)."""
    per_step = micro * world
    plan = []
    for s in range(0, len(order), per_step):
        split = split_step(order[s: s + per_step], lengths, micro, world)
        plan.append([mbs[0] for mbs in split])
    return plan


def reference_logprobs(policy: nn.Module, tokenized: Sequence[TokenizedPair], config: TrainConfig,
                       out_path: str | os.PathLike | None = None, device: torch.device | None = None
                       ) -> dict[int, tuple[float, float]]:
    """Summed log-probs of chosen and rejected answers under the current (frozen) model, per pair index.

    One no-grad pass; each rank does its share of length-sorted micro-batches. With out_path, finished
    batches are appended to per-rank part files (resumable after a kill: only the missing batches run,
    in the same composition, so results are bit-identical) and merged into `out_path` (.jsonl rows
    {"index", "chosen", "rejected"}); an existing out_path is simply read. Call on every rank.
    """
    if isinstance(policy, Transformer):  # a bare model (notebooks): same math through the fused head
        policy = PolicyHead(policy)
    device = device or next(policy.parameters()).device
    _, sequence_logps = fused_kernels()
    rank, world = dist.get_rank(), dist.get_world_size()
    out_path = Path(out_path) if out_path is not None else None
    if out_path is not None and dist.all_ranks_true(out_path.is_file()):
        return _read_reference_file(out_path, tokenized)

    by_pos = list(tokenized)
    lengths = [t.length for t in by_pos]
    order = sorted(range(len(by_pos)), key=lambda i: -lengths[i])
    micro = config.reference_batch_size or 2 * config.micro_batch_size
    plan = _micro_plan(order, lengths, micro, world)

    done: dict[int, tuple[float, float]] = {}
    if out_path is not None:
        for part in part_files(out_path):
            for row in read_jsonl_part(part):
                done[row["index"]] = (row["chosen"], row["rejected"])
        dist.barrier()  # everyone has read the parts before anyone appends
    writer = ChunkedJsonlWriter(part_path(out_path, rank, world)) if out_path is not None else None
    results: dict[int, tuple[float, float]] = dict(done)
    was_training = policy.training
    policy.eval()
    bar = Progress(len(plan), "reference", enabled=config.progress, unit="batches")
    try:
        with torch.no_grad():
            for b, step in enumerate(plan):
                if all(by_pos[i].index in done for mb in step for i in mb):
                    continue
                mine = step[rank] or step[0]  # an empty slot runs a dummy batch (collectives must match)
                batch = collate_pairs([by_pos[i] for i in mine]).to(device, non_blocking=True)
                token_logps = policy(batch.input_ids, batch.position_ids, batch.packed, batch.token_index, batch.labels)
                # the same (deterministic) summation as the training loss uses
                seq = sequence_logps(token_logps, batch.seq_index, 2 * batch.num_pairs, check_values=False).tolist()
                if step[rank]:
                    P = batch.num_pairs
                    rows = [{"index": idx, "chosen": seq[j], "rejected": seq[P + j]}
                            for j, idx in enumerate(batch.pair_index)]
                    results.update({r["index"]: (r["chosen"], r["rejected"]) for r in rows})
                    if writer is not None:
                        writer.write_rows(rows)
                bar.update(b + 1, "")
                dist.kill_point("reference", batch=b)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        policy.train(was_training)
    if out_path is None:
        gathered = dist.all_gather_json([[i, c, r] for i, (c, r) in results.items()])
        return {i: (c, r) for per_rank in gathered for i, c, r in per_rank}
    dist.barrier()
    if rank == 0:
        merge_parts(part_files(out_path), out_path, expected_keys={t.index for t in by_pos})
        remove_parts(out_path)
    dist.barrier()
    return _read_reference_file(out_path, tokenized)


def _read_reference_file(path: Path, tokenized: Sequence[TokenizedPair]) -> dict[int, tuple[float, float]]:
    ref = {row["index"]: (float(row["chosen"]), float(row["rejected"])) for row in read_jsonl_part(path)}
    missing = [t.index for t in tokenized if t.index not in ref]
    if missing:
        raise ValueError(f"{path}: no reference log-probs for pairs {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''} (stale file from other data? delete it)")
    return ref
