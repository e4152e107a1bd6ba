"""Fused per-sequence sums of per-token log-probs: the token work of every pair loss.

`sequence_logps(token_logps [N], seq_index [N], num_seqs) -> [num_seqs]` sums the token log-probs of each
sequence (seq_index[n] = the sequence token n belongs to, -1 = none; tokens need not be sorted). The pair
losses themselves (SPIN / DPO / SPPO / IPO ...) are small torch functions of these sums
(minispin.training.losses), which autograd differentiates; the kernels only ever see tokens.

Kernels: the forward gives each program a block of sequences; it streams all tokens once and forms the
block's sums as a masked [tokens x sequences] reduction (no atomics, so it is deterministic and needs no
ordering of seq_index). The cost is O(N x S) lane operations, microseconds at training sizes (N ~ 16k
tokens, S ~ 16 sequences per device). The backward of a segmented sum is one constant per sequence (d loss /
d sum_s) broadcast to that sequence's tokens: each token reads its sequence's gradient - a gather, no
scatter. Sums accumulate in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import on_device, pick_backend

__all__ = ["sequence_logps", "sequence_logps_reference"]

# Kernel-written buffers go through this name (tests swap in a NaN-filling allocator).
_empty = torch.empty


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _segment_sum_kernel(token_ptr, seq_ptr, out_ptr, N, S, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[s] = sum of token_ptr[n] over the tokens with seq[n] == s, for this program's block of sequences."""
    seqs = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    acc = tl.zeros([BLOCK_S], tl.float32)
    for t0 in range(0, N, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < N
        seq = tl.load(seq_ptr + t, mask=tmask, other=-1)
        logp = tl.load(token_ptr + t, mask=tmask, other=0.0)
        acc += tl.sum(tl.where(seq[:, None] == seqs[None, :], logp[:, None], 0.0), axis=0)
    tl.store(out_ptr + seqs, acc, mask=seqs < S)


@triton.jit
def _segment_broadcast_kernel(seq_ptr, grad_seq_ptr, grad_token_ptr, N, BLOCK_T: tl.constexpr):
    """grad_token[n] = grad_seq[seq[n]] (0 where seq[n] = -1): the gradient of a segmented sum."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < N
    seq = tl.load(seq_ptr + t, mask=tmask, other=-1)
    valid = tmask & (seq >= 0)
    grad = tl.load(grad_seq_ptr + tl.where(valid, seq, 0), mask=valid, other=0.0)
    tl.store(grad_token_ptr + t, grad, mask=tmask)


# ----------------------------------------------------------------------------------------------
# Autograd wrapper
# ----------------------------------------------------------------------------------------------
def _block_sizes(num_seqs: int) -> tuple[int, int]:
    """(tokens, sequences) per tile: 8192 lanes, at least 16 sequences wide."""
    block_s = min(64, max(16, triton.next_power_of_2(num_seqs)))
    return max(64, 8192 // block_s), block_s


class _SequenceLogpsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logps, seq_index, num_seqs):
        device = token_logps.device
        sums = _empty((num_seqs,), dtype=torch.float32, device=device)
        block_t, block_s = _block_sizes(num_seqs)
        if num_seqs > 0:
            with on_device(device):
                _segment_sum_kernel[(triton.cdiv(num_seqs, block_s),)](
                    token_logps, seq_index, sums, token_logps.shape[0], num_seqs,
                    BLOCK_T=block_t, BLOCK_S=block_s, num_warps=4)
        ctx.save_for_backward(seq_index)
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        (seq_index,) = ctx.saved_tensors
        N = seq_index.shape[0]
        grad_tokens = _empty((N,), dtype=torch.float32, device=seq_index.device)
        if N > 0:
            grad_sums = grad_sums.to(torch.float32).contiguous()
            block_t = 1024
            with on_device(seq_index.device):
                _segment_broadcast_kernel[(triton.cdiv(N, block_t),)](
                    seq_index, grad_sums, grad_tokens, N, BLOCK_T=block_t, num_warps=4)
        return grad_tokens, None, None


# ----------------------------------------------------------------------------------------------
# Reference (plain torch, differentiable; also the CPU path)
# ----------------------------------------------------------------------------------------------
def sequence_logps_reference(token_logps: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Plain torch version of `sequence_logps` (same arguments, no validation); sums in token_logps' dtype."""
    valid = seq_index >= 0
    return torch.zeros(num_seqs, dtype=token_logps.dtype, device=token_logps.device).index_add(
        0, seq_index[valid], token_logps[valid])


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _check_inputs(token_logps, seq_index, num_seqs, check_values) -> None:
    name = "sequence_logps"
    if not isinstance(token_logps, torch.Tensor) or not isinstance(seq_index, torch.Tensor):
        raise TypeError(f"{name}: token_logps and seq_index must be tensors")
    if token_logps.dim() != 1:
        raise ValueError(f"{name}: token_logps must be 1-D [N], got shape {tuple(token_logps.shape)}")
    if seq_index.shape != token_logps.shape:
        raise ValueError(f"{name}: seq_index shape {tuple(seq_index.shape)} != token_logps shape "
                         f"{tuple(token_logps.shape)}")
    if seq_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: seq_index must be int64 (or int32), got {seq_index.dtype}")
    if not token_logps.is_floating_point():
        raise TypeError(f"{name}: token_logps must be floating point, got {token_logps.dtype}")
    if seq_index.device != token_logps.device:
        raise ValueError(f"{name}: seq_index is on {seq_index.device} but token_logps is on {token_logps.device}")
    if not isinstance(num_seqs, int) or num_seqs < 0:
        raise ValueError(f"{name}: num_seqs must be an int >= 0, got {num_seqs!r}")
    if check_values and seq_index.numel() > 0:
        bad = (seq_index < -1) | (seq_index >= num_seqs)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: seq_index[{pos}] = {int(seq_index[pos])} is outside [-1, {num_seqs}) "
                             f"(sequences 0..{num_seqs - 1}, -1 = no sequence)")


def sequence_logps(token_logps: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, *,
                   backend: str | None = None, check_values: bool = True) -> torch.Tensor:
    """Summed token log-probs per sequence [num_seqs], differentiable in token_logps.

    token_logps [N] (float32 for the Triton backend, e.g. from linear_logprobs); seq_index [N] int64: the
    sequence of each token in [0, num_seqs), -1 for tokens outside any sequence (prompt, padding). A sequence
    without tokens sums to 0. Returns float32 from Triton, token_logps' dtype from torch.
    backend: None = Triton on CUDA (and on CPU under Triton's interpreter, TRITON_INTERPRET=1 set before
    triton is imported), torch otherwise. check_values: validate the seq_index range (a host sync).
    """
    _check_inputs(token_logps, seq_index, num_seqs, check_values)
    if pick_backend("sequence_logps", backend, token_logps.device, _segment_sum_kernel) == "torch":
        return sequence_logps_reference(token_logps, seq_index, num_seqs)
    if token_logps.dtype != torch.float32:
        raise TypeError(f"sequence_logps: the Triton backend takes float32 token_logps, got {token_logps.dtype}")
    return _SequenceLogpsTriton.apply(token_logps.contiguous(), seq_index.to(torch.int64).contiguous(), num_seqs)
