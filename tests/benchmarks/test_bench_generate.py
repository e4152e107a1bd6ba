"""benchmarks/bench_generate.py --smoke runs end to end (CPU) and reports minispin next to transformers."""
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
