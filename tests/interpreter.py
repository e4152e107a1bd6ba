"""Triton's CPU interpreter for the kernel tests, scoped to one child process.

Triton decides interpreter-or-compiled once per process: every @triton.jit function reads
TRITON_INTERPRET when it is decorated, i.e. when its module is imported (minispin.kernels checks the
decorated kernels' type at launch, so it always runs what was built). Setting the variable for a whole
test session would also reach other tests' subprocesses and torch.compile's inductor (whose Triton
kernels would then run in the interpreter, inside CUDA-graph capture on a GPU). So conftest.py removes
it from the test process, and `run_interpreter_tests` runs the tests marked `interpreter` in a child
pytest with TRITON_INTERPRET=1 set for that child alone.

Where the installed Triton/numpy pair cannot run the interpreter at all
(minispin.kernels.interpreter.interpreter_clash), the interpreter tests skip with a reason naming them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD_FLAG = "MINISPIN_TEST_INTERPRETER_CHILD"


def in_child() -> bool:
    """This process is the interpreter child started by `run_interpreter_tests`."""
    return os.environ.get(CHILD_FLAG) == "1"


def run_interpreter_tests(test_path: str | Path, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run the tests marked `interpreter` in `test_path` (a file or a folder) in a child pytest with
    TRITON_INTERPRET=1."""
    env = {k: v for k, v in os.environ.items() if k != "MINISPIN_AUTOTUNE"}
    env.update({"TRITON_INTERPRET": "1", CHILD_FLAG: "1"})
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(test_path),
                           "-m", "interpreter"], env=env, capture_output=True, text=True, timeout=timeout)
