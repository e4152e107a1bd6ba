"""One command-line surface: `python -m minispin` and every example take the same options (`--out`), give
the same one-line errors without a traceback (`--debug` / MINISPIN_DEBUG=1 shows it), suggest the nearest
option, read a single data file without split flags, and a user error under 2 ranks (CPU, gloo) is one
line. On CPU. Each entry point runs as `python` would run it (runpy, sys.argv, the exit code; stderr
captured) inside the test process - a child process per call would spend seconds importing torch -
except where ranks or the interpreter's own exit path matter: those are real processes. Also the option
parser (nested, flat and JSON options) and examples/spin_zephyr.py's --help and path checks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minispin.cli import nearest_option
from minispin.driver import MODEL_FILES
from tiny import FIXTURES, REPO, write_char_tokenizer

TINY_MODEL = FIXTURES / "hf-tiny-llama"  # vocab 512: the char tokenizer's ids fit
DPO_DATA = FIXTURES / "data" / "dpo_en_demo.json"  # 300 sharegpt preference rows, one file
ENTRY_POINTS = [["-m", "minispin"]] + [[str(REPO / "examples" / f"{name}.py")] for name in
                                       ("spin_zephyr", "dpo", "noise_spin", "judge_spin", "adaptive_spin", "sppo")]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_DEBUG",
                                                             "MINISPIN_TEST_KILL_AT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """`python cmd...` as a real child process."""
    return subprocess.run([sys.executable, *cmd], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda e: Path(e[-1]).stem)
def test_every_entry_point_same_one_line_errors(entry, tmp_path, run_here):
    nope = tmp_path / "nope"
    res = run_here([*entry, "--model", str(nope), "--data", str(DPO_DATA), "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 1
    assert res.stderr.splitlines() == [f"error: --model {nope}: no such folder (expected a Hugging Face model "
                                       f"folder with {MODEL_FILES}, or a llama.cpp .gguf file)"]
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists() and not (tmp_path / "runs").exists()
    res = run_here([*entry, "--learning_rate", "1e-6", "--out", str(tmp_path / "o")], tmp_path)
    assert res.returncode == 2
    [line] = res.stderr.splitlines()
    assert line.startswith("error: unknown option(s) --learning_rate (did you mean --lr?)"), line


def test_debug_switch_shows_the_traceback(tmp_path, run_here):
    """Real processes: the interpreter's own exit path after the traceback."""
    argv = ["-m", "minispin", "--model", str(tmp_path / "nope"), "--data", str(DPO_DATA)]
    for res in (_run([*argv, "--debug"], tmp_path), _run(argv, tmp_path, MINISPIN_DEBUG="1")):
        assert res.returncode == 1 and "Traceback (most recent call last)" in res.stderr
        assert res.stderr.splitlines()[-1].startswith(f"error: --model {tmp_path / 'nope'}: no such folder")
    res = run_here(["-m", "minispin", "--model", str(TINY_MODEL), "--data", str(DPO_DATA), "--method", "dpo",
                    "--split", "train_prefs", "--lr", "fast"], tmp_path)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        "error: argument --train.lr/--lr: cannot read 'fast' as float: could not convert string to float: 'fast' "
        "(see python -m minispin --help)"]


def test_nearest_option():
    options = ["--lr", "--train.lr", "--epochs", "--train.epochs", "--generation.temperature", "--temperature",
               "--output_dir", "--out", "--micro_batch_size", "--max_prompt_length"]
    assert nearest_option("--learning_rate", options) == "--lr"
    assert nearest_option("--learning-rate=1e-6", options) == "--lr"
    assert nearest_option("--num_train_epochs", options) == "--epochs"
    assert nearest_option("--lrr", options) == "--lr"
    assert nearest_option("--generation.temprature", options) == "--generation.temperature"
    assert nearest_option("--per_device_train_batch_size", options) == "--micro_batch_size"
    assert nearest_option("--max_prompt_len", options) == "--max_prompt_length"
    assert nearest_option("--zzzzzz", options) is None


