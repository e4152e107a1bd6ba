"""minispin.training.losses (CPU): every registered pair loss equals its float64 formula, forward and gradient
w.r.t. the per-sequence log-probs (odd pair counts, sequences without tokens, with and without a reference);
IPO is the paper's formula on summed log-probs; bad inputs; `python -m minispin --loss ipo` end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from minispin.kernels import sequence_logps_reference
from minispin.training import LOSS_TYPES, LOSSES, TrainConfig, pair_loss
from tiny import REPO, make_model_dir


def _formula(loss, lw, ll, beta, eps, targets):
    """Each loss as the papers write it, float64 (log sigmoid written plainly, not through softplus)."""
    z = beta * (lw - ll)
    P = lw.shape[0]
    return {
        "sigmoid": lambda: -(1 - eps) * torch.log(torch.sigmoid(z)) - eps * torch.log(torch.sigmoid(-z)),
        "hinge": lambda: torch.clamp(1 - z, min=0),
        "exponential": lambda: torch.exp(-z),
        "correlation": lambda: 1 - z,
        "sppo": lambda: ((lw - (targets[:P] - 0.5) / beta) ** 2 + (ll - (targets[P:] - 0.5) / beta) ** 2) / 2,
        "ipo": lambda: (lw - ll - 1 / (2 * beta)) ** 2,
    }[loss]().mean()


def _problem(P, seed):
    """Summed log-probs [2P] of random token rows (sequence 1 and the last have no tokens: sums of 0), a
    reference near them, SPPO targets and per-pair smoothing, all float64."""
    g = torch.Generator().manual_seed(seed)
    N = 9 * P
    seq_index = torch.randint(-1, 2 * P, (N,), generator=g)
    seq_index[(seq_index == 1) | (seq_index == 2 * P - 1)] = -1
    seq = sequence_logps_reference(-torch.rand(N, generator=g, dtype=torch.float64) * 2, seq_index, 2 * P)
    ref = seq + torch.randn(2 * P, generator=g, dtype=torch.float64) * 3
    return seq, ref, torch.rand(2 * P, generator=g, dtype=torch.float64), torch.rand(P, generator=g,
                                                                                       dtype=torch.float64) * 0.4


@pytest.mark.parametrize("P", [1, 3, 7])
def test_every_loss_is_its_float64_formula_forward_and_gradient(P):
    seq, ref, targets, eps = _problem(P, seed=P)
    for loss in LOSS_TYPES:
        beta = 0.001 if loss == "sppo" else 0.3
        extra = {"targets": targets} if LOSSES[loss].targets else {}
        smoothings = (0.0, 0.15, eps) if LOSSES[loss].smoothing else (0.0,)
        for with_ref in (True, False):
            r = ref if with_ref else None
            for smoothing in smoothings:
                case = (loss, with_ref, smoothing if isinstance(smoothing, float) else "per pair")
                x = seq.clone().requires_grad_()
                base = x - ref if with_ref else x
                want = _formula(loss, base[:P], base[P:], beta, smoothing, targets)
                (want_grad,) = torch.autograd.grad(want, x)
                x = seq.clone().requires_grad_()
                got = pair_loss(x, r, beta, loss, smoothing, **extra)
                (got_grad,) = torch.autograd.grad(got, x)
                assert got.dtype == torch.float64 and got.shape == (), case
                assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), case
                assert torch.allclose(got_grad, want_grad, rtol=1e-10, atol=1e-12), case
                # float32, as training runs it, within float32 rounding of float64
                x32 = seq.float().requires_grad_()
                got32 = pair_loss(x32, None if r is None else r.float(), beta, loss,
                                  smoothing.float() if isinstance(smoothing, torch.Tensor) else smoothing,
                                  **{k: v.float() for k, v in extra.items()})
                (grad32,) = torch.autograd.grad(got32, x32)
                assert got32.dtype == torch.float32 and got32.item() == pytest.approx(want.item(), rel=1e-5), case
                assert torch.allclose(grad32.double(), want_grad, rtol=1e-4, atol=1e-6 * want_grad.abs().max()), case


def test_ipo_is_the_papers_formula_on_summed_logprobs():
    """IPO (Azar et al. 2023): mean of (h - 1/(2 beta))^2, h = (pi_real - ref_real) - (pi_gen - ref_gen) from
    summed log-probs, h not scaled by beta, no division by length."""
    # by hand: lw = 1, ll = -1, h = 2, 1/(2 beta) = 1 -> 1 (a beta-scaled h would give 0)
    assert pair_loss(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0]), 0.5, "ipo").item() == 1.0
    # summed, not averaged: a 1-token and a 5-token answer with the same sum give the same loss
    tokens = torch.tensor([-2.0, -0.5, -0.5, -0.25, -0.5, -0.25, -1.0], dtype=torch.float64, requires_grad=True)
    seq = sequence_logps_reference(tokens, torch.tensor([0, 1, 1, 1, 1, 1, -1]), 2)
    loss = pair_loss(seq, None, 0.25, "ipo")
    assert seq.tolist() == [-2.0, -2.0] and loss.item() == 4.0  # h = 0: (0 - 2)^2
    # random pairs against the float64 formula, and the gradient 2 (h - 1/(2 beta)) / P on lw, minus it on ll
    g = torch.Generator().manual_seed(0)
    P, beta = 5, 0.1
    pi = (-torch.rand(2 * P, generator=g, dtype=torch.float64) * 40).requires_grad_()
    ref = -torch.rand(2 * P, generator=g, dtype=torch.float64) * 40
    h = (pi[:P] - ref[:P]) - (pi[P:] - ref[P:])
    loss = pair_loss(pi, ref, beta, "ipo")
    assert torch.allclose(loss, ((h - 1 / (2 * beta)) ** 2).mean(), rtol=1e-14)
    (grad,) = torch.autograd.grad(loss, pi)
    d = (2 * (h - 1 / (2 * beta)) / P).detach()
    assert torch.allclose(grad, torch.cat([d, -d]), rtol=1e-12)


def test_loss_types_come_from_the_registry_and_the_config_takes_each():
    assert LOSS_TYPES == tuple(LOSSES) and "ipo" in LOSS_TYPES
    for loss in LOSS_TYPES:
        assert TrainConfig(loss=loss).loss == loss
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="dpop")


def test_pair_loss_bad_inputs():
    seq, ref = torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match="unknown loss 'dpop'"):
        pair_loss(seq, ref, 0.1, "dpop")
    with pytest.raises(ValueError, match="2P >= 2 values"):
        pair_loss(torch.randn(5), None, 0.1)
    with pytest.raises(ValueError, match=r"ref_logps must be a floating tensor \[4\]"):
        pair_loss(seq, torch.randn(6), 0.1)
    with pytest.raises(ValueError, match="beta must be a positive"):
        pair_loss(seq, ref, 0.0)
    with pytest.raises(ValueError, match="needs targets"):
        pair_loss(seq, ref, 0.001, "sppo")
    with pytest.raises(ValueError, match="only used by loss='sppo'"):
        pair_loss(seq, ref, 0.1, "ipo", targets=torch.rand(4))
    with pytest.raises(ValueError, match="targets are probabilities"):
        pair_loss(seq, ref, 0.001, "sppo", targets=torch.tensor([0.5, 1.5, 0.2, 0.1]))
    with pytest.raises(ValueError, match=r"per-pair label_smoothing must have shape \(2,\)"):
        pair_loss(seq, ref, 0.1, "sigmoid", torch.zeros(3))
    with pytest.raises(ValueError, match="applies to loss='sigmoid' only"):
        pair_loss(seq, ref, 0.1, "hinge", 0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]"):
        pair_loss(seq, ref, 0.1, "sigmoid", 1.5)


def test_cli_trains_with_ipo_end_to_end(tmp_path):
    """`python -m minispin ... --loss ipo`: one SPIN iteration (generation, reference pass, training, saved
    model) on a tiny model. The first step's policy is the reference, so h = 0 and the loss is 1/(4 beta^2)."""
    model_dir = make_model_dir(tmp_path / "base")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "response": f"It is {2 * i}."}) + "\n"
                            for i in range(4)))
    out = tmp_path / "run"
    argv = ["--model", str(model_dir), "--data", str(data), "--output_dir", str(out), "--loss", "ipo",
            "--iterations", '[{"lr": 1e-3, "beta": 0.5}]', "--num_iterations", "1", "--epochs", "1",
            "--global_batch_size", "2", "--micro_batch_size", "2", "--max_length", "48", "--max_prompt_length",
            "24", "--max_new_tokens", "6", "--progress", "false", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1",
                                                                               "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-m", "minispin", *argv], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "loss ipo" in res.stderr + res.stdout
    metrics = [json.loads(line) for line in (out / "iter0" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and metrics[0]["loss"] == pytest.approx(1 / (4 * 0.5 ** 2), rel=1e-4)
    assert (out / "iter0" / "model" / "model.safetensors").is_file()
