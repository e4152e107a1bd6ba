"""The model as the trainer sees it: PolicyHead (ids -> response-token log-probs through the fused kernel),
FSDP2 wrapping with fp32 master weights, activation checkpointing, sharded loading, and saving the result
as an HF checkpoint."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import distributed as dist
from ..checkpoint import build_model, load_config, load_model, load_state_dict_into, save_model
from ..lora import add_adapters, adapter_param_names, init_adapters, merge_state_dict
from ..methods.noise import neftune, position_row_lengths
from ..model import PackedRows, Transformer
from .config import TrainConfig

class PolicyHead(nn.Module):
    """Packed rows -> log-prob of each selected response token [N'] (fp32), through the fused kernel.

    The root module for FSDP2: its forward is where the embedding, final norm and LM head are used,
    so FSDP's hooks gather them. input_ids / position_ids [1, N] hold rows packed as `packed` describes
    (minispin.collate); token_index are positions in that sequence.
    neftune_alpha > 0: NEFTune noise on the input embeddings of forwards in training mode only (so never
    in the reference pass, which runs in eval mode; generation uses a model of its own).
    """

    def __init__(self, model: Transformer, neftune_alpha: float = 0.0):
        super().__init__()
        self.model = model
        self.neftune_alpha = float(neftune_alpha)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, packed: PackedRows,
                token_index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        linear_logprobs, _ = fused_kernels()

        if self.neftune_alpha > 0 and self.training:
            with neftune(self.model.embed_tokens, self.neftune_alpha, position_row_lengths(position_ids, packed)):
                hidden = self.model.hidden_states(input_ids, position_ids=position_ids, packed=packed)
        else:
            hidden = self.model.hidden_states(input_ids, position_ids=position_ids, packed=packed)
        hidden = hidden.flatten(0, 1).index_select(0, token_index)
        weight = self.model.output_weight
        if weight.dtype != hidden.dtype:  # plain fp32 module under autocast
            weight = weight.to(hidden.dtype)
        return linear_logprobs(hidden, weight, labels, check_labels=False)


def apply_activation_checkpointing(model: Transformer) -> None:
    """Activation checkpointing per decoder block (recompute the block in backward). Names unchanged."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        layer.recompute_activations = False  # the whole block is recomputed; its scope would hide checkpoint's hooks
        inner = layer.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward


def _mesh(info: dist.DistInfo):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(info.device.type, (info.world_size,))


def prepare_policy(model: Transformer | str | os.PathLike, config: TrainConfig,
                   info: dist.DistInfo) -> PolicyHead:
    """Wrap (and shard, under a process group) the model for training; load it first if given a path.

    With a path under FSDP the model is built on the meta device, sharded, and each rank copies only
    its own shard of every tensor from the checkpoint (no full copy per rank).
    """
    if isinstance(model, nn.Module) and _is_meta(model):
        raise ValueError("the model is on the meta device (no weights); pass its checkpoint folder instead")
    fsdp = info.backend is not None
    if not fsdp:
        if not isinstance(model, nn.Module):
            model = load_model(model, dtype=torch.float32, device=info.device)
        model = model.to(device=info.device, dtype=torch.float32)
        model.reset_buffers(info.device)
        if config.lora is not None:  # LoRA: the base frozen, fresh fp32 adapters (minispin.lora)
            add_adapters(model, config.lora, seed=config.seed)
        if config.activation_checkpointing:
            apply_activation_checkpointing(model)
        return PolicyHead(model, config.neftune_alpha).train()

    path = None
    if not isinstance(model, nn.Module):
        path = model
        model = build_model(load_config(path), "meta")
    else:
        model = model.to(dtype=torch.float32)
    if config.lora is not None:  # LoRA: the base frozen in the compute dtype (bf16 on GPU), fp32 adapters
        bf16 = info.device.type == "cuda" and config.mixed_precision
        add_adapters(model, config.lora, seed=config.seed, base_dtype=torch.bfloat16 if bf16 else torch.float32)
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    policy = shard_policy(PolicyHead(model, config.neftune_alpha), config, info)
    if path is not None:
        policy.to_empty(device=info.device)  # uninitialised shards; the loader fills each rank's own
        load_state_dict_into(model, path, skip=adapter_param_names(model))
    if config.lora is not None:
        init_adapters(model, config.seed)  # into each rank's shards (after to_empty)
    model.reset_buffers(info.device)
    return policy.train()


def shard_policy(policy: PolicyHead, config: TrainConfig, info: dist.DistInfo) -> PolicyHead:
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
    sd = full_state_dict(policy)
    path = Path(path)
    if dist.is_main():
        model = policy.model
        target = model.config.dtype if dtype == "auto" else dtype
        if isinstance(target, str):
            target = getattr(torch, target)
        merge_state_dict(sd, model, dtype=target)  # LoRA: W + (alpha/r) B A, in place (else nothing to do)
        if target is not None:
            sd = {k: v.to(target) for k, v in sd.items()}
        save_model(model, path, max_shard_size=max_shard_size, state_dict=sd,
                   extra_files=tokenizer_files(tokenizer), extra_texts=getattr(tokenizer, "files_in_memory", None))
    dist.barrier()
    return path


def tokenizer_files(tokenizer: Any) -> list[str]:
    """The files of a loaded tokenizer's folder that an HF checkpoint folder should carry (none for one
    read from a GGUF file: its files are written from memory, never taken from beside the .gguf)."""
    if tokenizer is None or getattr(tokenizer, "files_in_memory", None):
        return []
    folder = Path(getattr(tokenizer, "tokenizer_file", "") or "").parent
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json", "generation_config.json")
    return [str(folder / n) for n in names if (folder / n).is_file()] if folder.is_dir() else []


# ----------------------------------------------------------------------------- kernels

def fused_kernels():
    """The fused kernels (imported lazily: Triton's import is slow and reads TRITON_INTERPRET once)."""
    from minispin.kernels.linear_logprobs import linear_logprobs
    from minispin.kernels.sequence_logps import sequence_logps
    return linear_logprobs, sequence_logps