def test_single_data_file_needs_no_split_and_a_given_split_says_which_flag(tmp_path, run_here):
    """examples/dpo.py (whose recipe names the train_prefs split of a folder) runs on the repo's single
    file with no split flag: a tiny real run (4 rows, 1 step); a split given for one file is refused
    with the flag that fixes it."""
    tok = tmp_path / "tok"
    write_char_tokenizer(tok)
    out = tmp_path / "dpo"
    argv = ["--model", str(TINY_MODEL), "--tokenizer", str(tok), "--data", str(DPO_DATA), "--out", str(out),
            "--limit", "4", "--max_steps", "1", "--global_batch_size", "2", "--micro_batch_size", "1",
            "--max_length", "64", "--max_prompt_length", "32", "--save_steps", "0", "--progress", "false",
            "--save_dtype", "float32"]
    res = run_here([str(REPO / "examples" / "dpo.py"), *argv], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == [json.dumps({"run_dir": str(out), "models": [str(out / "iter0" / "model")]})]
    assert (out / "iter0" / "model" / "model.safetensors").is_file()
    record = json.loads((out / "config.json").read_text())
    assert record["settings"]["split"] is None and record["settings"]["method"] == "dpo"
    [it] = record["iterations"]  # the effective settings: DPO's recipe + what was given
    assert (it["train"]["lr"], it["train"]["beta"], it["train"]["epochs"], it["train"]["max_steps"]) == \
        (5e-7, 0.1, 1.0, 1)
    assert "not the recipe's: max_steps 1 (recipe null)" in res.stderr
    res = run_here([str(REPO / "examples" / "dpo.py"), *argv, "--split", "train_prefs"], tmp_path)
    assert res.returncode == 1
    [line] = res.stderr.splitlines()
    assert line.startswith(f"error: --data {DPO_DATA}: a split ('train_prefs') only chooses among the files of "
                           "a folder, and this is one file: leave out --split"), line


def test_bad_row_under_two_ranks_is_one_line(tmp_path):
    """One bad row (line 15 of an UltraChat file lacks `messages`) with 2 CPU ranks started by
    `--nproc_per_node 2`: stderr is exactly one 'error:' line naming the file, the 1-based line and the
    right key; exit code 1, no traceback, no result line, no status line, no run folder content."""
    tok = tmp_path / "tok"
    write_char_tokenizer(tok)
    rows = [{"prompt": f"q{i}", "prompt_id": str(i), "messages": [{"role": "user", "content": f"q{i}"},
                                                                   {"role": "assistant", "content": f"a{i}"}]}
            for i in range(20)]
    rows[14] = {"prompt": "q14", "prompt_id": "14"}
    data = tmp_path / "ultrachat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = _run(["-m", "minispin", "--nproc_per_node", "2", "--model", str(TINY_MODEL), "--tokenizer", str(tok),
                "--data", str(data), "--out", str(tmp_path / "run"), "--train.device", "cpu"], tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    assert res.stderr.splitlines() == [f"error: {data}: line 15: key 'messages': missing (format 'ultrachat')"]
    assert res.stdout == ""


def test_bad_nproc_per_node_is_one_line(tmp_path, run_here):
    for value, expected in [("0", "error: --nproc_per_node: expected at least 1 rank, got 0"),
                            ("two", "error: argument --nproc_per_node: invalid int value: 'two' "
                                    "(see python -m minispin --help)")]:
        res = run_here(["-m", "minispin", "--nproc_per_node", value, "--model", str(TINY_MODEL), "--data",
                        str(DPO_DATA)], tmp_path)
        assert res.returncode == 2 and res.stderr.splitlines() == [expected], res.stderr


def test_cli_parses_nested_flat_and_json_options():
    from minispin.cli import parse_config
    from minispin.config import ConfigError
    from minispin.driver import RunConfig, resolve

    cfg = parse_config(RunConfig, ["--model", "m", "--data", "d", "--train.lr", "5e-7", "--beta", "0.5",
                                    "--seed", "3", "--mix_previous", "false",
                                    "--iterations", '[{"epochs": 1, "loss": "hinge"}]', "--limit", "none",
                                    "--max-prompt-length", "100", "--activation_checkpointing"])
    assert cfg.train.lr == 5e-7 and cfg.train.beta == 0.5 and cfg.mix_previous is False
    assert cfg.seed == 3  # one home: training seed 3, generation seed 3 + iteration
    assert [(t.seed, g.seed) for t, g, *_ in resolve(cfg)] == [(3, 3)]
    assert cfg.iterations == [{"epochs": 1, "loss": "hinge"}] and cfg.limit is None
    assert cfg.max_prompt_length == 100
    assert [(t.max_prompt_length, g.max_prompt_length) for t, g, *_ in resolve(cfg)] == [(100, 100)]
    assert cfg.train.activation_checkpointing is True
    with pytest.raises(ConfigError, match="unknown option"):
        parse_config(RunConfig, ["--no_such_option", "1"])
    with pytest.raises(ConfigError, match="--train.seed"):  # a run-level setting has no section option
        parse_config(RunConfig, ["--train.seed", "7"])


