"""The generation job: SPIN rows in source order, K samples, exactly-once after a kill -9, 2 ranks ==
1 rank, malformed rows reported, settings guard, a finished file means done."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minispin import distributed as dist
from minispin.checkpoint import save_model
from minispin.data import DataError, Example
from minispin.generation_job import GenerationConfig, run_generation_job
from minispin.model import ModelConfig, Transformer
from minispin.tokenizer import load_tokenizer
from tiny import FIXTURES, REPO

TOKENIZER = FIXTURES / "tokenizers" / "zephyr"
ALPACA = FIXTURES / "data" / "alpaca_en_demo.json"

SETTINGS = dict(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=11, batch_size=4, chunk_size=2,
                limit=12, max_prompt_length=64, progress=False)

WORKER = """
import json, sys, torch
from minispin import distributed as d, load_model
from minispin.generation_job import GenerationConfig, run_generation_job
from minispin.tokenizer import load_tokenizer
model_dir, tok_dir, data, out, settings = sys.argv[1:6]
info = d.init_distributed("cpu")
torch.set_num_threads(1)
run_generation_job(load_model(model_dir), load_tokenizer(tok_dir), data, out,
                   GenerationConfig(**json.loads(settings)))
d.shutdown(info)
"""


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, torch_dtype="float32", eos_token_id=tokenizer.eos_id)
    return Transformer(config).eval()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def reference_rows(model, tokenizer, tmp_path_factory):
    """The rows of one uninterrupted single-process run with SETTINGS."""
    out = run_generation_job(model, tokenizer, ALPACA, tmp_path_factory.mktemp("ref") / "gen.jsonl",
                             GenerationConfig(**SETTINGS))
    return read_jsonl(out)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def run_worker(tmp_path, model_dir, out, settings, env_extra=None, nproc=1):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop(dist.KILL_ENV, None) if not env_extra else None
    args = [str(model_dir), str(TOKENIZER), str(ALPACA), str(out), json.dumps(settings)]
    if nproc == 1:
        cmd = [sys.executable, str(script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)


def test_rows_in_source_order_and_spin_format(reference_rows, tokenizer):
    rows = reference_rows
    assert [r["index"] for r in rows] == list(range(12))
    source = json.loads(ALPACA.read_text())
    for r in rows:
        assert set(r) == {"real", "generated", "index", "generated_ids"}
        ids = r["generated_ids"]  # the sampled ids, ending with EOS when the sample stopped there
        body = ids[:-1] if ids and ids[-1] == tokenizer.eos_id else ids
        assert tokenizer.decode(body, skip_special_tokens=True) == r["generated"][1]["content"]
        assert [m["role"] for m in r["real"]] == ["user", "assistant"] == [m["role"] for m in r["generated"]]
        assert r["real"][0] == r["generated"][0]
        assert r["real"][1]["content"] == source[r["index"]]["output"]
        assert isinstance(r["generated"][1]["content"], str)
    assert len({r["generated"][1]["content"] for r in rows}) > 8  # sampled, not constant


def test_k_samples_and_parquet_copy(model, tokenizer, reference_rows, tmp_path):
    out = run_generation_job(model, tokenizer, ALPACA, tmp_path / "k.jsonl",
                             GenerationConfig(**{**SETTINGS, "num_samples": 3, "limit": 4, "parquet": True}))
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == list(range(4))
    for r, ref in zip(rows, reference_rows):
        assert len(r["samples"]) == 3 and r["generated"][1]["content"] == r["samples"][0]
        assert r["samples"][0] == ref["generated"][1]["content"]  # sample 0 == the single-sample run
        assert len(r["samples_ids"]) == 3 and r["samples_ids"][0] == r["generated_ids"] == ref["generated_ids"]
        assert len(set(r["samples"])) > 1
    pq = pytest.importorskip("pyarrow.parquet")
    assert pq.read_table(tmp_path / "k.parquet").to_pylist() == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.jsonl", "k.parquet"]  # parts cleaned up


def test_finished_file_means_done(tmp_path, tokenizer):
    final = tmp_path / "done.jsonl"
    final.write_text('{"index": 0}\n')
    # no model needed: the job returns before touching it
    assert run_generation_job(None, tokenizer, ALPACA, final, GenerationConfig(**SETTINGS)) == final
    assert final.read_text() == '{"index": 0}\n'


def test_crash_resume_in_process_and_settings_guard(model, tokenizer, reference_rows, tmp_path, monkeypatch):
    class Crash(Exception):
        pass

    def crash_after_first_chunk(phase, **counters):
        if counters.get("rows", 0) >= 2:
            raise Crash

    out = tmp_path / "gen.jsonl"
    monkeypatch.setattr(dist, "kill_point", crash_after_first_chunk)
    with pytest.raises(Crash):
        run_generation_job(model, tokenizer, ALPACA, out, GenerationConfig(**SETTINGS))
    monkeypatch.undo()
    part = out.with_name("gen.jsonl.part-00000-of-00001.jsonl")
    assert not out.exists() and len(read_jsonl(part)) == 2
    with pytest.raises(ValueError, match="temperature"):
        run_generation_job(model, tokenizer, ALPACA, out, GenerationConfig(**{**SETTINGS, "temperature": 0.5}))
    assert run_generation_job(model, tokenizer, ALPACA, out, GenerationConfig(**SETTINGS)) == out
    assert read_jsonl(out) == reference_rows
    assert not part.exists()


def test_sigkill_mid_job_then_rerun_gives_every_row_once(model_dir, reference_rows, tmp_path):
    out = tmp_path / "gen.jsonl"
    killed = run_worker(tmp_path, model_dir, out, SETTINGS, {dist.KILL_ENV: "generate:rows=4"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    part = out.with_name("gen.jsonl.part-00000-of-00001.jsonl")
    assert not out.exists() and len(read_jsonl(part)) == 4
    # a kill in the middle of a write leaves a torn last line: the resume must drop it, not keep it
    with open(part, "a", encoding="utf-8") as f:
        f.write('{"real": [{"role": "user", "content": "tor')
    done = run_worker(tmp_path, model_dir, out, SETTINGS)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_jsonl(out)
    assert [r["index"] for r in rows] == list(range(12))  # every row exactly once, in source order
    assert rows == reference_rows


def test_two_ranks_equal_one(model_dir, reference_rows, tmp_path):
    out = tmp_path / "gen.jsonl"
    proc = run_worker(tmp_path, model_dir, out, SETTINGS, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_jsonl(out) == reference_rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.jsonl", "worker.py"]


def test_malformed_rows_are_reported_and_skipped_or_refused(model, tokenizer, tmp_path):
    def ex(i, prompt):
        return Example(index=i, prompt=prompt, real="answer", generated=None, source="mem")

    user = [{"role": "user", "content": "Say hi."}]
    multi = user + [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "again"}]
    examples = [ex(0, user), ex(1, multi), ex(2, []), ex(3, user)]
    cfg = GenerationConfig(**{**SETTINGS, "template": "spin", "limit": None})
    out = run_generation_job(model, tokenizer, examples, tmp_path / "g.jsonl", cfg)
    assert [r["index"] for r in read_jsonl(out)] == [0, 3]
    skipped = read_jsonl(tmp_path / "g.jsonl.skipped.jsonl")
    assert [s["index"] for s in skipped] == [1, 2] and all(s["reason"] for s in skipped)
    with pytest.raises(DataError, match=r"row 2 \(1-based\)"):
        run_generation_job(model, tokenizer, examples, tmp_path / "h.jsonl",
                           GenerationConfig(**{**SETTINGS, "template": "spin", "on_error": "raise"}))
    with pytest.raises(DataError, match="same index"):
        run_generation_job(model, tokenizer, [ex(0, user), ex(0, user)], tmp_path / "i.jsonl", cfg)
    # a template that cannot render anything is a setting error, not 4 malformed rows
    with pytest.raises(ValueError, match="template"):
        run_generation_job(model, tokenizer, examples, tmp_path / "t.jsonl",
                           GenerationConfig(**{**SETTINGS, "template": "{{ raise_exception('no') }}"}))
    assert not (tmp_path / "t.jsonl").exists()
    # rows the reader cannot parse are reported by index too
    data = tmp_path / "rows.jsonl"
    data.write_text('{"prompt": "Hi?", "response": "Hello."}\n{"prompt": 5, "response": "x"}\n'
                    '{"prompt": "Bye?", "response": "Bye."}\n')
    out = run_generation_job(model, tokenizer, data, tmp_path / "j.jsonl", GenerationConfig(**SETTINGS))
    assert [r["index"] for r in read_jsonl(out)] == [0, 2]
    assert [s["index"] for s in read_jsonl(tmp_path / "j.jsonl.skipped.jsonl")] == [1]
    # and so are those of a ReadResult read by the caller
    from minispin.data import read_examples
    out = run_generation_job(model, tokenizer, read_examples(data, on_error="skip"), tmp_path / "k.jsonl",
                             GenerationConfig(**SETTINGS))
    assert [s["index"] for s in read_jsonl(tmp_path / "k.jsonl.skipped.jsonl")] == [1]


def test_tokenizer_and_positions_are_checked_before_any_row(model, tokenizer, tmp_path):
    """A model whose vocabulary the tokenizer overruns, or prompt + max_new_tokens past the model's
    positions: refused before generation starts (no part file written)."""
    small = Transformer(dataclasses.replace(model.config, vocab_size=tokenizer.vocab_size - 1)).eval()
    out = tmp_path / "gen.jsonl"
    with pytest.raises(ValueError, match=f"do not match: the tokenizer has {len(tokenizer)} tokens but the "
                                         f"model's vocabulary has {tokenizer.vocab_size - 1}"):
        run_generation_job(small, tokenizer, ALPACA, out, GenerationConfig(**SETTINGS))
    with pytest.raises(ValueError, match=r"prompt \([0-9]+ tokens\) \+ max_new_tokens \(500\) exceeds the model's "
                                         "512 positions"):
        run_generation_job(model, tokenizer, ALPACA, out, GenerationConfig(**dict(SETTINGS, max_new_tokens=500)))
    assert list(tmp_path.iterdir()) == []
