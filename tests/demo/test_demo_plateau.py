"""minispin.demo.plateau (CPU, one process): --regime plateau at the reduced size: early stopping on the
validation split, the per-iteration schedule's mechanism metrics, --seeds reading the seed back."""
import json
import math
import subprocess
import sys

import pytest

from minispin.demo.plateau import PlateauConfig
from demo_helpers import _env


def test_plateau_regime_small(tmp_path):
    """--regime plateau at the reduced size, one process: the demo's SFT, SFT epochs on the fixed set with
    early stopping on the validation split, continued SFT and SPIN with the per-iteration schedule and
    their mechanism metrics; then --seeds reads the finished seed back."""
    out = tmp_path / "demo" / "seed0"
    cmd = [sys.executable, "-m", "minispin.demo.toy", "--small", "--regime", "plateau", "--nproc", "1"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "plateau" / "results.json").read_text())
    config = PlateauConfig.small()
    # the validation questions lie outside the SFT data and the test set
    rows = lambda path: [json.loads(x)["prompt"] for x in path.read_text().splitlines()]  # noqa: E731
    val, train, test = rows(out / "plateau" / "val.jsonl"), rows(out / "task" / "train_sft.jsonl"), \
        rows(out / "task" / "test_sft.jsonl")
    assert len(set(val)) == len(val) == config.n_val and not set(val) & (set(train) | set(test))
    # epoch 0 is the demo's SFT model; early stopping ends `patience` epochs after the best one, or at max_epochs
    assert r["epoch_curve"][0]["model"] == str(out / "sft" / "iter0" / "model")
    curve = [(c["val_exact_match"], c["val_mean_logprob"]) for c in r["epoch_curve"]]
    best = r["best_epoch"]
    assert curve[best] == max(curve) and curve.index(max(curve)) == best
    assert len(curve) == config.max_epochs + 1 or len(curve) - 1 - best == config.patience
    labels = [s["label"] for s in r["stages"]]
    assert labels[0] == "SFT" and labels[-4:] == ["continued SFT iter 0", "continued SFT iter 1", "SPIN iter 0",
                                                  "SPIN iter 1"]
    assert all(len(s["correct"]) == 96 for s in r["stages"])
    # SPIN ran the per-iteration schedule (lr L, L/5; beta 0.1, 5) on the fixed set and logged the mechanism
    gen = [json.loads(x)["real"][0]["content"]
           for x in (out / "plateau" / "spin" / "iter0" / "generated.jsonl").read_text().splitlines()]
    assert sorted(gen) == sorted(train[: config.n_spin])
    spin = r["mechanism"]["spin"]
    assert [(m["lr"], m["beta"]) for m in spin] == [(3e-5, 0.1), (pytest.approx(6e-6), 5.0)]
    for m in spin:
        for key in ("rewards/real", "rewards/generated", "margins", "accuracies", "logps/real", "logps/generated"):
            assert math.isfinite(m[key])
        assert 0 <= m["accuracies"] <= 1 and m["logps/real"] < 0
    assert [m["lr"] for m in r["mechanism"]["continued_sft"]] == [m["lr"] for m in spin]
    assert "SFT validation exact match by epoch" in proc.stdout and "rewards/generated" in proc.stdout
    proc2 = subprocess.run([*cmd, "--seeds", "1", "--out", str(out.parent)], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    summary = json.loads((out.parent / "plateau_seeds.json").read_text())
    assert summary["seeds_computed_this_run"] == 0 and summary["best_epoch"]["values"] == [best]
    assert summary["mechanism"]["spin"][1]["margins"]["values"] == [spin[1]["margins"]]
    assert "| spin iter |" in summary["table"]
