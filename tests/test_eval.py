"""python -m minispin.eval (CPU, offline): lm-evaluation-harness on every saved model of a real tiny
two-iteration run with two local JSON-lines multiple-choice tasks (tests/fixtures/lm_eval_tasks, no hub
access) writes the seeds' table (rows SFT, iter0, iter1; columns the tasks, then Average) as JSON and
markdown; a re-run recomputes nothing, a lost cell or changed settings recompute exactly those cells;
the exported folders load in transformers; task specs and bad input are clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minispin.eval import (SEED_TASKS, TABLE_JSON, TABLE_MD, EvalError, EvalTask, _read_cell, evaluate_run,
                           parse_task, pick_metric, run_models)
from tiny import FIXTURES, REPO
from tiny_run import copy_run, tiny_run

TASKS_DIR = FIXTURES / "lm_eval_tasks"
TASKS = [EvalTask("minispin_add", 0), EvalTask("minispin_letters", 1, "acc,none")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def test_parse_task_and_seed_defaults():
    assert parse_task("arc_challenge:25") == EvalTask("arc_challenge", 25, None)
    assert parse_task("gsm8k:5:exact_match,strict-match") == EvalTask("gsm8k", 5, "exact_match,strict-match")
    assert parse_task("mmlu:5:acc") == EvalTask("mmlu", 5, "acc,none")
    assert parse_task("hellaswag") == EvalTask("hellaswag", None, None)
    assert parse_task("x:3").label == "x(3)"
    for bad, msg in (("x:three", "not an integer"), (":5", "empty task name"), ("x:-1", "negative")):
        with pytest.raises(EvalError, match=msg):
            parse_task(bad)
    assert [(t.name, t.num_fewshot) for t in SEED_TASKS] == [
        ("arc_challenge", 25), ("arc_easy", 25), ("truthfulqa_mc1", 0), ("truthfulqa_mc2", 0),
        ("winogrande", 5), ("gsm8k", 5), ("hellaswag", 10), ("mmlu", 5)]


def test_pick_metric():
    results = {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.25,
                     "acc_norm_stderr,none": 0.05}}
    assert pick_metric(EvalTask("t"), results) == ("acc_norm,none", 0.25, 0.05)
    assert pick_metric(EvalTask("t", 0, "acc,none"), results) == ("acc,none", 0.5, 0.1)
    with pytest.raises(EvalError, match=r"no metric 'f1,none' in its results \(it has: acc,none, acc_norm,none\)"):
        pick_metric(EvalTask("t", 0, "f1,none"), results)


def test_rows_are_sft_then_each_saved_iteration(run, tmp_path):
    assert [(name, path) for name, path in run_models(run)] == [
        ("SFT", run.parent / "sft-model"), ("iter0", run / "iter0" / "model"), ("iter1", run / "iter1" / "model")]
    partial = copy_run(run, tmp_path / "run")
    import shutil
    shutil.rmtree(partial / "iter1" / "model")  # iteration 1 still training
    assert [name for name, _ in run_models(partial)] == ["SFT", "iter0"]
    cfg = json.loads((partial / "config.json").read_text())
    cfg["settings"]["model"] = str(tmp_path / "moved")
    (partial / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvalError, match="key 'model' .* is not a model folder from here; pass --sft_model"):
        run_models(partial)
    assert run_models(partial, sft_model=run.parent / "sft-model")[0] == ("SFT", run.parent / "sft-model")
    cfg["settings"]["model"] = str(tmp_path / "SmolLM2.Q4_1.gguf")  # a run started from a GGUF file
    (partial / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvalError, match="is a GGUF file; .* python -m minispin.convert .* --sft_model DIR"):
        run_models(partial)


def test_exported_folders_load_in_transformers(run):
    """lm-eval's hf model loads minispin's exported folders with transformers' Auto classes."""
    transformers = pytest.importorskip("transformers")
    import torch

    from minispin.checkpoint import load_model

    ids = torch.tensor([[1, 10, 11, 12, 13]])
    for _, path in run_models(run):
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        assert tok("q: 1+1? a:")["input_ids"]
        ours = load_model(path, dtype=torch.float32, device="cpu")
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, ours(ids), rtol=1e-4, atol=1e-4)


def _acc_norm_minispin_add(model_dir: Path) -> float:
    """minispin_add's acc_norm computed here with minispin's model and tokenizer: per test row, the choice
    with the highest log p(" " + choice | "q: ... a:") per character of the choice is right or not."""
    import torch

    from minispin.checkpoint import load_model
    from minispin.tokenizer import load_tokenizer

    model = load_model(model_dir, dtype=torch.float32, device="cpu")
    tok = load_tokenizer(model_dir)
    rows = [json.loads(line) for line in (TASKS_DIR / "minispin_add.jsonl").read_text().splitlines()][2:]
    hits = 0
    for row in rows:
        context = tok.encode(f"q: {row['question']} a:", add_special_tokens=False)
        scores = []
        for choice in row["choices"]:
            ids = context + tok.encode(" " + choice, add_special_tokens=False)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).double(), -1)[0]
            n = len(ids) - len(context)
            scores.append(sum(logp[len(context) - 1 + i, ids[len(context) + i]].item() for i in range(n)) / len(choice))
        hits += max(range(len(scores)), key=scores.__getitem__) == row["answer"]
    return hits / len(rows)


