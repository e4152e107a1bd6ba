"""The pair losses, each defined once as a small torch function of per-sequence summed log-probs.

The token work (per-token log-probs, their per-sequence sums, forward and backward) is fused in the kernels
(minispin.kernels); a pair loss only sees 2P numbers, so it is plain torch and autograd differentiates it.
Pair p is (sequence p, sequence P + p): the real / chosen / winner answer and the generated / rejected /
loser one. Every loss gets the log-ratios of its P pairs,

    lw = pi_w - ref_w,   ll = pi_l - ref_l     (summed log-probs; ref = 0 when reference-free)

and beta; `LOSSES` says which loss also takes label smoothing or SPPO's targets. A new loss is one function
here and one entry in `LOSSES` (IPO is the example).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def sigmoid(lw: Tensor, ll: Tensor, beta: float, label_smoothing: float | Tensor) -> Tensor:
    """SPIN / DPO's logistic loss, z = beta (lw - ll): -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)
    (eps = label smoothing, conservative DPO); written with softplus, which never overflows."""
    z = beta * (lw - ll)
    eps = label_smoothing
    return (1 - eps) * F.softplus(-z) + eps * F.softplus(z)


def hinge(lw: Tensor, ll: Tensor, beta: float) -> Tensor:
    """max(0, 1 - z), z = beta (lw - ll) (SPIN paper, Assumption 5.1; SLiC)."""
    return torch.relu(1 - beta * (lw - ll))


def exponential(lw: Tensor, ll: Tensor, beta: float) -> Tensor:
    """exp(-z), z = beta (lw - ll) (SPIN paper, Assumption 5.1)."""
    return torch.exp(-(beta * (lw - ll)))


def correlation(lw: Tensor, ll: Tensor, beta: float) -> Tensor:
    """The linear loss 1 - z, z = beta (lw - ll) (SPIN paper, Assumption 5.1)."""
    return 1 - beta * (lw - ll)


def sppo(lw: Tensor, ll: Tensor, beta: float, targets: Tensor) -> Tensor:
    """SPPO's square loss ((lw - eta (P_win - 1/2))^2 + (ll - eta (P_lose - 1/2))^2) / 2, eta = 1/beta (no beta on
    the log-ratios); targets [2P]: P_win at [p], P_lose at [P + p]."""
    eta = 1.0 / beta
    P = lw.shape[0]
    return ((lw - eta * (targets[:P] - 0.5)) ** 2 + (ll - eta * (targets[P:] - 0.5)) ** 2) / 2


def ipo(lw: Tensor, ll: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023): (h - 1/(2 beta))^2, h = lw - ll from summed log-probs as in the paper, h not
    scaled by beta. TRL's "ipo" divides each sequence's log-prob by its length first; this one does not."""
    return (lw - ll - 1 / (2 * beta)) ** 2


@dataclass(frozen=True)
class PairLoss:
    """A registered loss: its per-pair function and the extra inputs it takes."""
    fn: Callable[..., Tensor]
    smoothing: bool = False  # takes label_smoothing (a float, or one per pair [P])
    targets: bool = False  # needs targets [2P] (SPPO's P_win / P_lose)


LOSSES: dict[str, PairLoss] = {
    "sigmoid": PairLoss(sigmoid, smoothing=True),
    "hinge": PairLoss(hinge),
    "exponential": PairLoss(exponential),
    "correlation": PairLoss(correlation),
    "sppo": PairLoss(sppo, targets=True),
    "ipo": PairLoss(ipo),
}
LOSS_TYPES = tuple(LOSSES)


