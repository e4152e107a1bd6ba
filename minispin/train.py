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

import base64
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn

from . import distributed as du
from .collate import (Pair, PairBatch, TokenizedPair, collate_pairs, epoch_permutation, plan_steps,
                      split_step, tokenize_pairs)
from .model import Transformer

LOSS_TYPES = ("sigmoid", "hinge", "exponential", "correlation", "sppo")
METHODS = ("spin", "sft")
STATE_FORMAT = "minispin-train-state/1"
# TrainConfig fields that may change between a run and its resume (they do not change the result)
_RESUME_FREE = ("save_steps", "status_every", "progress", "device", "reference_batch_size")


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; training stopped before applying that step."""


@dataclass
class TrainConfig:
    """Training hyperparameters; defaults are the SPIN paper's (zephyr-7b, iteration 0)."""

    method: str = "spin"  # "spin": pairwise loss vs the frozen reference; "sft": NLL of the real answers
    loss: str = "sigmoid"  # sigmoid (logistic, default) | hinge | exponential | correlation | sppo
    beta: float = 0.1
    label_smoothing: float = 0.0  # default for pairs without their own label_smoothing
    neftune_alpha: float = 0.0  # NEFTune noise on the input embeddings of training forwards (0: off; NEFTune: 5-15)
    reference_free: bool = False  # pairwise loss on policy log-probs only (no reference pass)
    lr: float = 5e-7
    epochs: float = 2  # may be fractional (e.g. 0.5: the first half of one permutation)
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when smaller)
    global_batch_size: int = 64  # pairs per optimizer step, over all ranks and accumulation steps
    micro_batch_size: int = 2  # pairs per forward per rank (2 rows each: chosen + rejected)
    reference_batch_size: int | None = None  # pairs per forward in the reference pass (default 2x micro)
    max_length: int = 1024
    max_prompt_length: int = 512
    template: str | None = None  # prompt template, the same one the generation job used
    optimizer: str = "rmsprop"  # rmsprop | adamw
    weight_decay: float = 0.0
    rmsprop_alpha: float = 0.99
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still logged)
    seed: int = 42
    activation_checkpointing: bool = False
    mixed_precision: bool = True  # CUDA: bf16 compute with fp32 master weights (FSDP2 policy)
    reshard_after_forward: bool = True
    save_steps: int = 100  # training-state checkpoint every N steps (0: only at the end); needs run_dir
    status_every: int = 10  # status line every N steps when stderr is not a terminal
    progress: bool = True
    device: str | None = None  # None: cuda when available, else cpu

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"loss must be one of {LOSS_TYPES}, got {self.loss!r}")
        if self.optimizer not in ("rmsprop", "adamw"):
            raise ValueError(f"optimizer must be 'rmsprop' or 'adamw', got {self.optimizer!r}")
        for name in ("global_batch_size", "micro_batch_size", "max_length", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not (self.neftune_alpha >= 0 and math.isfinite(self.neftune_alpha)):
            raise ValueError(f"neftune_alpha must be a finite number >= 0, got {self.neftune_alpha}")

    @property
    def needs_reference(self) -> bool:
        return self.method == "spin" and not self.reference_free


@dataclass
class TrainResult:
    """What `train` returns. model: the trained Transformer (in single-process mode trained in place;
    under FSDP its parameters are shards - use `save_trained_model` to write a checkpoint)."""
    model: Transformer
    policy: nn.Module
    steps: int
    history: list[dict] = field(default_factory=list)  # metrics of the steps run in this call
    metrics_path: Path | None = None


# ----------------------------------------------------------------------------- model wrapping

class PolicyHead(nn.Module):
    """input ids [R, T] -> log-prob of each selected response token [N] (fp32), through the fused kernel.

    The root module for FSDP2: its forward is where the embedding, final norm and LM head are used,
    so FSDP's hooks gather them. token_index are positions in the flattened [R * T] hidden states.
    neftune_alpha > 0: NEFTune noise on the input embeddings of forwards in training mode only (so never
    in the reference pass, which runs in eval mode; generation uses a model of its own).
    """

    def __init__(self, model: Transformer, neftune_alpha: float = 0.0):
        super().__init__()
        self.model = model
        self.neftune_alpha = float(neftune_alpha)

    def forward(self, input_ids: torch.Tensor, token_index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        linear_logprobs, _ = _kernels()

        if self.neftune_alpha > 0 and self.training:
            from .methods import neftune, row_lengths

            lengths = row_lengths(token_index, *input_ids.shape)
            with neftune(self.model.embed_tokens, self.neftune_alpha, lengths):
                hidden = self.model.hidden_states(input_ids)
        else:
            hidden = self.model.hidden_states(input_ids)  # right padding: no mask needed
        hidden = hidden.flatten(0, 1).index_select(0, token_index)
        weight = self.model.output_weight
        if weight.dtype != hidden.dtype:  # plain fp32 module under autocast
            weight = weight.to(hidden.dtype)
        return linear_logprobs(hidden, weight, labels, check_labels=False)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Activation checkpointing per decoder block (recompute the block in backward). Names unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def _mesh(info: du.DistInfo):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(info.device.type, (info.world_size,))


def prepare_policy(model: Transformer | str | os.PathLike, config: TrainConfig,
                   info: du.DistInfo) -> PolicyHead:
    """Wrap (and shard, under a process group) the model for training; load it first if given a path.

    With a path under FSDP the model is built on the meta device, sharded, and each rank copies only
    its own shard of every tensor from the checkpoint (no full copy per rank).
    """
    from .checkpoint import build_model, load_config, load_model

    if isinstance(model, nn.Module) and _is_meta(model):
        raise ValueError("the model is on the meta device (no weights); pass its checkpoint folder instead")
    fsdp = info.backend is not None
    if not fsdp:
        if not isinstance(model, nn.Module):
            model = load_model(model, dtype=torch.float32, device=info.device)
        model = model.to(device=info.device, dtype=torch.float32)
        model.reset_buffers(info.device)
        if config.activation_checkpointing:
            apply_activation_checkpointing(model)
        return PolicyHead(model, config.neftune_alpha).train()

    path = None
    if not isinstance(model, nn.Module):
        path = model
        model = build_model(load_config(path), "meta")
    else:
        model = model.to(dtype=torch.float32)
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    policy = shard_policy(PolicyHead(model, config.neftune_alpha), config, info)
    if path is not None:
        policy.to_empty(device=info.device)  # uninitialised shards; load_sharded_weights fills them
        load_sharded_weights(policy, path)
    model.reset_buffers(info.device)
    return policy.train()


def shard_policy(policy: PolicyHead, config: TrainConfig, info: du.DistInfo) -> PolicyHead:
    """FSDP2: fully_shard every decoder block, then the root; fp32 master weights, and on CUDA
    bf16 compute with fp32 gradient reduction (MixedPrecisionPolicy)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy()
    if info.device.type == "cuda" and config.mixed_precision:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = _mesh(info)
    for layer in policy.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=config.reshard_after_forward)
    fully_shard(policy, mesh=mesh, mp_policy=mp, reshard_after_forward=config.reshard_after_forward)
    return policy


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _local_piece(full: torch.Tensor, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's slice of `full`, the local tensor to copy it into) for a DTensor or plain param."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return full, param.data
    local = param.to_local()
    mesh = param.device_mesh
    piece = full
    for dim_mesh, placement in enumerate(param.placements):
        if placement.is_shard():
            n, r = mesh.size(dim_mesh), mesh.get_local_rank(dim_mesh)
            chunks = torch.chunk(piece, n, dim=placement.dim)  # FSDP2 shards like torch.chunk
            piece = chunks[r] if r < len(chunks) else piece.narrow(placement.dim, 0, 0)
    return piece, local


def load_sharded_weights(policy: PolicyHead, path: str | os.PathLike) -> None:
    """Copy each rank's shard of every tensor of an HF checkpoint folder into the (sharded) model."""
    from .checkpoint import CheckpointError, checkpoint_files, iter_safetensors
    from .model import our_key

    model = policy.model
    params = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    loaded = set()
    with torch.no_grad():
        for file in checkpoint_files(path):
            for key, tensor in iter_safetensors(file):
                name = our_key(key)
                if name is None or (tied and name == "lm_head.weight"):
                    continue
                if name not in params:
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} for this model")
                p = params[name]
                if tuple(tensor.shape) != tuple(p.shape):
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                          f"the model expects {tuple(p.shape)}")
                piece, local = _local_piece(tensor, p)
                if piece.shape != local.shape:
                    raise CheckpointError(f"{key}: shard shape {tuple(piece.shape)} != local {tuple(local.shape)}")
                local.copy_(piece.to(dtype=local.dtype))
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks tensors: {', '.join(missing)}")


