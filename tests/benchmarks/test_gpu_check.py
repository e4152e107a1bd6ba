"""benchmarks/gpu_check.sh, the one prepared GPU check, in its --dry-run form: every step at smoke size
on the CPU (the kernel step through Triton's interpreter), so the script never rots between GPU visits."""
import json
import os
import subprocess
import sys

from tiny import REPO

STEPS = ["kernels", "logprobs", "train", "generate", "cuda_tests", "pair_loss"]


def test_gpu_check_dry_run(tmp_path):
    """CPU. Exit 0, at most 8 result files (what the GPU tool brings back), one JSON-lines file per step
    ending with that step's status, and a summary naming the versions and every step."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_AUTOTUNE", "OUT")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
    assert files == sorted([f"{s}.jsonl" for s in STEPS] + ["summary.md", "log.txt"])
    for name in STEPS:
        lines = [json.loads(x) for x in (out / f"{name}.jsonl").read_text().splitlines() if x.startswith("{")]
        assert lines[-1]["step"] == name and lines[-1]["status"] == "ok", (name, lines[-1])
        assert len(lines) > 1, name  # the step wrote results, not only its status
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "torch " in summary and "triton " in summary and "GPU: none (CPU)" in summary
    assert all(f"| {s} | ok |" in summary for s in STEPS + ["generate_sampler"]), summary
    assert "sampler candidates, top_p" in summary and "same tokens as the full sort: True" in summary
    kernels = [json.loads(x) for x in (out / "kernels.jsonl").read_text().splitlines()]
    assert kernels[0].get("status") == "skipped" or {"check": "summary", "status": "ok", "failed": 0} in kernels
