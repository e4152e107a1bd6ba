"""A judge / preference scorer as a command (--judge.command "python examples/judge_command.py"):
reads JSON lines {"index": i, "prompt": [messages], "responses": [texts]} on stdin and writes one JSON
list of scores (higher = better) per input line, in order, on stdout. minispin starts it once per
chunk of prompts (--judge.prompts_per_call) and caches the scores in <run>/iter<t>/judge_scores/.

Replace `score` with your judge (a reward model you run locally, an API client you trust, ...).
As shipped it scores answers to the built-in demo task's questions (exact-match checker with graded
closeness, minispin.demo.methods.demo_score), so the command works out of the box on the demo data.
"""
from __future__ import annotations

import json
import sys


def score(prompt: list[dict], responses: list[str]) -> list[float]:
    from minispin.demo.methods import demo_judge

    return demo_judge(prompt, responses)


def main() -> None:
    for line_no, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            scores = score(row["prompt"], row["responses"])
        except Exception as e:  # name the row: minispin shows this message when the command fails
            sys.exit(f"judge_command: input line {line_no} (row {row.get('index')}): {type(e).__name__}: {e}")
        print(json.dumps(scores), flush=True)


if __name__ == "__main__":
    main()