def full_state_dict(policy: PolicyHead) -> dict[str, torch.Tensor]:
    """The model's full fp32 state dict on CPU with our parameter names, on rank 0 ({} elsewhere).

    A collective under FSDP: call on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k[len("model."):]: v for k, v in sd.items()}


def save_trained_model(policy: PolicyHead, path: str | os.PathLike, *, tokenizer: Any = None,
                       dtype: str | torch.dtype | None = "auto", max_shard_size: str = "5GB") -> Path:
    """Write the model as an HF safetensors checkpoint (loadable by transformers), atomically, rank 0.

    dtype "auto": the config's torch_dtype (bf16 for zephyr); None: keep fp32 masters. Copies the
    tokenizer files next to the weights when `tokenizer` is given. Call on every rank under FSDP.
    """
    from .checkpoint import save_model

    sd = full_state_dict(policy)
    path = Path(path)
    if du.is_main():
        model = policy.model
        target = model.config.dtype if dtype == "auto" else dtype
        if isinstance(target, str):
            target = getattr(torch, target)
        if target is not None:
            sd = {k: v.to(target) for k, v in sd.items()}
        save_model(model, path, max_shard_size=max_shard_size, state_dict=sd,
                   extra_files=tokenizer_files(tokenizer))
    du.barrier()
    return path


def tokenizer_files(tokenizer: Any) -> list[str]:
    """The files of a loaded tokenizer's folder that an HF checkpoint folder should carry."""
    if tokenizer is None:
        return []
    folder = Path(getattr(tokenizer, "tokenizer_file", "") or "").parent
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json", "generation_config.json")
    return [str(folder / n) for n in names if (folder / n).is_file()] if folder.is_dir() else []


