"""The kernel benchmarks run end to end in --smoke mode (tiny fp32 shapes, on the CPU also on a GPU host) and
agree with naive."""
import importlib.util
import json

import pytest

from tiny import REPO

BENCH_DIR = REPO / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_minispin_bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_bench_logprobs_smoke(capsys):
    bench = _load("bench_logprobs")
    results = bench.main(["--smoke", "--device", "cpu", "--warmup", "0", "--repeats", "1"])
    lines = _json_lines(capsys.readouterr().out)
    by_method = {r["method"]: r for r in results}
    assert {"naive", "compiled", "minispin"} <= set(by_method)
    for name, record in by_method.items():
        assert record["status"] == "ok" and record["ms_fwd_bwd"] > 0 and record["tflops_fwd_bwd"] > 0
        if name != "naive":
            assert record["err_logps_vs_naive"] < 1e-4, name
            assert record["rel_err_dhidden_vs_naive"] < 1e-4 and record["rel_err_dweight_vs_naive"] < 1e-4, name
            assert record["speedup_fwd_bwd_vs_naive"] > 0, name
    assert any(line.get("kind") == "matmul" and line["tflops"] > 0 for line in lines)
    assert sum(1 for line in lines if line.get("method")) == len(bench.METHODS)  # skipped methods are reported too


def test_bench_pair_loss_smoke(capsys):
    bench = _load("bench_pair_loss")
    results = bench.main(["--smoke", "--device", "cpu", "--warmup", "0", "--repeats", "1"])
    lines = _json_lines(capsys.readouterr().out)
    assert {(r["part"], r["method"]) for r in results} == {
        ("loss", "naive"), ("loss", "minispin"), ("e2e", "naive"), ("e2e", "minispin")}
    assert all(r["status"] == "ok" for r in results)
    check = next(line for line in lines if line.get("kind") == "check")
    assert check["loss_abs_diff"] < 1e-4 and check["grad_max_abs_diff"] < 1e-5
    e2e = [r for r in results if r["part"] == "e2e"]
    assert all(r["pct_of_matmul_fwd_bwd"] > 0 for r in e2e)


if __name__ == "__main__":
    pytest.main([__file__])
