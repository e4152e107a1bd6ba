"""benchmarks/bench_recompute.py --smoke runs (CPU) and reports the three activation modes."""
import json
import subprocess
import sys

from tiny import REPO


def test_bench_recompute_smoke_runs():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_recompute.py"), "--smoke", "--threads", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    modes = {r["mode"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(modes) == {"keep", "recompute", "checkpoint"}
    assert modes["keep"]["ratio_to_keep"] == [1.0, 1.0, 1.0] and modes["recompute"]["median_s"] > 0
