"""Run the test suite's CUDA tests (marked `cuda`) and print one JSON line per test: its outcome, time
and, for a failure or skip, the reason. benchmarks/gpu_check.sh runs this on the GPU (without a GPU
every test reports skipped: "needs a CUDA GPU").

    python benchmarks/run_cuda_tests.py                       # every CUDA test
    python benchmarks/run_cuda_tests.py --skip-kernel-check   # not test_compiled_kernels_on_cuda (gpu_check's step 1)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests test this checkout's minispin (not another installed copy)


class _Outcomes:
    """pytest plugin: the outcome of each test's call (or of its setup, when that skipped or failed)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            record = {"test": report.nodeid, "outcome": report.outcome, "seconds": round(report.duration, 2)}
            if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
                record["reason"] = str(report.longrepr[2])
            elif report.outcome == "failed":
                record["reason"] = str(report.longrepr)[-3000:]
            self.records.append(record)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-kernel-check", action="store_true",
                        help="leave out test_compiled_kernels_on_cuda (benchmarks/check_kernels.py ran it)")
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    selection = "cuda and not test_compiled_kernels_on_cuda" if args.skip_kernel_check else "cuda"
    plugin = _Outcomes()
    with contextlib.redirect_stdout(sys.stderr):  # pytest's report to stderr; stdout stays JSON lines
        code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", selection, str(ROOT / "tests")], plugins=[plugin])
    for record in plugin.records:
        print(json.dumps(record), flush=True)
    counts = {k: sum(r["outcome"] == k for r in plugin.records) for k in ("passed", "failed", "skipped")}
    print(json.dumps({"cuda_tests": counts, "pytest_exit": int(code)}), flush=True)
    return 0 if counts["failed"] == 0 and int(code) in (0, 5) else 1


if __name__ == "__main__":
    sys.exit(main())
