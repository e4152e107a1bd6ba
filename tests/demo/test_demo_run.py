"""minispin.demo.run (CPU): the results table's intervals and paired differences, and the demo end to end
at the reduced size on 2 torchrun ranks (gloo): resume, refused settings, --seeds reading the run back."""
import json
import math
import subprocess
import sys

import pytest

from minispin.demo import run as demo_run
from minispin.demo import task as demo_task
from minispin.report import write_report
from minispin.stats import wilson_interval
from demo_helpers import _env, _stage


def test_demo_table_has_intervals_and_paired_differences():
    """Hand-made per-question results: SFT right on 30 of 60; SPIN right on those and 6 more (a paired
    difference of exactly +0.1 that no resample can make negative); continued SFT = SFT."""
    sft = [1] * 30 + [0] * 30
    spin = [1] * 36 + [0] * 24
    stages = [_stage("sft", "SFT", sft), _stage("continued_sft", "continued SFT", list(sft)),
              _stage("spin_iter0", "SPIN iter 0", spin)]
    rows = demo_run.interval_rows(stages)
    assert [r["stage"] for r in rows] == ["SFT", "continued SFT", "SPIN iter 0"]
    assert (rows[0]["low"], rows[0]["high"]) == pytest.approx(wilson_interval(30, 60))
    assert (rows[2]["low"], rows[2]["high"]) == pytest.approx(wilson_interval(36, 60))
    assert "vs_baseline" not in rows[0]
    same = rows[1]["vs_baseline"]
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    better = rows[2]["vs_baseline"]
    assert better["difference"] == pytest.approx(0.1) and 0 < better["low"] < 0.1 < better["high"] <= 0.2
    text = demo_run.format_results(stages)
    lo, hi = wilson_interval(36, 60)
    line = next(x for x in text.splitlines() if x.startswith("SPIN iter 0") and "[" in x)
    assert f"0.600 [{lo:.3f}, {hi:.3f}]" in line
    assert f"+0.100 [{better['low']:+.3f}, {better['high']:+.3f}]" in line
    assert "accuracy [95% CI]" in text and "vs SFT [95% CI, paired]" in text
    assert "mean log p(real)  per token" in text  # the per-skill / log-prob table follows
    assert "60 held-out questions" in text


STAGES = ["sft", "continued_sft", "spin_iter0", "spin_iter1"]


def test_demo_small_two_ranks_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo" / "seed0"  # also seed 0 of the --seeds study in tmp_path / "demo" (below)
    cmd = [sys.executable, "-m", "minispin.demo.toy", "--small", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert [s["stage"] for s in results["stages"]] == STAGES
    for stage in results["stages"]:
        assert 0.0 <= stage["exact_match"] <= 1.0
        assert set(stage["exact_match_by_skill"]) == set(demo_task.SKILLS)
        assert math.isfinite(stage["mean_logprob"]) and stage["mean_logprob"] < 0
        assert math.isfinite(stage["mean_logprob_per_token"])
        assert stage["n_test"] == 96
    # SFT learned something: its answers are likelier than under a uniform guess over the vocabulary
    assert results["stages"][0]["mean_logprob_per_token"] > -math.log(demo_task.vocab_size()) + 0.5
    # the table is printed (rank 0 only: once) and saved
    for label in ("SFT", "continued SFT", "SPIN iter 0", "SPIN iter 1"):
        assert label in results["table"]
    assert proc.stdout.count("mean log p(real)  per token") == 1
    assert (out / "results.txt").read_text().strip() == results["table"]
    # ... with every stage's 95% interval and its paired difference from SFT, from the per-question results
    assert proc.stdout.count("vs SFT [95% CI, paired]") == 1
    for stage, row in zip(results["stages"], results["stats"]):
        assert len(stage["correct"]) == 96 and sum(stage["correct"]) / 96 == stage["exact_match"]
        assert row["stage"] == stage["label"] and (row["low"], row["high"]) == \
            pytest.approx(wilson_interval(sum(stage["correct"]), 96))
        assert ("vs_baseline" in row) == (stage["stage"] != "sft")
        assert f"{row['accuracy']:.3f} [{row['low']:.3f}, {row['high']:.3f}]" in results["table"]
    # every stage's model is a loadable HF folder with the tokenizer
    for model_dir in ("init", "sft/iter0/model", "continued_sft/iter0/model", "spin/iter0/model", "spin/iter1/model"):
        assert (out / model_dir / "config.json").is_file() and (out / model_dir / "tokenizer.json").is_file()
    # SPIN generated real samples from the SFT model and trained on them (+ mixing at iteration 1)
    gen0 = [json.loads(line) for line in (out / "spin/iter0/generated.jsonl").read_text().splitlines()]
    assert len(gen0) == 128
    # the demo's exact match as the seeds' table, and python -m minispin.report on the finished demo run
    table = json.loads((out / "eval_table.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["SFT", "continued SFT", "iter0", "iter1"]
    assert [c["key"] for c in table["columns"]] == list(demo_task.SKILLS)
    assert [r["scores"] for r in table["rows"]] == [s["exact_match_by_skill"] for s in results["stages"]]
    report = write_report(out)
    assert sorted(report.figures) == ["eval.png", "training_continued_sft.png", "training_sft.png",
                                      "training_spin.png"]
    assert all((out / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in report.figures)

    # re-running with the same --out (here in one process) skips every finished stage, same results
    proc2 = subprocess.run([*cmd, "--nproc", "1"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert [s["exact_match"] for s in again["stages"]] == [s["exact_match"] for s in results["stages"]]
    assert "done earlier" in proc2.stderr
    # other settings in the same folder are refused, naming the option
    proc3 = subprocess.run([*cmd, "--nproc", "1", "--seed", "5"], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert proc3.returncode != 0 and "seed" in proc3.stderr

    # --seeds: a finished seed is read back, not recomputed; the summary is written
    proc4 = subprocess.run([sys.executable, "-m", "minispin.demo.toy", "--small", "--nproc", "1", "--seeds", "1", "--out",
                            str(out.parent)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc4.returncode == 0, proc4.stdout[-3000:] + proc4.stderr[-3000:]
    assert "finished earlier, read back" in proc4.stderr and "[run]" not in proc4.stderr
    summary = json.loads((out.parent / "seeds.json").read_text())
    assert summary["seeds"] == [0] and summary["seeds_computed_this_run"] == 0
    assert [s["exact_match"]["values"] for s in summary["stages"]] == [[s["exact_match"]] for s in results["stages"]]
    assert (out.parent / "seeds.md").read_text().strip() == summary["table"]
