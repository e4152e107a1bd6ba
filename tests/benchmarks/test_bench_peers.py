"""benchmarks/bench_peers.py end to end on a tiny fixture model (CPU): pairs generated and cached, both
jobs (minispin's DPO command and TRL's DPOTrainer) run in child processes, trained and measured."""
import json
import subprocess
import sys

import pytest

from tiny import REPO, make_model_dir


def test_bench_peers_small_path_runs_both_jobs(tmp_path):
    pytest.importorskip("trl")
    model = make_model_dir(tmp_path / "tiny")
    work = tmp_path / "work"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_peers.py"), "--model-dir", str(model),
           "--work-dir", str(work), "--pairs", "4", "--repeats", "1", "--max-length", "120",
           "--max-prompt-length", "64", "--micro", "2", "--batch", "4", "--threads", "1", "--no-results"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    runs = {r["job"]: r for r in lines if "job" in r}
    assert set(runs) == {"minispin", "trl"}
    assert all(r["wall_s"] > 0 and r["peak_rss_gb"] > 0.05 for r in runs.values())
    summary = lines[-1]["summary"]
    assert summary["speed_ratio"][1] == pytest.approx(runs["trl"]["wall_s"] / runs["minispin"]["wall_s"])
    # the same 4 pairs for both, both trained a model; the pairs are cached for the next run
    (pairs,) = work.glob("pairs-4-*.jsonl")
    assert len(pairs.read_text().splitlines()) == 4
    assert (work / "runs" / "minispin" / "out" / "iter0" / "model" / "model.safetensors").is_file()
    assert (work / "runs" / "trl" / "out" / "model" / "model.safetensors").is_file()
    assert "Peer benchmark" in proc.stderr and "| TRL `DPOTrainer`" in proc.stderr


def test_bench_peers_generation_half_reports_ratios_without_trl(tmp_path):
    """`--jobs generate` (CPU, tiny checkpoint, transformers only): minispin.generate vs HF generate at two
    batch sizes, greedy and top-p; the summary and the report carry the ratios and the targets."""
    model = make_model_dir(tmp_path / "tiny")
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_peers.py"), "--model-dir", str(model), "--work-dir",
           str(tmp_path / "work"), "--jobs", "generate", "--gen-batches", "1,3", "--new-tokens", "4",
           "--repeats", "2", "--threads", "1", "--no-results"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    runs = [r for r in lines if r.get("compare") == "run"]
    assert len(runs) == 2 * 2 * 2 * 2  # repeats x batches x settings x libraries
    summary = lines[-1]["summary"]
    assert summary["jobs"] == {} and "speed_ratio" not in summary
    rows = {(r["batch"], r.get("setting")): r for r in summary["generation"]}
    assert set(rows) == {(1, "greedy"), (1, "top_p"), (3, "greedy"), (3, "top_p"), (1, None), (3, None)}
    for (batch, setting), r in rows.items():
        if setting:  # minispin / HF over the repeats
            ratio = r["minispin_over_hf"]
            assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"]
    assert "| 3 | top_p |" in proc.stderr and "batch 1 greedy" in proc.stderr and "target ≥ 1.3" in proc.stderr
    assert "Training setup" not in proc.stderr
