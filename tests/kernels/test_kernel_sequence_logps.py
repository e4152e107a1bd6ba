"""minispin.kernels.sequence_logps (CPU: Triton's interpreter in its own process, and the torch path): the
per-sequence sums and their gradient against float64 (unsorted tokens, -1 tokens, sequences without tokens,
several token and sequence blocks), and bad inputs."""
import pytest
import torch

from minispin.kernels import sequence_logps, sequence_logps_reference
from kernel_helpers import needs_interpreter, rel_err


def _segments(S, N, seed=0):
    """Random token log-probs [N] (float64) and an unsorted seq_index with -1 tokens; the last sequence has no
    tokens at all (a fully masked row)."""
    g = torch.Generator().manual_seed(seed)
    token_logps = -torch.rand(N, generator=g, dtype=torch.float64) * 3
    seq_index = torch.randint(-1, S, (N,), generator=g)
    seq_index[seq_index == S - 1] = -1
    return token_logps, seq_index, torch.randn(S, generator=g, dtype=torch.float64)


def _float64_sums(token_logps, seq_index, S):
    """The definition, one sequence at a time: sum of the token log-probs whose seq_index is s."""
    return torch.stack([token_logps[seq_index == s].sum() for s in range(S)])


@needs_interpreter
@pytest.mark.parametrize("S,N", [(7, 1100), (131, 300), (1, 5), (4, 0)])  # token blocks; sequence blocks; tiny
def test_sequence_logps_triton_matches_float64(S, N, poison):
    token_logps, seq_index, upstream = _segments(S, N, seed=S + N)
    x64 = token_logps.clone().requires_grad_()
    expected = _float64_sums(x64, seq_index, S)
    for backend in ("triton", "torch"):
        for index in (seq_index, seq_index.int()):
            x32 = token_logps.float().requires_grad_()
            got = sequence_logps(x32, index, S, backend=backend)
            assert got.shape == (S,) and got.dtype == torch.float32, backend
            assert got[S - 1] == 0 and rel_err(got, expected) <= 1e-6, backend  # the last: no tokens
            if N:
                # the gradient of a segmented sum: each token gets its sequence's upstream gradient, -1 tokens 0
                (exp_grad,) = torch.autograd.grad((expected * upstream).sum(), x64, retain_graph=True)
                (got_grad,) = torch.autograd.grad((got * upstream.float()).sum(), x32)
                assert rel_err(got_grad, exp_grad) <= 1e-6 and (got_grad[seq_index < 0] == 0).all(), backend
                assert torch.equal(got_grad[seq_index >= 0], upstream.float()[seq_index[seq_index >= 0]]), backend


def test_sequence_logps_reference_is_differentiable_in_float64():
    token_logps, seq_index, upstream = _segments(5, 40, seed=3)
    x = token_logps.clone().requires_grad_()
    got = sequence_logps_reference(x, seq_index, 5)
    assert got.dtype == torch.float64 and torch.allclose(got, _float64_sums(token_logps, seq_index, 5), atol=1e-12)
    (grad,) = torch.autograd.grad((got * upstream).sum(), x)
    assert torch.equal(grad, torch.where(seq_index >= 0, upstream[seq_index.clamp(min=0)], 0.0))


def test_sequence_logps_bad_inputs():
    tok = torch.randn(6)
    seq = torch.tensor([0, 0, 1, 2, 3, -1])
    with pytest.raises(ValueError, match=r"seq_index\[3\] = 4 is outside \[-1, 4\)"):
        sequence_logps(tok, torch.tensor([0, 0, 1, 4, 3, -1]), 4)
    with pytest.raises(ValueError, match=r"seq_index\[0\] = -2"):
        sequence_logps(tok, torch.tensor([-2, 0, 1, 2, 3, -1]), 4)
    with pytest.raises(ValueError, match="seq_index shape"):
        sequence_logps(tok, seq[:5], 4)
    with pytest.raises(TypeError, match="seq_index must be int64"):
        sequence_logps(tok, seq.float(), 4)
    with pytest.raises(ValueError, match="num_seqs must be an int >= 0"):
        sequence_logps(tok, seq, -1)
    with pytest.raises(ValueError, match="backend must be"):
        sequence_logps(tok, seq, 4, backend="cuda")
    with pytest.raises((TypeError, RuntimeError), match="float32 token_logps|Triton backend needs CUDA"):
        sequence_logps(tok.double(), seq, 4, backend="triton")
