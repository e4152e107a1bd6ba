"""Adaptive judge-or-noise SPIN (the internship report's future work): per pair, if the judge's score
margin |score_real - score_generated| >= tau, trust the judge (flip the pair when it prefers the
generated answer); below tau keep the SPIN pair but train it with label smoothing eps_small.

    torchrun --nproc_per_node 8 examples/adaptive_spin.py --model /models/zephyr-7b-sft-full \\
        --data /data/ultrachat_200k --judge.command "python my_judge.py" --out runs/adaptive
    python examples/adaptive_spin.py --demo

tau = 5 (the report's "margin of score larger than 5", for a judge scoring 1-10) and eps_small = 0.1
by default: --judge.tau, --judge.smoothing. A margin of exactly tau is trusted. Counts of trusted /
flipped / smoothed pairs per iteration: <out>/pair_stats.jsonl and the status line. The judge is given
as in examples/judge_spin.py. Recipe otherwise the SPIN paper's.
"""
from __future__ import annotations

from minispin.cli import run_recipe
from minispin.demo import methods as demo_methods

# the split only applies to a folder of several splits (UltraChat200k's train_sft); a file is read whole
RECIPE = {"method": "adaptive", "limit": 50000, "split": "train_sft", "num_iterations": 4, "judge.tau": 5.0,
          "judge.smoothing": 0.1, "output_dir": "runs/adaptive"}


def demo(argv: list[str]):
    return demo_methods.main(["--methods", "adaptive", "--out", "runs/demo_adaptive", *argv])


if __name__ == "__main__":
    run_recipe(RECIPE, description=__doc__, demo=demo)
