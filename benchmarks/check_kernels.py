"""Check: the Triton kernels (compiled on a GPU) against CPU references, at odd shapes and past 2**31.

For each linear_logprobs case, inputs are drawn on the device, copied to the CPU, and the reference
(log-probs, d_hidden, d_weight) is computed there in float64 (float32 for the cases with 2**31+
elements, which float64 on the CPU would make slow); the Triton backend and the torch backend on the
device are both compared with it by max|a - b| / max|b|. The large cases have element offsets past
2**31 (N*H for hidden and d_hidden, V*H for weight and d_weight), which 32-bit index arithmetic would
corrupt. sequence_logps (the per-sequence sums and their gradient), and every pair loss on top of it, is
compared with float64 on the CPU. The tensors sit on the
last GPU (with 2+ GPUs not the current one: the kernels must launch on the data's device). Each case
prints a JSON line (errors, tolerance, the kernel configs' registers and spills); exit status 1 if
any case fails.

    python benchmarks/check_kernels.py                   # CUDA, full cases (~12 GB on the GPU)
    python benchmarks/check_kernels.py --smoke           # CUDA tiny cases; on CPU with TRITON_INTERPRET=1
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time

import torch

from minispin.kernels import linear_logprobs, linear_logprobs_reference, sequence_logps, sequence_logps_reference
from minispin.kernels.interpreter import interpreter_clash, kernels_interpreted
from minispin.training import LOSS_TYPES, LOSSES, pair_loss

llp = importlib.import_module("minispin.kernels.linear_logprobs")  # (the package attribute is the function)

# [N, H, V, dtype, tolerance vs the CPU reference]
FULL_LOGPROBS = [[1003, 4096, 32003, "bfloat16", 2e-2], [257, 1000, 5003, "float16", 2e-2],
                 [67, 96, 1003, "float32", 1e-5], [1, 64, 300, "bfloat16", 2e-2],
                 [(1 << 17) + 3, 16400, 256, "bfloat16", 2e-2],   # N * H > 2**31
                 [69, 16400, (1 << 17) + 17, "bfloat16", 2e-2]]   # V * H > 2**31
FULL_SEQUENCE_LOGPS = [[1, 40], [3, 1000], [40, 20000]]  # [pairs, tokens]
SMOKE_LOGPROBS = [[37, 40, 1003, "float32", 1e-5], [33, 64, 203, "bfloat16", 2e-2]]
SMOKE_SEQUENCE_LOGPS = [[3, 100]]
FLOAT64_LIMIT = 1 << 28  # reference in float64 up to this many N*H*V multiply-adds, else float32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| on the CPU, in pieces (the large cases hold 2**31 elements)."""
    a, b = a.detach().cpu(), b.detach().cpu()
    assert bool(torch.isfinite(a).all()), "non-finite values"
    pieces = list(zip(a.reshape(-1).split(1 << 24), b.reshape(-1).split(1 << 24)))
    num = max((x.double() - y.double()).abs().max().item() for x, y in pieces)
    return num / max(max(y.double().abs().max().item() for _, y in pieces), 1e-30)


def _record_launches():
    """Wrap the kernels' launch helper to record each compiled config's registers and spills."""
    seen = {}
    launch = llp._launch_compiled

    def recording(kernel, grid_of, args, N, H, dtype, precision):
        compiled = launch(kernel, grid_of, args, N, H, dtype, precision)
        key = f"{kernel}/{str(dtype).replace('torch.', '')}/{llp.kernel_config(kernel, N, dtype)}"
        seen[key] = {"n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None)}
        return compiled
    llp._launch_compiled = recording
    return seen


def check_logprobs(N, H, V, dtype_name, tol, device, g) -> dict:
    dtype = getattr(torch, dtype_name)
    hidden = torch.randn(N, H, device=device, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=device, generator=g) * H ** -0.5).to(dtype)
    labels = torch.randint(0, V, (N,), device=device, generator=g)
    labels[0], labels[-1], labels[1::7] = 0, V - 1, -100
    grad = torch.randn(N, device=device, generator=g)
    compute = torch.float64 if N * H * V <= FLOAT64_LIMIT else torch.float32
    t0 = time.perf_counter()
    h_ref = hidden.cpu().to(compute).requires_grad_()
    w_ref = weight.cpu().to(compute).requires_grad_()
    out_ref = linear_logprobs_reference(h_ref, w_ref, labels.cpu())
    ref = (out_ref.detach(), *torch.autograd.grad(out_ref, (h_ref, w_ref), grad.cpu().to(compute)))
    del h_ref, w_ref, out_ref
    ref_seconds = time.perf_counter() - t0
    record = {"check": "linear_logprobs", "N": N, "H": H, "V": V, "dtype": dtype_name, "tol": tol,
              "reference": f"cpu {str(compute).replace('torch.', '')}", "reference_s": round(ref_seconds, 1)}
    ok = True
    for backend in ("triton", "torch"):
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        out = linear_logprobs(h, w, labels, backend=backend)
        got = (out.detach(), *torch.autograd.grad(out, (h, w), grad))
        del h, w, out
        errs = [rel(a, b) for a, b in zip(got, ref)]
        masked_zero = bool((got[0][1::7] == 0).all()) and bool((got[1][1::7] == 0).all())
        dtypes_ok = got[1].dtype == got[2].dtype == dtype
        record[backend] = {"err_logps": errs[0], "err_dhidden": errs[1], "err_dweight": errs[2],
                           "masked_rows_zero": masked_zero, "grad_dtypes_ok": dtypes_ok}
        ok = ok and max(errs) <= tol and masked_zero and dtypes_ok
        del got
    record["status"] = "ok" if ok else "failed"
    return record


