"""GGUF file -> Hugging Face folder that transformers loads without the gguf package.

    python -m minispin.convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2-hf [--dtype bfloat16]

Writes config.json (transformers 4.x layout), model.safetensors (dequantized weights, Q/K rows in the HF
order), tokenizer.json and tokenizer_config.json (special tokens, chat template) into OUT_DIR, atomically
(a temporary folder renamed into place); OUT_DIR must not exist yet or be empty.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import load_model, save_model
from .errors import UserError
from .gguf import is_gguf
from .log import print0, run_main
from .tokenizer import load_tokenizer

DTYPES = ("float32", "bfloat16", "float16")


def convert(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None,
            max_shard_size: str = "5GB") -> Path:
    """Write the GGUF file's model and tokenizer as a Hugging Face folder; dtype None keeps the file's
    (float32 for quantized weights). Returns the folder."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not is_gguf(gguf_path):
        raise UserError(f"{gguf_path}: expected a .gguf file (a llama.cpp checkpoint)")
    if not gguf_path.is_file():
        raise UserError(f"{gguf_path}: no such file")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not an empty folder; choose a new OUT_DIR (nothing is overwritten)")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    tokenizer = load_tokenizer(gguf_path)
    model = load_model(gguf_path, dtype=getattr(torch, dtype) if dtype else None)  # config.json records it
    if out_dir.is_dir():
        out_dir.rmdir()  # empty: the finished folder is renamed into its place
    return save_model(model, out_dir, max_shard_size=max_shard_size, extra_texts=tokenizer.files_in_memory)


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m minispin.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("gguf_file", help="a llama.cpp GGUF file of a Llama/Mistral-family model")
    p.add_argument("out_dir", help="the Hugging Face folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="weight dtype (default: the file's; float32 for quantized weights)")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard (default 5GB)")
    args = p.parse_args(argv)

    def run() -> Path:
        out = convert(args.gguf_file, args.out_dir, args.dtype, args.max_shard_size)
        print0(f"wrote {out} (config.json, safetensors, tokenizer.json, tokenizer_config.json)")
        return out

    return run_main(run, list(argv) if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
