"""The methods demo over seeds (`python -m minispin.demo.methods --seeds K`), CPU, at the reduced size."""
import json
import statistics

import pytest

from minispin.demo import methods as methods_demo


def test_methods_demo_seeds_summarizes_each_seed_and_reads_finished_ones_back(tmp_path):
    """--seeds 2 with two cheap methods, one process on CPU: every seed is a full methods-demo run in
    <out>/seed<s> (results.json with stages + interval rows, results.md, each method's eval_table), the
    summary's stages are SFT then every method's iterations, its numbers are the mean of the per-seed
    results, and a rerun reads both seeds back (the numbers themselves are not meaningful at this size)."""
    out = tmp_path / "methods_seeds"
    argv = ["--small", "--nproc", "1", "--device", "cpu", "--seeds", "2", "--methods", "continued_sft,dpo",
            "--out", str(out)]
    assert methods_demo.main(argv) == 0
    summary = json.loads((out / "seeds.json").read_text())
    names = ["sft", "continued_sft_iter0", "continued_sft_iter1", "dpo_iter0", "dpo_iter1"]
    labels = ["SFT", "continued SFT iter 0", "continued SFT iter 1", "DPO iter 0", "DPO iter 1"]
    assert summary["seeds"] == [0, 1] and summary["seeds_computed_this_run"] == 2
    assert [s["stage"] for s in summary["stages"]] == names and [s["label"] for s in summary["stages"]] == labels

    runs = [json.loads((out / f"seed{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [r["config"]["demo"]["seed"] for r in runs] == [0, 1]
    for seed, r in zip((0, 1), runs):  # each seed is the single-run path's output
        assert [s["stage"] for s in r["stages"]] == names and [x["stage"] for x in r["stats"]] == labels
        assert (out / f"seed{seed}" / "results.md").is_file()
        assert all((out / f"seed{seed}" / m / "eval_table.json").is_file() for m in ("continued_sft", "dpo"))
        assert all(len(s["correct"]) == r["sft"]["n_test"] for s in r["stages"])
    # the seeds differ (init, data order, label noise): not one run summarized twice
    assert runs[0]["sft"]["mean_logprob"] != runs[1]["sft"]["mean_logprob"]

    for i, row in enumerate(summary["stages"]):
        per_seed = [r["stages"][i] for r in runs]
        assert row["seeds"] == 2
        assert row["exact_match"]["mean"] == pytest.approx(statistics.mean(s["exact_match"] for s in per_seed))
        assert row["exact_match"]["se"] == pytest.approx(
            statistics.stdev(s["exact_match"] for s in per_seed) / 2 ** 0.5)
        assert row["mean_logprob"]["mean"] == pytest.approx(statistics.mean(s["mean_logprob"] for s in per_seed))
        for skill, v in row["exact_match_by_skill"].items():
            assert v["mean"] == pytest.approx(statistics.mean(s["exact_match_by_skill"][skill] for s in per_seed))
        if i == 0:
            assert "vs_baseline" not in row
            continue
        diffs = [s["exact_match"] - r["stages"][0]["exact_match"] for s, r in zip(per_seed, runs)]
        v = row["vs_baseline"]
        assert v["values"] == pytest.approx(diffs) and v["mean"] == pytest.approx(statistics.mean(diffs))
        assert v["low"] <= v["mean"] <= v["high"]
        paired = [r["stats"][i]["vs_baseline"] for r in runs]
        assert row["seeds_above"] == sum(p["low"] > 0 for p in paired)
        assert row["seeds_below"] == sum(p["high"] < 0 for p in paired)
    table = (out / "seeds.md").read_text().strip()
    assert table == summary["table"] and "Mean ± standard error over 2 seeds (0, 1)" in table
    assert all(f"| {label} |" in table for label in labels)

    # a rerun reads both finished seeds back and writes the same summary
    assert methods_demo.main(argv) == 0
    again = json.loads((out / "seeds.json").read_text())
    assert again["seeds_computed_this_run"] == 0 and again["stages"] == summary["stages"]
