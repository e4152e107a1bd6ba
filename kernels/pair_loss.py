"""Fused pairwise sequence loss (SPIN / DPO family and SPPO) from per-token log-probs.

`pair_loss(token_logps [N], seq_index [N], ref_logps [2P] | None, beta, loss=...)` sums the token
log-probs of each sequence (seq_index[n] = the sequence token n belongs to, -1 = none; tokens need
not be sorted), forms the pair statistic and averages the per-pair loss over the P pairs. Pair p is
(sequence p, sequence P + p): the real / chosen / winner response and the generated / rejected /
loser one.

  lw = pi_w - ref_w,  ll = pi_l - ref_l     (summed log-probs of sequences p and P + p; ref = 0 if None)
  "sigmoid"      z = beta (lw - ll),  l = -(1-eps) log sigmoid(z) - eps log sigmoid(-z)
  "hinge"        l = max(0, 1 - z)
  "exponential"  l = exp(-z)
  "correlation"  l = 1 - z
  "sppo"         l = ((lw - eta (P_win - 1/2))^2 + (ll - eta (P_lose - 1/2))^2) / 2,  eta = 1/beta
                 (no beta on the log-ratios; `targets` carries P_win at [p] and P_lose at [P + p])

Kernels: the forward is one single-program Triton kernel - for each block of pairs it streams all
tokens once, forms both sequence sums as a masked [tokens x pairs] reduction (no atomics, so it is
deterministic and needs no ordering of seq_index), then evaluates the loss for the block; the cost is
O(N x P) lane operations, microseconds at training sizes (N ~ 16k tokens, P ~ 8 pairs per device).
The backward is one many-program kernel: the loss gradient w.r.t. a token's log-prob is one constant
per sequence (d loss / d sum_s), so each token recomputes that constant from the saved sums and
writes it - a gather, no scatter. All loss math is in fp32 with softplus / sigmoid forms that never
overflow (log sigmoid(z) = -softplus(-z), softplus(x) = max(x, 0) + log1p(exp(-|x|))).

ref_logps, targets and label_smoothing are constants (no gradient flows to them).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["pair_loss", "pair_loss_reference", "LOSS_TYPES"]

LOSS_TYPES = {"sigmoid": 0, "hinge": 1, "exponential": 2, "correlation": 3, "sppo": 4}

# Kernel-written buffers go through this name (tests swap in a NaN-filling allocator).
_empty = torch.empty


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _pair_loss_forward_kernel(
    token_ptr, seq_ptr, ref_ptr, target_ptr, eps_ptr, seq_sum_ptr, loss_ptr,
    N, P, beta, eta, eps_scalar,
    LOSS: tl.constexpr, HAS_REF: tl.constexpr, EPS_PER_PAIR: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Single program: per-sequence sums (stored) and the mean per-pair loss (stored)."""
    loss_acc = tl.zeros([BLOCK_P], tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pairs = p0 + tl.arange(0, BLOCK_P)
        pmask = pairs < P
        sum_w = tl.zeros([BLOCK_P], tl.float32)
        sum_l = tl.zeros([BLOCK_P], tl.float32)
        for t0 in range(0, N, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            tmask = t < N
            seq = tl.load(seq_ptr + t, mask=tmask, other=-1)
            logp = tl.load(token_ptr + t, mask=tmask, other=0.0)
            sum_w += tl.sum(tl.where(seq[:, None] == pairs[None, :], logp[:, None], 0.0), axis=0)
            sum_l += tl.sum(tl.where(seq[:, None] == (pairs + P)[None, :], logp[:, None], 0.0), axis=0)
        tl.store(seq_sum_ptr + pairs, sum_w, mask=pmask)
        tl.store(seq_sum_ptr + P + pairs, sum_l, mask=pmask)
        lw = sum_w
        ll = sum_l
        if HAS_REF:
            lw -= tl.load(ref_ptr + pairs, mask=pmask, other=0.0)
            ll -= tl.load(ref_ptr + P + pairs, mask=pmask, other=0.0)
        if LOSS == 4:  # sppo: squared distance of each log-ratio to its target
            dw = lw - eta * (tl.load(target_ptr + pairs, mask=pmask, other=0.5) - 0.5)
            dl = ll - eta * (tl.load(target_ptr + P + pairs, mask=pmask, other=0.5) - 0.5)
            per_pair = 0.5 * (dw * dw + dl * dl)
        else:
            z = beta * (lw - ll)
            if LOSS == 0:  # (1-eps) softplus(-z) + eps softplus(z)
                if EPS_PER_PAIR:
                    eps = tl.load(eps_ptr + pairs, mask=pmask, other=0.0)
                else:
                    eps = tl.zeros([BLOCK_P], tl.float32) + eps_scalar
                e = tl.exp(-tl.abs(z))
                one_plus = 1.0 + e
                # log1p(e) without losing tiny e: log(u) * e / (u - 1) is exact-rounded for u = fl(1 + e)
                exact = one_plus == 1.0
                log1p_e = tl.where(exact, e, tl.log(one_plus) * e / tl.where(exact, 1.0, one_plus - 1.0))
                per_pair = (1.0 - eps) * (tl.maximum(-z, 0.0) + log1p_e) + eps * (tl.maximum(z, 0.0) + log1p_e)
            elif LOSS == 1:
                per_pair = tl.maximum(1.0 - z, 0.0)
            elif LOSS == 2:
                per_pair = tl.exp(-z)
            else:
                per_pair = 1.0 - z
        loss_acc += tl.where(pmask, per_pair, 0.0)
    tl.store(loss_ptr, tl.sum(loss_acc, axis=0) / P)


@triton.jit
def _pair_loss_backward_kernel(
    seq_ptr, seq_sum_ptr, ref_ptr, target_ptr, eps_ptr, grad_loss_ptr, grad_token_ptr,
    N, P, beta, eta, eps_scalar,
    LOSS: tl.constexpr, HAS_REF: tl.constexpr, EPS_PER_PAIR: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """grad_token[n] = grad_loss / P * d loss_pair / d sum_{seq_index[n]} (0 for seq_index -1)."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < N
    seq = tl.load(seq_ptr + t, mask=tmask, other=-1)
    valid = tmask & (seq >= 0)
    is_w = seq < P
    pair = tl.where(valid, tl.where(is_w, seq, seq - P), 0)
    lw = tl.load(seq_sum_ptr + pair, mask=valid, other=0.0)
    ll = tl.load(seq_sum_ptr + P + pair, mask=valid, other=0.0)
    if HAS_REF:
        lw -= tl.load(ref_ptr + pair, mask=valid, other=0.0)
        ll -= tl.load(ref_ptr + P + pair, mask=valid, other=0.0)
    if LOSS == 4:
        d_w = lw - eta * (tl.load(target_ptr + pair, mask=valid, other=0.5) - 0.5)
        d_l = ll - eta * (tl.load(target_ptr + P + pair, mask=valid, other=0.5) - 0.5)
        coef = tl.where(is_w, d_w, d_l)
    else:
        z = beta * (lw - ll)
        if LOSS == 0:  # dl/dz = -(1-eps) sigmoid(-z) + eps sigmoid(z)
            if EPS_PER_PAIR:
                eps = tl.load(eps_ptr + pair, mask=valid, other=0.0)
            else:
                eps = tl.zeros([BLOCK_T], tl.float32) + eps_scalar
            e = tl.exp(-tl.abs(z))
            sig_pos = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(z)
            sig_neg = tl.where(z >= 0, e / (1.0 + e), 1.0 / (1.0 + e))  # sigmoid(-z)
            dz = -(1.0 - eps) * sig_neg + eps * sig_pos
        elif LOSS == 1:
            dz = tl.where(z < 1.0, -1.0, 0.0)
        elif LOSS == 2:
            dz = -tl.exp(-z)
        else:
            dz = tl.zeros([BLOCK_T], tl.float32) - 1.0
        coef = tl.where(is_w, beta * dz, -beta * dz)
    grad_loss = tl.load(grad_loss_ptr)
    tl.store(grad_token_ptr + t, tl.where(valid, coef * (grad_loss / P), 0.0), mask=tmask)


# ----------------------------------------------------------------------------------------------
# Autograd wrapper
# ----------------------------------------------------------------------------------------------
def _on_device(device: torch.device):
    """Triton launches on the current CUDA device, not the tensors' one: make them the same."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward_block_sizes(num_pairs: int) -> tuple[int, int]:
    block_p = min(64, max(16, triton.next_power_of_2(num_pairs)))
    block_t = max(64, 8192 // block_p)
    return block_t, block_p


class _PairLossTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_logps, seq_index, ref, targets, eps_tensor, eps_scalar, beta, num_pairs, loss_id):
        N = token_logps.shape[0]
        device = token_logps.device
        seq_sums = _empty((2 * num_pairs,), dtype=torch.float32, device=device)
        loss = _empty((), dtype=torch.float32, device=device)
        dummy = seq_sums  # stands in for absent optional pointers (never read)
        eta = 1.0 / beta
        block_t, block_p = _forward_block_sizes(num_pairs)
        with _on_device(device):
            _pair_loss_forward_kernel[(1,)](
                token_logps, seq_index, ref if ref is not None else dummy, targets if targets is not None else dummy,
                eps_tensor if eps_tensor is not None else dummy, seq_sums, loss,
                N, num_pairs, beta, eta, eps_scalar,
                LOSS=loss_id, HAS_REF=ref is not None, EPS_PER_PAIR=eps_tensor is not None,
                BLOCK_T=block_t, BLOCK_P=block_p, num_warps=4)
        ctx.save_for_backward(seq_index, seq_sums, ref, targets, eps_tensor)
        ctx.args = (N, num_pairs, beta, eta, eps_scalar, loss_id)
        ctx.mark_non_differentiable(seq_sums)
        return loss, seq_sums

    @staticmethod
    def backward(ctx, grad_loss, _grad_sums):
        seq_index, seq_sums, ref, targets, eps_tensor = ctx.saved_tensors
        N, num_pairs, beta, eta, eps_scalar, loss_id = ctx.args
        grad_tokens = _empty((N,), dtype=torch.float32, device=seq_index.device)
        if N > 0:
            grad_loss = grad_loss.to(torch.float32).reshape(()).contiguous()
            block_t = 1024
            with _on_device(seq_index.device):
                _pair_loss_backward_kernel[(triton.cdiv(N, block_t),)](
                    seq_index, seq_sums, ref if ref is not None else seq_sums,
                    targets if targets is not None else seq_sums, eps_tensor if eps_tensor is not None else seq_sums,
                    grad_loss, grad_tokens, N, num_pairs, beta, eta, eps_scalar,
                    LOSS=loss_id, HAS_REF=ref is not None, EPS_PER_PAIR=eps_tensor is not None,
                    BLOCK_T=block_t, num_warps=4)
        return grad_tokens, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Reference (plain torch, differentiable; also the CPU path)
# ----------------------------------------------------------------------------------------------
def pair_loss_reference(token_logps: torch.Tensor, seq_index: torch.Tensor, ref_logps: torch.Tensor | None,
                        beta: float, loss: str = "sigmoid", label_smoothing: float | torch.Tensor = 0.0,
                        *, num_pairs: int | None = None, targets: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch version of `pair_loss` (same arguments, no validation); computes in token_logps' dtype."""
    P = _infer_num_pairs(ref_logps, targets, num_pairs)
    dtype = token_logps.dtype
    valid = seq_index >= 0
    sums = torch.zeros(2 * P, dtype=dtype, device=token_logps.device).index_add(
        0, seq_index[valid], token_logps[valid])
    ratios = sums if ref_logps is None else sums - ref_logps.to(dtype)
    lw, ll = ratios[:P], ratios[P:]
    if loss == "sppo":
        eta = 1.0 / beta
        t = targets.to(dtype)
        per_pair = ((lw - eta * (t[:P] - 0.5)) ** 2 + (ll - eta * (t[P:] - 0.5)) ** 2) / 2
    else:
        z = beta * (lw - ll)
        if loss == "sigmoid":
            eps = label_smoothing.to(dtype) if isinstance(label_smoothing, torch.Tensor) else label_smoothing
            per_pair = (1 - eps) * torch.nn.functional.softplus(-z) + eps * torch.nn.functional.softplus(z)
        elif loss == "hinge":
            per_pair = torch.relu(1 - z)
        elif loss == "exponential":
            per_pair = torch.exp(-z)
        elif loss == "correlation":
            per_pair = 1 - z
        else:
            raise ValueError(f"pair_loss: unknown loss {loss!r}; expected one of {sorted(LOSS_TYPES)}")
    return per_pair.mean(), sums.detach()


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _infer_num_pairs(ref_logps, targets, num_pairs) -> int:
    candidates = []
    for name, t in (("ref_logps", ref_logps), ("targets", targets)):
        if t is not None:
            if t.dim() != 1 or t.shape[0] % 2 != 0:
                raise ValueError(f"pair_loss: {name} must be a 1-D tensor of 2*num_pairs values, "
                                 f"got shape {tuple(t.shape)}")
            candidates.append((name, t.shape[0] // 2))
    if num_pairs is not None:
        candidates.append(("num_pairs", int(num_pairs)))
    if not candidates:
        raise ValueError("pair_loss: the number of pairs is unknown; pass ref_logps [2P], targets [2P] "
                         "or num_pairs=P")
    P = candidates[0][1]
    for name, value in candidates[1:]:
        if value != P:
            raise ValueError(f"pair_loss: inconsistent number of pairs: {candidates[0][0]} implies {P}, "
                             f"{name} implies {value}")
    if P < 1:
        raise ValueError(f"pair_loss: need at least one pair, got {P}")
    return P


def _check_inputs(token_logps, seq_index, ref_logps, beta, loss, label_smoothing, targets, P, check_values):
    name = "pair_loss"
    if token_logps.dim() != 1:
        raise ValueError(f"{name}: token_logps must be 1-D [N], got shape {tuple(token_logps.shape)}")
    if seq_index.shape != token_logps.shape:
        raise ValueError(f"{name}: seq_index shape {tuple(seq_index.shape)} != token_logps shape "
                         f"{tuple(token_logps.shape)}")
    if seq_index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: seq_index must be int64 (or int32), got {seq_index.dtype}")
    if not token_logps.is_floating_point():
        raise TypeError(f"{name}: token_logps must be floating point, got {token_logps.dtype}")
    device = token_logps.device
    for what, t in (("seq_index", seq_index), ("ref_logps", ref_logps), ("targets", targets)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: {what} is on {t.device} but token_logps is on {device}")
    if loss not in LOSS_TYPES:
        raise ValueError(f"{name}: unknown loss {loss!r}; expected one of {sorted(LOSS_TYPES)}")
    if not (isinstance(beta, (int, float)) and beta > 0 and beta != float("inf")):
        raise ValueError(f"{name}: beta must be a positive finite number, got {beta!r}")
    if loss == "sppo":
        if targets is None:
            raise ValueError(f"{name}: loss='sppo' needs targets [2P] (P_win at [p], P_lose at [P + p])")
    elif targets is not None:
        raise ValueError(f"{name}: targets are only used by loss='sppo', got loss={loss!r}")
    for what, t in (("ref_logps", ref_logps), ("targets", targets)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name}: {what} must be floating point, got {t.dtype}")
    if isinstance(label_smoothing, torch.Tensor):
        if loss != "sigmoid":
            raise ValueError(f"{name}: label_smoothing applies to loss='sigmoid' only, got loss={loss!r}")
        if label_smoothing.shape != (P,):
            raise ValueError(f"{name}: per-pair label_smoothing must have shape ({P},), "
                             f"got {tuple(label_smoothing.shape)}")
        if label_smoothing.device != device:
            raise ValueError(f"{name}: label_smoothing is on {label_smoothing.device} but token_logps is on {device}")
        if check_values and bool(((label_smoothing < 0) | (label_smoothing > 1)).any()):
            raise ValueError(f"{name}: label_smoothing values must lie in [0, 1]")
    else:
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"{name}: label_smoothing must lie in [0, 1], got {label_smoothing}")
        if label_smoothing != 0 and loss != "sigmoid":
            raise ValueError(f"{name}: label_smoothing applies to loss='sigmoid' only, got loss={loss!r}")
    if check_values and seq_index.numel() > 0:
        bad = (seq_index < -1) | (seq_index >= 2 * P)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}: seq_index[{pos}] = {int(seq_index[pos])} is outside [-1, {2 * P}) "
                             f"for {P} pairs (sequences 0..{2 * P - 1}, -1 = no sequence)")
    if check_values and targets is not None and bool(((targets < 0) | (targets > 1) | targets.isnan()).any()):
        raise ValueError(f"{name}: targets are probabilities and must lie in [0, 1]")


def _kernels_interpreted() -> bool:
    """Triton built the kernels for its CPU interpreter: TRITON_INTERPRET=1 was set when triton was
    imported (Triton decides at decoration time, so setting it later has no effect)."""
    # tl.sum stands for Triton's own library kernels, which must be interpreted too.
    return all(type(k).__name__ == "InterpretedFunction" for k in (_pair_loss_forward_kernel, tl.sum))


def _triton_runs_on(device: torch.device) -> bool:
    """CUDA, or CPU through Triton's interpreter."""
    return device.type == "cuda" or _kernels_interpreted()


def pair_loss(token_logps: torch.Tensor, seq_index: torch.Tensor, ref_logps: torch.Tensor | None, beta: float,
              loss: str = "sigmoid", label_smoothing: float | torch.Tensor = 0.0, *,
              num_pairs: int | None = None, targets: torch.Tensor | None = None,
              backend: str | None = None, check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean pairwise loss over P pairs and the detached per-sequence log-prob sums [2P].

    token_logps [N] float32 (e.g. from linear_logprobs); seq_index [N] int64: sequence of each token,
    -1 for tokens outside any response; sequences 0..P-1 are the real/chosen responses, P..2P-1 the
    generated/rejected ones, pair p = (p, P + p). ref_logps [2P]: the reference model's summed
    log-probs of the same sequences, or None (reference-free). The number of pairs P comes from
    ref_logps, targets or num_pairs (they must agree; one is required).
    loss: "sigmoid" (SPIN/DPO; label_smoothing eps as a float or a per-pair tensor [P]), "hinge",
    "exponential", "correlation", or "sppo" (needs targets [2P]: P_win at [p] for sequence p,
    P_lose at [P + p] for sequence P + p; eta = 1/beta, SPPO's default beta is 0.001).
    Returns (loss: 0-d float32 tensor, seq_logps: [2P] float32, detached). Only token_logps gets a
    gradient. backend: None = Triton on CUDA (and on CPU under Triton's interpreter, TRITON_INTERPRET=1
    set before triton is imported), torch otherwise.
    check_values: validate seq_index / smoothing / target ranges (a host sync).
    """
    if not isinstance(token_logps, torch.Tensor) or not isinstance(seq_index, torch.Tensor):
        raise TypeError("pair_loss: token_logps and seq_index must be tensors")
    P = _infer_num_pairs(ref_logps, targets, num_pairs)
    _check_inputs(token_logps, seq_index, ref_logps, beta, loss, label_smoothing, targets, P, check_values)
    if backend is None:
        backend = "triton" if _triton_runs_on(token_logps.device) else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"pair_loss: backend must be 'triton', 'torch' or None, got {backend!r}")
    if backend == "torch":
        return pair_loss_reference(token_logps, seq_index, ref_logps, float(beta), loss, label_smoothing,
                                   num_pairs=P, targets=targets)
    if token_logps.dtype != torch.float32:
        raise TypeError(f"pair_loss: the Triton backend takes float32 token_logps, got {token_logps.dtype}")
    if not _triton_runs_on(token_logps.device):
        raise RuntimeError(f"pair_loss: the Triton backend needs CUDA tensors (got {token_logps.device}) or "
                           "Triton's CPU interpreter (TRITON_INTERPRET=1 set before triton is imported); "
                           "or use backend='torch'")
    f32 = lambda t: None if t is None else t.detach().to(torch.float32).contiguous()  # noqa: E731
    eps_tensor = f32(label_smoothing) if isinstance(label_smoothing, torch.Tensor) else None
    eps_scalar = 0.0 if eps_tensor is not None else float(label_smoothing)
    return _PairLossTriton.apply(token_logps.contiguous(), seq_index.to(torch.int64).contiguous(), f32(ref_logps),
                                 f32(targets), eps_tensor, eps_scalar, float(beta), P, LOSS_TYPES[loss])
