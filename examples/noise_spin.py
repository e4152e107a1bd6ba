"""Noise-SPIN: SPIN's recipe plus noise (the internship report's fix of SPIN's reward-model issue):
label smoothing eps of the sigmoid pair loss, and NEFTune noise on the input embeddings of training
forward passes (uniform(-1, 1) * alpha / sqrt(L * d), L = the row's length, d = hidden size; never in
the reference pass or generation). Either or both.

    torchrun --nproc_per_node 8 examples/noise_spin.py --model /models/zephyr-7b-sft-full \\
        --data /data/ultrachat_200k --out runs/noise-spin
    python examples/noise_spin.py --demo

Defaults here (--method noise_spin): eps = 0.1 and alpha = 5 (NEFTune's smallest setting) on every
iteration of the paper's schedule. Other values or only one kind of noise: --label_smoothing 0.05,
--neftune_alpha 0 (an option given on the command line applies to every iteration), or per iteration
--iterations '[{"lr": 5e-7, "beta": 0.1, "label_smoothing": 0.1, "neftune_alpha": 0}, ...]' (which
replaces the whole schedule). Noise is an option of every pairwise method (dpo, judge_spin, adaptive
too), not a separate loop.
"""
from __future__ import annotations

from minispin.cli import run_recipe
from minispin.demo import methods as demo_methods

# the method's schedule: the paper's, with label smoothing 0.1 and NEFTune alpha 5 on every iteration; the
# split only applies to a folder of several splits (UltraChat200k's train_sft), a single file is read whole
RECIPE = {"method": "noise_spin", "limit": 50000, "split": "train_sft", "output_dir": "runs/noise-spin"}


def demo(argv: list[str]):
    return demo_methods.main(["--methods", "noise_spin", "--out", "runs/demo_noise_spin", *argv])


if __name__ == "__main__":
    run_recipe(RECIPE, description=__doc__, demo=demo)
