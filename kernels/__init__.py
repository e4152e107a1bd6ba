"""Triton kernels for the LM head and the pairwise loss (importable as minispin.kernels).

linear_logprobs: per-token log-probs straight from hidden states and the LM-head weight, never
materialising the [N, V] logits. pair_loss: fused per-sequence sums + SPIN/DPO/SPPO pair losses.
Each file holds the Triton kernels, the autograd.Function and a plain-torch reference.
"""
from .linear_logprobs import linear_logprobs, linear_logprobs_reference
from .pair_loss import LOSS_TYPES, pair_loss, pair_loss_reference

__all__ = ["linear_logprobs", "linear_logprobs_reference", "pair_loss", "pair_loss_reference", "LOSS_TYPES"]
