"""minispin.kernels.linear_logprobs (CPU: Triton's interpreter in its own process, and the torch path) against
float64: odd shapes, ignored rows, the fixed kernel-config rule, bad inputs, the chain into sequence_logps
and pair_loss."""
import json
import os
import subprocess
import sys

import pytest
import torch

from minispin.kernels import linear_logprobs, linear_logprobs_reference, sequence_logps, sequence_logps_reference
from minispin.training import pair_loss
from kernel_helpers import llp_mod, needs_interpreter, rel_err


def _lm_head_problem(N, H, V, dtype, seed=0, ignore=(3, 10)):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[0], labels[1] = 0, V - 1  # vocabulary edges (first and last tile)
    for i in ignore:
        labels[i] = -100
    grad = torch.randn(N, generator=g)  # per-token upstream gradient
    return hidden, weight, labels, grad


def _reference_grads(hidden, weight, labels, grad, ignore_index=-100):
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    out = linear_logprobs_reference(h64, w64, labels, ignore_index)
    dh, dw = torch.autograd.grad(out, (h64, w64), grad.double())
    return out.detach(), dh, dw


def _run(hidden, weight, labels, grad, **kwargs):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = linear_logprobs(hidden, weight, labels, **kwargs)
    dh, dw = torch.autograd.grad(out, (hidden, weight), grad)
    return out, dh, dw


@needs_interpreter
def test_linear_logprobs_triton_fp32_odd_shapes(poison):
    # N not a multiple of the row tile (32), H not a multiple of BLOCK_H (32), odd V = 1003, vocabulary
    # chunks of 300 in the backward (last one partial); every kernel buffer starts as NaN.
    hidden, weight, labels, grad = _lm_head_problem(N=37, H=40, V=1003, dtype=torch.float32)
    out, dh, dw = _run(hidden, weight, labels, grad, backend="triton", chunk_size=300)
    ref, rdh, rdw = _reference_grads(hidden, weight, labels, grad)
    assert out.dtype == torch.float32 and out.shape == (37,)
    assert dh.dtype == torch.float32 and dw.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(dh, rdh) <= 1e-5
    assert rel_err(dw, rdw) <= 1e-5
    assert out[3] == 0 and out[10] == 0 and (dh[3] == 0).all() and (dh[10] == 0).all()


@needs_interpreter
def test_linear_logprobs_triton_bf16(poison):
    hidden, weight, labels, grad = _lm_head_problem(N=33, H=64, V=203, dtype=torch.bfloat16, seed=1)
    out, dh, dw = _run(hidden, weight, labels, grad, backend="triton", chunk_size=100)
    ref, rdh, rdw = _reference_grads(hidden, weight, labels, grad)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert rel_err(out, ref) <= 2e-2
    assert rel_err(dh, rdh) <= 2e-2
    assert rel_err(dw, rdw) <= 2e-2


@needs_interpreter
def test_linear_logprobs_noncontiguous_and_partial_grads():
    N, H, V = 21, 48, 130
    hidden_c, weight_c, labels_c, grad = _lm_head_problem(N=N, H=H, V=V, dtype=torch.float32, seed=2)
    hidden = hidden_c.t().contiguous().t()                       # column-major [N, H]
    weight = torch.cat([weight_c, torch.randn(V, 5)], dim=1)[:, :H]  # row stride H + 5
    labels = torch.stack([labels_c, labels_c], dim=1)[:, 0]      # stride 2
    assert not hidden.is_contiguous() and not weight.is_contiguous() and not labels.is_contiguous()
    ref, rdh, rdw = _reference_grads(hidden_c, weight_c, labels_c, grad)
    for backend in ("triton", "torch"):
        out, dh, dw = _run(hidden, weight, labels, grad, backend=backend)
        assert rel_err(out, ref) <= 1e-5 and rel_err(dh, rdh) <= 1e-5 and rel_err(dw, rdw) <= 1e-5, backend
        # only the weight needs a gradient (e.g. a frozen trunk), then only the hidden states
        w = weight.detach().requires_grad_()
        (dw_only,) = torch.autograd.grad(linear_logprobs(hidden, w, labels, backend=backend), (w,), grad)
        assert rel_err(dw_only, rdw) <= 1e-5, backend
        h = hidden.detach().requires_grad_()
        (dh_only,) = torch.autograd.grad(linear_logprobs(h, weight, labels, backend=backend), (h,), grad)
        assert rel_err(dh_only, rdh) <= 1e-5, backend


