"""Triton kernels for the LM head and the pairwise loss: `from minispin.kernels import linear_logprobs, pair_loss`.

linear_logprobs: per-token log-probs straight from hidden states and the LM-head weight, never
materialising the [N, V] logits. pair_loss: fused per-sequence sums + SPIN/DPO/SPPO pair losses.
Each kernel file holds the Triton kernels, the autograd.Function and a plain-torch reference.

Why a module with a `__path__`: the kernel files live in the repository's top-level kernels/ folder, which
has no __init__.py, so from the repository root `import kernels` can never find it ahead of an installed
`kernels` distribution (Hugging Face's, which transformers imports). This module makes that folder the
package `minispin.kernels`: in a checkout it is ../kernels; in an installed wheel setup.py copies the files
into minispin/kernels/ beside this module.
"""
from pathlib import Path

_HERE = Path(__file__).resolve()
# The wheel's copy beside this file first: in site-packages, parents[1]/"kernels" may be Hugging Face's package.
__path__ = [str(next(d for d in (_HERE.with_suffix(""), _HERE.parents[1] / "kernels")
                     if (d / "linear_logprobs.py").is_file()))]

from minispin.kernels.linear_logprobs import linear_logprobs, linear_logprobs_reference  # noqa: E402
from minispin.kernels.pair_loss import LOSS_TYPES, pair_loss, pair_loss_reference  # noqa: E402

__all__ = ["linear_logprobs", "linear_logprobs_reference", "pair_loss", "pair_loss_reference", "LOSS_TYPES"]
