"""benchmarks/bench_generate.py --smoke runs end to end (CPU) and reports minispin next to transformers."""
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_runs():
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--smoke"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"impl": "minispin"' in proc.stdout and '"impl": "hf"' in proc.stdout and "speedup" in proc.stdout
