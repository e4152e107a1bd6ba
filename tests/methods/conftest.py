"""Fixtures shared by the methods tests: a tiny 2-layer Llama with the char tokenizer (CPU), once per module."""
from __future__ import annotations

import pytest
import torch

from tiny import tiny_config, write_char_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from minispin.model import Transformer
    from minispin.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("methods_tok")
    write_char_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    torch.manual_seed(0)
    model = Transformer(tiny_config(max_positions=64))
    return model, tokenizer
