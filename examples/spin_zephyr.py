"""The SPIN paper's recipe: zephyr-7b-sft-full on 50k UltraChat200k prompts, iterations 0-3.

    torchrun --nproc_per_node 8 examples/spin_zephyr.py \\
        --model /models/zephyr-7b-sft-full --data /data/ultrachat_200k --out runs/spin-zephyr
    python examples/spin_zephyr.py --demo [--small ...]   # = python -m minispin.demo (CPU, no downloads)

| iter | data                          | lr   | beta |
|------|-------------------------------|------|------|
| 0    | iter-0 synthetic (50k)        | 5e-7 | 0.1  |
| 1    | iter-0 + iter-1 (100k)        | 5e-7 | 0.1  |
| 2    | iter-1 + iter-2               | 1e-7 | 0.1  |
| 3    | iter-2 + iter-3               | 1e-7 | 5.0  |
RMSProp without weight decay, global batch 64, linear schedule with 10% warmup, 2 epochs per
iteration, max length 1024 / prompt 512, bf16 compute with fp32 master weights, generation of at
most 256 new tokens at temperature 1, ONE prompt template (the model's chat template) for generation
and training. Those are minispin's RunConfig defaults; this script adds the 50k-prompt limit and the
train_sft split (of a folder; a single file is read whole). Every option can be overridden (`--help`), e.g.
`--num_iterations 1`, `--train.micro_batch_size 4`, `--lr 1e-7` (every iteration; the betas stay the
paper's), `--iterations '[{"lr": 1e-6, "beta": 0.1}]'` (replaces the whole schedule).
Re-running the same command resumes the run.
"""
from __future__ import annotations

from minispin.cli import run_recipe
from minispin.demo.__main__ import main as demo_main

# The recipe on top of RunConfig's (paper) defaults; options you give win over it.
RECIPE = {"limit": 50000, "split": "train_sft", "num_iterations": 4, "output_dir": "runs/spin-zephyr"}

if __name__ == "__main__":
    run_recipe(RECIPE, description=__doc__, demo=demo_main)
