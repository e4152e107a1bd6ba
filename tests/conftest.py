"""Test-wide settings.

- One intra-op thread per process (CI has 2 cores and several tests start 2-rank torchrun jobs, which
  oversubscribe the machine with torch's default thread count).
- No TRITON_INTERPRET in the test process: Triton reads it once, at import, for the whole process, and
  it would reach other tests' subprocesses and torch.compile's inductor. The kernel tests that need the
  interpreter are marked `interpreter` and run in a child process of their own (tests/interpreter.py),
  which is the one place the variable is set.
- Tests say which device they mean: CPU tests pass device="cpu" (or --device cpu), so on a CUDA machine
  they still run on the CPU; CUDA tests are skipped without a GPU and compare with a CPU reference.
- The tree mirrors the code (tests/training/, tests/methods/, ...; no __init__.py files, so every test file's
  basename is unique). pytest's default "prepend" import mode puts this folder on sys.path when it imports
  this file, so the shared helpers here (tiny.py, tiny_run.py, interpreter.py) import by name from every
  subfolder, and a subfolder's own helper module imports by name from its test files.
- `run_here`: a command line (`-m minispin ...` or an example script) run in this process as `python` would
  run it - a child process per call would spend seconds importing torch.
"""
import os
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from interpreter import in_child

os.environ.setdefault("OMP_NUM_THREADS", "1")
if in_child():
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

from minispin.tokenizer import load_tokenizer  # noqa: E402 (after the environment above: imports torch)
from tiny import make_model_dir  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "interpreter: runs the Triton kernels in Triton's CPU interpreter "
                                       "(in its own child process; see tests/interpreter.py)")
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); compares with a CPU reference "
                                       "(benchmarks/run_cuda_tests.py runs these)")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder (fp32 Llama + char tokenizer) and its tokenizer, once per test module that asks
    (the training and collation tests)."""
    root = tmp_path_factory.mktemp("train")
    model_dir = make_model_dir(root)
    return root, model_dir, load_tokenizer(model_dir)


@pytest.fixture
def run_here(monkeypatch, capsys):
    """`python cmd...` run in this process, as the interpreter would run it: sys.argv, runpy as __main__
    (`-m module` or a script path), SystemExit's code; returns returncode / stdout / stderr."""
    def run(cmd: list[str], cwd: Path, **env: str) -> SimpleNamespace:
        for name in ("TRITON_INTERPRET", "MINISPIN_DEBUG", "MINISPIN_TEST_KILL_AT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(cwd)
        module = cmd[1] if cmd[0] == "-m" else None
        monkeypatch.setattr(sys, "argv", [module or cmd[0], *cmd[2 if module else 1:]])
        capsys.readouterr()
        code = 0
        try:
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(cmd[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run
