"""Checkpoint loading benchmark: peak RSS while loading, as a multiple of the checkpoint's size.

Writes a random Llama/Mistral-shaped checkpoint (single file and sharded), then loads each in a fresh
subprocess with minispin.load_model and reports the peak resident memory of that process over the size
of the checkpoint (target: <= 1.3), plus the load time and read bandwidth. One JSON line per case.

    python benchmarks/bench_load.py                   # ~2 GB bf16 checkpoint (Mistral-7B layer shapes, 3 layers)
    python benchmarks/bench_load.py --smoke           # seconds, for CI
    python benchmarks/bench_load.py --layers 32       # the whole 7B shape (~14.5 GB bf16)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def proc_status_kib(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in KiB. Unlike getrusage's
    ru_maxrss, VmHWM is not inherited from the parent process across fork/exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def child(folder: str, dtype: str) -> None:
    """Runs in a fresh process: import everything, then measure what loading adds."""
    import torch

    from minispin import load_model

    # Warm up what every load pays once whatever the size (meta-device op registrations, ~150 MB of
    # library pages) so the baseline isolates the memory that grows with the checkpoint.
    torch.ones(1).to("meta") + 1
    base = proc_status_kib("VmRSS")
    t0 = time.perf_counter()
    model = load_model(folder, dtype=getattr(torch, dtype))
    elapsed = time.perf_counter() - t0
    peak = proc_status_kib("VmHWM")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base_rss_kib": base, "peak_rss_kib": peak, "seconds": elapsed, "param_bytes": params}))


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        return child(*args._child)

    import torch

    from minispin import ModelConfig

    if args.smoke:
        cfg = ModelConfig(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                          num_attention_heads=8, num_key_value_heads=2, torch_dtype=args.dtype)
        shard = "4MB"
    else:
        cfg = ModelConfig(num_hidden_layers=args.layers, torch_dtype=args.dtype)  # Mistral-7B layer shapes
        shard = "1GB"
    dtype = getattr(torch, args.dtype)
    root = Path(args.dir or tempfile.mkdtemp(prefix="minispin-bench-load-"))
    try:
        run_cases(cfg, dtype, shard, root, args.dtype)
    finally:
        if args.dir is None:  # the 7B-shaped checkpoints are tens of GB: do not leave them in /tmp
            shutil.rmtree(root, ignore_errors=True)


def run_cases(cfg, dtype, shard: str, root: Path, dtype_name: str) -> None:
    import torch

    from minispin import save_model
    from minispin.checkpoint import build_model

    model = build_model(cfg, "cpu").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_model(model, root / "single", max_shard_size="1000GB")
    save_model(model, root / "sharded", max_shard_size=shard)
    del model
    print(f"# checkpoints in {root}; {torch.__version__}; {os.cpu_count()} CPUs", file=sys.stderr)
    for layout in ("single", "sharded"):
        folder = root / layout
        out = subprocess.run([sys.executable, __file__, "--_child", str(folder), dtype_name],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        size = checkpoint_bytes(folder)
        print(json.dumps({
            "bench": "load", "layout": layout, "checkpoint_bytes": size,
            "peak_rss_over_checkpoint": round(r["peak_rss_kib"] * 1024 / size, 3),
            "loading_rss_over_checkpoint": round((r["peak_rss_kib"] - r["base_rss_kib"]) * 1024 / size, 3),
            "seconds": round(r["seconds"], 3), "GB_per_s": round(size / r["seconds"] / 1e9, 2),
        }))


if __name__ == "__main__":
    main()
