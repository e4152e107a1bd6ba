"""minispin.training.optim (CPU): the warmup-then-linear-decay schedule, and the step's memory model for
Mistral-7B on one H200 (the optimizer updates one tensor at a time)."""
from __future__ import annotations

import pytest
import torch

from minispin.training import TrainConfig, lr_at


def test_lr_schedule_warmup_then_linear_decay():
    cfg = TrainConfig(lr=1.0, warmup_ratio=0.1)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)  # warmup = ceil(2) steps
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(1 / 18)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_memory_model_fits_7b_on_one_h200():
    """CPU. The step's memory model (printed by bench_train next to the measured peak) for Mistral-7B on one
    H200 (139 GiB) at the default micro batch and length: RMSProp and AdamW fit, with activation
    checkpointing on or off; the optimizer updates one tensor at a time (no full-size temporaries)."""
    from minispin.model import ModelConfig
    from minispin.training.optim import build_optimizer, memory_estimate

    mistral_7b = ModelConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                             torch_dtype="bfloat16", architecture="MistralForCausalLM")
    figures = {}
    for optimizer in ("rmsprop", "adamw"):
        for ac in (False, True):
            m = memory_estimate(mistral_7b, TrainConfig(optimizer=optimizer, activation_checkpointing=ac))
            assert m["total"] == pytest.approx(sum(v for k, v in m.items() if k != "total"))
            assert m["total"] < 139, (optimizer, ac, m)
            figures[optimizer, ac] = m
    params = 7.24e9  # Mistral-7B
    assert figures["rmsprop", False]["weights_fp32"] == pytest.approx(4 * params / 2**30, rel=0.01)
    assert figures["adamw", False]["optimizer_state"] == pytest.approx(2 * figures["rmsprop", False]["optimizer_state"])
    assert figures["adamw", True]["activations"] < figures["adamw", False]["activations"] / 5
    assert figures["adamw", True]["total"] < 139 - 20  # headroom with checkpointing
    assert figures["rmsprop", False]["optimizer_temp"] < 1  # one tensor's temporary, not a model's
    for optimizer in ("rmsprop", "adamw"):
        opt = build_optimizer(torch.nn.Linear(3, 3), TrainConfig(optimizer=optimizer, device="cpu"))
        assert opt.defaults["foreach"] is False, optimizer
