"""Judge-relabelled SPIN: SPIN's recipe, but a judge scores the real and the generated answer of every
pair before each iteration and the pair is flipped when it prefers the generated answer (the internship
report's "GPT-score" fix of SPIN's labelling issue).

    torchrun --nproc_per_node 8 examples/judge_spin.py --model /models/zephyr-7b-sft-full \\
        --data /data/ultrachat_200k --judge.command "python my_judge.py" --out runs/judge-spin
    python examples/judge_spin.py --demo     # on the built-in demo task, with its exact-match judge

The judge is yours (minispin has no network access built in):
  --judge.function pkg.module:function  or  path/to/file.py:function
        called as function(prompt_messages, [real, generated]) -> [score_real, score_generated]
  --judge.command "cmd args"   JSON lines {"index", "prompt", "responses"} on stdin, one JSON list of
        scores per line on stdout (template: examples/judge_command.py)
  or, training on data that already holds the generated answers and score columns (e.g. the report's
  gpt-score datasets): --generate false --judge.real_column score_real --judge.generated_column score_generated
A tie keeps the SPIN orientation. Flips per iteration: <out>/pair_stats.jsonl and the status line.
Recipe: the SPIN paper's (50k UltraChat200k prompts, iterations 0-3, lr 5e-7/5e-7/1e-7/1e-7, beta
0.1/0.1/0.1/5.0, 2 epochs, previous iteration's pairs mixed in).
"""
from __future__ import annotations

from minispin.cli import run_recipe
from minispin.demo import methods as demo_methods

# the split only applies to a folder of several splits (UltraChat200k's train_sft); a file is read whole
RECIPE = {"method": "judge_spin", "limit": 50000, "split": "train_sft", "num_iterations": 4,
          "output_dir": "runs/judge-spin"}


def demo(argv: list[str]):
    return demo_methods.main(["--methods", "judge_spin", "--out", "runs/demo_judge_spin", *argv])


if __name__ == "__main__":
    run_recipe(RECIPE, description=__doc__, demo=demo)