def test_eval_table_rows_columns_and_resume(run, tmp_path, monkeypatch, capfd):
    pytest.importorskip("lm_eval")
    import lm_eval.evaluator
    # test speed only: lm-eval's environment report (a `pip list` per call, ~2 s) is not what is tested
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    run = copy_run(run, tmp_path / "run")
    messages: list[str] = []
    kwargs = dict(include_path=[TASKS_DIR], batch_size=4, device="cpu", log=messages.append)
    table = evaluate_run(run, TASKS, **kwargs)
    cells = [(row, task) for row in ("SFT", "iter0", "iter1") for task in ("minispin_add", "minispin_letters")]
    assert table["computed"] == cells
    progress = [line for line in capfd.readouterr().err.splitlines() if line.startswith("[eval] ")]
    assert progress[0].startswith("[eval] 1/6 cells | ") and " cells/s | ETA " in progress[0]
    assert progress[-1].startswith("[eval] 6/6 cells | ") and "iter1 minispin_letters(1)" in progress[-1]

    saved = json.loads((run / TABLE_JSON).read_text())
    assert [r["name"] for r in saved["rows"]] == ["SFT", "iter0", "iter1"]
    assert [c["key"] for c in saved["columns"]] == ["minispin_add", "minispin_letters"]
    assert [c["label"] for c in saved["columns"]] == ["minispin_add(0)", "minispin_letters(1)"]
    assert saved["columns"][0]["metric"] == "acc_norm,none"  # the default pick
    for r in saved["rows"]:
        scores = list(r["scores"].values())
        assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
        assert r["average"] == pytest.approx(sum(scores) / 2)
        for task in ("minispin_add", "minispin_letters"):  # the cell files hold the same numbers
            cell = json.loads((run / "eval" / r["name"] / f"{task}.json").read_text())
            assert cell["value"] == r["scores"][task] and cell["n_samples"] == 8
    for row, path in run_models(run):  # lm-eval's number is the one minispin's own model gives
        assert saved["rows"][[r["name"] for r in saved["rows"]].index(row)]["scores"]["minispin_add"] == \
            _acc_norm_minispin_add(path)
    md = (run / TABLE_MD).read_text().splitlines()
    assert md[0] == "| Task | minispin_add(0) | minispin_letters(1) | Average |"
    assert [line.split(" | ")[0] for line in md[2:5]] == ["| SFT", "| iter0", "| iter1"]

    # a re-run computes nothing and rewrites no cell
    mtimes = {p: p.stat().st_mtime_ns for p in (run / "eval").rglob("*.json")}
    again = evaluate_run(run, TASKS, **kwargs)
    assert again["computed"] == []
    assert {p: p.stat().st_mtime_ns for p in (run / "eval").rglob("*.json")} == mtimes
    assert [r["scores"] for r in again["rows"]] == [r["scores"] for r in saved["rows"]]

    # a lost cell, and a cell whose model changed, are computed again; nothing else
    (run / "eval" / "iter0" / "minispin_letters.json").unlink()
    cell = run / "eval" / "iter1" / "minispin_add.json"
    data = json.loads(cell.read_text())
    data["settings"]["model_fingerprint"] = "0" * 16
    cell.write_text(json.dumps(data))
    messages.clear()
    third = evaluate_run(run, TASKS, **kwargs)
    assert third["computed"] == [("iter0", "minispin_letters"), ("iter1", "minispin_add")]
    progress = [line for line in capfd.readouterr().err.splitlines() if line.startswith("[eval] ")]
    assert progress[0].startswith("[eval] 5/6 cells | ") and "ETA" in progress[0] and "resumed from 4" in progress[0]
    assert any("made with other settings (model_fingerprint: '0000000000000000' ->" in m for m in messages)
    assert [r["scores"] for r in third["rows"]] == [r["scores"] for r in saved["rows"]]  # deterministic


def test_cell_settings_change_means_recompute(tmp_path):
    settings = {"task": "t", "num_fewshot": 0, "metric": None, "limit": None, "model": "m",
                "model_fingerprint": "f", "lm_eval": "0.4.13"}
    path = tmp_path / "cell.json"
    path.write_text(json.dumps({"value": 0.5, "settings": settings}))
    log: list[str] = []
    assert _read_cell(path, settings, log.append)["value"] == 0.5 and not log
    assert _read_cell(path, dict(settings, limit=10.0), log.append) is None
    assert log == [f"{path}: made with other settings (limit: None -> 10.0), computing it again"]
    path.write_text("{torn")
    assert _read_cell(path, settings, log.append) is None and "unreadable cell" in log[-1]


def test_command_line_errors(run, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "minispin.eval", str(run), "--tasks", "arc_easy:many"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2 and res.stderr.strip() == (
        "error: --tasks: the few-shot count in 'arc_easy:many' is not an integer (use name, name:fewshot or "
        "name:fewshot:metric)")
    with pytest.raises(EvalError, match=f"run directory {tmp_path / 'nowhere'} does not exist"):
        evaluate_run(tmp_path / "nowhere", TASKS)
    with pytest.raises(EvalError, match="config.json is missing: not a minispin run directory"):
        evaluate_run(run / "iter0", TASKS)


def test_benchmark_data_missing_offline_is_a_clear_error(run, tmp_path, monkeypatch):
    """Offline, a task whose data set is not in the local cache fails with one line saying what to do."""
    pytest.importorskip("lm_eval")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "0")  # minispin.eval sets them itself (restored after the test)
    run = copy_run(run, tmp_path / "run")
    with pytest.raises(EvalError, match=r"task minispin_hub_only: its data set is not on this machine \(.*"
                                        r"not-on-this-machine.*\)\. minispin.eval runs lm-eval offline"):
        evaluate_run(run, [EvalTask("minispin_hub_only", 0)], include_path=[TASKS_DIR], device="cpu",
                     log=lambda m: None)
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert not (run / "eval").exists()  # nothing half-written
