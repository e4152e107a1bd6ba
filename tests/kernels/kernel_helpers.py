"""Shared by the kernel tests (CPU): the `interpreter` marker, torch.empty poisoned with NaN / garbage (so
unwritten kernel outputs show), and the norm-wise relative error in float64."""
import importlib

import pytest
import torch

from minispin.kernels.interpreter import interpreter_clash, kernels_interpreted

llp_mod = importlib.import_module("minispin.kernels.linear_logprobs")
sl_mod = importlib.import_module("minispin.kernels.sequence_logps")
INTERPRETED = kernels_interpreted()
CLASH = interpreter_clash() if INTERPRETED else None


def needs_interpreter(test):
    """Mark a test as an interpreter test: run in the interpreter child, skipped elsewhere."""
    reason = CLASH or "runs in the interpreter's own process (test_interpreter_tests_in_their_own_process)"
    return pytest.mark.interpreter(pytest.mark.skipif(not INTERPRETED or CLASH is not None, reason=reason)(test))


def _poisoned_empty(*args, **kwargs):
    """torch.empty that fills floats with NaN and integers with garbage: unwritten elements show."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-987654321)


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (norm-wise relative error), in float64."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values (unwritten output?)"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()
