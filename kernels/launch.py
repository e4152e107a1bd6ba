"""What every kernel file needs around a launch: run on the tensors' CUDA device, tell whether Triton built the
kernels for its CPU interpreter, and pick the backend (Triton or plain torch) for a call."""
from __future__ import annotations

import contextlib

import torch
import triton.language as tl


def on_device(device: torch.device):
    """Triton launches on the *current* CUDA device, not the tensors' one: make them the same (a tensor on
    cuda:1 while cuda:0 is current would otherwise be read through the wrong device's address space)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def interpreted(kernel) -> bool:
    """Triton built `kernel` for its CPU interpreter: TRITON_INTERPRET=1 was set when triton was imported
    (Triton decides at decoration time, so setting it later has no effect)."""
    # tl.sum stands for Triton's own library kernels, which must be interpreted too.
    return all(type(k).__name__ == "InterpretedFunction" for k in (kernel, tl.sum))


def triton_runs_on(device: torch.device, kernel) -> bool:
    """CUDA, or CPU through Triton's interpreter."""
    return device.type == "cuda" or interpreted(kernel)


def pick_backend(name: str, backend: str | None, device: torch.device, kernel) -> str:
    """"triton" or "torch" for a call of `name` on `device`: None = Triton where it runs (CUDA, or CPU under the
    interpreter), torch otherwise; a forced "triton" that cannot run here is an error naming the way out."""
    if backend is None:
        return "triton" if triton_runs_on(device, kernel) else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"{name}: backend must be 'triton', 'torch' or None, got {backend!r}")
    if backend == "triton" and not triton_runs_on(device, kernel):
        raise RuntimeError(f"{name}: the Triton backend needs CUDA tensors (got {device}) or Triton's CPU "
                           "interpreter (TRITON_INTERPRET=1 set before triton is imported); or use backend='torch'")
    return backend
