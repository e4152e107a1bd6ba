"""minispin.training.policy (CPU, tiny model): PolicyHead + batch_loss give the loss, rewards and
gradients of a float64 recomputation, for the sigmoid and hinge losses."""
from __future__ import annotations

import pytest
import torch

from minispin.collate import collate_pairs, tokenize_pairs
from minispin.training import PolicyHead, TrainConfig, batch_loss
from tiny import make_pairs
from train_helpers import _float64_stats


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_loss_rewards_and_grads_match_float64(setup, loss_type):
    _, model_dir, tok = setup
    from minispin.checkpoint import load_model

    model = load_model(model_dir, dtype=torch.float32)
    pairs = make_pairs(4, seed=1)
    refs = [-20.0, -15.5, -30.25, -12.0, -25.0, -18.0, -9.5, -40.0]
    beta = 0.7
    cfg = TrainConfig(beta=beta, loss=loss_type, device="cpu")
    tps = tokenize_pairs(pairs, tok, max_length=128, max_prompt_length=64)
    batch = collate_pairs(tps, ref_logps={i: (refs[i], refs[4 + i]) for i in range(4)})
    policy = PolicyHead(model)
    loss, seq = batch_loss(policy, batch, cfg)
    loss.backward()
    loss64, real64, gen64, r_real64, r_gen64, grads64 = _float64_stats(model, tok, pairs, refs, beta, loss_type)
    assert loss.item() == pytest.approx(loss64, rel=1e-5, abs=1e-6)
    assert torch.allclose(seq[:4].double(), real64, rtol=1e-5, atol=1e-4)
    assert torch.allclose(seq[4:].double(), gen64, rtol=1e-5, atol=1e-4)
    rewards_real = beta * (seq[:4].double() - torch.tensor(refs[:4], dtype=torch.float64))
    assert torch.allclose(rewards_real, r_real64, atol=1e-4)
    for name, p in model.named_parameters():
        g64 = grads64[name]
        scale = g64.abs().max().item() + 1e-6
        assert (p.grad.double() - g64).abs().max().item() <= 2e-4 * scale + 1e-7, name