def pair_loss(seq_logps: Tensor, ref_logps: Tensor | None, beta: float, loss: str = "sigmoid",
              label_smoothing: float | Tensor = 0.0, targets: Tensor | None = None, *,
              check_values: bool = True) -> Tensor:
    """Mean over the P pairs of `loss` (a name in LOSSES), a 0-d tensor in seq_logps' dtype.

    seq_logps [2P]: summed log-probs of sequences 0..2P-1 (minispin.kernels.sequence_logps), pair p =
    (p, P + p); ref_logps [2P]: the reference model's, or None (reference-free). label_smoothing: a float or
    a per-pair tensor [P] (sigmoid only); targets [2P] (sppo only). Only seq_logps gets a gradient.
    check_values: validate the smoothing and target ranges (a host sync).
    """
    spec = _check_inputs(seq_logps, ref_logps, beta, loss, label_smoothing, targets, check_values)
    dtype = seq_logps.dtype
    ratios = seq_logps if ref_logps is None else seq_logps - ref_logps.to(dtype)
    P = ratios.shape[0] // 2
    extra = {}
    if spec.smoothing:
        extra["label_smoothing"] = label_smoothing.to(dtype) if isinstance(label_smoothing, Tensor) \
            else label_smoothing
    if spec.targets:
        extra["targets"] = targets.to(dtype)
    return spec.fn(ratios[:P], ratios[P:], float(beta), **extra).mean()


def _check_inputs(seq_logps, ref_logps, beta, loss, label_smoothing, targets, check_values) -> PairLoss:
    """The loss's registry entry, once its inputs are known to fit it."""
    name = "pair_loss"
    if loss not in LOSSES:
        raise ValueError(f"{name}: unknown loss {loss!r}; expected one of {LOSS_TYPES}")
    spec = LOSSES[loss]
    if not isinstance(seq_logps, Tensor) or not seq_logps.is_floating_point() or seq_logps.dim() != 1 \
            or seq_logps.shape[0] < 2 or seq_logps.shape[0] % 2:
        raise ValueError(f"{name}: seq_logps must be a 1-D floating tensor of 2P >= 2 values, got "
                         f"{getattr(seq_logps, 'shape', type(seq_logps).__name__)}")
    P = seq_logps.shape[0] // 2
    for what, t in (("ref_logps", ref_logps), ("targets", targets)):
        if t is not None and (t.shape != (2 * P,) or not t.is_floating_point() or t.device != seq_logps.device):
            raise ValueError(f"{name}: {what} must be a floating tensor [{2 * P}] on {seq_logps.device} like "
                             f"seq_logps, got {t.dtype} {tuple(t.shape)} on {t.device}")
    if not (isinstance(beta, (int, float)) and 0 < beta < float("inf")):
        raise ValueError(f"{name}: beta must be a positive finite number, got {beta!r}")
    if spec.targets and targets is None:
        raise ValueError(f"{name}: loss={loss!r} needs targets [2P] (P_win at [p], P_lose at [P + p])")
    if not spec.targets and targets is not None:
        raise ValueError(f"{name}: targets are only used by loss='sppo', got loss={loss!r}")
    _check_smoothing(name, loss, spec, label_smoothing, P, seq_logps.device, check_values)
    if check_values and targets is not None and bool(((targets < 0) | (targets > 1) | targets.isnan()).any()):
        raise ValueError(f"{name}: targets are probabilities and must lie in [0, 1]")
    return spec


def _check_smoothing(name, loss, spec, label_smoothing, P, device, check_values) -> None:
    if isinstance(label_smoothing, Tensor):
        if label_smoothing.shape != (P,) or label_smoothing.device != device:
            raise ValueError(f"{name}: per-pair label_smoothing must have shape ({P},) on {device}, got "
                             f"{tuple(label_smoothing.shape)} on {label_smoothing.device}")
        nonzero = True
        if check_values and bool(((label_smoothing < 0) | (label_smoothing > 1)).any()):
            raise ValueError(f"{name}: label_smoothing values must lie in [0, 1]")
    else:
        nonzero = label_smoothing != 0
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise ValueError(f"{name}: label_smoothing must lie in [0, 1], got {label_smoothing}")
    if nonzero and not spec.smoothing:
        raise ValueError(f"{name}: label_smoothing applies to loss='sigmoid' only, got loss={loss!r}")
