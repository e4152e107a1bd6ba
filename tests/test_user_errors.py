"""The catalogue of user mistakes (CPU): each bad input through `python -m minispin` (or an example script) ends
in exactly one "error:" line that names the culprit (file, key or option), a nonzero exit and no traceback.
One rule makes that so: an error about user input is a `minispin.errors.UserError`, which `run_main` prints as
one line; anything else keeps its traceback. Runs in-process (conftest's `run_here`), as `python` would."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tiny import FIXTURES, REPO, write_char_tokenizer

ZEPHYR_TOKENIZER = FIXTURES / "tokenizers" / "zephyr"  # 32000 tokens: more than the tiny model's 512


def _model(root: Path, name: str, edit=None) -> Path:
    """The tiny Llama fixture (vocab 512) with a char tokenizer, its config.json changed by `edit`."""
    folder = root / name
    shutil.copytree(FIXTURES / "hf-tiny-llama", folder)
    write_char_tokenizer(folder)
    if edit is not None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def _drop_tensor(folder: Path, name: str) -> Path:
    tensors = load_file(folder / "model.safetensors")
    del tensors[name]
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_inputs")
    files = {
        "good": _model(root, "good"),
        "gpt2": _model(root, "gpt2", lambda c: c.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")),
        "phi": _model(root, "phi", lambda c: c.update(architectures=["PhiForCausalLM"], model_type="phi")),
        "no_hidden": _model(root, "no_hidden", lambda c: c.pop("hidden_size")),
        "yarn": _model(root, "yarn", lambda c: c.update(rope_scaling={"type": "yarn", "factor": 2.0})),
        "vocab": _model(root, "vocab", lambda c: c.update(vocab_size=600)),
        "no_weights": _model(root, "no_weights"),
        "no_lm_head": _drop_tensor(_model(root, "no_lm_head"), "lm_head.weight"),
        "bad_config": _model(root, "bad_config"),
        "bad_tokenizer": root / "bad_tokenizer",
        "data": root / "data.json", "bad_json": root / "bad.json", "no_key": root / "no_key.json",
        "empty": root / "empty.json", "csv": root / "data.csv", "alpaca": root / "alpaca.json",
        "bad_config_file": root / "settings.json",
    }
    (files["no_weights"] / "model.safetensors").unlink()
    (files["bad_config"] / "config.json").write_text("{not json")
    files["bad_tokenizer"].mkdir()
    (files["bad_tokenizer"] / "tokenizer.json").write_text("{}")
    files["data"].write_text(json.dumps([{"prompt": "hi", "response": "there"}] * 4))
    files["bad_json"].write_text('[{"prompt": "hi", }]')
    files["no_key"].write_text(json.dumps([{"prompt": "hi", "response": "a"}, {"prompt": "hi"}]))
    files["empty"].write_text("[]")
    files["csv"].write_text("prompt,response\nhi,there\n")
    shutil.copy(FIXTURES / "data" / "alpaca_en_demo.json", files["alpaca"])
    files["bad_config_file"].write_text('{"train": {"lr": }')
    return files


# name -> (arguments, with {key} for a path from `inputs`; what the error line must name)
CASES = {
    "unsupported architecture (GPT-2)": ("--model {gpt2} --data {data}", "GPT2LMHeadModel"),
    "unsupported architecture (Phi)": ("--model {phi} --data {data}", "PhiForCausalLM"),
    "tokenizer larger than the model's vocabulary": ("--model {good} --tokenizer %s --data {data}" % ZEPHYR_TOKENIZER,
                                                     str(ZEPHYR_TOKENIZER)),
    "config.json not JSON": ("--model {bad_config} --data {data}", "{bad_config}/config.json"),
    "config.json without hidden_size": ("--model {no_hidden} --data {data}", "'hidden_size'"),
    "unsupported rope scaling": ("--model {yarn} --data {data}", "'rope_scaling'"),
    "config vocabulary != the weights'": ("--model {vocab} --data {data}", "embed_tokens"),
    "no weights file": ("--model {no_weights} --data {data}", "model.safetensors"),
    "a tensor missing from the weights": ("--model {no_lm_head} --data {data}", "lm_head.weight"),
    "no such model folder": ("--model {good}/nope --data {data}", "--model"),
    "broken tokenizer.json": ("--model {good} --tokenizer {bad_tokenizer} --data {data}",
                              "{bad_tokenizer}/tokenizer.json"),
    "no such tokenizer": ("--model {good} --tokenizer {good}/nope --data {data}", "--tokenizer"),
    "data not JSON": ("--model {good} --data {bad_json}", "{bad_json}"),
    "data row without its answer": ("--model {good} --data {no_key}", "row 2 (1-based)"),
    "data without rows": ("--model {good} --data {empty}", "{empty}"),
    "data file type": ("--model {good} --data {csv}", ".csv"),
    "no such data": ("--model {good} --data {good}/nope.json", "--data"),
    "unknown loss": ("--model {good} --data {data} --loss squared", "loss"),
    "unknown method": ("--model {good} --data {data} --method dpo_magic", "--method"),
    "unknown option": ("--model {good} --data {data} --learning_rate 1e-6", "--learning_rate"),
    "option value not a number": ("--model {good} --data {data} --lr fast", "--lr"),
    "no such --config file": ("--config {good}/nope.json", "--config"),
    "--config not JSON": ("--config {bad_config_file}", "{bad_config_file}"),
    "--iterations not a list": ("--model {good} --data {data} --iterations {{\"lr\":1}}", "iterations"),
    "num_iterations 0": ("--model {good} --data {data} --num_iterations 0", "num_iterations"),
    "max_prompt_length >= max_length": ("--model {good} --data {data} --max_length 64 --max_prompt_length 64",
                                        "max_prompt_length"),
    "negative learning rate": ("--model {good} --data {data} --lr -1", "lr"),
    "temperature below 0": ("--model {good} --data {data} --temperature -1", "temperature"),
    "top_p above 1": ("--model {good} --data {data} --top_p 2", "top_p"),
    "unknown device": ("--model {good} --data {data} --device tpu", "--device"),
    "prompt + max_new_tokens past the model's positions": ("--model {good} --data {data} --max_new_tokens 400",
                                                           "max_new_tokens"),
    "output folder is a file": ("--model {good} --data {data} --out {data}", "--output_dir"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_mistake_is_one_error_line_naming_its_culprit(case, inputs, tmp_path, run_here):
    args, culprit = CASES[case]
    argv = [a.format(**inputs) for a in args.split(" ")]
    if "--out" not in argv and "--config" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    if "--device" not in argv:
        argv += ["--device", "cpu"]
    res = run_here(["-m", "minispin", *argv], tmp_path)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode != 0 and "Traceback" not in res.stderr + res.stdout, res.stderr
    assert len(errors) == 1, res.stderr
    assert culprit.format(**inputs) in errors[0], errors[0]


def test_the_catalogue_is_broad():
    assert len(CASES) >= 20


@pytest.mark.parametrize("script,args,culprit", [
    ("dpo.py", "--model {good} --data {alpaca} --split none", "alpaca.json: row 1 (1-based): not a preference row"),
    ("spin_zephyr.py", "--model {gpt2} --data {data}", "GPT2LMHeadModel"),
])
def test_example_scripts_give_the_same_one_line(script, args, culprit, inputs, tmp_path, run_here):
    argv = [a.format(**inputs) for a in args.split(" ")] + ["--out", str(tmp_path / "run"), "--device", "cpu"]
    res = run_here([str(REPO / "examples" / script), *argv], tmp_path)
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert res.returncode != 0 and "Traceback" not in res.stderr and len(errors) == 1, res.stderr
    assert culprit in errors[0], errors[0]
