"""Benchmark: the pairwise SPIN/DPO loss from per-token log-probs (minispin.kernels.sequence_logps, then
minispin.training.pair_loss on the per-sequence sums).

Two parts, forward + backward each:
  loss     per-sequence sums + pair loss alone, from token_logps [N] (2P sequences of N/(2P) tokens):
           naive = the public trainer's masked [2P, T] sum then logsigmoid, vs minispin's.
  e2e      the whole SPIN head step: hidden [N, H] -> LM head -> per-token log-probs -> pair loss.
           naive = logits, fp32 log_softmax, gather, masked sums, loss (what the trainers run), vs
           minispin = linear_logprobs + sequence_logps + pair_loss. TFLOP/s count 6NHV; the bf16 matmul rate of
           [N, H] @ [H, V] is measured in the same run.
One JSON line per (part, shape, method) on stdout; ratios are vs naive.

  python benchmarks/bench_pair_loss.py            # full, GPU, bf16 head
  python benchmarks/bench_pair_loss.py --smoke    # seconds, fp32, tiny shapes, CPU is fine
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as common  # noqa: E402
from bench_logprobs import naive_logps  # noqa: E402

from minispin.kernels import linear_logprobs, sequence_logps  # noqa: E402
from minispin.training import pair_loss  # noqa: E402

IGNORE = -100
FULL_LOSS_SHAPES = [(4096, 8), (16384, 8), (16384, 64)]  # (tokens N, pairs P)
SMOKE_LOSS_SHAPES = [(256, 4)]
FULL_E2E_SHAPES = [(4096, 4096, 32000, 8), (16384, 4096, 32000, 8), (16384, 4096, 128256, 8)]  # N, H, V, P
SMOKE_E2E_SHAPES = [(64, 24, 257, 2)]


def make_batch(N: int, P: int, device, gen):
    """seq_index for 2P sequences of T = N // (2P) tokens laid out as the trainer's [2P, T] rows:
    a prompt part and right padding are -1. Returns (seq_index [N], mask [2P, T] bool)."""
    T = N // (2 * P)
    pos = torch.arange(T)[None, :]
    prompt = torch.randint(T // 8, T // 3 + 1, (2 * P, 1), generator=gen)
    length = torch.randint(T // 2, T + 1, (2 * P, 1), generator=gen)
    mask = (pos >= prompt) & (pos < length)
    seq = torch.where(mask, torch.arange(2 * P)[:, None], -1).reshape(-1)
    return seq.to(device), mask.to(device)


def naive_pair_loss(token_logps_2d, mask, ref, beta, loss):
    """The public trainers: masked per-sequence sums of a [2B, T] tensor, then the loss."""
    sums = (token_logps_2d * mask).sum(-1)
    P = sums.shape[0] // 2
    ratios = sums - ref
    if loss == "sppo":
        raise ValueError("naive sppo is not part of this benchmark")
    z = beta * (ratios[:P] - ratios[P:])
    return -F.logsigmoid(z).mean()


def minispin_pair_loss(token_logps, seq, ref, beta):
    """minispin's loss: fused per-sequence sums, then the sigmoid pair loss on them."""
    return pair_loss(sequence_logps(token_logps, seq, ref.shape[0], check_values=False), ref, beta,
                     check_values=False)


def _run_methods(part, shape_fields, methods, device, warmup, repeats, flops=None, mm_rate=None):
    results = {}
    for name, step, forward_only in methods:
        record = {"bench": "pair_loss", "part": part, "method": name, **shape_fields, "device": device.type}
        try:
            step()
            t_fb = common.time_fn(step, device, warmup, repeats)
            t_f = common.time_fn(forward_only, device, warmup, repeats)
            record.update(status="ok", ms_fwd_bwd=t_fb["ms"], ms_fwd=t_f["ms"],
                          peak_mem_bytes=common.peak_memory_bytes(step, device),
                          peak_mem_fwd_bytes=common.peak_memory_bytes(forward_only, device))
            if flops is not None:
                record["tflops_fwd_bwd"] = flops / (t_fb["ms"] * 1e-3) / 1e12
                record["matmul_tflops"] = mm_rate
                record["pct_of_matmul_fwd_bwd"] = 100.0 * record["tflops_fwd_bwd"] / mm_rate
            if "naive" in results:
                base = results["naive"]
                record.update(speedup_fwd_bwd_vs_naive=common.ratio(base["ms_fwd_bwd"], record["ms_fwd_bwd"]),
                              speedup_fwd_vs_naive=common.ratio(base["ms_fwd"], record["ms_fwd"]),
                              mem_ratio_vs_naive=common.ratio(record["peak_mem_bytes"], base["peak_mem_bytes"]))
            results[name] = record
        except Exception as err:
            record.update(status="oom" if common.is_oom(err) else "error", reason=f"{type(err).__name__}: {err}"[:500])
        common.free_memory(device)
        common.emit(record)
        if record["status"] == "ok":
            extra = (f"  {record['tflops_fwd_bwd']:.3g} TFLOP/s ({record['pct_of_matmul_fwd_bwd']:.1f}% of mm)"
                     if flops else "")
            speed = record.get("speedup_fwd_bwd_vs_naive")
            memr = record.get("mem_ratio_vs_naive")
            common.note(f"  {part:4s} {name:9s} fwd+bwd {record['ms_fwd_bwd']:9.3f} ms  fwd {record['ms_fwd']:8.3f} ms"
                        f"{extra}  mem {common.fmt_bytes(record['peak_mem_bytes'])}"
                        + (f"  x{speed:.2f} speed" if speed else "") + (f"  x{memr:.3f} mem" if memr else ""))
        else:
            common.note(f"  {part:4s} {name:9s} {record['status']}: {record.get('reason', '')[:200]}")
    return results