@needs_interpreter
def test_linear_logprobs_fully_ignored_batch(poison):
    hidden, weight, _, grad = _lm_head_problem(N=9, H=16, V=70, dtype=torch.float32, seed=3, ignore=())
    labels = torch.full((9,), -100)
    for backend in ("triton", "torch"):
        out, dh, dw = _run(hidden, weight, labels, grad, backend=backend)
        assert torch.equal(out, torch.zeros(9)), backend
        assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw)), backend


@needs_interpreter
def test_linear_logprobs_custom_ignore_index_and_empty():
    hidden, weight, labels, grad = _lm_head_problem(N=11, H=16, V=50, dtype=torch.float32, seed=4, ignore=())
    labels[5] = 7  # 7 is now the ignore index (a valid vocabulary id, so it must be skipped, not matched)
    ref, rdh, rdw = _reference_grads(hidden, weight, labels, grad, ignore_index=7)
    out, dh, dw = _run(hidden, weight, labels, grad, backend="triton", ignore_index=7)
    assert out[5] == 0 and rel_err(out, ref) <= 1e-5 and rel_err(dh, rdh) <= 1e-5 and rel_err(dw, rdw) <= 1e-5
    empty = linear_logprobs(torch.zeros(0, 16), weight, torch.zeros(0, dtype=torch.long), backend="triton")
    assert empty.shape == (0,) and empty.dtype == torch.float32


def test_linear_logprobs_torch_chunked_path():
    # The CPU default without the interpreter: rows in chunks, logits recomputed in the backward.
    hidden, weight, labels, grad = _lm_head_problem(N=37, H=40, V=1003, dtype=torch.float32, seed=5)
    ref, rdh, rdw = _reference_grads(hidden, weight, labels, grad)
    for chunk in (None, 7):  # default chunk (one chunk here) and 6 chunks with a partial last one
        out, dh, dw = _run(hidden, weight, labels, grad, backend="torch", chunk_size=chunk)
        assert rel_err(out, ref) <= 1e-5 and rel_err(dh, rdh) <= 1e-5 and rel_err(dw, rdw) <= 1e-5, chunk
    hb, wb, lb, gb = _lm_head_problem(N=20, H=32, V=301, dtype=torch.bfloat16, seed=6)
    ref, rdh, rdw = _reference_grads(hb, wb, lb, gb)
    out, dh, dw = _run(hb, wb, lb, gb, backend="torch", chunk_size=6)
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 2e-2 and rel_err(dh, rdh) <= 2e-2 and rel_err(dw, rdw) <= 2e-2


def test_linear_logprobs_default_chunk_sizes_bound_memory():
    # GPU backward: the d_logits chunk stays <= the budget and never spans the whole vocabulary.
    for n, v in ((16384, 32000), (4096, 128256), (512, 32000), (1, 32003)):
        width = llp_mod._gpu_chunk_width(n, v)
        assert 256 <= width < v and n * width <= max(llp_mod._GPU_CHUNK_ELEMS, 256 * n)
    assert llp_mod._torch_chunk_rows(100000, 128256, None) * 128256 <= llp_mod._CPU_CHUNK_ELEMS


KERNEL_RULE_CASES = [(k, n, d) for k in ("forward", "backward") for n in (1, 64, 65, 1003, 16384, 1 << 20)
                     for d in ("bfloat16", "float16", "float32")]
KERNEL_RULE_SCRIPT = r"""
import importlib, json, sys, torch
llp = importlib.import_module("minispin.kernels.linear_logprobs")
print(json.dumps([str(llp.kernel_config(k, n, getattr(torch, d))) for k, n, d in json.loads(sys.argv[1])]))
"""


