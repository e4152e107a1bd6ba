"""A tiny but real SPIN run directory for the report and eval tests: a 2-layer Llama with the char
tokenizer saved by minispin.save_model, two SPIN iterations run by the real driver (generation,
reference pass, training, saved models) on 8 prompts, in one process on CPU (~5-10 s)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from minispin.checkpoint import save_model
from minispin.generation_job import GenerationConfig
from minispin.model import Transformer
from minispin.driver import RunConfig, spin
from minispin.training import TrainConfig
from tiny import tiny_config, write_char_tokenizer

ITERATIONS = 2
STEPS = (4, 8)
LONG = " (twice seven, which is an even number)"  # optimizer steps of iterations 0 and 1 (8 pairs, then 16 with the previous iteration's)


def tiny_run(tmp_path_factory) -> Path:
    """The run directory (built once per test session, shared by the modules that use it)."""
    root = tmp_path_factory.getbasetemp() / "tiny_spin_run"
    run = root / "run"
    if (root / "done").is_file():
        return run
    shutil.rmtree(root, ignore_errors=True)
    model_dir = root / "sft-model"
    write_char_tokenizer(model_dir)
    torch.manual_seed(0)
    save_model(Transformer(tiny_config()), model_dir,
               extra_files=[str(model_dir / "tokenizer.json"), str(model_dir / "tokenizer_config.json")])
    data = root / "sft.jsonl"
    # the last answer is too long for max_length 48: one pair per iteration's new pairs is truncated
    data.write_text("".join(json.dumps({"prompt": f"what is {i}+{i}?", "response": f"it is {2 * i}." + LONG * (i == 7)})
                            + "\n" for i in range(8)))
    spin(RunConfig(
        model=str(model_dir), data=str(data), output_dir=str(run), iterations=[{"lr": 1e-3, "beta": 0.1}] * ITERATIONS,
        save_dtype="float32", max_prompt_length=24,
        train=TrainConfig(epochs=1, global_batch_size=2, micro_batch_size=2, max_length=48,
                          optimizer="adamw", progress=False, device="cpu"),
        generation=GenerationConfig(max_new_tokens=6, batch_size=8, progress=False)))
    (root / "done").write_text("")
    return run


def copy_run(run: Path, dest: Path) -> Path:
    """A copy of the run to modify in a test (the shared one stays as it is)."""
    shutil.copytree(run, dest)
    return dest
