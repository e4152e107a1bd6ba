"""minispin: minimal, fast self-play fine-tuning (SPIN, SPPO, DPO) for Llama/Mistral models.

The public API is importable from the top level; names are resolved lazily so that light modules
(`minispin.data`, `minispin.io`) do not pull in torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # model and checkpoints
    "ModelConfig": "model", "Transformer": "model", "KVCache": "model",
    "load_model": "checkpoint", "save_model": "checkpoint",
    # tokenizer and data
    "load_tokenizer": "tokenizer", "Tokenizer": "tokenizer",
    "read_examples": "data", "read_preferences": "data",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'minispin' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = list(_EXPORTS)
