"""benchmarks/check_kernels.py, the kernels' GPU check: the compiled kernels on CUDA against CPU references
(CUDA), and its smoke cases through Triton's interpreter (CPU), so it works before a GPU is there."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tiny import REPO

CHECK_SCRIPT = REPO / "benchmarks" / "check_kernels.py"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_on_cuda():
    """CUDA. The compiled (not interpreted) kernels on the GPU agree with CPU references (float64, or
    float32 for the 2**31-element cases): odd shapes, bf16/fp16/fp32, and sizes whose element offsets
    pass 2**31 (N*H for hidden and d_hidden, V*H for weight and d_weight), which 32-bit index arithmetic
    would corrupt (benchmarks/check_kernels.py). Runs in a fresh process without TRITON_INTERPRET, with
    the tensors on the last GPU (not the current one when there are two)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_AUTOTUNE")}
    result = subprocess.run([sys.executable, str(CHECK_SCRIPT), "--device", "cuda"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert records[-1] == {"check": "summary", "status": "ok", "failed": 0}
    assert sum(r["check"] == "linear_logprobs" for r in records) == 6
    assert all(r["reference"].startswith("cpu") for r in records if "reference" in r)


def test_kernel_check_script_on_cpu_interpreter():
    """CPU. The GPU check script's smoke cases through Triton's interpreter (its own process), so the
    script that benchmarks/gpu_check.sh runs first on the GPU is known to work before a GPU is there."""
    env = {k: v for k, v in os.environ.items() if k != "MINISPIN_AUTOTUNE"}
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, str(CHECK_SCRIPT), "--device", "cpu", "--smoke"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if records[0].get("status") == "skipped":
        pytest.skip(records[0]["reason"])
    assert records[-1] == {"check": "summary", "status": "ok", "failed": 0}
    cases = [r for r in records if r["check"] == "linear_logprobs"]
    assert len(cases) == 2 and all(r["triton"]["err_logps"] <= r["tol"] for r in cases)
