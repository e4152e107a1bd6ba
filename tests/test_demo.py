"""The built-in demo: its task generator, its end-to-end run (reduced size, 2 torchrun ranks), and the
zephyr example script's argument checks."""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from minispin.demo import task as demo_task
from minispin.report import write_report
from minispin.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the demo runs the kernels' plain-torch CPU path
    env.pop("MINISPIN_TEST_KILL_AT", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ----------------------------------------------------------------------------- the task

def _independent_answer(question: str) -> str:
    """The answer recomputed without demo_task's parser."""
    words = question.split()
    if words[0] == "Reverse":
        return "".join(reversed(list(words[1])))
    if words[0] == "Sort":
        return "".join(sorted(list(words[1])))
    a, b = question[len("What is "):-1].split("+")
    return str(int(a) + int(b))


def test_task_is_deterministic_and_correct(tmp_path):
    config = demo_task.TaskConfig(n_train=300, n_test=60)
    train, test = demo_task.make_rows(config)
    assert (train, test) == demo_task.make_rows(config)
    assert demo_task.make_rows(demo_task.TaskConfig(n_train=300, n_test=60, seed=7))[0] != train
    assert len(train) == 300 and len(test) == 60
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}  # held out
    assert len({r["prompt"] for r in test}) == 60
    assert {r["skill"] for r in train} == set(demo_task.SKILLS)
    for row in train + test:
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": row["prompt"]}
        assert assistant["role"] == "assistant"
        assert assistant["content"] == _independent_answer(row["prompt"])
        assert demo_task.skill_of(row["prompt"]) == row["skill"]

    # files: same config -> same bytes
    a, b = demo_task.write_task(tmp_path / "a", config), demo_task.write_task(tmp_path / "b", config)
    for key in ("train", "test"):
        assert a[key].read_bytes() == b[key].read_bytes()
    assert [json.loads(line) for line in a["test"].read_text().splitlines()] == test
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a["tokenizer"] / name).read_bytes() == (b["tokenizer"] / name).read_bytes()


def test_answer_checking():
    assert demo_task.is_correct("Reverse abc", "cba")
    assert demo_task.is_correct("Reverse abc", " cba\n")  # surrounding whitespace is ignored
    assert not demo_task.is_correct("Reverse abc", "cb a")
    assert not demo_task.is_correct("Reverse abc", "abc")
    assert demo_task.is_correct("Sort dcab", "abcd")
    assert not demo_task.is_correct("Sort dcab", "abdc")
    assert demo_task.is_correct("What is 47+85?", "132")
    assert not demo_task.is_correct("What is 47+85?", "0132")
    assert not demo_task.is_correct("What is 47+85?", "")
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        assert demo_task.answer_of(f"What is {a}+{b}?") == str(a + b)
    for bad in ("What is 4+?", "Reverse ABC", "Sort", "hello"):
        with pytest.raises(ValueError, match="not a demo-task question"):
            demo_task.answer_of(bad)


def test_tokenizer_is_character_level(tmp_path):
    tok = load_tokenizer(demo_task.write_tokenizer(tmp_path))
    assert tok.vocab_size == demo_task.vocab_size()
    train, _ = demo_task.make_rows(demo_task.TaskConfig(n_train=200, n_test=10))
    for row in train:
        text = row["prompt"] + row["messages"][1]["content"]
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one token per character
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    msgs = [{"role": "user", "content": "Sort cab"}, {"role": "assistant", "content": "abc"}]
    assert tok.apply_chat_template(msgs) == "<s><|user|>Sort cab<|assistant|>abc</s>"
    prompt = tok.render_prompt(msgs)
    assert prompt == "<s><|user|>Sort cab<|assistant|>"
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == tok.bos_id and ids[1] == tok.token_to_id("<|user|>") and ids[-1] == tok.token_to_id("<|assistant|>")
    assert len(ids) == 3 + len("Sort cab")
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "system", "content": "x"}])


# ----------------------------------------------------------------------------- the demo, end to end

STAGES = ["sft", "continued_sft", "spin_iter0", "spin_iter1"]


