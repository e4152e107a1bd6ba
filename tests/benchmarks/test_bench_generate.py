"""benchmarks/bench_generate.py --smoke runs end to end (CPU) and reports minispin next to transformers."""
import importlib.util
import subprocess
import sys

import pytest

from tiny import REPO


def test_bench_smoke_runs():
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_generate.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"impl": "minispin"' in proc.stdout and '"impl": "hf"' in proc.stdout and "speedup" in proc.stdout


def test_compare_with_hf_runs_on_a_tiny_checkpoint(tmp_path, capsys):
    """CPU. compare_with_hf (what bench_peers.py calls on the real model) end to end on a tiny checkpoint:
    one run per (impl, batch, setting) and repeat, exactly new_tokens per prompt, paired ratios."""
    pytest.importorskip("transformers")
    from tiny import make_model_dir
    spec = importlib.util.spec_from_file_location("_minispin_bench_generate", REPO / "benchmarks" / "bench_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.compare_with_hf(make_model_dir(tmp_path), bench.alpaca_prompts(3), batches=(1, 3), new_tokens=5,
                                 repeats=2, threads=None)
    runs = [r for r in rows if r["compare"] == "run"]
    assert len(runs) == 2 * 2 * 2 * 2 and all(r["tokens"] == 5 * r["batch"] for r in runs)
    summary = [r for r in rows if r["compare"] == "summary" and "setting" in r]
    assert {(r["batch"], r["setting"]) for r in summary} == {(b, s) for b in (1, 3) for s in ("greedy", "top_p")}
    assert all(0 < r["minispin_over_hf"]["min"] <= r["minispin_over_hf"]["median"] <= r["minispin_over_hf"]["max"]
               for r in summary)
    assert '"compare": "summary"' in capsys.readouterr().out
