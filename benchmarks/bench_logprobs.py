"""Benchmark: per-token log-probs from the LM head, forward + backward (minispin.kernels.linear_logprobs).

Methods, each giving log p(label) for N tokens and gradients for hidden [N, H] and weight [V, H]:
  naive         the public SPIN/TRL path: logits = h @ W.T, .float(), log_softmax, gather, mask
  compiled      torch.compile of a chunked torch version (rows in chunks, checkpointed per chunk)
  torch_lce     torch.nn.functional.linear_cross_entropy, chunked options (torch >= 2.13 only)
  liger         Liger-Kernel's fused linear cross-entropy (when installed)
  trl           TRL's chunked log-prob kernel (trl.kernels.ChunkedLogProbFunction, TRL >= 1.16, when
                installed), called as TRL's trainers call it: labelled tokens only, TRL's chunk size
  minispin      minispin.kernels.linear_logprobs
Reported per method: fwd+bwd and forward-only time, peak extra memory, TFLOP/s counting 6NHV
(forward 2NHV), % of the measured bf16 matmul rate, speed and memory ratios vs naive, and the error
of log-probs / gradients vs naive. One JSON line per (shape, method) on stdout.

  python benchmarks/bench_logprobs.py            # full: N in {4096, 16384}, H 4096, V in {32000, 128256}, bf16
  python benchmarks/bench_logprobs.py --smoke    # seconds, fp32, tiny shapes, CPU is fine
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402

from minispin.kernels import linear_logprobs  # noqa: E402

IGNORE = -100
FULL_SHAPES = [(4096, 4096, 32000), (4096, 4096, 128256), (16384, 4096, 32000), (16384, 4096, 128256)]
SMOKE_SHAPES = [(50, 24, 257)]
METHODS = ["naive", "compiled", "torch_lce", "liger", "trl", "minispin"]


# ------------------------------------------------------------------------------------------------
# Methods: each maps (hidden, weight, labels) -> (per-token log-probs [N] float32, upstream note)
# ------------------------------------------------------------------------------------------------
def naive_logps(hidden, weight, labels):
    logits = hidden @ weight.t()
    logp = logits.float().log_softmax(-1)
    valid = labels != IGNORE
    return logp.gather(-1, torch.where(valid, labels, 0)[:, None]).squeeze(-1) * valid


def _chunk_logps(hidden, weight, labels):
    logits = (hidden @ weight.t()).float()
    valid = labels != IGNORE
    picked = logits.gather(-1, torch.where(valid, labels, 0)[:, None]).squeeze(-1)
    return (picked - torch.logsumexp(logits, -1)) * valid


def make_compiled(device: torch.device, chunk_rows: int):
    backend = "inductor" if device.type == "cuda" else "eager"  # eager: no C++ toolchain needed on CPU
    # Dynamo caches graphs per code object and guards on shapes and grad mode: every shape here adds up to
    # 4 entries (full + last chunk, grad and no-grad), and past the recompile limit (8) it silently runs
    # eager, so later shapes would be timed uncompiled. Start each shape from an empty cache.
    torch._dynamo.reset()
    compiled = torch.compile(_chunk_logps, backend=backend, dynamic=False)

    def run(hidden, weight, labels):
        parts = [checkpoint(compiled, hidden[i:i + chunk_rows], weight, labels[i:i + chunk_rows], use_reentrant=False)
                 for i in range(0, hidden.shape[0], chunk_rows)]
        return torch.cat(parts)
    return run


def make_torch_lce():
    if not hasattr(F, "linear_cross_entropy"):
        return None, "torch.nn.functional.linear_cross_entropy missing (needs torch >= 2.13)"
    options = torch.nn.LinearCrossEntropyOptions() if hasattr(torch.nn, "LinearCrossEntropyOptions") else None

    def run(hidden, weight, labels):
        return -F.linear_cross_entropy(hidden, weight, labels, reduction="none", ignore_index=IGNORE, options=options)
    return run, None


def make_liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as err:  # not installed, or an incompatible version
        return None, f"liger_kernel unavailable: {type(err).__name__}: {err}"

    def run(hidden, weight, labels):
        # Per-token values need reduction="none" (newer Liger); the caller falls back to "sum".
        return -liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="none")

    def run_sum(hidden, weight, labels):
        return -liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="sum")
    return (run, run_sum), None



def make_trl():
    try:
        from trl.kernels import ChunkedLogProbFunction
    except Exception as err:  # not installed, or a TRL without the kernel (< 1.16)
        return None, f"trl.kernels.ChunkedLogProbFunction unavailable: {type(err).__name__}: {err}"
    try:  # its backward imports trl.trainer.utils (pandas, accelerate, datasets, huggingface_hub)
        import trl.trainer.utils  # noqa: F401
    except Exception as err:
        return None, f"TRL's kernel cannot run its backward here: trl.trainer.utils: {type(err).__name__}: {err}"
    chunk = getattr(trl.trainer.utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)  # its trainers' vocabulary tile

    def run(hidden, weight, labels):
        # as TRL's fused LM head calls it: the labelled tokens only, no bias, temperature 1, no extra outputs
        valid = labels != IGNORE
        out = ChunkedLogProbFunction.apply(hidden[valid], weight, None, labels[valid], 1.0, chunk, None, 1.0, ())
        return out[0].new_zeros(labels.shape).masked_scatter(valid, out[0])
    return run, None


# ------------------------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def bench_shape(N, H, V, dtype, device, methods, warmup, repeats, mm_rate, chunk_rows):
    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(N, H, generator=gen) * 1.0).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * H ** -0.5 * 2).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.rand(N, generator=gen) < 0.1] = IGNORE  # prompt / padding tokens
    labels = labels.to(device)
    token_w = torch.randn(N, generator=gen).to(device)  # per-token upstream gradient (pair-loss like)
    flops_fb, flops_f = 6.0 * N * H * V, 2.0 * N * H * V

    impls, unavailable = {}, {}
    for name in methods:
        if name == "naive":
            impls[name] = (naive_logps, "per-token")
        elif name == "compiled":
            impls[name] = (make_compiled(device, chunk_rows), "per-token")
        elif name == "torch_lce":
            fn, why = make_torch_lce()
            impls[name] = (fn, "per-token") if fn else None
            unavailable[name] = why
        elif name == "trl":
            fn, why = make_trl()
            impls[name] = (fn, "per-token") if fn else None
            unavailable[name] = why
        elif name == "liger":
            fns, why = make_liger()
            impls[name] = (fns, "per-token") if fns else None
            unavailable[name] = why
        elif name == "minispin":
            impls[name] = (linear_logprobs, "per-token")

    reference = None  # naive results for the error columns
    results = {}
    for name in methods:
        record = {"bench": "logprobs", "method": name, "N": N, "H": H, "V": V,
                  "dtype": str(dtype).replace("torch.", ""), "device": device.type}
        if impls.get(name) is None:
            record.update(status="skipped", reason=unavailable.get(name, "unknown method"))
            common.emit(record)
            common.note(f"  {name:10s} skipped: {record['reason']}")
            continue
        fn, upstream = impls[name]
        try:
            if name == "liger":  # probe reduction="none", else fall back to a uniform upstream gradient
                run_none, run_sum = fn
                try:
                    run_none(hidden[:8], weight, labels[:8]).float().sum()
                    fn = run_none
                except Exception:
                    fn, upstream = run_sum, "uniform (reduction='sum')"

            def step(fn=fn, upstream=upstream):
                out = fn(hidden, weight, labels)
                loss = (out.float() * token_w).sum() if upstream == "per-token" else out.float().sum()
                return torch.autograd.grad(loss, (hidden, weight))

            def forward_only(fn=fn):
                with torch.no_grad():
                    return fn(hidden, weight, labels)

            grads = step()  # warm-up / autotune / compile, and the error columns
            with torch.no_grad():
                out = fn(hidden, weight, labels).float()
            if name == "naive":
                reference = (out, grads)
            elif reference is not None and upstream == "per-token":
                record.update(err_logps_vs_naive=(out - reference[0]).abs().max().item(),
                              rel_err_dhidden_vs_naive=_rel(grads[0], reference[1][0]),
                              rel_err_dweight_vs_naive=_rel(grads[1], reference[1][1]))
            del grads, out
            t_fb = common.time_fn(step, device, warmup, repeats)
            t_f = common.time_fn(forward_only, device, warmup, repeats)
            mem = common.peak_memory_bytes(step, device)
            mem_f = common.peak_memory_bytes(forward_only, device)
            record.update(status="ok", upstream=upstream, ms_fwd_bwd=t_fb["ms"], ms_fwd=t_f["ms"],
                          peak_mem_bytes=mem, peak_mem_fwd_bytes=mem_f,
                          tflops_fwd_bwd=flops_fb / (t_fb["ms"] * 1e-3) / 1e12,
                          tflops_fwd=flops_f / (t_f["ms"] * 1e-3) / 1e12,
                          matmul_tflops=mm_rate)
            record["pct_of_matmul_fwd_bwd"] = 100.0 * record["tflops_fwd_bwd"] / mm_rate
            record["pct_of_matmul_fwd"] = 100.0 * record["tflops_fwd"] / mm_rate
            results[name] = record
        except Exception as err:
            record.update(status="oom" if common.is_oom(err) else "error", reason=f"{type(err).__name__}: {err}"[:500])
        common.free_memory(device)
        if record["status"] == "ok" and "naive" in results:
            base = results["naive"]
            record.update(speedup_fwd_bwd_vs_naive=common.ratio(base["ms_fwd_bwd"], record["ms_fwd_bwd"]),
                          speedup_fwd_vs_naive=common.ratio(base["ms_fwd"], record["ms_fwd"]),
                          mem_ratio_vs_naive=common.ratio(record["peak_mem_bytes"], base["peak_mem_bytes"]),
                          mem_fwd_ratio_vs_naive=common.ratio(record["peak_mem_fwd_bytes"], base["peak_mem_fwd_bytes"]))
        common.emit(record)
        if record["status"] == "ok":
            speed = record.get("speedup_fwd_bwd_vs_naive")
            memr = record.get("mem_ratio_vs_naive")
            common.note(f"  {name:10s} fwd+bwd {record['ms_fwd_bwd']:9.2f} ms  fwd {record['ms_fwd']:8.2f} ms  "
                        f"{record['tflops_fwd_bwd']:7.3g} TFLOP/s ({record['pct_of_matmul_fwd_bwd']:5.1f}% of mm)  "
                        f"mem {common.fmt_bytes(record['peak_mem_bytes'])}"
                        + (f"  x{speed:.2f} speed" if speed else "") + (f"  x{memr:.3f} mem" if memr else "")
                        + f"  vs naive")
        else:
            common.note(f"  {name:10s} {record['status']}: {record.get('reason', '')[:200]}")
    del hidden, weight
    common.free_memory(device)
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {METHODS}")
    parser.add_argument("--shapes", default=None, help="comma list of NxHxV, e.g. 16384x4096x32000")
    parser.add_argument("--chunk-rows", type=int, default=None, help="rows per chunk of the compiled baseline")
    args = parser.parse_args(argv)
    common.set_json_out(args.json_out)
    device = common.resolve_device(args.device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = SMOKE_SHAPES if args.smoke else FULL_SHAPES
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 10)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    if "naive" in methods:
        methods.remove("naive")
        methods.insert(0, "naive")  # the baseline runs first: ratios are relative to it

    common.emit({"bench": "logprobs", "kind": "env", **common.env_info(device), "smoke": args.smoke})
    mm_square = 8192 if not args.smoke else 128
    square_rate = common.matmul_tflops(mm_square, mm_square, mm_square, dtype, device, warmup, repeats)
    common.emit({"bench": "logprobs", "kind": "matmul", "shape": [mm_square] * 3, "dtype": str(dtype),
                 "tflops": square_rate})
    common.note(f"matmul {mm_square}^3 {dtype}: {square_rate:.4g} TFLOP/s")
    all_results = []
    for N, H, V in shapes:
        mm_rate = common.matmul_tflops(N, H, V, dtype, device, warmup, repeats)  # the logits GEMM's shape
        common.emit({"bench": "logprobs", "kind": "matmul", "shape": [N, H, V], "dtype": str(dtype), "tflops": mm_rate})
        common.note(f"N={N} H={H} V={V} {dtype}: torch.mm [N,H]@[H,V] {mm_rate:.4g} TFLOP/s")
        chunk_rows = args.chunk_rows or max(1, min(N, (1 << 27) // V))  # ~0.5 GiB of fp32 logits per chunk
        results = bench_shape(N, H, V, dtype, device, methods, warmup, repeats, mm_rate, chunk_rows)
        all_results.extend(results.values())
    return all_results


if __name__ == "__main__":
    main()
