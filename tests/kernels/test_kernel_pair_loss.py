"""minispin.kernels.pair_loss (CPU: Triton's interpreter in its own process, and the torch path): every pair
loss and the per-sequence sums against float64, extreme margins stay finite and accurate, bad inputs."""
import pytest
import torch

from minispin.kernels import pair_loss, pair_loss_reference
from kernel_helpers import needs_interpreter, rel_err


def _pair_problem(P, N, seed=0, ref_scale=30.0):
    g = torch.Generator().manual_seed(seed)
    token_logps = -torch.rand(N, generator=g, dtype=torch.float64) * 3
    seq_index = torch.randint(-1, 2 * P, (N,), generator=g)  # unsorted, with -1 (prompt/padding) tokens
    seq_index[seq_index == 2 * P - 1] = -1                   # the last sequence has no tokens at all
    sums = torch.zeros(2 * P, dtype=torch.float64).index_add(0, seq_index[seq_index >= 0], token_logps[seq_index >= 0])
    ref = sums + torch.randn(2 * P, generator=g, dtype=torch.float64) * ref_scale / 10  # close to the policy
    targets = torch.rand(2 * P, generator=g, dtype=torch.float64)
    eps = torch.rand(P, generator=g, dtype=torch.float64) * 0.3
    return token_logps, seq_index, ref, targets, eps


PAIR_CASES = [
    ("sigmoid", 0.0, True), ("sigmoid", 0.1, True), ("sigmoid", "per_pair", True), ("sigmoid", 0.0, False),
    ("hinge", 0.0, True), ("exponential", 0.0, True), ("correlation", 0.0, False), ("sppo", 0.0, True),
    ("sppo", 0.0, False),
]


@needs_interpreter
@pytest.mark.parametrize("P,N", [(5, 1100), (70, 300)])  # several token blocks; several pair blocks
def test_pair_loss_triton_matches_float64(P, N, poison):
    token_logps, seq_index, ref, targets, eps = _pair_problem(P, N, seed=P)
    for loss, smoothing, with_ref in PAIR_CASES:
        beta = 0.001 if loss == "sppo" else 0.3
        smooth64 = eps if smoothing == "per_pair" else smoothing
        smooth32 = eps.float() if smoothing == "per_pair" else smoothing
        kw64 = {"targets": targets} if loss == "sppo" else {}
        kw32 = {"targets": targets.float()} if loss == "sppo" else {}
        ref64 = ref if with_ref else None
        ref32 = ref.float() if with_ref else None
        if not with_ref:
            kw64["num_pairs"] = kw32["num_pairs"] = P

        x64 = token_logps.clone().requires_grad_()
        exp_loss, exp_sums = pair_loss_reference(x64, seq_index, ref64, beta, loss, smooth64, **kw64)
        (exp_grad,) = torch.autograd.grad(exp_loss * 1.7, x64)

        x32 = token_logps.float().requires_grad_()
        got_loss, got_sums = pair_loss(x32, seq_index, ref32, beta, loss, smooth32, backend="triton", **kw32)
        (got_grad,) = torch.autograd.grad(got_loss * 1.7, x32)
        case = (loss, smoothing, with_ref)
        assert got_loss.shape == () and got_sums.shape == (2 * P,) and not got_sums.requires_grad, case
        assert rel_err(got_loss, exp_loss) <= 1e-5, case
        assert rel_err(got_sums, exp_sums) <= 1e-5, case
        assert got_sums[2 * P - 1] == 0, case
        assert rel_err(got_grad, exp_grad) <= 1e-5, case
        assert (got_grad[seq_index < 0] == 0).all(), case
        # the torch backend (the CPU default without the interpreter) agrees too
        x32 = token_logps.float().requires_grad_()
        t_loss, t_sums = pair_loss(x32, seq_index, ref32, beta, loss, smooth32, backend="torch", **kw32)
        (t_grad,) = torch.autograd.grad(t_loss * 1.7, x32)
        assert rel_err(t_loss, exp_loss) <= 1e-5 and rel_err(t_sums, exp_sums) <= 1e-5, case
        assert rel_err(t_grad, exp_grad) <= 1e-5, case


