"""minispin.demo.methods (CPU): the demo's judge and its margins, the noisy method data, near misses, and
the comparison pipeline at the reduced size (adaptive and SPPO, one process)."""
from __future__ import annotations

import json
import os
import sys

import pytest

from minispin.eval import read_table
from tiny import REPO


def test_demo_judge_scores_and_margins():
    from minispin.demo import task as demo_task
    from minispin.demo.methods import closeness, demo_judge, demo_score

    q = [{"role": "user", "content": "What is 47+38?"}]
    assert demo_judge(q, ["85", " 85 ", "84", "95", "75", "abc", "", "200"]) == \
        pytest.approx([10.0, 10.0, 3.6, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert demo_score("What is 47+38?", "80") == pytest.approx(4.0 * 0.5)
    assert demo_score("Reverse kqzt", "tzqk") == 10.0
    assert demo_score("Reverse kqzt", "tzkq") == pytest.approx(4.0 * 2 / 4)  # two of four positions right
    assert demo_score("Sort kqzt", "kqtzz") == pytest.approx(4.0 * 4 / 5)  # longer answers lose credit
    assert closeness("", "abc") == 0.0
    # right vs any wrong: margin >= 6; wrong vs wrong: margin < 4 (so tau = 5 trusts exactly one-right pairs)
    for question, wrong in (("What is 5+5?", "10 "), ("What is 5+5?", "11"), ("Sort cba", "acb"),
                            ("Reverse abc", "cbaa")):
        s = demo_score(question, wrong)
        assert (s == 10.0) if wrong.strip() == demo_task.answer_of(question) else (0.0 <= s <= 4.0)


def test_demo_method_data_noise_is_deterministic(tmp_path):
    from minispin.demo import task as demo_task
    from minispin.data import read_examples, read_preferences
    from minispin.demo.methods import write_method_data

    train = tmp_path / "train.jsonl"
    rows, _ = demo_task.make_rows(demo_task.TaskConfig(n_train=50, n_test=5))
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = write_method_data(train, tmp_path / "a", 40, 0.25, seed=0)
    b = write_method_data(train, tmp_path / "b", 40, 0.25, seed=0)
    assert a["spin"].read_bytes() == b["spin"].read_bytes()
    examples = read_examples(a["spin"])
    assert len(examples) == 40
    wrong = [e for e in examples if not demo_task.is_correct(e.prompt_text, e.real)]
    assert len(wrong) == 10 and all(e.extra["noisy"] for e in wrong)
    prefs = read_preferences(a["preferences"])
    assert [p.chosen for p in prefs] == [e.real for e in examples]
    assert all(not demo_task.is_correct(p.prompt[-1]["content"], p.rejected) and p.rejected != p.chosen for p in prefs)


def test_near_miss_avoids_given_answers():
    import random

    from minispin.demo.methods import near_miss

    rng = random.Random(0)
    for q, avoid in (("Sort aab", ("aba",)), ("Reverse aaa", ()), ("What is 0+0?", ("1", "2")), ("Sort ab", ("ba",))):
        for _ in range(20):
            miss = near_miss(q, rng, avoid)
            assert miss not in avoid and miss != __import__("minispin.demo.task").demo.task.answer_of(q)


def test_methods_demo_small_runs_adaptive_and_sppo(tmp_path):
    """The comparison pipeline (minispin.demo.methods) at the reduced size, one process: SFT, then the
    adaptive method and SPPO for 2 iterations each; results.json has every iteration's evaluation and the
    per-iteration pair counts (the numbers themselves are not meaningful at this size)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_TEST_KILL_AT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = tmp_path / "demo_methods"
    res = subprocess.run([sys.executable, "-m", "minispin.demo.methods", "--small", "--nproc", "1", "--out", str(out),
                          "--methods", "adaptive,sppo"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["adaptive", "sppo"]
    for name, r in results["methods"].items():
        assert len(r["iterations"]) == 2 and all(0 <= e["exact_match"] <= 1 for e in r["iterations"])
        assert [s["iteration"] for s in r["pair_stats"]] == [0, 1]
    adaptive = results["methods"]["adaptive"]["pair_stats"]
    assert [s["counts"]["pairs"] for s in adaptive] == [128, 256]  # iteration 1 mixes in iteration 0's pairs
    assert [s["counts"]["pairs"] for s in results["methods"]["sppo"]["pair_stats"]] == [128, 128]  # SPPO does not
    table = (out / "results.md").read_text()
    assert "| adaptive |" in table and "| SPPO |" in table
    # every stage with its interval and its paired difference from SFT
    assert "vs SFT [95% CI, paired]" in table and "adaptive iter 1" in table and "SPPO iter 0" in table
    assert all(len(e["correct"]) == results["sft"]["n_test"] for r in results["methods"].values()
               for e in r["iterations"])
    for name, r in results["methods"].items():  # each method's run has the seeds' table, for minispin.report
        table = read_table(out / name)
        assert [row["name"] for row in table["rows"]] == ["SFT", "iter0", "iter1"]
        assert [c["key"] for c in table["columns"]] == ["reverse", "sort", "add"]
        assert [row["scores"] for row in table["rows"][1:]] == [e["exact_match_by_skill"] for e in r["iterations"]]