# ----------------------------------------------------------------------------- loss

def _kernels():
    """The fused kernels (imported lazily: Triton's import is slow and reads TRITON_INTERPRET once)."""
    from minispin.kernels.linear_logprobs import linear_logprobs
    from minispin.kernels.pair_loss import pair_loss
    return linear_logprobs, pair_loss


def sequence_logps(token_logps: torch.Tensor, seq_index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Sum of token log-probs per row [num_rows] (fp32)."""
    out = torch.zeros(num_rows, dtype=torch.float32, device=token_logps.device)
    return out.index_add_(0, seq_index, token_logps.float())


def batch_loss(policy: nn.Module, batch: PairBatch, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward one micro-batch: (loss as a mean over its pairs (SFT: NLL summed over tokens),
    per-row summed log-probs [R] (detached), token log-probs [N]).

    SPIN: the pair_loss kernel on token log-probs, reference sums and beta.
    SFT: loss = -sum of the chosen tokens' log-probs (the caller divides by the step's token count).
    """
    token_logps = policy(batch.input_ids, batch.token_index, batch.labels)
    if config.method == "sft":
        seq = sequence_logps(token_logps.detach(), batch.seq_index, batch.input_ids.shape[0])
        return -token_logps.sum(), seq, token_logps
    _, pair_loss = _kernels()
    smoothing = batch.label_smoothing if batch.label_smoothing is not None else config.label_smoothing
    loss, seq = pair_loss(token_logps, batch.seq_index, None if config.reference_free else batch.ref_logps,
                          config.beta, loss=config.loss, label_smoothing=smoothing,
                          num_pairs=batch.num_pairs, targets=batch.targets, check_values=False)
    return loss, seq, token_logps


# ----------------------------------------------------------------------------- reference pass

def _micro_plan(order: Sequence[int], lengths: Sequence[int], micro: int, world: int) -> list[list[list[int]]]:
    """[step][rank] -> one micro-batch per rank per step, longest first (the reference pass's plan)."""
    per_step = micro * world
    plan = []
    for s in range(0, len(order), per_step):
        split = split_step(order[s: s + per_step], lengths, micro, world)
        plan.append([mbs[0] for mbs in split])
    return plan


def reference_logprobs(policy: nn.Module, tokenized: Sequence[TokenizedPair], pad_id: int, config: TrainConfig,
                       out_path: str | os.PathLike | None = None, device: torch.device | None = None
                       ) -> dict[int, tuple[float, float]]:
    """Summed log-probs of chosen and rejected answers under the current (frozen) model, per pair index.

    One no-grad pass; each rank does its share of length-sorted micro-batches. With out_path, finished
    batches are appended to per-rank part files (resumable after a kill: only the missing batches run,
    in the same composition, so results are bit-identical) and merged into `out_path` (.jsonl rows
    {"index", "chosen", "rejected"}); an existing out_path is simply read. Call on every rank.
    """
    from .io import ChunkedJsonlWriter, merge_parts, read_jsonl_part

    if isinstance(policy, Transformer):  # a bare model (notebooks): same math through the fused head
        policy = PolicyHead(policy)
    device = device or next(policy.parameters()).device
    _, pair_loss = _kernels()
    rank, world = du.get_rank(), du.get_world_size()
    out_path = Path(out_path) if out_path is not None else None
    if out_path is not None and du.all_ranks_true(out_path.is_file()):
        return _read_reference_file(out_path, tokenized)

    by_pos = list(tokenized)
    lengths = [t.length for t in by_pos]
    order = sorted(range(len(by_pos)), key=lambda i: -lengths[i])
    micro = config.reference_batch_size or 2 * config.micro_batch_size
    plan = _micro_plan(order, lengths, micro, world)

    done: dict[int, tuple[float, float]] = {}
    parts_dir = out_path.with_name(out_path.name + ".parts") if out_path is not None else None
    if parts_dir is not None:
        if parts_dir.is_dir():
            for part in sorted(parts_dir.glob("*.jsonl")):
                for row in read_jsonl_part(part):
                    done[row["index"]] = (row["chosen"], row["rejected"])
        du.barrier()  # everyone has read the parts before anyone appends
    writer = ChunkedJsonlWriter(parts_dir / f"rank{rank:05d}-of-{world:05d}.jsonl") if parts_dir else None
    results: dict[int, tuple[float, float]] = dict(done)
    was_training = policy.training
    policy.eval()
    bar = _Status(len(plan), "reference", config.progress)
    try:
        with torch.no_grad():
            for b, step in enumerate(plan):
                if all(by_pos[i].index in done for mb in step for i in mb):
                    continue
                mine = step[rank] or step[0]  # an empty slot runs a dummy batch (collectives must match)
                batch = collate_pairs([by_pos[i] for i in mine], pad_id).to(device, non_blocking=True)
                token_logps = policy(batch.input_ids, batch.token_index, batch.labels)
                # the same (deterministic) summation as the training loss uses
                _, seq = pair_loss(token_logps, batch.seq_index, None, 1.0, num_pairs=batch.num_pairs,
                                   check_values=False)
                seq = seq.tolist()
                if step[rank]:
                    P = batch.num_pairs
                    rows = [{"index": idx, "chosen": seq[j], "rejected": seq[P + j]}
                            for j, idx in enumerate(batch.pair_index)]
                    results.update({r["index"]: (r["chosen"], r["rejected"]) for r in rows})
                    if writer is not None:
                        writer.write_rows(rows)
                bar.update(b + 1, "")
                du.kill_point("reference", batch=b)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        policy.train(was_training)
    if out_path is None:
        gathered = du.all_gather_json([[i, c, r] for i, (c, r) in results.items()])
        return {i: (c, r) for per_rank in gathered for i, c, r in per_rank}
    du.barrier()
    if rank == 0:
        merge_parts(sorted(parts_dir.glob("*.jsonl")), out_path, expected_keys={t.index for t in by_pos})
        for part in parts_dir.glob("*.jsonl"):
            part.unlink()
        parts_dir.rmdir()
    du.barrier()
    return _read_reference_file(out_path, tokenized)


def _read_reference_file(path: Path, tokenized: Sequence[TokenizedPair]) -> dict[int, tuple[float, float]]:
    from .io import read_jsonl_part

    ref = {row["index"]: (float(row["chosen"]), float(row["rejected"])) for row in read_jsonl_part(path)}
    missing = [t.index for t in tokenized if t.index not in ref]
    if missing:
        raise ValueError(f"{path}: no reference log-probs for pairs {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''} (stale file from other data? delete it)")
    return ref


# ----------------------------------------------------------------------------- optimizer, schedule

def build_optimizer(policy: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in policy.parameters() if p.requires_grad]
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, alpha=config.rmsprop_alpha, eps=config.eps,
                                   weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.eps, weight_decay=config.weight_decay)


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup over ceil(warmup_ratio * total) steps, then linear decay to 0 at `total_steps`.
    step is 0-based (the lr used by the (step+1)-th update); the first update already has lr > 0."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


