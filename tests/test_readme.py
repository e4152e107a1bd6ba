"""README's API snippet runs as written (CPU): extracted from README.md and executed on the tiny fixtures.

Only the settings line is replaced (MODEL / DATA / SPLIT / DEVICE: a tiny char-level Llama folder, a
10-row data file, no split, "cpu"), and the final spin() call runs one short iteration (the paper's
4 x 2-epoch schedule with 256 new tokens is too long for a test); every other line runs as printed."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from minispin.checkpoint import save_model
from minispin.model import Transformer
from tiny import REPO, tiny_config, write_char_tokenizer

SETTINGS = re.compile(r"^MODEL, DATA, SPLIT, DEVICE = .*$", re.M)


def readme_snippet() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The API in a few lines"):]
    start = section.index("```python\n") + len("```python\n")
    return section[start: section.index("\n```", start)]


def test_readme_snippet_runs(tmp_path, monkeypatch):
    model_dir = tmp_path / "tiny-model"
    files = write_char_tokenizer(model_dir)
    torch.manual_seed(0)
    save_model(Transformer(tiny_config()), model_dir, extra_files=files)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?", "response": f"It is {2 * i}."}) + "\n"
                            for i in range(4)))
    code = readme_snippet()
    assert SETTINGS.search(code) and code.count("minispin.spin(cfg)") == 1
    code = SETTINGS.sub(f"MODEL, DATA, SPLIT, DEVICE = {str(model_dir)!r}, {str(data)!r}, None, 'cpu'", code)
    code = code.replace("minispin.spin(cfg)", "shorten(cfg); result = minispin.spin(cfg)")

    def shorten(cfg):
        cfg.iterations = [{"lr": 1e-3, "epochs": 1}]
        cfg.generation.max_new_tokens = 4
        cfg.train.global_batch_size, cfg.train.progress, cfg.generation.progress = 2, False, False

    monkeypatch.chdir(tmp_path)
    namespace = {"shorten": shorten}
    exec(compile(code, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"]) and namespace["seq_logps"].shape == (2,)
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    assert namespace["result"].final_model == Path("runs/z") / "iter0" / "model"