def test_kernel_config_is_a_fixed_rule_of_shape_and_dtype(monkeypatch):
    """CPU. Deterministic kernel choice: the compiled kernels launch with the config of a fixed rule (a pure
    function of kernel, row count class and dtype; no autotuner timing), so a resumed run on GPU picks the
    same config (the same reduction order) as the uninterrupted one - also in another process."""
    import triton

    got = [llp_mod.kernel_config(k, n, getattr(torch, d)) for k, n, d in KERNEL_RULE_CASES]
    for (kernel, n, dtype), cfg in zip(KERNEL_RULE_CASES, got):
        want = llp_mod._FP32 if dtype == "float32" else (llp_mod._SMALL_16BIT if n <= 64 else llp_mod._LARGE_16BIT)
        assert cfg is want, (kernel, n, dtype)
        if kernel == "forward":
            assert cfg.kwargs["BLOCK_V"] == llp_mod._FORWARD_BLOCK_V  # the partials' tile layout
    assert got == [llp_mod.kernel_config(k, n, getattr(torch, d)) for k, n, d in KERNEL_RULE_CASES]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_AUTOTUNE")}
    other = subprocess.run([sys.executable, "-c", KERNEL_RULE_SCRIPT, json.dumps(KERNEL_RULE_CASES)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 0, other.stderr[-3000:]
    assert json.loads(other.stdout) == [str(c) for c in got]
    assert not any(isinstance(v, triton.runtime.Autotuner) for v in vars(llp_mod).values())
    with pytest.raises(ValueError, match="'forward' or 'backward'"):
        llp_mod.kernel_config("sideways", 8, torch.bfloat16)

    # The launch takes the rule's config (stand-in kernels record what they were launched with).
    launched = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((self.name, grid, meta))

    monkeypatch.setattr(llp_mod, "_logprobs_forward_kernel", Recorder("forward"))
    monkeypatch.setattr(llp_mod, "_logprobs_backward_kernel", Recorder("backward"))
    monkeypatch.delenv("MINISPIN_AUTOTUNE", raising=False)
    for kernel, n, h in (("forward", 1003, 4096), ("backward", 40, 4100), ("backward", 5000, 96)):
        for dtype in (torch.bfloat16, torch.float32):
            llp_mod._launch_compiled(kernel, lambda bn, bv: (bn, bv), (), n, h, dtype, "ieee")
            cfg = llp_mod.kernel_config(kernel, n, dtype)
            name, grid, meta = launched[-1]
            assert name == kernel and grid == (cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_V"])
            assert meta == {**cfg.kwargs, "EVEN_H": h % cfg.kwargs["BLOCK_H"] == 0, "DOT_PRECISION": "ieee",
                            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def test_linear_logprobs_bad_inputs():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    lab = torch.tensor([1, 2, -100, 9])
    with pytest.raises(ValueError, match=r"labels\[1\] = 10 is outside the vocabulary \[0, 10\)"):
        linear_logprobs(h, w, torch.tensor([1, 10, -100, 9]))
    with pytest.raises(ValueError, match=r"labels\[0\] = -5"):
        linear_logprobs(h, w, torch.tensor([-5, 1, 2, 3]))
    with pytest.raises(ValueError, match="hidden size mismatch"):
        linear_logprobs(h, torch.randn(10, 7), lab)
    with pytest.raises(ValueError, match=r"hidden must be \[N, H\]"):
        linear_logprobs(h[None], w, lab)
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        linear_logprobs(h, w, lab[:3])
    with pytest.raises(TypeError, match="share one dtype"):
        linear_logprobs(h, w.bfloat16(), lab)
    with pytest.raises(TypeError, match="share one dtype"):
        linear_logprobs(h.double(), w.double(), lab)
    with pytest.raises(TypeError, match="labels must be int64"):
        linear_logprobs(h, w, lab.float())
    with pytest.raises(ValueError, match="backend must be"):
        linear_logprobs(h, w, lab, backend="cuda")


@needs_interpreter
def test_linear_logprobs_into_pair_loss_chain():
    # The trainer's composition: LM head -> per-token log-probs -> per-sequence sums -> pair loss, gradients to
    # h and W.
    hidden, weight, labels, _ = _lm_head_problem(N=26, H=24, V=97, dtype=torch.float32, seed=7)
    seq_index = torch.tensor([-1, -1, 0, 0, 0, -1, 1, 1, 2, 2, 2, 2, -1, -1, 3, 3, 3, -1, 4, 4, 5, 5, 5, -1, 3, 3])
    labels[seq_index < 0] = -100
    ref = torch.randn(6) - 20

    def run(h, w, lp_fn, seq_fn, **kw):
        seq = seq_fn(lp_fn(h, w, labels, **kw), seq_index, 6, **kw)
        return pair_loss(seq, ref.to(h.dtype), 0.1, "sigmoid", 0.05)

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    exp = run(h64, w64, linear_logprobs_reference, sequence_logps_reference)
    exp_dh, exp_dw = torch.autograd.grad(exp, (h64, w64))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = run(h, w, linear_logprobs, sequence_logps, backend="triton")
    got_dh, got_dw = torch.autograd.grad(got, (h, w))
    assert rel_err(got, exp) <= 1e-5 and rel_err(got_dh, exp_dh) <= 1e-5 and rel_err(got_dw, exp_dw) <= 1e-5
