"""Whether the kernels run in Triton's CPU interpreter in this process, and whether they can.

Triton decides interpreter-or-compiled once per process: each @triton.jit function reads
TRITON_INTERPRET when it is decorated (when its module is imported); the launch code checks the decorated
kernels' type, so it always runs what was built. Some Triton/numpy pairs cannot run the interpreter at all
(Triton 3.6's interpreter calls int() on 1-element arrays, which numpy >= 2.4 refuses; Triton 3.9 works):
`interpreter_clash()` finds that with a tiny launch of the real kernels and names the versions.
"""
from __future__ import annotations

import numpy
import torch
import triton

from .launch import interpreted
from .linear_logprobs import _logprobs_forward_kernel, linear_logprobs
from .sequence_logps import _segment_sum_kernel, sequence_logps

CLASH_PREFIX = "Triton's CPU interpreter cannot run with the installed numpy"
# numpy's words when a 1-element array meets int() / index(): the interpreter's known failure
_NUMPY_SCALAR_ERRORS = ("only 0-dimensional arrays can be converted", "only length-1 arrays can be converted",
                        "only integer scalar arrays can be converted")


def kernels_interpreted() -> bool:
    """The kernels in this process were built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return interpreted(_logprobs_forward_kernel) and interpreted(_segment_sum_kernel)


def interpreter_clash() -> str | None:
    """In an interpreted process: None when the kernels run; a reason naming the versions when the installed
    Triton interpreter and numpy cannot work together. Any other error is raised: it is a real failure."""
    try:
        hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(7, 8, requires_grad=True)
        linear_logprobs(hidden, weight, torch.tensor([0, 6, -100, 3, 1]), backend="triton").sum().backward()
        tokens = torch.randn(6, requires_grad=True)
        sequence_logps(tokens, torch.tensor([0, 0, 1, 2, 3, -1]), 4, backend="triton").sum().backward()
    except Exception as err:  # noqa: BLE001 - classified here, re-raised unless it is the known clash
        text = f"{err!r} {err.__cause__!r}"
        words = next((w for w in _NUMPY_SCALAR_ERRORS if w in text), None)
        if words is None:
            raise
        return (f"{CLASH_PREFIX}: triton {triton.__version__} + numpy {numpy.__version__} (TypeError: {words} to "
                "Python scalars); Triton >= 3.9, or numpy < 2.4, runs it")
    return None
