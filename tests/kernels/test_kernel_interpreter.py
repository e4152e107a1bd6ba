"""minispin.kernels.interpreter (CPU): the kernel tests marked `interpreter` run in one child process of their
own with TRITON_INTERPRET=1 (tests/interpreter.py); in the test process they skip."""
from pathlib import Path

import pytest

import interpreter
from minispin.kernels.interpreter import CLASH_PREFIX
from kernel_helpers import INTERPRETED


@pytest.mark.skipif(INTERPRETED, reason="this process is the interpreter run itself")
def test_interpreter_tests_in_their_own_process():
    result = interpreter.run_interpreter_tests(Path(__file__).parent)  # every kernel test file, one child
    output = result.stdout + result.stderr
    if CLASH_PREFIX in output and " passed" not in result.stdout.strip().splitlines()[-1]:
        reason = next(line for line in output.splitlines() if CLASH_PREFIX in line)
        pytest.skip(reason.split(": ", 1)[-1] if reason.startswith("SKIPPED") else reason)
    assert result.returncode == 0, output[-6000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
