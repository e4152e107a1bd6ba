"""Checkpoint loading benchmark: minispin.load_model vs transformers' from_pretrained, time and peak RSS.

Writes a random Llama/Mistral-shaped checkpoint (single file and sharded), then loads each in fresh
subprocesses, alternating minispin and transformers (`--repeats` times each), with a warm page cache and
with a cold one (the checkpoint's pages dropped with posix_fadvise(DONTNEED) before the process starts).
Both map the file, so "load" (the call returning) can leave pages unread: each process then touches one
element of every 4 KiB page of every parameter, and "ready" (load + touch) is the comparable time.
Reported per case: best and median seconds of both, CPU seconds, the ratio transformers / minispin
(> 1: minispin faster), and minispin's peak resident memory over the checkpoint's size (target <= 1.3).
One JSON line per case. Then the real model (minispin.pinned, SmolLM2-135M-Instruct Q4_1): its GGUF file
dequantized to float32 (minispin.load_model vs transformers' from_pretrained(gguf_file=...)), and the
Hugging Face folder `python -m minispin.convert` writes from it (float32), warm cache.

    python benchmarks/bench_load.py                   # ~2 GB bf16 checkpoint (Mistral-7B layer shapes, 3 layers) + real model
    python benchmarks/bench_load.py --real-only       # only the real model (GGUF and converted folder)
    python benchmarks/bench_load.py --smoke           # seconds, for CI (single file, cold cache only)
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


def child(folder: str, dtype: str, loader: str) -> None:
    """Runs in a fresh process: import everything, then measure what loading adds."""
    import torch

    if loader == "transformers":
        import transformers

        def load(path, dt):
            if path.endswith(".gguf"):  # transformers' own GGUF loading (dequantizes with the gguf package)
                p = Path(path)
                return transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=dt)
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dt)
    else:
        from minispin import load_model as load

    # Warm up what every load pays once whatever the size (meta-device op registrations, ~150 MB of
    # library pages) so the baseline isolates the memory that grows with the checkpoint.
    torch.ones(1).to("meta") + 1
    base = proc_status_kib("VmRSS")
    cpu0 = os.times()
    t0 = time.perf_counter()
    model = load(folder, getattr(torch, dtype))
    loaded = time.perf_counter() - t0
    touched = 0.0
    with torch.no_grad():
        for p in model.parameters():  # one element of every 4 KiB page: every byte is then resident
            touched += float(p.detach().reshape(-1)[:: max(1, 4096 // p.element_size())].float().sum())
    ready = time.perf_counter() - t0
    cpu1 = os.times()
    peak = proc_status_kib("VmHWM")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"base_rss_kib": base, "peak_rss_kib": peak, "load_s": loaded, "ready_s": ready,
                      "cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system), "param_bytes": params,
                      "touch_sum": touched}))


def drop_from_page_cache(folder: Path) -> None:
    """Evict the checkpoint's pages from the page cache (clean pages; no privileges needed)."""
    for f in checkpoint_files(folder):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# transformers must not look anything up online (it would wait on timeouts here, and time them)
