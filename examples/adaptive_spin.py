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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run  # noqa: E402

RECIPE = ["--method", "adaptive", "--limit", "50000", "--split", "train_sft", "--num_iterations", "4",
          "--judge.tau", "5", "--judge.smoothing", "0.1", "--output_dir", "runs/adaptive"]

if __name__ == "__main__":
    run(RECIPE, "adaptive", needs_judge=True, description=__doc__)
