"""SPIN training-step benchmark: tokens/s, MFU and peak memory of minispin's step vs a naive baseline.

minispin's step is the library's own `minispin.training.optimizer_step`: FSDP2 (a one-rank group on one
GPU) with fp32 master weights and bf16 compute, the fused linear_logprobs kernel on response tokens
only, the pair_loss kernel, precomputed reference log-probs (no reference model), RMSProp.
The naive baseline is what the public SPIN/TRL trainer does on one GPU with bf16=True: a transformers
model in fp32 under bf16 autocast, a resident bf16 reference model run every micro-step, full logits
[rows, T, V] -> float -> log_softmax -> gather -> sum, DPO-sigmoid loss, RMSProp. (Without transformers
installed, the baseline runs the same naive recipe on minispin's Transformer and says so.)

    python benchmarks/bench_train.py                    # 1B- and 7B-shaped random models, one GPU
    python benchmarks/bench_train.py --shapes 1b --no-baseline
    python benchmarks/bench_train.py --smoke            # CPU, tiny model, seconds
    python benchmarks/bench_train.py --shapes 7b,llama3_8b --lora-r 16 --micro-batch 1 --accum 1 \
        --prompt-len 512 --response-len 512                # LoRA: bf16 frozen base, fp32 adapters (24 GB?)

Output: JSON lines (one per implementation and shape, then the ratios). MFU counts the model FLOPs
the step runs: 6 x (decoder-block params) x tokens + 6 x H x V x response tokens (the LM head is only
needed there) + causal attention 6 x L x H x T^2 per sequence, where minispin's tokens count each pair's
prompt once (its packed pairs share it; tokens/s counts both rows' tokens for both implementations); it is reported against --peak-flops
(H200 dense bf16: 989e12) and against a measured bf16 matmul rate. Activation-checkpoint recompute is
not counted. With --lora-r (minispin only, no baseline) the weights are frozen: 4 instead of 6 per weight.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minispin import distributed as dist  # noqa: E402
from minispin.collate import TokenizedPair, collate_pairs  # noqa: E402
from minispin.lora import add_adapters  # noqa: E402
from minispin.model import ModelConfig, Transformer  # noqa: E402
from minispin.training import (PolicyHead, TrainConfig, apply_activation_checkpointing,  # noqa: E402
                            batch_loss, build_optimizer, optimizer_step, shard_policy)
from minispin.training.optim import memory_estimate  # noqa: E402

SHAPES = {
    # TinyLlama-1.1B layout with the Mistral/Llama-2 32000 vocabulary (the SPIN models' tokenizer)
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, architecture="LlamaForCausalLM"),
    # Mistral-7B (zephyr-7b-sft-full, the paper's model)
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, architecture="MistralForCausalLM"),
    "llama2_7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, architecture="LlamaForCausalLM"),
    "llama3_8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, architecture="LlamaForCausalLM"),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, architecture="LlamaForCausalLM"),
}


def model_config(shape: str) -> ModelConfig:
    return ModelConfig(**SHAPES[shape], max_position_embeddings=4096, torch_dtype="bfloat16", sliding_window=None)


def step_flops(cfg: ModelConfig, rows: int, T: int, response: int, frozen_base: bool = False,
               shared_prompt: int = 0) -> float:
    """Model FLOPs of one forward+backward over `rows` sequences of length T (see module doc). frozen_base
    (LoRA): the backward needs no weight gradients, 4 instead of 6 FLOPs per weight and token (the
    adapters' own FLOPs are negligible). shared_prompt: prompt tokens each pair runs once, not twice
    (minispin's packed pairs), so MFU counts only the work that is done."""
    H, V, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    hd = cfg.head_dim
    kv = cfg.num_key_value_heads * hd
    per_layer = H * cfg.num_attention_heads * hd * 2 + H * kv * 2 + 3 * H * cfg.intermediate_size + 2 * H
    block_params = L * per_layer + H
    tokens = rows * T - rows // 2 * shared_prompt
    # causal attention per layer and sequence: QK^T and AV, 2 T^2 d FLOPs each at half the square,
    # x3 for forward + backward -> 6 T^2 d
    attention = 6 * L * cfg.num_attention_heads * hd * T * T * rows
    per_weight = 4 if frozen_base else 6
    return per_weight * block_params * tokens + per_weight * H * V * rows * response + attention


def measured_matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps = 20 if device.type == "cuda" else 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_pairs(cfg: ModelConfig, n: int, prompt_len: int, response_len: int, seed: int) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    r = lambda k: torch.randint(3, cfg.vocab_size, (k,), generator=g).tolist()  # noqa: E731
    return [TokenizedPair(i, r(prompt_len), r(response_len), r(response_len)) for i in range(n)]


def init_random_(module: torch.nn.Module, seed: int) -> None:
    """Normal(0, 0.02) weights, ones for norms; works on local FSDP shards (DTensor.to_local)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if name.endswith("norm.weight") or "layernorm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02)


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _time_steps(run_step, steps: int, warmup: int, device: torch.device) -> list[float]:
    times = []
    for i in range(warmup + steps):
        _sync(device)
        t = time.perf_counter()
        run_step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


# ----------------------------------------------------------------------------- minispin

def train_config(args, device: str) -> TrainConfig:
    return TrainConfig(lr=5e-7, beta=0.1, micro_batch_size=args.micro_batch, progress=False,
                       activation_checkpointing=args.ac, device=device, optimizer=args.optimizer,
                       max_length=args.prompt_len + args.response_len, max_prompt_length=args.prompt_len,
                       lora_r=args.lora_r, lora_alpha=args.lora_alpha)


def bench_minispin(cfg: ModelConfig, args, info: dist.DistInfo, batches) -> dict:
    device = info.device
    tcfg = train_config(args, device.type)
    with torch.device("meta"):
        model = Transformer(cfg)
    if tcfg.lora is not None:  # as training does it: the base frozen in bf16 on GPU, fp32 adapters
        add_adapters(model, tcfg.lora, base_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    if tcfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    policy = PolicyHead(model)
    if info.backend is not None:
        shard_policy(policy, tcfg, info)
    policy.to_empty(device=device)
    init_random_(policy, seed=0)
    model.reset_buffers(device)
    optimizer = build_optimizer(policy, tcfg)
    weight = 1.0 / args.accum

    def run_step():
        optimizer_step(policy, optimizer, ((b, weight) for b in batches), tcfg, device=device)

    def reference_forward():  # what the reference pass costs for these pairs: a no-grad forward of each
        with torch.no_grad():
            for b in batches:
                batch_loss(policy, b.to(device, non_blocking=True), tcfg)

    times = _time_steps(run_step, args.steps, args.warmup, device)
    ref_times = _time_steps(reference_forward, max(1, args.steps), 1, device)
    result = {"impl": "minispin", "params": sum(p.numel() for p in policy.parameters()),  # DTensor: global
              "trainable_params": sum(p.numel() for p in policy.parameters() if p.requires_grad),
              "lora_r": tcfg.lora_r,
              "activation_checkpointing": tcfg.activation_checkpointing, "optimizer": tcfg.optimizer,
              "fsdp": info.backend is not None, "reference_forward_s": statistics.median(ref_times)}
    del policy, optimizer, model
    return result | {"times": times}


# ----------------------------------------------------------------------------- naive baseline

def _naive_models(cfg: ModelConfig, device: torch.device, ac: bool):
    try:
        import transformers
        hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
        with torch.device(device):
            policy = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").float()
        if ac:
            if hasattr(policy, "activation_checkpointing_enable"):  # transformers >= 5.x name
                policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.config.use_cache = False
        forward = lambda m, ids: m(input_ids=ids, use_cache=False).logits  # noqa: E731
        kind = f"transformers {transformers.__version__}"
    except ImportError:
        with torch.device(device):
            policy = Transformer(cfg)
        policy.reset_buffers(device)
        if ac:
            apply_activation_checkpointing(policy)
        forward = lambda m, ids: m(ids)  # noqa: E731
        kind = "minispin Transformer (transformers not installed)"
    init_random_(policy, seed=0)
    reference = copy.deepcopy(policy).to(torch.bfloat16).eval().requires_grad_(False)
    return policy.train(), reference, forward, kind


def padded_rows(group: list[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive layout: chosen rows then rejected rows, right-padded to [2P, T], with row-aligned labels
    (-100 on prompts and padding)."""
    rows = [(t.prompt_ids, t.chosen_ids) for t in group] + [(t.prompt_ids, t.rejected_ids) for t in group]
    T = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.int64)
    labels = torch.full((len(rows), T), -100, dtype=torch.int64)
    for r, (p, a) in enumerate(rows):
        input_ids[r, : len(p) + len(a)] = torch.tensor(p + a)
        labels[r, len(p): len(p) + len(a)] = torch.tensor(a)
    return input_ids, labels


def bench_naive(cfg: ModelConfig, args, device: torch.device, groups: list[list[TokenizedPair]]) -> dict:
    policy, reference, forward, kind = _naive_models(cfg, device, args.ac)
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(policy.parameters(), lr=5e-7, eps=1e-8, weight_decay=0.0)
    else:
        optimizer = torch.optim.RMSprop(policy.parameters(), lr=5e-7, alpha=0.99, eps=1e-8, weight_decay=0.0)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    beta = 0.1

    def seq_logps(model, input_ids, labels):
        logits = forward(model, input_ids)[:, :-1].float()
        labels = labels[:, 1:]
        mask = labels != -100
        logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (logp * mask).sum(-1)

    def run_step():
        for group in groups:
            input_ids, labels = (t.to(device, non_blocking=True) for t in padded_rows(group))
            P = len(group)
            with amp:
                pi = seq_logps(policy, input_ids, labels)
                with torch.no_grad():
                    ref = seq_logps(reference, input_ids, labels)
            z = beta * ((pi[:P] - ref[:P]) - (pi[P:] - ref[P:]))
            loss = torch.nn.functional.softplus(-z).mean() / args.accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = _time_steps(run_step, args.steps, args.warmup, device)
    result = {"impl": "naive", "baseline": kind, "params": sum(p.numel() for p in policy.parameters()),
              "activation_checkpointing": args.ac}
    del policy, reference, optimizer
    return result | {"times": times}


# ----------------------------------------------------------------------------- driver

def run_one(impl: str, shape: str, args, info: dist.DistInfo, hardware: dict) -> dict:
    device = info.device
    cfg = model_config(shape)
    T = args.prompt_len + args.response_len
    pairs = random_pairs(cfg, args.micro_batch * args.accum, args.prompt_len, args.response_len, seed=1)
    ref = {p.index: (-100.0 - p.index, -120.0 - p.index) for p in pairs}
    groups = [pairs[i: i + args.micro_batch] for i in range(0, len(pairs), args.micro_batch)]
    batches = [collate_pairs(group, ref_logps=ref) for group in groups]
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    record = {"bench": "train_step", "shape": shape, "impl": impl}
    try:
        out = bench_minispin(cfg, args, info, batches) if impl == "minispin" else bench_naive(cfg, args, device, groups)
    except torch.OutOfMemoryError as e:
        record.update(status="oom", error=str(e).split("\n")[0][:300], peak_mem_gb=peak_memory_gb(device))
        return record | hardware
    except Exception as e:  # noqa: BLE001
        if impl == "minispin":
            raise
        # The baseline depends on the installed transformers (API drift, attention backends): report its
        # failure and go on, rather than losing the remaining shapes of the run.
        record.update(status="error", error=f"{type(e).__name__}: {e}".split("\n")[0][:300])
        return record | hardware
    times = out.pop("times")
    step_time = statistics.median(times)
    rows = 2 * args.micro_batch * args.accum * info.world_size
    tokens = rows * T
    flops = step_flops(cfg, rows, T, args.response_len, frozen_base=bool(args.lora_r),
                       shared_prompt=args.prompt_len if impl == "minispin" else 0)
    record.update(out)
    if impl == "minispin":  # the reference pass runs once per iteration, over `epochs` passes of training
        ref_s = record.pop("reference_forward_s")
        record.update(reference_forward_s=ref_s, step_with_reference_1_epoch_s=step_time + ref_s,
                      step_per_iteration_s=step_time + ref_s / args.epochs, epochs=args.epochs,
                      memory_model_gib={k: round(v, 2) for k, v in memory_estimate(
                          cfg, train_config(args, device.type), world_size=info.world_size, seq_len=T,
                          response_len=args.response_len).items()})
    if impl == "minispin" and dist.is_main():
        print(f"# {shape} memory model {record['memory_model_gib']['total']:.1f} GiB "
              f"({', '.join(f'{k} {v}' for k, v in record['memory_model_gib'].items() if k != 'total')}); "
              f"measured peak {peak_memory_gb(device)} GiB", file=sys.stderr, flush=True)
    record.update(status="ok", seq_len=T, response_len=args.response_len, pairs_per_step=rows // 2,
                  micro_batch_pairs=args.micro_batch, accumulation=args.accum, world_size=info.world_size,
                  step_time_s=step_time, step_times_s=times, tokens_per_s=tokens / step_time,
                  model_tflops_per_step=flops / 1e12,
                  mfu=flops / step_time / (args.peak_flops * info.world_size),
                  mfu_vs_measured_matmul=flops / step_time / (hardware["measured_matmul_flops"] * info.world_size),
                  peak_mem_gb=peak_memory_gb(device))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record | hardware


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="1b,7b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 steps (checks the script runs)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--response-len", type=int, default=768)
    p.add_argument("--micro-batch", type=int, default=4, help="pairs per forward (2 rows each)")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--ac", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="activation checkpointing (both implementations; the public SPIN recipe uses it)")
    p.add_argument("--peak-flops", type=float, default=989e12, help="peak dense bf16 FLOP/s per GPU (H200: 989e12)")
    p.add_argument("--optimizer", default="rmsprop", choices=("rmsprop", "adamw"), help="both implementations")
    p.add_argument("--epochs", type=float, default=2, help="epochs per iteration, to amortise the reference pass "
                                                            "(the paper: 2)")
    p.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0: full fine-tuning); no naive baseline")
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.prompt_len, args.response_len = "tiny", 16, 48
        args.micro_batch, args.accum, args.steps, args.warmup = 2, 2, 2, 1
        device = "cpu"
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    info = dist.init_distributed(device, single_process_group=device == "cuda")
    dev = info.device
    hardware = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "peak_flops": args.peak_flops,
        "measured_matmul_flops": measured_matmul_flops(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32),
    }
    try:
        import triton
        hardware["triton"] = triton.__version__
    except ImportError:
        pass
    lines = []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        results = {}
        impls = ["minispin"] + ([] if args.no_baseline or info.world_size > 1 or args.lora_r else ["naive"])
        for impl in impls:
            rec = run_one(impl, shape, args, info, hardware)
            results[impl] = rec
            lines.append(rec)
            if dist.is_main():
                print(json.dumps(rec), flush=True)
        a, b = results.get("minispin"), results.get("naive")
        if a and b:
            ratio = {"bench": "train_step_ratio", "shape": shape, "device": hardware["device"]}
            if a["status"] == b["status"] == "ok":
                # the step alone gives minispin its reference log-probs for free (the naive step runs a
                # reference model every micro-step): also the step with the reference pass counted, for one
                # epoch and amortised over the configured epochs (the whole job, per step)
                ratio.update(tokens_per_s_ratio=a["tokens_per_s"] / b["tokens_per_s"],
                             speedup_with_reference_1_epoch=b["step_time_s"] / a["step_with_reference_1_epoch_s"],
                             speedup_per_iteration=b["step_time_s"] / a["step_per_iteration_s"], epochs=args.epochs,
                             peak_mem_ratio=(b["peak_mem_gb"] / a["peak_mem_gb"]) if a["peak_mem_gb"] else None)
            else:
                ratio.update(minispin=a["status"], naive=b["status"])
            lines.append(ratio)
            if dist.is_main():
                print(json.dumps(ratio), flush=True)
    if args.out and dist.is_main():
        with open(args.out, "a") as f:
            for rec in lines:
                f.write(json.dumps(rec) + "\n")
    dist.shutdown(info)


if __name__ == "__main__":
    main()