def test_demo_small_two_ranks_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "minispin.demo", "--small", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert [s["stage"] for s in results["stages"]] == STAGES
    for stage in results["stages"]:
        assert 0.0 <= stage["exact_match"] <= 1.0
        assert set(stage["exact_match_by_skill"]) == set(demo_task.SKILLS)
        assert math.isfinite(stage["mean_logprob"]) and stage["mean_logprob"] < 0
        assert math.isfinite(stage["mean_logprob_per_token"])
        assert stage["n_test"] == 96
    # SFT learned something: its answers are likelier than under a uniform guess over the vocabulary
    assert results["stages"][0]["mean_logprob_per_token"] > -math.log(demo_task.vocab_size()) + 0.5
    # the table is printed (rank 0 only: once) and saved
    for label in ("SFT", "continued SFT", "SPIN iter 0", "SPIN iter 1"):
        assert label in results["table"]
    assert proc.stdout.count("mean log p(real)  per token") == 1
    assert (out / "results.txt").read_text().strip() == results["table"]
    # every stage's model is a loadable HF folder with the tokenizer
    for model_dir in ("init", "sft/iter0/model", "continued_sft/iter0/model", "spin/iter0/model", "spin/iter1/model"):
        assert (out / model_dir / "config.json").is_file() and (out / model_dir / "tokenizer.json").is_file()
    # SPIN generated real samples from the SFT model and trained on them (+ mixing at iteration 1)
    gen0 = [json.loads(line) for line in (out / "spin/iter0/generated.jsonl").read_text().splitlines()]
    assert len(gen0) == 128
    # the demo's exact match as the seeds' table, and python -m minispin.report on the finished demo run
    table = json.loads((out / "eval_table.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["SFT", "continued SFT", "iter0", "iter1"]
    assert [c["key"] for c in table["columns"]] == list(demo_task.SKILLS)
    assert [r["scores"] for r in table["rows"]] == [s["exact_match_by_skill"] for s in results["stages"]]
    report = write_report(out)
    assert sorted(report.figures) == ["eval.png", "training_continued_sft.png", "training_sft.png",
                                      "training_spin.png"]
    assert all((out / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in report.figures)

    # re-running with the same --out (here in one process) skips every finished stage, same results
    proc2 = subprocess.run([*cmd, "--nproc", "1"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert [s["exact_match"] for s in again["stages"]] == [s["exact_match"] for s in results["stages"]]
    assert "done earlier" in proc2.stderr
    # other settings in the same folder are refused, naming the option
    proc3 = subprocess.run([*cmd, "--nproc", "1", "--seed", "5"], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert proc3.returncode != 0 and "seed" in proc3.stderr


# ----------------------------------------------------------------------------- examples/spin_zephyr.py

def _example(args, tmp_path):
    return subprocess.run([sys.executable, str(REPO / "examples" / "spin_zephyr.py"), *args], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)


def test_zephyr_example_help(tmp_path):
    proc = _example(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--data", "--output_dir", "--out", "--train.lr", "--iterations"):
        assert option in proc.stdout
    assert "| 1    | iter-0 + iter-1 (100k)        | 5e-7 | 0.1  |" in proc.stdout  # the docstring's layout kept
    assert "pairs per optimizer step, over all ranks and accumulation steps (default: 64)" in \
        " ".join(proc.stdout.split())  # each option: what it is and its default
    assert not (tmp_path / "runs").exists()
    dpo = subprocess.run([sys.executable, str(REPO / "examples" / "dpo.py"), "--help"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert dpo.returncode == 0 and "DPO on preference data" in dpo.stdout and "--out" in dpo.stdout


def test_zephyr_example_path_errors(tmp_path):
    data = tmp_path / "ultrachat"
    data.mkdir()
    (data / "train_sft-00000-of-00001.jsonl").write_text("")
    model = tmp_path / "model"
    model.mkdir()

    proc = _example(["--data", str(data)], tmp_path)
    assert proc.returncode != 0 and "--model is required" in proc.stderr

    proc = _example(["--model", str(tmp_path / "nope"), "--data", str(data)], tmp_path)
    assert proc.returncode != 0 and str(tmp_path / "nope") in proc.stderr and "config.json" in proc.stderr

    proc = _example(["--model", str(model), "--data", str(data)], tmp_path)
    assert proc.returncode != 0
    for missing in ("config.json", "model.safetensors", "tokenizer.json"):
        assert missing in proc.stderr

    (model / "config.json").write_text("{}")
    (model / "model.safetensors.index.json").write_text("{}")
    (model / "tokenizer.model").write_bytes(b"")
    proc = _example(["--model", str(model), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], tmp_path)
    assert proc.returncode != 0 and str(tmp_path / "missing") in proc.stderr and "train_sft" in proc.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _example(["--model", str(model), "--data", str(empty)], tmp_path)
    assert proc.returncode != 0 and str(empty) in proc.stderr and "train_sft" in proc.stderr

    other = tmp_path / "other"
    other.mkdir()
    (other / "test_sft.parquet").write_bytes(b"")
    proc = _example(["--model", str(model), "--data", str(other)], tmp_path)
    assert proc.returncode != 0 and "train_sft" in proc.stderr and "test_sft.parquet" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()  # nothing started
