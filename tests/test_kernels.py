"""minispin.kernels: Triton kernels (run by Triton's CPU interpreter here) against float64 references.

The tests marked `interpreter` run the Triton kernels on CPU tensors through Triton's interpreter.
Triton picks interpreter-or-compiled once per process (at import), so they run in a child process of
their own with TRITON_INTERPRET=1 (tests/interpreter.py; test_interpreter_tests_in_their_own_process
starts it); in the test process itself they skip. Where the installed Triton/numpy pair cannot run the
interpreter they skip with a reason naming the versions. The other tests run on CPU in the test process;
test_compiled_kernels_on_cuda checks the compiled kernels on a GPU against CPU references.
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import interpreter
from minispin.kernels import linear_logprobs, linear_logprobs_reference, pair_loss, pair_loss_reference
from minispin.kernels.interpreter import CLASH_PREFIX, interpreter_clash, kernels_interpreted

llp_mod = importlib.import_module("minispin.kernels.linear_logprobs")
pl_mod = importlib.import_module("minispin.kernels.pair_loss")
INTERPRETED = kernels_interpreted()
CLASH = interpreter_clash() if INTERPRETED else None


def needs_interpreter(test):
    """Mark a test as an interpreter test: run in the interpreter child, skipped elsewhere."""
    reason = CLASH or "runs in the interpreter's own process (test_interpreter_tests_in_their_own_process)"
    return pytest.mark.interpreter(pytest.mark.skipif(not INTERPRETED or CLASH is not None, reason=reason)(test))


@pytest.mark.skipif(INTERPRETED, reason="this process is the interpreter run itself")
def test_interpreter_tests_in_their_own_process():
    result = interpreter.run_interpreter_tests(__file__)
    output = result.stdout + result.stderr
    if CLASH_PREFIX in output and " passed" not in result.stdout.strip().splitlines()[-1]:
        reason = next(line for line in output.splitlines() if CLASH_PREFIX in line)
        pytest.skip(reason.split(": ", 1)[-1] if reason.startswith("SKIPPED") else reason)
    assert result.returncode == 0, output[-6000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


CHECK_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_kernels.py"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernels_on_cuda():
    """CUDA. The compiled (not interpreted) kernels on the GPU agree with CPU references (float64, or
    float32 for the 2**31-element cases): odd shapes, bf16/fp16/fp32, and sizes whose element offsets
    pass 2**31 (N*H for hidden and d_hidden, V*H for weight and d_weight), which 32-bit index arithmetic
    would corrupt (benchmarks/check_kernels.py). Runs in a fresh process without TRITON_INTERPRET, with
    the tensors on the last GPU (not the current one when there are two)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_AUTOTUNE")}
    result = subprocess.run([sys.executable, str(CHECK_SCRIPT), "--device", "cuda"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert records[-1] == {"check": "summary", "status": "ok", "failed": 0}
    assert sum(r["check"] == "linear_logprobs" for r in records) == 6
    assert all(r["reference"].startswith("cpu") for r in records if "reference" in r)


def test_kernel_check_script_on_cpu_interpreter():
    """CPU. The GPU check script's smoke cases through Triton's interpreter (its own process), so the
    script that benchmarks/gpu_check.sh runs first on the GPU is known to work before a GPU is there."""
    env = {k: v for k, v in os.environ.items() if k != "MINISPIN_AUTOTUNE"}
    env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, str(CHECK_SCRIPT), "--device", "cpu", "--smoke"], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    records = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if records[0].get("status") == "skipped":
        pytest.skip(records[0]["reason"])
    assert records[-1] == {"check": "summary", "status": "ok", "failed": 0}
    cases = [r for r in records if r["check"] == "linear_logprobs"]
    assert len(cases) == 2 and all(r["triton"]["err_logps"] <= r["tol"] for r in cases)


def _poisoned_empty(*args, **kwargs):
    """torch.empty that fills floats with NaN and integers with garbage: unwritten elements show."""
    t = torch.empty(*args, **kwargs)
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-987654321)


@pytest.fixture
def poison(monkeypatch):
    monkeypatch.setattr(llp_mod, "_empty", _poisoned_empty)
    monkeypatch.setattr(pl_mod, "_empty", _poisoned_empty)


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (norm-wise relative error), in float64."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), "non-finite values (unwritten output?)"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


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


# ------------------------------------------------------------------------------------------------
# linear_logprobs
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# pair_loss
# ------------------------------------------------------------------------------------------------
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


@needs_interpreter
def test_linear_logprobs_into_pair_loss_chain():
    # The trainer's composition: LM head -> per-token log-probs -> pair loss, gradients to h and W.
    hidden, weight, labels, _ = _lm_head_problem(N=26, H=24, V=97, dtype=torch.float32, seed=7)
    seq_index = torch.tensor([-1, -1, 0, 0, 0, -1, 1, 1, 2, 2, 2, 2, -1, -1, 3, 3, 3, -1, 4, 4, 5, 5, 5, -1, 3, 3])
    labels[seq_index < 0] = -100
    ref = torch.randn(6) - 20

    def run(h, w, lp_fn, loss_fn, **kw):
        return loss_fn(lp_fn(h, w, labels, **kw.get("lp", {})), seq_index, ref.to(h.dtype), 0.1, "sigmoid", 0.05,
                       **kw.get("pl", {}))[0]

    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    exp = run(h64, w64, linear_logprobs_reference, pair_loss_reference)
    exp_dh, exp_dw = torch.autograd.grad(exp, (h64, w64))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = run(h, w, linear_logprobs, pair_loss, lp={"backend": "triton"}, pl={"backend": "triton"})
    got_dh, got_dw = torch.autograd.grad(got, (h, w))
    assert rel_err(got, exp) <= 1e-5 and rel_err(got_dh, exp_dh) <= 1e-5 and rel_err(got_dw, exp_dw) <= 1e-5