# ----------------------------------------------------------------------------- train state (no pickle)

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(bytes(t.cpu().numpy().tobytes())).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _rng_state() -> dict:
    state = {"torch": _b64(torch.get_rng_state()), "python": _json_safe(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = _b64(torch.cuda.get_rng_state())
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(_unb64(state["cuda"]))


def _json_safe(x):
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item()
    return x


def _aliases(policy: nn.Module) -> dict[str, str]:
    """{duplicate name: first name} for parameters shared between modules (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in policy.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def save_train_state(policy: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike,
                     state: dict) -> None:
    """Atomically write weights + optimizer state (safetensors) + trainer state (JSON). Every rank calls."""
    import shutil
    import tempfile

    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from .io import atomic_replace_dir

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(policy, options=options)
    osd = get_optimizer_state_dict(policy, optimizer, options=options)
    rng = du.all_gather_json(_rng_state())
    if du.is_main():
        path = Path(path)
        aliases = _aliases(policy)
        model_tensors = {k: v.detach().contiguous().clone() for k, v in msd.items() if k not in aliases}
        optim_tensors, optim_scalars = {}, {}
        for pname, pstate in osd["state"].items():
            if pname in aliases:
                continue
            for key, value in pstate.items():
                if isinstance(value, torch.Tensor):
                    optim_tensors[f"state.{pname}.{key}"] = value.detach().contiguous().clone()
                else:
                    optim_scalars[f"state.{pname}.{key}"] = value
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
        meta = dict(state, format=STATE_FORMAT, aliases=aliases, param_groups=groups,
                    optimizer_scalars=optim_scalars, rng=rng)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            save_file(model_tensors, str(tmp / "model.safetensors"))
            save_file(optim_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "trainer_state.json").write_text(json.dumps(meta) + "\n")
            atomic_replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    du.barrier()


def read_train_state_json(path: str | os.PathLike) -> dict | None:
    from .io import recover_replaced_dir

    path = Path(path)
    recover_replaced_dir(path)
    f = path / "trainer_state.json"
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: corrupt trainer state ({e})") from None
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{f}: unknown trainer state format {meta.get('format')!r}")
    return meta


def load_train_state(policy: nn.Module, optimizer: torch.optim.Optimizer, path: str | os.PathLike) -> dict:
    """Restore weights, optimizer state and this rank's RNG state; returns the trainer-state dict."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    path = Path(path)
    meta = du.broadcast_json(read_train_state_json(path) if du.is_main() else None)
    if meta is None:
        raise FileNotFoundError(f"no trainer_state.json in {path}")
    distributed = du.is_initialized()
    main = du.is_main() or not distributed
    aliases = meta["aliases"]
    msd, osd = {}, {}
    if main:
        msd = load_file(str(path / "model.safetensors"))
        for dup, src in aliases.items():
            msd[dup] = msd[src]
        flat = load_file(str(path / "optimizer.safetensors"))
        flat.update(meta.get("optimizer_scalars", {}))
        state: dict[str, dict] = {}
        for key, value in flat.items():
            pname, _, skey = key[len("state."):].rpartition(".")
            state.setdefault(pname, {})[skey] = value
        groups = []
        for g in meta["param_groups"]:
            g = dict(g)
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        osd = {"state": state, "param_groups": groups}
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed)
    set_model_state_dict(policy, msd, options=options)
    set_optimizer_state_dict(policy, optimizer, osd, options=options)
    rng = meta.get("rng") or []
    if rng and len(rng) == du.get_world_size():
        _set_rng_state(rng[du.get_rank()])
    return meta


# ----------------------------------------------------------------------------- status line

class _Status:
    """One-line progress on stderr (rank 0): redrawn in place on a terminal, else every `every` steps."""

    def __init__(self, total: int, label: str, enabled: bool = True, every: int = 10):
        self.total, self.label, self.every = total, label, max(1, every)
        self.enabled = enabled and du.is_main()
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self.drawn = False

    def update(self, done: int, text: str) -> None:
        if not self.enabled:
            return
        line = f"[{self.label}] {done}/{self.total} {text}".rstrip()
        if self.tty:
            sys.stderr.write("\r" + line[:200] + "\033[K")
            sys.stderr.flush()
            self.drawn = True
        elif done == self.total or done % self.every == 0:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty and self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ----------------------------------------------------------------------------- the loop

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
        if config.method == "spin" and p.rejected is None:
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
    info = du.init_distributed(config.device, single_process_group=_wants_group(config))
    du.seed_everything(config.seed)
    run_dir = Path(run_dir) if run_dir is not None else None
    policy = prepare_policy(model, config, info)
    model_config = policy.model.config
    pad_id = _pad_id(tokenizer, model_config)
    if tokenized is None:
        tokenized = tokenize_pairs(pairs, tokenizer, template=config.template, max_length=config.max_length,
                                   max_prompt_length=config.max_prompt_length, vocab_size=model_config.vocab_size)
    tokenized = list(tokenized)
    by_pos_pair = {p.index: p for p in pairs}
    device = info.device

    refs = None
    if config.needs_reference:
        refs = _ref_of(pairs, ref_logps)
        if refs is None:
            on_phase("reference")
            out = run_dir / "reference_logps.jsonl" if run_dir is not None else None
            refs = reference_logprobs(policy, tokenized, pad_id, config, out, device)

    orders = _epoch_orders(len(tokenized), config)
    lengths = [t.length for t in tokenized]
    steps_plan = [step for order in orders
                  for step in plan_steps(order, lengths, config.global_batch_size, config.micro_batch_size,
                                         info.world_size)]
    if config.max_steps is not None:
        steps_plan = steps_plan[: config.max_steps]
    total_steps = len(steps_plan)
    optimizer = build_optimizer(policy, config)

    state_dir = run_dir / "train_state" if run_dir is not None else None
    metrics_path = run_dir / "metrics.jsonl" if run_dir is not None else None
    start_step = 0
    saved = du.broadcast_json(read_train_state_json(state_dir) is not None if du.is_main() and state_dir else False)
    if saved:
        meta = load_train_state(policy, optimizer, state_dir)
        if meta["num_pairs"] != len(tokenized) or meta["total_steps"] != total_steps:
            raise ValueError(f"{state_dir}: saved for {meta['num_pairs']} pairs / {meta['total_steps']} steps, "
                             f"but this run has {len(tokenized)} pairs / {total_steps} steps; "
                             "same data and config are needed to resume (or delete the folder)")
        if meta["data_order"] != orders:
            raise ValueError(f"{state_dir}: the saved data order differs from this run's (seed/epochs changed?)")
        now = json.loads(json.dumps(asdict(config)))
        changed = sorted(k for k in set(now) | set(meta["config"])
                         if k not in _RESUME_FREE and now.get(k) != meta["config"].get(k))
        if changed:
            saved_cfg = meta["config"]
            detail = ", ".join(f"{k}: {saved_cfg.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ValueError(f"{state_dir}: saved by a run with other settings ({detail}); resume with the "
                             "same config (or delete the folder to start over)")
        start_step = meta["step"]
        if du.is_main() and metrics_path is not None:
            _truncate_metrics(metrics_path, start_step)
    elif du.is_main() and metrics_path is not None and metrics_path.exists():
        metrics_path.unlink()  # a fresh start

    def save_state(step: int) -> None:
        if state_dir is None:
            return
        save_train_state(policy, optimizer, state_dir, {
            "step": step, "total_steps": total_steps, "num_pairs": len(tokenized), "data_order": orders,
            "world_size": info.world_size, "config": asdict(config)})

    on_phase("train")
    history: list[dict] = []
    status = _Status(total_steps, "train" if config.method == "spin" else "sft", config.progress, config.status_every)
    sft = config.method == "sft"
    try:
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            step_items = [i for rank_mbs in steps_plan[step] for mb in rank_mbs for i in mb]
            step_pairs = len(step_items)
            step_tokens = sum(len(tokenized[i].chosen_ids) for i in step_items)  # SFT normaliser
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, config)

            def micro_batches(step=step, step_pairs=step_pairs, step_tokens=step_tokens):
                for items in steps_plan[step][info.rank]:
                    chosen = items or steps_plan[step][0][0]  # empty slot: a zero-weight dummy
                    batch = collate_pairs([tokenized[i] for i in chosen], pad_id, sft=sft,
                                          pairs=[by_pos_pair[tokenized[i].index] for i in chosen], ref_logps=refs)
                    weight = 0.0 if not items else (1.0 / step_tokens if sft else batch.num_pairs / step_pairs)
                    yield batch, weight

            values, gn = optimizer_step(
                policy, optimizer, micro_batches(), config, device=device,
                where=f"step {step + 1}/{total_steps}",
                last_good=f"the last good state is in {state_dir}" if state_dir else "no run_dir, nothing saved")
            elapsed = time.perf_counter() - t0
            record = _metrics(step + 1, values, config, optimizer.param_groups[0]["lr"], gn, elapsed)
            history.append(record)
            if du.is_main() and metrics_path is not None:
                metrics_path.parent.mkdir(parents=True, exist_ok=True)
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
            status.update(step + 1, _status_text(record, sft))
            if state_dir is not None and (step + 1 == total_steps or
                                          (config.save_steps > 0 and (step + 1) % config.save_steps == 0)):
                save_state(step + 1)
            du.kill_point("train", step=step + 1)
    finally:
        status.close()
    return TrainResult(model=policy.model, policy=policy, steps=total_steps, history=history,
                       metrics_path=metrics_path)


