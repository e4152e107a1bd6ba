"""python -m minispin.convert (CPU): a tiny synthetic GGUF file becomes a Hugging Face folder that
transformers loads with the logits and token ids minispin gets from the GGUF file; refusals in one line.
(The real SmolLM2 file's conversion, loaded in a process without gguf, is in tests/test_gguf.py.)"""
from __future__ import annotations

import json

import pytest
import torch

import minispin
from minispin.convert import convert, main
from minispin.errors import UserError
from minispin.tokenizer import load_tokenizer
from tiny_gguf import VOCAB, write_tiny_gguf

CHATML = ("{% for m in messages %}{{'<s>' + m['role'] + '\n' + m['content'] + '</s>\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<s>assistant\n' }}{% endif %}")


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, {"embed": "Q8_0", "attn": "Q4_0", "mlp": "F16"}, chat_template=CHATML)
    return path


def test_converted_folder_loads_in_transformers_like_the_gguf_file(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "hf"
    main([str(tiny), str(out)])
    config = json.loads((out / "config.json").read_text())
    assert (config["architectures"], config["torch_dtype"], config["tie_word_embeddings"]) == \
        (["LlamaForCausalLM"], "float32", False)
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours = minispin.load_model(tiny, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, ours(ids))
    hf_tok, tok = AutoTokenizer.from_pretrained(str(out)), load_tokenizer(tiny)
    for text in ("abc ab", "cab</s>ba", " a  b"):
        assert hf_tok(text)["input_ids"] == tok.encode(text)
    messages = [{"role": "user", "content": "abc"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(messages, add_generation_prompt=True) == "<s>user\nabc</s>\n<s>assistant\n"
    assert (hf_tok.bos_token, hf_tok.eos_token) == ("<s>", "</s>")
    assert load_tokenizer(out).encode("abc ab") == tok.encode("abc ab")


def test_dtype_option_and_refusals(tiny, tmp_path):
    out = convert(tiny, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert minispin.load_model(out).embed_tokens.weight.dtype == torch.bfloat16
    for call, needle in ((lambda: convert(tiny, out), "not an empty folder"),
                         (lambda: convert(tmp_path / "missing.gguf", tmp_path / "x"), "no such file"),
                         (lambda: convert(out, tmp_path / "y"), "expected a .gguf file"),
                         (lambda: convert(tiny, tmp_path / "z", dtype="int8"), "--dtype")):
        with pytest.raises(UserError, match=needle) as info:
            call()
        assert "\n" not in str(info.value)
    (tmp_path / "empty").mkdir()
    assert convert(tiny, tmp_path / "empty").is_dir()  # an empty folder may be the target
