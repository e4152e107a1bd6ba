"""Fixtures shared by the kernel tests (CPU): `poison` starts every kernel buffer as NaN / garbage."""
import pytest

from kernel_helpers import _poisoned_empty, llp_mod, pl_mod


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(llp_mod, "_empty", _poisoned_empty)
    monkeypatch.setattr(pl_mod, "_empty", _poisoned_empty)