def _pad_id(tokenizer: Any, model_config) -> int:
    """Any valid id works for padding (it is never attended to nor predicted)."""
    for value in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None),
                  model_config.pad_token_id, model_config.eos_token_id, 0):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _wants_group(config: TrainConfig) -> bool:
    """One GPU without torchrun: a one-rank group so the FSDP2 mixed-precision path runs there too."""
    dev = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(dev).type == "cuda"


def optimizer_step(policy: nn.Module, optimizer: torch.optim.Optimizer,
                   micro_batches: Iterable[tuple[PairBatch, float]], config: TrainConfig, *,
                   device: torch.device, where: str = "step", last_good: str = "") -> tuple[list[float], float]:
    """One optimizer step: forward + backward of every (micro-batch, weight) (weight = its share of the
    step's loss; 0 = a dummy that only keeps FSDP collectives in step), all-reduce of the metric sums,
    gradient clipping, NaN/inf check, optimizer update. Exactly one host sync (after the backward passes).

    Returns (metric sums [loss, reward_real, reward_gen, margin, correct, logp_real, logp_gen, pairs,
    tokens, response tokens], grad norm before clipping). Raises TrainingDiverged before updating.
    """
    world = du.get_world_size()
    stats = torch.zeros(10, dtype=torch.float64, device=device)
    for batch, weight in micro_batches:
        if device.type == "cuda":
            batch = batch.pin_memory()
        batch = batch.to(device, non_blocking=True)
        loss, seq, _ = batch_loss(policy, batch, config)
        (loss * (weight * world)).backward()
        if weight:
            _accumulate(stats, loss.detach() * weight, seq, batch, config)
    if du.is_initialized() and world > 1:
        torch.distributed.all_reduce(stats)
    grad_norm = _clip(policy, config.max_grad_norm)
    *values, gn = torch.cat([stats, grad_norm.to(stats).view(1)]).tolist()  # the step's one host sync
    if not (math.isfinite(values[0]) and math.isfinite(gn)):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingDiverged(f"{where}: loss {values[0]} / grad norm {gn} is not finite; stopped before "
                               f"applying it ({last_good}). Lower the learning rate or check the data")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return values, gn


