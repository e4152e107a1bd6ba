"""Shared by the demo tests (CPU): the child processes' environment and a hand-made per-stage result."""
import os

from minispin.demo import task as demo_task
from tiny import REPO


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the demo runs the kernels' plain-torch CPU path
    env.pop("MINISPIN_TEST_KILL_AT", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _stage(name, label, correct, by_skill=None, logp=-3.0):
    return {"stage": name, "label": label, "n_test": len(correct), "correct": correct,
            "exact_match": sum(correct) / len(correct), "mean_logprob": logp, "mean_logprob_per_token": logp / 4,
            "exact_match_by_skill": by_skill or {s: sum(correct) / len(correct) for s in demo_task.SKILLS}}