@needs_interpreter
def test_pair_loss_extreme_margins_stay_finite():
    # |z| up to ~1e3: log sigmoid must go through softplus (no exp overflow, no log(0)).
    P = 4
    seq_index = torch.arange(2 * P).repeat_interleave(3)
    token_logps = torch.zeros(6 * P, dtype=torch.float64)
    ref = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    token_logps[seq_index == 0] = -400.0 / 3   # z = 10 * (-400 - 0) very negative
    token_logps[seq_index == 1] = 300.0 / 3    # very positive
    token_logps[seq_index == 6] = 1e-4 / 3     # tiny margin
    for smoothing in (0.0, 0.2):
        x64 = token_logps.clone().requires_grad_()
        exp_loss, _ = pair_loss_reference(x64, seq_index, ref, 10.0, "sigmoid", smoothing)
        (exp_grad,) = torch.autograd.grad(exp_loss, x64)
        x32 = token_logps.float().requires_grad_()
        got_loss, _ = pair_loss(x32, seq_index, ref.float(), 10.0, "sigmoid", smoothing, backend="triton")
        (got_grad,) = torch.autograd.grad(got_loss, x32)
        assert torch.isfinite(got_loss) and torch.isfinite(got_grad).all()
        assert rel_err(got_loss, exp_loss) <= 1e-5 and rel_err(got_grad, exp_grad) <= 1e-5
    # All pairs confidently right (z = 20..60): the loss is ~1e-9 and must keep its relative accuracy
    # (a plain log(1 + exp(-z)) rounds it to 0 in fp32).
    token_logps = torch.zeros(6 * P, dtype=torch.float64)
    for p, margin in enumerate((2.0, 3.0, 4.5, 6.0)):
        token_logps[seq_index == p] = margin / 3
    x64 = token_logps.clone().requires_grad_()
    exp_loss, _ = pair_loss_reference(x64, seq_index, ref, 10.0, "sigmoid")
    (exp_grad,) = torch.autograd.grad(exp_loss, x64)
    x32 = token_logps.float().requires_grad_()
    got_loss, _ = pair_loss(x32, seq_index, ref.float(), 10.0, "sigmoid", backend="triton")
    (got_grad,) = torch.autograd.grad(got_loss, x32)
    assert 0 < exp_loss.item() < 1e-8
    assert rel_err(got_loss, exp_loss) <= 1e-5 and rel_err(got_grad, exp_grad) <= 1e-5


def test_pair_loss_bad_inputs():
    tok = torch.randn(6)
    seq = torch.tensor([0, 0, 1, 2, 3, -1])
    ref = torch.randn(4)
    with pytest.raises(ValueError, match=r"seq_index\[3\] = 4 is outside \[-1, 4\)"):
        pair_loss(tok, torch.tensor([0, 0, 1, 4, 3, -1]), ref, 0.1)
    with pytest.raises(ValueError, match=r"seq_index\[0\] = -2"):
        pair_loss(tok, torch.tensor([-2, 0, 1, 2, 3, -1]), ref, 0.1)
    with pytest.raises(ValueError, match="number of pairs is unknown"):
        pair_loss(tok, seq, None, 0.1)
    with pytest.raises(ValueError, match="inconsistent number of pairs"):
        pair_loss(tok, seq, ref, 0.1, num_pairs=3)
    with pytest.raises(ValueError, match="2\\*num_pairs"):
        pair_loss(tok, seq, torch.randn(5), 0.1)
    with pytest.raises(ValueError, match="needs targets"):
        pair_loss(tok, seq, ref, 0.001, "sppo")
    with pytest.raises(ValueError, match="only used by loss='sppo'"):
        pair_loss(tok, seq, ref, 0.1, "sigmoid", targets=torch.rand(4))
    with pytest.raises(ValueError, match="targets are probabilities"):
        pair_loss(tok, seq, ref, 0.001, "sppo", targets=torch.tensor([0.5, 1.5, 0.2, 0.1]))
    with pytest.raises(ValueError, match=r"per-pair label_smoothing must have shape \(2,\)"):
        pair_loss(tok, seq, ref, 0.1, "sigmoid", torch.zeros(3))
    with pytest.raises(ValueError, match="applies to loss='sigmoid' only"):
        pair_loss(tok, seq, ref, 0.1, "hinge", 0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]"):
        pair_loss(tok, seq, ref, 0.1, "sigmoid", 1.5)
    with pytest.raises(ValueError, match="beta must be a positive"):
        pair_loss(tok, seq, ref, 0.0)
    with pytest.raises(ValueError, match="unknown loss 'ipo'"):
        pair_loss(tok, seq, ref, 0.1, "ipo")
    with pytest.raises(ValueError, match="seq_index shape"):
        pair_loss(tok, seq[:5], ref, 0.1)
    with pytest.raises(TypeError, match="float32 token_logps"):
        pair_loss(tok.double(), seq, ref, 0.1, backend="triton")
