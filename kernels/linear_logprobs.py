"""Fused LM-head log-probs: log_softmax(hidden @ weight.T)[label] without an [N, V] logits tensor.

`linear_logprobs(hidden [N, H], weight [V, H], labels [N]) -> [N] float32` is what SPIN / DPO / SPPO
need from the LM head: the log-prob of each target token (0.0 where labels == ignore_index). The
public trainers materialise fp32 logits and their log-softmax ([N, V] each, several GB) for the
policy and again for the reference model; this file never does.

Design (H200, bf16, N=16384, H=4096, V=32000..128256; the problem is compute-bound at 6NHV FLOPs):

Forward - one Triton kernel + a tiny combine kernel.
  Each program computes one logits tile (BLOCK_N rows x 128 vocabulary columns) as a GEMM tile:
  tl.dot over H in BLOCK_H steps into an fp32 accumulator (wgmma on Hopper), launched in grouped
  order so the tiles in flight share hidden rows and weight rows in L2. Its epilogue reduces the
  tile to a per-row (max, sum-exp) pair and picks the label logit when the label falls in the tile;
  only these [V/128, N] partials reach memory (1/64 of fp32 logits at BLOCK_V = 128). The combine
  kernel merges them into the row's logsumexp, which is saved for the backward, so the backward needs
  no second reduction over V. One tile per program (rather than a loop over V inside a program) keeps
  the register footprint of a plain GEMM (no spills at 128x128, checked with ptxas for sm_90) and
  lets the launch order, not the program, decide L2 reuse. No atomics: deterministic.

Backward - one Triton kernel + two cuBLAS matmuls per vocabulary chunk.
  d_logits[n, v] = grad_out[n] * (onehot[n, v] - exp(logit[n, v] - lse[n])) needs no reduction once
  lse is known, so a plain GEMM tile (rows x vocab, full H loop) recomputes the logits in fp32 and
  writes d_logits for one vocabulary chunk of C columns in the input dtype (the [N, C] chunk, never
  [N, V]; C is chosen so the chunk is <= ~128 MiB). Then
      d_weight[chunk] = d_logits_chunk.T @ hidden     (one full reduction over N: fp32 inside the
                                                       GEMM, cast once to the weight dtype)
      d_hidden       += d_logits_chunk @ weight[chunk] (fp32 accumulator across chunks; each
                                                       chunk's product leaves cuBLAS in the input dtype)
  Why not the all-in-Triton alternatives: with H = 4096 neither gradient fits in registers while
  looping over the other dimension (a [128, 4096] fp32 accumulator is 2 MiB), so a "tile over (N, H),
  loop over V" kernel would recompute each logits tile H/BLOCK_H times; a single kernel with atomics
  into d_hidden and d_weight moves (N/BN)(V/BV)(BN+BV)H fp32 atomics (~130 GB at the target shape)
  and is non-deterministic. The chunked form costs one logits recompute (8NHV FLOPs in all), runs
  two thirds of the backward FLOPs in cuBLAS, is deterministic, and keeps the scratch at O(N x C).

CPU: with TRITON_INTERPRET=1 set before triton is imported, the same kernels run in Triton's
interpreter (tests); otherwise a chunked torch implementation (rows in chunks, logits recomputed in the
backward) keeps memory at O(chunk x V). `backend="triton" | "torch"` forces a path.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .launch import interpreted, on_device, pick_backend

__all__ = ["linear_logprobs", "linear_logprobs_reference"]

# Kernel-written buffers are allocated through this name so a test can swap in an allocator that
# fills them with NaN/garbage and thereby prove every element is written.
_empty = torch.empty

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Scratch budgets (elements). GPU backward: the [N, C] d_logits chunk; CPU torch path: [rows, V] fp32.
_GPU_CHUNK_ELEMS = 1 << 26  # 128 MiB in bf16
_GPU_MAX_CHUNK = 16384
_CPU_CHUNK_ELEMS = 1 << 23  # 32 MiB in fp32
# Interpreter tile sizes (small: the interpreter runs numpy per tile).
_INTERP_BLOCK_N, _INTERP_BLOCK_V, _INTERP_BLOCK_H = 32, 64, 32


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _grouped_tile(pid, num_pid_n, num_pid_v, GROUP_N: tl.constexpr):
    """(row block, vocab block) of program `pid` in grouped order: GROUP_N row blocks sweep the
    vocabulary together, so both operands' tiles are reused from L2."""
    pids_per_group = GROUP_N * num_pid_v
    first_n = (pid // pids_per_group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % pids_per_group) % group_size
    pid_v = (pid % pids_per_group) // group_size
    return pid_n, pid_v


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, H,
                 stride_hn, stride_hh, stride_wv, stride_wh,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """fp32 logits hidden[rows] @ weight[cols]^T for one [BLOCK_N, BLOCK_V] tile, looping over H."""
    offs_h = tl.arange(0, BLOCK_H)
    a_ptrs = hidden_ptr + rows[:, None] * stride_hn + offs_h[None, :] * stride_hh
    b_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_h[:, None] * stride_wh
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        if EVEN_H:
            a = tl.load(a_ptrs, mask=row_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=col_mask[None, :], other=0.0)
        else:
            h_mask = (h0 + offs_h) < H
            a = tl.load(a_ptrs, mask=row_mask[:, None] & h_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=h_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST_DOT:  # the Triton interpreter multiplies raw bf16 bits: compute in fp32
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_H * stride_hh
        b_ptrs += BLOCK_H * stride_wh
    return acc


@triton.jit
def _logprobs_forward_kernel(
    hidden_ptr, weight_ptr, labels_ptr,
    part_max_ptr, part_sum_ptr, label_logit_ptr,
    N, V, H, n_bucket,
    stride_hn, stride_hh, stride_wv, stride_wh,
    ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr = False,
):
    """One logits tile (BLOCK_N rows x BLOCK_V vocab): its row max, sum-exp and the label logit."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_n, pid_v = _grouped_tile(pid, num_pid_n, tl.cdiv(V, BLOCK_V), GROUP_N)

    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols < V
    acc = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, H,
                       stride_hn, stride_hh, stride_wv, stride_wh,
                       BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, DOT_PRECISION, UPCAST_DOT)

    labels = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    valid = row_mask & (labels != ignore_index)
    label_local = tl.where(valid, labels - pid_v * BLOCK_V, -1).to(tl.int32)  # int32 compare on the tile
    hit = tl.arange(0, BLOCK_V)[None, :] == label_local[:, None]
    label_logit = tl.sum(tl.where(hit, acc, 0.0), axis=1)
    logits = tl.where(col_mask[None, :], acc, float("-inf"))
    tile_max = tl.max(logits, axis=1)
    tile_sum = tl.sum(tl.exp(logits - tile_max[:, None]), axis=1)

    part_offs = pid_v.to(tl.int64) * N + rows
    tl.store(part_max_ptr + part_offs, tile_max, mask=row_mask)
    tl.store(part_sum_ptr + part_offs, tile_sum, mask=row_mask)
    # Exactly one program writes each row's label logit: the tile holding the label, or the first
    # vocabulary tile (with 0.0) for an ignored row. (Block-shaped test: the interpreter rejects
    # masks built from scalars.)
    first_tile = (tl.zeros([BLOCK_N], tl.int32) + pid_v) == 0
    owner = (valid & (label_local >= 0) & (label_local < BLOCK_V)) | ((labels == ignore_index) & first_tile)
    tl.store(label_logit_ptr + rows, label_logit, mask=row_mask & owner)


@triton.jit
def _logprobs_combine_kernel(
    part_max_ptr, part_sum_ptr, label_logit_ptr, labels_ptr, out_ptr, lse_ptr,
    N, num_tiles, ignore_index,
    BLOCK: tl.constexpr,
):
    """Fold the per-tile (max, sum-exp) into logsumexp; out = label_logit - lse (0 if ignored)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < N
    max_ptrs = part_max_ptr + rows  # 64-bit pointers stepped by N: no int32 tile * N products
    sum_ptrs = part_sum_ptr + rows
    row_max = tl.load(max_ptrs, mask=row_mask, other=0.0)
    total = tl.load(sum_ptrs, mask=row_mask, other=1.0)
    for _ in range(1, num_tiles):
        max_ptrs += N
        sum_ptrs += N
        m = tl.load(max_ptrs, mask=row_mask, other=0.0)
        s = tl.load(sum_ptrs, mask=row_mask, other=1.0)
        new_max = tl.maximum(row_max, m)
        total = total * tl.exp(row_max - new_max) + s * tl.exp(m - new_max)
        row_max = new_max
    lse = row_max + tl.log(total)
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    label_logit = tl.load(label_logit_ptr + rows, mask=row_mask, other=0.0)
    out = tl.where(labels != ignore_index, label_logit - lse, 0.0)
    tl.store(out_ptr + rows, out, mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)


@triton.jit
def _logprobs_backward_kernel(
    hidden_ptr, weight_ptr, labels_ptr, lse_ptr, grad_ptr, dlogits_ptr,
    N, H, n_bucket, v_start, chunk_width,
    stride_hn, stride_hh, stride_wv, stride_wh, stride_dn,
    ignore_index,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
    EVEN_H: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr = False,
):
    """d_logits[:, v_start:v_start+chunk_width] = grad * (onehot - softmax), logits recomputed."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_n, pid_v = _grouped_tile(pid, num_pid_n, tl.cdiv(chunk_width, BLOCK_V), GROUP_N)

    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols_local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = cols_local < chunk_width
    cols = v_start + cols_local
    acc = _logits_tile(hidden_ptr, weight_ptr, rows, cols, row_mask, col_mask, H,
                       stride_hn, stride_hh, stride_wv, stride_wh,
                       BLOCK_N, BLOCK_V, BLOCK_H, EVEN_H, DOT_PRECISION, UPCAST_DOT)

    labels = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    valid = row_mask & (labels != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.load(grad_ptr + rows, mask=row_mask, other=0.0)
    grad = tl.where(valid, grad, 0.0)
    prob = tl.exp(acc - lse[:, None])
    label_local = tl.where(valid, labels - v_start - pid_v * BLOCK_V, -1).to(tl.int32)
    onehot = tl.where(tl.arange(0, BLOCK_V)[None, :] == label_local[:, None], 1.0, 0.0)
    dlogits = grad[:, None] * (onehot - prob)
    d_ptrs = dlogits_ptr + rows[:, None] * stride_dn + cols_local[None, :]
    tl.store(d_ptrs, dlogits.to(dlogits_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# Kernel configs: chosen by a fixed rule, not by Triton's autotuner. The autotuner times candidates in
# each new process and may pick another config (another reduction order) in a resumed run, which would
# break the bit-identical resume of a reference pass on GPU. The rule (`kernel_config`) is a pure
# function of (kernel, dtype, row class):
#   16-bit inputs, N > 64 rows   128 x 128 tiles, BLOCK_H 64, 8 warps, 4 stages (wgmma on Hopper; the
#                                plain GEMM tile; benchmarks/gpu_check.sh records its registers/spills)
#   16-bit inputs, N <= 64 rows  64 x 128 tiles, BLOCK_H 64, 4 warps, 3 stages (no wasted row half)
#   fp32 inputs                  64 x 128 tiles, BLOCK_H 32, 4 warps, 3 stages (fits shared memory)
# The forward's per-tile partials are laid out in BLOCK_V-wide vocabulary tiles, so every forward
# config has BLOCK_V = _FORWARD_BLOCK_V. MINISPIN_AUTOTUNE=1 (read at launch) lets Triton's autotuner
# choose among _TUNING_CONFIGS instead: for benchmarking candidate rules only, never for runs that resume.
_FORWARD_BLOCK_V = 128
_LARGE_16BIT = triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=4)
_SMALL_16BIT = triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=4, num_stages=3)
_FP32 = triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_H": 32, "GROUP_N": 8}, num_warps=4, num_stages=3)
_TUNING_CONFIGS = {
    "forward": [
        _LARGE_16BIT, _SMALL_16BIT, _FP32,
        triton.Config({"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 128, "GROUP_N": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=4, num_stages=4),
    ],
    "backward": [
        _LARGE_16BIT, _SMALL_16BIT, _FP32,
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_H": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_H": 128, "GROUP_N": 8}, num_warps=8, num_stages=3),
    ],
}
_AUTOTUNERS: dict[str, object] = {}


def kernel_config(kernel: str, n_rows: int, dtype: torch.dtype) -> triton.Config:
    """The config the `kernel` ("forward" | "backward") launches with for n_rows rows of `dtype` inputs
    (the fixed rule above): a pure function of its arguments, so every process picks the same one."""
    if kernel not in ("forward", "backward"):
        raise ValueError(f"kernel_config: kernel must be 'forward' or 'backward', got {kernel!r}")
    if dtype == torch.float32:
        return _FP32
    return _SMALL_16BIT if n_rows <= 64 else _LARGE_16BIT


def _autotune_requested() -> bool:
    return os.environ.get("MINISPIN_AUTOTUNE", "0") not in ("", "0")


def _autotuned(kernel: str):
    """Triton's autotuner over _TUNING_CONFIGS (MINISPIN_AUTOTUNE=1 only; created on first use)."""
    if kernel not in _AUTOTUNERS:
        fn = _logprobs_forward_kernel if kernel == "forward" else _logprobs_backward_kernel
        configs = [c for c in _TUNING_CONFIGS[kernel]
                   if kernel == "backward" or c.kwargs["BLOCK_V"] == _FORWARD_BLOCK_V]
        key = ["n_bucket", "V", "H"] if kernel == "forward" else ["n_bucket", "H"]
        _AUTOTUNERS[kernel] = triton.autotune(configs, key=key)(
            triton.heuristics({"EVEN_H": lambda args: args["H"] % args["BLOCK_H"] == 0})(fn))
    return _AUTOTUNERS[kernel]


def _launch_compiled(kernel: str, grid_of, args, N: int, H: int, dtype: torch.dtype, precision: str):
    """Launch the compiled forward/backward kernel with the rule's config (or the autotuner's, on request);
    returns what Triton's launch returns (the compiled kernel: registers, spills)."""
    if _autotune_requested():
        return _autotuned(kernel)[lambda meta: grid_of(meta["BLOCK_N"], meta["BLOCK_V"])](
            *args, DOT_PRECISION=precision)
    cfg = kernel_config(kernel, N, dtype)
    fn = _logprobs_forward_kernel if kernel == "forward" else _logprobs_backward_kernel
    meta = cfg.kwargs
    return fn[grid_of(meta["BLOCK_N"], meta["BLOCK_V"])](
        *args, **meta, EVEN_H=H % meta["BLOCK_H"] == 0, DOT_PRECISION=precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ----------------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------------
def _use_interpreter(device: torch.device) -> bool:
    return device.type != "cuda" or _kernels_interpreted()


def _kernels_interpreted() -> bool:
    """This file's kernels were built for Triton's CPU interpreter (see launch.interpreted)."""
    return interpreted(_logprobs_forward_kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _forward_triton(hidden, weight, labels, ignore_index):
    """Returns (logps [N] fp32, lse [N] fp32)."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    interp = _use_interpreter(device)
    block_v = _INTERP_BLOCK_V if interp else _FORWARD_BLOCK_V
    num_tiles = triton.cdiv(V, block_v)
    part_max = _empty((num_tiles, N), dtype=torch.float32, device=device)
    part_sum = _empty((num_tiles, N), dtype=torch.float32, device=device)
    label_logit = _empty((N,), dtype=torch.float32, device=device)
    args = (hidden, weight, labels, part_max, part_sum, label_logit,
            N, V, H, triton.next_power_of_2(N),
            hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            ignore_index)
    precision = _dot_precision(hidden.dtype)
    if interp:
        grid = (triton.cdiv(N, _INTERP_BLOCK_N) * num_tiles,)
        _logprobs_forward_kernel[grid](
            *args, BLOCK_N=_INTERP_BLOCK_N, BLOCK_V=block_v, BLOCK_H=_INTERP_BLOCK_H, GROUP_N=2,
            EVEN_H=H % _INTERP_BLOCK_H == 0, DOT_PRECISION=precision, UPCAST_DOT=True)
    else:
        _launch_compiled("forward", lambda block_n, block_v: (triton.cdiv(N, block_n) * num_tiles,),
                         args, N, H, hidden.dtype, precision)
    logps = _empty((N,), dtype=torch.float32, device=device)
    lse = _empty((N,), dtype=torch.float32, device=device)
    block = 64 if interp else 512
    _logprobs_combine_kernel[(triton.cdiv(N, block),)](
        part_max, part_sum, label_logit, labels, logps, lse, N, num_tiles, ignore_index, BLOCK=block)
    return logps, lse


def _gpu_chunk_width(n_rows: int, vocab: int) -> int:
    width = max(256, (_GPU_CHUNK_ELEMS // max(n_rows, 1)) // 256 * 256)
    return min(width, _GPU_MAX_CHUNK, vocab)


def _backward_triton(hidden, weight, labels, lse, grad_out, ignore_index, need_dh, need_dw, chunk):
    """Returns (d_hidden or None, d_weight or None), the vocabulary processed `chunk` columns at a time."""
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    interp = _use_interpreter(device)
    width = chunk if chunk is not None else (V if interp else _gpu_chunk_width(N, V))
    width = max(1, min(width, V))
    dlogits_buf = _empty((N, width), dtype=hidden.dtype, device=device)
    precision = _dot_precision(hidden.dtype)
    # Operands for the cuBLAS products (row- or column-major views are fine, other strides are not).
    hidden_mm = hidden if (hidden.stride(1) == 1 or hidden.stride(0) == 1) else hidden.contiguous()
    weight_mm = weight if (weight.stride(1) == 1 or weight.stride(0) == 1) else weight.contiguous()
    d_weight = _empty((V, H), dtype=weight.dtype, device=device) if need_dw else None
    dh_acc = None
    if need_dh:
        dh_acc = torch.zeros((N, H), dtype=torch.float32, device=device)
    for v_start in range(0, V, width):
        w = min(width, V - v_start)
        args = (hidden, weight, labels, lse, grad_out, dlogits_buf,
                N, H, triton.next_power_of_2(N), v_start, w,
                hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dlogits_buf.stride(0),
                ignore_index)
        if interp:
            grid = (triton.cdiv(N, _INTERP_BLOCK_N) * triton.cdiv(w, _INTERP_BLOCK_V),)
            _logprobs_backward_kernel[grid](
                *args, BLOCK_N=_INTERP_BLOCK_N, BLOCK_V=_INTERP_BLOCK_V, BLOCK_H=_INTERP_BLOCK_H, GROUP_N=4,
                EVEN_H=H % _INTERP_BLOCK_H == 0, DOT_PRECISION=precision, UPCAST_DOT=True)
        else:
            grid_of = lambda block_n, block_v, w=w: (triton.cdiv(N, block_n) * triton.cdiv(w, block_v),)  # noqa: E731
            _launch_compiled("backward", grid_of, args, N, H, hidden.dtype, precision)
        dlogits = dlogits_buf[:, :w]
        if need_dw:
            torch.mm(dlogits.t(), hidden_mm, out=d_weight[v_start:v_start + w])
        if need_dh:
            if dh_acc.dtype == hidden.dtype:
                dh_acc.addmm_(dlogits, weight_mm[v_start:v_start + w])
            else:  # bf16/fp16 product (fp32 inside cuBLAS), accumulated across chunks in fp32
                dh_acc.add_(torch.mm(dlogits, weight_mm[v_start:v_start + w]))
    d_hidden = None
    if need_dh:
        d_hidden = dh_acc if dh_acc.dtype == hidden.dtype else dh_acc.to(hidden.dtype)
    return d_hidden, d_weight


class _LinearLogprobsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk):
        with on_device(hidden.device):
            logps, lse = _forward_triton(hidden, weight, labels, ignore_index)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk = ignore_index, chunk
        return logps

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw):
            return None, None, None, None, None
        grad_out = grad_out.to(torch.float32).contiguous()
        with on_device(hidden.device):
            d_hidden, d_weight = _backward_triton(hidden, weight, labels, lse, grad_out, ctx.ignore_index,
                                                  need_dh, need_dw, ctx.chunk)
        return d_hidden, d_weight, None, None, None


# ----------------------------------------------------------------------------------------------
# Torch paths: chunked (CPU default, memory O(chunk x V)) and the plain reference
# ----------------------------------------------------------------------------------------------
def _torch_chunk_rows(n_rows: int, vocab: int, chunk: int | None) -> int:
    if chunk is not None:
        return max(1, chunk)
    return max(1, min(n_rows, _CPU_CHUNK_ELEMS // vocab))


class _LinearLogprobsTorch(torch.autograd.Function):
    """Rows in chunks; the backward recomputes each chunk's logits instead of saving them."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk):
        N = hidden.shape[0]
        rows = _torch_chunk_rows(N, weight.shape[0], chunk)
        weight32 = weight.float()
        logps = _empty((N,), dtype=torch.float32, device=hidden.device)
        lse = _empty((N,), dtype=torch.float32, device=hidden.device)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            logits = hidden[r0:r1].float() @ weight32.t()
            chunk_lse = torch.logsumexp(logits, dim=1)
            lab = labels[r0:r1]
            valid = lab != ignore_index
            picked = logits.gather(1, torch.where(valid, lab, 0)[:, None]).squeeze(1)
            logps[r0:r1] = torch.where(valid, picked - chunk_lse, 0.0)
            lse[r0:r1] = chunk_lse
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        return logps

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_dh or need_dw):
            return None, None, None, None, None
        N, rows = hidden.shape[0], ctx.rows
        weight32 = weight.float()
        grad_out = grad_out.float()
        d_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_dh else None
        dw_acc = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            h32 = hidden[r0:r1].float()
            lab = labels[r0:r1]
            valid = lab != ctx.ignore_index
            grad = torch.where(valid, grad_out[r0:r1], 0.0)
            # d_logits = grad * (onehot - softmax), built in place in the recomputed logits buffer.
            dlogits = (h32 @ weight32.t()).sub_(lse[r0:r1, None]).exp_().mul_(-grad[:, None])
            dlogits.scatter_add_(1, torch.where(valid, lab, 0)[:, None], grad[:, None])
            if need_dh:
                d_hidden[r0:r1] = (dlogits @ weight32).to(hidden.dtype)
            if need_dw:
                dw_acc.addmm_(dlogits.t(), h32)
        d_weight = dw_acc.to(weight.dtype) if need_dw else None
        return d_hidden, d_weight, None, None, None


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                              ignore_index: int = -100) -> torch.Tensor:
    """Plain torch: full logits in fp32 (fp64 for fp64 inputs), log_softmax, gather. Memory O(N x V)."""
    compute = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    logits = hidden.to(compute) @ weight.to(compute).t()
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    picked = logp.gather(1, torch.where(valid, labels, 0)[:, None]).squeeze(1)
    return torch.where(valid, picked, torch.zeros((), dtype=compute, device=picked.device))


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _check_inputs(hidden, weight, labels, ignore_index, check_labels):
    name = "linear_logprobs"
    if not all(isinstance(t, torch.Tensor) for t in (hidden, weight, labels)):
        raise TypeError(f"{name}: hidden, weight and labels must be tensors")
    if hidden.dim() != 2:
        raise ValueError(f"{name}: hidden must be [N, H] (flatten batch and time first), "
                         f"got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be [V, H], got shape {tuple(weight.shape)}")
    N, H = hidden.shape
    V = weight.shape[0]
    if weight.shape[1] != H:
        raise ValueError(f"{name}: hidden size mismatch: hidden is {tuple(hidden.shape)}, "
                         f"weight is {tuple(weight.shape)}")
    if V == 0 or H == 0:
        raise ValueError(f"{name}: empty vocabulary or hidden size (weight shape {tuple(weight.shape)})")
    if labels.shape != (N,):
        raise ValueError(f"{name}: labels must have shape ({N},) to match hidden, got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: labels must be int64 (or int32), got {labels.dtype}")
    if hidden.dtype not in _SUPPORTED_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"{name}: hidden and weight must share one dtype among bf16/fp16/fp32, "
                        f"got hidden {hidden.dtype}, weight {weight.dtype}")
    if hidden.device != weight.device or labels.device != hidden.device:
        raise ValueError(f"{name}: hidden ({hidden.device}), weight ({weight.device}) and labels "
                         f"({labels.device}) must be on one device")
    if V >= 2**31:
        raise ValueError(f"{name}: vocabulary of {V} is too large")
    if check_labels and N > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: labels[{row}] = {int(labels[row])} is outside the vocabulary [0, {V}) "
                             f"and is not ignore_index ({ignore_index})")


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                    *, backend: str | None = None, chunk_size: int | None = None,
                    check_labels: bool = True) -> torch.Tensor:
    """log_softmax(hidden @ weight.T)[n, labels[n]] as float32 [N]; 0.0 where labels == ignore_index.

    hidden [N, H] and weight [V, H] share a dtype (bf16, fp16 or fp32); labels [N] int64. Differentiable
    in hidden and weight; the logits are never materialised ([N, V] is never written).
    backend: None = Triton on CUDA (and on CPU under Triton's interpreter, TRITON_INTERPRET=1 set
    before triton is imported), chunked torch on CPU otherwise; "triton" or "torch" forces one.
    chunk_size: scratch knob - the Triton backward handles `chunk_size` vocabulary columns at a time
    (default: ~128 MiB of d_logits, at most 16384 columns); the torch path `chunk_size` rows at a
    time (default: 32 MiB of fp32 logits).
    check_labels: validate label range (one host sync); disable inside CUDA graphs.
    fp32 inputs on CUDA use TF32 tensor cores only if torch.backends.cuda.matmul.allow_tf32 is set.
    """
    _check_inputs(hidden, weight, labels, ignore_index, check_labels)
    labels = labels.to(torch.int64).contiguous()
    backend = pick_backend("linear_logprobs", backend, hidden.device, _logprobs_forward_kernel)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_logprobs: chunk_size must be positive, got {chunk_size}")
    if hidden.shape[0] == 0:
        return (hidden.sum(1) + weight.sum() * 0).float()  # empty [0] result that keeps the graph
    if backend == "triton":
        return _LinearLogprobsTriton.apply(hidden, weight, labels, int(ignore_index), chunk_size)
    return _LinearLogprobsTorch.apply(hidden, weight, labels, int(ignore_index), chunk_size)
