"""Optimizer build (RMSProp / AdamW), the linear warmup-decay schedule, and the memory model of a step
(the step itself: minispin.training.step)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..lora import lora_memory_terms
from .config import TrainConfig

# ----------------------------------------------------------------------------- optimizer, schedule

def build_optimizer(policy: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """RMSProp or AdamW updating one tensor at a time (foreach=False): torch's default multi-tensor path
    allocates temporaries for all parameters at once (+1 full fp32 copy of the model per step: 27 GiB at
    7B), the per-tensor path only one tensor's worth, which is what lets AdamW fit 7B on one H200."""
    params = [p for p in policy.parameters() if p.requires_grad]
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, alpha=config.rmsprop_alpha, eps=config.eps,
                                   weight_decay=config.weight_decay, foreach=False)
    return torch.optim.AdamW(params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                             eps=config.eps, weight_decay=config.weight_decay, foreach=False)


def lr_at(step: int, total_steps: int, config: TrainConfig) -> float:
    """Linear warmup over ceil(warmup_ratio * total) steps, then linear decay to 0 at `total_steps`.
    step is 0-based (the lr used by the (step+1)-th update); the first update already has lr > 0."""
    warmup = math.ceil(config.warmup_ratio * total_steps)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


# ----------------------------------------------------------------------------- memory model

GIB = 2 ** 30
# bf16 bytes saved for the backward per token and layer, in units of the hidden size H and the MLP width I.
# A decoder block under its RecomputeScope (minispin.recompute) keeps its input and the input of the second
# norm, rotated q, k and v (~7H with a quarter as many kv heads), gate and up (4I). A block without it (the
# one block being recomputed under full activation checkpointing) keeps everything: the two RMSNorms (bf16
# input + fp32 upcast + bf16 output, ~8H each), the projections' inputs, rotated q and k, v, the attention
# output (~8H), gate, up, silu(gate) and their product (8I). An estimate: bench_train prints it next to the
# measured peak.
ACTIVATION_H_BYTES, ACTIVATION_I_BYTES = 7, 4
ACTIVATION_H_BYTES_ALL, ACTIVATION_I_BYTES_ALL = 24, 8


def memory_estimate(model_config, config: TrainConfig, *, world_size: int = 1, seq_len: int | None = None,
                    response_len: int | None = None) -> dict[str, float]:
    """Peak GPU memory of one training step per rank, in GiB, term by term: fp32 master weights, fp32
    gradients, optimizer state (RMSProp 1, AdamW 2 fp32 tensors per weight) and the per-tensor update's
    temporary, FSDP2's bf16 all-gathered layers (current + prefetched) and reduce-scatter buffer,
    activations (all layers' saved tensors; with checkpointing only each layer's input plus one layer
    recomputed), and the fused LM head's scratch (response tokens' hidden states and their fp32 gradient
    accumulator, one d_logits chunk). Micro batch = config.micro_batch_size pairs of seq_len tokens.
    LoRA (config.lora_r > 0): the weight, gradient and optimizer terms are the adapters', plus the frozen
    base and the adapters' activations (minispin.lora.lora_memory_terms)."""
    H, I, L, V = (model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers,
                  model_config.vocab_size)
    kv = model_config.num_key_value_heads * model_config.head_dim
    q = model_config.num_attention_heads * model_config.head_dim
    layer_params = H * (q + 2 * kv) + q * H + 3 * H * I + 2 * H
    embed = V * H * (1 if model_config.tie_word_embeddings else 2)
    params = L * layer_params + embed + H
    shard = params / world_size
    T = seq_len or config.max_length
    R = response_len if response_len is not None else T - config.max_prompt_length // 2
    # chosen + rejected rows at full length: an upper bound, since training runs a pair's prompt once
    # (minispin.collate), a pair's tokens are prompt + both answers
    tokens = 2 * config.micro_batch_size * T
    if config.activation_checkpointing:
        activations = tokens * L * 2 * H + tokens * (ACTIVATION_H_BYTES_ALL * H + ACTIVATION_I_BYTES_ALL * I)
    else:
        activations = tokens * L * (ACTIVATION_H_BYTES * H + ACTIVATION_I_BYTES * I)
    resp = 2 * config.micro_batch_size * R
    lm_head = resp * H * (2 + 4) + (1 << 27)  # bf16 hidden + fp32 d_hidden accumulator + 128 MiB chunk
    states = 2 if config.optimizer == "adamw" else 1
    largest = max(V * H, H * I, H * q)  # the biggest single tensor: the per-tensor update's temporary
    terms = {
        "weights_fp32": 4 * shard,
        "grads_fp32": 4 * shard,
        "optimizer_state": 4 * states * shard,
        "optimizer_temp": 4 * largest / world_size,
        "fsdp_buffers": 2 * 2 * layer_params + 4 * layer_params,  # bf16 gathered x2, fp32 reduce-scatter
        "activations": activations,
        "lm_head": lm_head,
    }
    if config.lora is not None:  # LoRA: a frozen base in its compute dtype, fp32 adapters (minispin.lora)
        terms.update(lora_memory_terms(model_config, config.lora, params=params, layer_params=layer_params,
                                       world_size=world_size, optimizer_states=states, tokens=tokens,
                                       checkpointing=config.activation_checkpointing,
                                       base_bytes=2 if config.mixed_precision else 4))
    out = {k: v / GIB for k, v in terms.items()}
    out["total"] = sum(out.values())
    return out
