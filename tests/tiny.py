"""Shared test helpers: a character-level tokenizer with a tiny chat template, tiny Llama configs, a tiny
checkpoint folder and random arithmetic pairs; the repository's and the fixtures' paths (one place, so a
test file's depth in tests/ never matters)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from minispin.checkpoint import save_model
from minispin.collate import Pair
from minispin.model import ModelConfig, Transformer
from minispin.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]  # the repository root
FIXTURES = REPO / "tests" / "fixtures"

CHARS = list("0123456789+-=?.,!: ") + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
    [chr(c) for c in range(ord("A"), ord("Z") + 1)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = len(SPECIALS) + len(CHARS)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                 "{% else %}<|assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_char_tokenizer(folder: Path) -> list[str]:
    """A character-level tokenizers-library tokenizer (VOCAB_SIZE tokens) in `folder`; returns its files."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tok.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
        "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE}))
    return [str(folder / "tokenizer.json"), str(folder / "tokenizer_config.json")]


def tiny_config(vocab_size: int = VOCAB_SIZE, tie: bool = False, layers: int = 2,
                max_positions: int = 128) -> ModelConfig:
    """A 2-layer, hidden-32 fp32 Llama with GQA (4 heads, 2 kv heads)."""
    return ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                       torch_dtype="float32", tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                       architecture="LlamaForCausalLM")


def make_model_dir(folder: Path, seed: int = 0, tie: bool = False) -> Path:
    """An HF checkpoint folder (fp32 tiny Llama + char tokenizer)."""
    tok_files = write_char_tokenizer(folder / "tok")
    tok = load_tokenizer(folder / "tok")
    torch.manual_seed(seed)
    model = Transformer(tiny_config(tok.vocab_size, tie))
    save_model(model, folder / "model", extra_files=tok_files)
    return folder / "model"


def make_pairs(n: int, seed: int = 0) -> list[Pair]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        a, b = torch.randint(0, 200, (2,), generator=g).tolist()
        junk = "".join(CHARS[j] for j in torch.randint(0, 36, (int(torch.randint(0, 9, (1,), generator=g)),),
                                                      generator=g).tolist())
        pairs.append(Pair(i, [{"role": "user", "content": f"What is {a}+{b}?"}], str(a + b), junk))
    return pairs