ZEPHYR = str(REPO / "examples" / "spin_zephyr.py")


def test_zephyr_example_help(tmp_path, run_here):
    proc = run_here([ZEPHYR, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--data", "--output_dir", "--out", "--train.lr", "--iterations"):
        assert option in proc.stdout
    assert "| 1    | iter-0 + iter-1 (100k)        | 5e-7 | 0.1  |" in proc.stdout  # the docstring's layout kept
    assert "pairs per optimizer step, over all ranks and accumulation steps (default: 64)" in \
        " ".join(proc.stdout.split())  # each option: what it is and its default
    assert not (tmp_path / "runs").exists()
    dpo = run_here([str(REPO / "examples" / "dpo.py"), "--help"], tmp_path)
    assert dpo.returncode == 0 and "DPO on preference data" in dpo.stdout and "--out" in dpo.stdout


def test_zephyr_example_one_entry_iterations_runs_one_iteration(tmp_path, run_here):
    """The example's docstring: a given --iterations list replaces the whole schedule, so one entry is ONE
    iteration although the recipe says num_iterations 4 (a tiny real run: 3 prompts, 1 step); a given
    --num_iterations that contradicts the list's length is one error line."""
    tok = tmp_path / "tok"
    write_char_tokenizer(tok)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "response": f"a{i}."}) + "\n" for i in range(3)))
    out = tmp_path / "zephyr"
    argv = [ZEPHYR, "--model", str(TINY_MODEL), "--tokenizer", str(tok), "--data", str(data), "--out", str(out),
            "--iterations", '[{"lr": 5e-7, "beta": 0.1}]', "--max_steps", "1", "--global_batch_size", "2",
            "--micro_batch_size", "1", "--max_length", "64", "--max_prompt_length", "32", "--max_new_tokens", "2",
            "--save_steps", "0", "--progress", "false", "--save_dtype", "float32"]
    res = run_here(argv, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == [json.dumps({"run_dir": str(out), "models": [str(out / "iter0" / "model")]})]
    assert "1 iteration(s)" in res.stderr and not (out / "iter1").exists()
    assert len(json.loads((out / "config.json").read_text())["iterations"]) == 1
    res = run_here([*argv, "--num_iterations", "2", "--out", str(tmp_path / "two")], tmp_path)
    assert res.returncode == 2 and res.stderr.splitlines() == [
        "error: num_iterations is 2 but iterations lists 1: give one iterations entry per iteration, or leave out "
        "num_iterations"]


def test_zephyr_example_path_errors(tmp_path, run_here):
    data = tmp_path / "ultrachat"
    data.mkdir()
    (data / "train_sft-00000-of-00001.jsonl").write_text("")
    model = tmp_path / "model"
    model.mkdir()

    proc = run_here([ZEPHYR, "--data", str(data)], tmp_path)
    assert proc.returncode != 0 and "--model is required" in proc.stderr

    proc = run_here([ZEPHYR, "--model", str(tmp_path / "nope"), "--data", str(data)], tmp_path)
    assert proc.returncode != 0 and str(tmp_path / "nope") in proc.stderr and "config.json" in proc.stderr

    proc = run_here([ZEPHYR, "--model", str(model), "--data", str(data)], tmp_path)
    assert proc.returncode != 0
    for missing in ("config.json", "model.safetensors", "tokenizer.json"):
        assert missing in proc.stderr

    (model / "config.json").write_text("{}")
    (model / "model.safetensors.index.json").write_text("{}")
    (model / "tokenizer.model").write_bytes(b"")
    proc = run_here([ZEPHYR, "--model", str(model), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], tmp_path)
    assert proc.returncode != 0 and str(tmp_path / "missing") in proc.stderr and "train_sft" in proc.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_here([ZEPHYR, "--model", str(model), "--data", str(empty)], tmp_path)
    assert proc.returncode != 0 and str(empty) in proc.stderr and "train_sft" in proc.stderr

    other = tmp_path / "other"
    other.mkdir()
    (other / "test_sft.parquet").write_bytes(b"")
    proc = run_here([ZEPHYR, "--model", str(model), "--data", str(other)], tmp_path)
    assert proc.returncode != 0 and "train_sft" in proc.stderr and "test_sft.parquet" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()  # nothing started
