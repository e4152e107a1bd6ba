"""Shared benchmark helpers: device choice, timing, peak memory, matmul rate, JSON-line results.

Convention for every benchmark script: `--smoke` runs tiny fp32 shapes on whatever device is there
(CPU included) in seconds, so a test can call `main(["--smoke"])`; without it the script runs the
full GPU configuration. Each measurement is printed as one JSON line on stdout (`emit`); a readable
summary goes to stderr (`note`).
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--smoke", action="store_true",
                        help="tiny fp32 shapes, few repeats: a seconds-long check that runs on CPU")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls (the median is reported)")
    parser.add_argument("--json-out", default=None, help="also append the JSON lines to this file")
    return parser


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10) -> dict:
    """Run fn warmup + repeats times; wall time per call in ms (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_mean": statistics.fmean(times),
            "repeats": repeats}


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of fn above what was allocated before it (CUDA only; None on CPU).

    Whatever fn returns is dropped before it returns here, so this is the transient working set
    (activations, scratch, gradients) of the call, not counting its inputs.
    """
    if device.type != "cuda":
        return None
    gc.collect()
    synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return int(peak)


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device,
                  warmup: int = 3, repeats: int = 10) -> float:
    """Measured rate of torch.mm([m, k] @ [k, n]) in TFLOP/s: the ceiling the kernels are judged against."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    ms = time_fn(lambda: torch.mm(a, b), device, warmup, repeats)["ms"]
    del a, b
    return 2.0 * m * n * k / (ms * 1e-3) / 1e12


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def env_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, gpu_mem_gib=round(props.total_memory / 2**30, 1))
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


_JSON_OUT: str | None = None


def set_json_out(path: str | None) -> None:
    global _JSON_OUT
    _JSON_OUT = path


def emit(record: dict) -> None:
    """Print one result as a JSON line on stdout (and append it to --json-out when given)."""
    line = json.dumps(record, default=str, sort_keys=False)
    print(line, flush=True)
    if _JSON_OUT:
        with open(_JSON_OUT, "a") as f:
            f.write(line + "\n")


def note(text: str) -> None:
    """Human-readable progress / summary line (stderr, so stdout stays pure JSON lines)."""
    print(text, file=sys.stderr, flush=True)


def fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b
