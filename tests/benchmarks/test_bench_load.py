"""benchmarks/bench_load.py --smoke runs end to end (CPU): load times, memory and speed next to transformers."""
import json

from tiny import REPO


def test_load_benchmark_smoke_runs():
    import subprocess
    import sys

    bench = REPO / "benchmarks" / "bench_load.py"
    out = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["layout"], r["cache"]) for r in rows] == [("single", "cold")]
    assert all(r["minispin"]["loading_rss_over_checkpoint"] > 0 for r in rows)
    assert all(r["minispin"]["ready_s_best"] >= r["minispin"]["load_s_best"] > 0 for r in rows)
    assert all(r["speed_vs_transformers_best"] > 0 for r in rows)  # transformers is a test dependency
