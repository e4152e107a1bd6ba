"""Fixtures shared by the kernel tests (CPU): `poison` starts every kernel buffer as NaN / garbage."""
import pytest

from kernel_helpers import _poisoned_empty, llp_mod, sl_mod


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(llp_mod, "_empty", _poisoned_empty)
    monkeypatch.setattr(sl_mod, "_empty", _poisoned_empty)