def check_sequence_logps(P, N, device, g) -> dict:
    """The sums and their gradient for a random upstream, then each pair loss on them (value and token
    gradient), against the same composition in float64 on the CPU."""
    tok = -torch.rand(N, device=device, generator=g) * 3
    seq = torch.randint(-1, 2 * P, (N,), device=device, generator=g)
    ref = torch.randn(2 * P, device=device, generator=g) * 5 - 20
    targets = torch.rand(2 * P, device=device, generator=g)
    upstream = torch.randn(2 * P, device=device, generator=g)
    record = {"check": "sequence_logps", "P": P, "N": N, "tol": 1e-5, "reference": "cpu float64"}
    x, x64 = tok.clone().requires_grad_(), tok.cpu().double().requires_grad_()
    s1, s2 = sequence_logps(x, seq, 2 * P, backend="triton"), sequence_logps_reference(x64, seq.cpu(), 2 * P)
    (g1,), (g2,) = torch.autograd.grad(s1, x, upstream), torch.autograd.grad(s2, x64, upstream.cpu().double())
    record["sums"] = [rel(s1, s2), rel(g1, g2)]
    for loss in LOSS_TYPES:
        beta = 0.001 if loss == "sppo" else 0.1
        kw, kw64 = ({"targets": targets}, {"targets": targets.cpu().double()}) if LOSSES[loss].targets else ({}, {})
        x, x64 = tok.clone().requires_grad_(), tok.cpu().double().requires_grad_()
        l1 = pair_loss(sequence_logps(x, seq, 2 * P, backend="triton"), ref, beta, loss, **kw)
        l2 = pair_loss(sequence_logps_reference(x64, seq.cpu(), 2 * P), ref.cpu().double(), beta, loss, **kw64)
        (g1,), (g2,) = torch.autograd.grad(l1, x), torch.autograd.grad(l2, x64)
        record[loss] = [rel(l1, l2), rel(g1, g2)]
    record["status"] = "ok" if max(max(v) for k, v in record.items() if isinstance(v, list)) <= 1e-5 else "failed"
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (compiled kernels) or cpu (Triton's interpreter)")
    parser.add_argument("--smoke", action="store_true", help="tiny cases only")
    parser.add_argument("--cases", default=None, help='JSON {"logprobs": [[N, H, V, dtype, tol], ...], '
                                                      '"sequence_logps": [[P, N], ...]} instead of the built-in cases')
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            print(json.dumps({"check": "setup", "status": "failed", "reason": "no CUDA device"}))
            return 1
        if kernels_interpreted():
            print(json.dumps({"check": "setup", "status": "failed",
                              "reason": "TRITON_INTERPRET is set: the kernels were built for the interpreter"}))
            return 1
        device = f"cuda:{torch.cuda.device_count() - 1}"
    else:
        if not kernels_interpreted():
            print(json.dumps({"check": "setup", "status": "failed",
                              "reason": "CPU checks run the kernels in Triton's interpreter: set TRITON_INTERPRET=1"}))
            return 1
        clash = interpreter_clash()
        if clash:
            print(json.dumps({"check": "setup", "status": "skipped", "reason": clash}))
            return 0
        device = "cpu"
    cases = {"logprobs": SMOKE_LOGPROBS if args.smoke else FULL_LOGPROBS,
             "sequence_logps": SMOKE_SEQUENCE_LOGPS if args.smoke else FULL_SEQUENCE_LOGPS}
    if args.cases:
        cases.update(json.loads(args.cases))
    launches = _record_launches()
    g = torch.Generator(device=device).manual_seed(0)
    failed = 0
    for case in cases["logprobs"]:
        record = check_logprobs(*case, device, g)
        failed += record["status"] != "ok"
        print(json.dumps(record), flush=True)
        if device != "cpu":
            torch.cuda.empty_cache()
    for case in cases["sequence_logps"]:
        record = check_sequence_logps(*case, device, g)
        failed += record["status"] != "ok"
        print(json.dumps(record), flush=True)
    print(json.dumps({"check": "kernel_configs", "device": device, "configs": launches}), flush=True)
    print(json.dumps({"check": "summary", "status": "failed" if failed else "ok", "failed": failed}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
