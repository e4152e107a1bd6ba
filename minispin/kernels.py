"""Triton kernels for the token work of training: `from minispin.kernels import linear_logprobs, sequence_logps`.

linear_logprobs: per-token log-probs straight from hidden states and the LM-head weight, never
materialising the [N, V] logits. sequence_logps: fused per-sequence sums of them (the pair losses are torch
functions of these sums: minispin.training.losses). Each kernel file holds the Triton kernels, the
autograd.Function and a plain-torch reference; launch.py what every launch needs.

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
from minispin.kernels.sequence_logps import sequence_logps, sequence_logps_reference  # noqa: E402

__all__ = ["linear_logprobs", "linear_logprobs_reference", "sequence_logps", "sequence_logps_reference"]