def bench_loss(N, P, device, warmup, repeats, beta, gen):
    seq, mask = make_batch(N, P, device, gen)
    token_logps = (-torch.rand(N, generator=gen) * 4).to(device).requires_grad_()
    with torch.no_grad():
        sums = torch.zeros(2 * P, device=device).index_add(0, seq[seq >= 0], token_logps[seq >= 0])
    ref = (sums + torch.randn(2 * P, generator=gen).to(device)).detach()
    tok2d = token_logps.view(2 * P, N // (2 * P))

    def naive_step():
        return torch.autograd.grad(naive_pair_loss(tok2d, mask, ref, beta, "sigmoid"), token_logps)

    def naive_fwd():
        with torch.no_grad():
            return naive_pair_loss(tok2d, mask, ref, beta, "sigmoid")

    def ours_step():
        return torch.autograd.grad(minispin_pair_loss(token_logps, seq, ref, beta), token_logps)

    def ours_fwd():
        with torch.no_grad():
            return minispin_pair_loss(token_logps, seq, ref, beta)

    # correctness vs naive, reported once
    g_naive, g_ours = naive_step()[0], ours_step()[0]
    common.emit({"bench": "pair_loss", "part": "loss", "kind": "check", "N": N, "P": P,
                 "loss_abs_diff": abs(naive_fwd().item() - ours_fwd().item()),
                 "grad_max_abs_diff": (g_naive - g_ours).abs().max().item()})
    methods = [("naive", naive_step, naive_fwd), ("minispin", ours_step, ours_fwd)]
    return _run_methods("loss", {"N": N, "P": P}, methods, device, warmup, repeats)


def bench_e2e(N, H, V, P, dtype, device, warmup, repeats, beta, gen, mm_rate):
    seq, mask = make_batch(N, P, device, gen)
    hidden = torch.randn(N, H, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * H ** -0.5 * 2).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen).to(device)
    labels = torch.where(seq >= 0, labels, IGNORE)
    ref = (-torch.rand(2 * P, generator=gen) * 50 - 100).to(device)
    mask2d = mask

    def naive_loss():
        logps = naive_logps(hidden, weight, labels).view(2 * P, N // (2 * P))
        return naive_pair_loss(logps, mask2d, ref, beta, "sigmoid")

    def ours_loss():
        return minispin_pair_loss(linear_logprobs(hidden, weight, labels, check_labels=False), seq, ref, beta)

    def make_step(loss_fn):
        def step():
            return torch.autograd.grad(loss_fn(), (hidden, weight))
        return step

    def make_fwd(loss_fn):
        def fwd():
            with torch.no_grad():
                return loss_fn()
        return fwd

    methods = [("naive", make_step(naive_loss), make_fwd(naive_loss)),
               ("minispin", make_step(ours_loss), make_fwd(ours_loss))]
    out = _run_methods("e2e", {"N": N, "H": H, "V": V, "P": P, "dtype": str(dtype).replace("torch.", "")},
                       methods, device, warmup, repeats, flops=6.0 * N * H * V, mm_rate=mm_rate)
    del hidden, weight
    common.free_memory(device)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--parts", default="loss,e2e", help="comma list from loss,e2e")
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args(argv)
    common.set_json_out(args.json_out)
    device = common.resolve_device(args.device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    repeats = args.repeats if args.repeats is not None else (2 if args.smoke else 20)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    gen = torch.Generator().manual_seed(0)
    common.emit({"bench": "pair_loss", "kind": "env", **common.env_info(device), "smoke": args.smoke})
    results = []
    if "loss" in parts:
        for N, P in (SMOKE_LOSS_SHAPES if args.smoke else FULL_LOSS_SHAPES):
            common.note(f"pair loss alone: N={N} tokens, P={P} pairs")
            results.extend(bench_loss(N, P, device, warmup, repeats, args.beta, gen).values())
    if "e2e" in parts:
        for N, H, V, P in (SMOKE_E2E_SHAPES if args.smoke else FULL_E2E_SHAPES):
            mm_rate = common.matmul_tflops(N, H, V, dtype, device, warmup, repeats)
            common.emit({"bench": "pair_loss", "kind": "matmul", "shape": [N, H, V], "dtype": str(dtype),
                         "tflops": mm_rate})
            common.note(f"head + loss: N={N} H={H} V={V} P={P} {dtype}; torch.mm [N,H]@[H,V] {mm_rate:.4g} TFLOP/s")
            results.extend(bench_e2e(N, H, V, P, dtype, device, warmup, repeats, args.beta, gen, mm_rate).values())
    return results


if __name__ == "__main__":
    main()