OFFLINE_ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def checkpoint_files(path: Path) -> list[Path]:
    """A checkpoint folder's safetensors files, or a GGUF file itself."""
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint_files(folder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", help="the checkpoint's dtype")
    ap.add_argument("--load-dtype", default=None, help="the loaded model's dtype (default: the checkpoint's; "
                                                       "float32 is the training path: converted while loading)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="fresh processes per loader and case (default 3; smoke 1)")
    ap.add_argument("--no-transformers", action="store_true", help="minispin only")
    ap.add_argument("--real-only", action="store_true", help="only the real model (GGUF file and converted folder)")
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
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
    repeats = args.repeats or (1 if args.smoke else 3)
    loaders = ["minispin"] + ([] if args.no_transformers or not _has_transformers() else ["transformers"])
    try:
        caches, layouts = (("cold",), ("single",)) if args.smoke else (("warm", "cold"), ("single", "sharded"))
        if not args.real_only:
            run_cases(cfg, dtype, shard, root, args.load_dtype or args.dtype, repeats, loaders, caches, layouts)
        if args.real_only or not args.smoke:
            run_real(root, repeats, loaders)
    finally:
        if args.dir is None:  # the 7B-shaped checkpoints are tens of GB: do not leave them in /tmp
            shutil.rmtree(root, ignore_errors=True)


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def run_cases(cfg, dtype, shard: str, root: Path, dtype_name: str, repeats: int, loaders: list[str],
              caches: tuple[str, ...] = ("warm", "cold"), layouts: tuple[str, ...] = ("single", "sharded")) -> None:
    import torch

    from minispin import save_model
    from minispin.checkpoint import build_model

    if not (root / "sharded" / "config.json").is_file():  # --dir keeps the checkpoints between runs
        model = build_model(cfg, "cpu").to(dtype)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        save_model(model, root / "single", max_shard_size="1000GB")
        save_model(model, root / "sharded", max_shard_size=shard)
        del model
    print(f"# checkpoints in {root}; torch {torch.__version__}; {os.cpu_count()} CPUs; loaders {loaders}",
          file=sys.stderr)
    for layout in layouts:
        for cache in caches:
            run_case(root / layout, cache, {"layout": layout, "checkpoint_dtype": str(dtype).replace("torch.", "")},
                     dtype_name, repeats, loaders)


def run_real(root: Path, repeats: int, loaders: list[str]) -> None:
    """The pinned real model: its GGUF file (dequantized) and the HF folder minispin.convert writes, float32."""
    from minispin import pinned
    from minispin.convert import convert

    gguf_file = pinned.fetch()
    folder = root / "real-converted"
    if not (folder / "config.json").is_file():
        convert(gguf_file, folder, dtype="float32")
    name = pinned.SMOLLM2.name
    run_case(gguf_file, "warm", {"layout": "gguf", "model": name, "checkpoint_dtype": "Q4_1/Q8_0/F32"},
             "float32", repeats, loaders)
    run_case(folder, "warm", {"layout": "converted", "model": name, "checkpoint_dtype": "float32"},
             "float32", repeats, loaders)


def run_case(path: Path, cache: str, labels: dict, dtype_name: str, repeats: int, loaders: list[str]) -> None:
    """Load `path` (a folder or a GGUF file) in fresh processes, alternating the loaders; one JSON line."""
    import statistics

    size = checkpoint_bytes(path)
    runs: dict[str, list[dict]] = {name: [] for name in loaders}
    if cache == "warm":  # read once so that the first timed process finds it cached too
        for f in checkpoint_files(path):
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass
    for _ in range(repeats):
        for name in loaders:  # alternate, so that drifting machine load hits both alike
            if cache == "cold":
                drop_from_page_cache(path)
            out = subprocess.run([sys.executable, __file__, "--_child", str(path), dtype_name, name],
                                 capture_output=True, text=True, check=True, env=OFFLINE_ENV)
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    sums = {name: r[0]["touch_sum"] for name, r in runs.items()}
    assert len({round(v, 2) for v in sums.values()}) == 1, f"the loaders read different weights: {sums}"
    record = {"bench": "load", **labels, "cache": cache, "checkpoint_bytes": size, "load_dtype": dtype_name,
              "repeats": repeats}
    for name, r in runs.items():
        ready = [x["ready_s"] for x in r]
        peak = max(x["peak_rss_kib"] for x in r) * 1024
        record[name] = {"ready_s_best": round(min(ready), 3),
                        "ready_s_median": round(statistics.median(ready), 3),
                        "load_s_best": round(min(x["load_s"] for x in r), 3),
                        "cpu_s_median": round(statistics.median(x["cpu_s"] for x in r), 3),
                        "GB_per_s_best": round(size / min(ready) / 1e9, 2),
                        "peak_rss_over_checkpoint": round(peak / size, 3),
                        "peak_rss_over_model": round(peak / r[0]["param_bytes"], 3),
                        "loading_rss_over_checkpoint": round(
                            max(x["peak_rss_kib"] - x["base_rss_kib"] for x in r) * 1024 / size, 3)}
    if "transformers" in runs:
        m, t = record["minispin"], record["transformers"]
        record["speed_vs_transformers_best"] = round(t["ready_s_best"] / m["ready_s_best"], 2)
        record["speed_vs_transformers_median"] = round(t["ready_s_median"] / m["ready_s_median"], 2)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
