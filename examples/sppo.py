"""SPPO (self-play preference optimization): Mistral-7B-Instruct-v0.2 on UltraFeedback prompts.

    torchrun --nproc_per_node 8 examples/sppo.py --model /models/Mistral-7B-Instruct-v0.2 \\
        --data /data/ultrafeedback_prompts.jsonl --judge.command "python pairrm_scorer.py" --out runs/sppo
    python examples/sppo.py --demo

Per iteration: K = 5 samples per prompt (temperature 0.7, top-p 0.9) from the current model; the
preference scorer (yours: --judge.function / --judge.command, called with all K samples of a prompt;
PairRM in the SPPO paper) gives scores s_i; P[i][j] = sigmoid(s_i - s_j); chosen / rejected =
argmax / argmin; targets P_win = mean_j P[w][j], P_lose = mean_j P[l][j]; loss
((lw - eta (P_win - 1/2))^2 + (ll - eta (P_lose - 1/2))^2) / 2 with eta = 1000 (beta = 1e-3) on summed
log-ratios - the fused pair-loss kernel's "sppo" mode. The real answer is not a candidate.
Recipe (SPPO's model cards): 3 iterations, lr 5e-7, RMSProp, linear schedule, warmup 0.1, 1 epoch,
global batch 64; no mixing of the previous iteration's pairs. (SPPO also uses a new third of the
prompts every iteration: pass --limit and different --data files per run if you want that.)
Precomputed SPPO data (prompt / chosen / rejected + chosen_probs_win / chosen_probs_lose columns) is
trained on as it is with --generate false.
"""
from __future__ import annotations

from minispin.cli import run_recipe
from minispin.demo import methods as demo_methods

RECIPE = {"method": "sppo", "output_dir": "runs/sppo"}  # the method's schedule is SPPO's recipe


def demo(argv: list[str]):
    return demo_methods.main(["--methods", "sppo", "--out", "runs/demo_sppo", *argv])


if __name__ == "__main__":
    run_recipe(RECIPE, description=__doc__, demo=demo)