def _clip(policy: nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in policy.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm


def _accumulate(stats: torch.Tensor, weighted_loss: torch.Tensor, seq: torch.Tensor, batch: PairBatch,
                config: TrainConfig) -> None:
    """stats: [loss, reward_real, reward_gen, margin, correct, logp_real, logp_gen, pairs, tokens, resp_tokens]."""
    P = batch.num_pairs
    stats[0] += weighted_loss.double()
    stats[7] += P
    stats[8] += batch.num_tokens
    stats[9] += batch.labels.numel()
    if config.method == "sft":
        stats[5] += seq[:P].sum().double()
        return
    real, gen = seq[:P].double(), seq[P:2 * P].double()
    if batch.ref_logps is not None and not config.reference_free:
        ref = batch.ref_logps.double()
        r_real, r_gen = config.beta * (real - ref[:P]), config.beta * (gen - ref[P:])
    else:
        r_real, r_gen = config.beta * real, config.beta * gen
    stats[1] += r_real.sum()
    stats[2] += r_gen.sum()
    stats[3] += (r_real - r_gen).sum()
    stats[4] += (r_real > r_gen).double().sum()
    stats[5] += real.sum()
    stats[6] += gen.sum()


def _metrics(step: int, v: list[float], config: TrainConfig, lr: float, grad_norm: float, elapsed: float) -> dict:
    n = max(v[7], 1.0)
    rec = {"step": step, "loss": v[0]}
    if config.method == "spin":
        rec.update({"rewards/real": v[1] / n, "rewards/generated": v[2] / n, "margins": v[3] / n,
                    "accuracies": v[4] / n, "logps/real": v[5] / n, "logps/generated": v[6] / n})
    else:
        rec.update({"logps/real": v[5] / n})
    rec.update({"lr": lr, "grad_norm": grad_norm, "pairs": int(v[7]), "tokens": int(v[8]),
                "tokens_per_s": v[8] / max(elapsed, 1e-9), "step_time_s": elapsed})
    return rec


def _status_text(r: dict, sft: bool) -> str:
    if sft:
        return f"loss {r['loss']:.4f} lr {r['lr']:.2e} gnorm {r['grad_norm']:.3f} {r['tokens_per_s']:.0f} tok/s"
    return (f"loss {r['loss']:.4f} margin {r['margins']:.4f} acc {r['accuracies']:.2f} lr {r['lr']:.2e} "
            f"gnorm {r['grad_norm']:.3f} {r['tokens_per_s']:.0f} tok/s")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines of steps after `step` (they are re-run after a resume)."""
    from .io import atomic_write_text

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
