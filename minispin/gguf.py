"""GGUF files (llama.cpp) in: the config, dequantized weights and tokenizer of a Llama/Mistral-family model.

    config = read_config("m.gguf")                     # a ModelConfig (LlamaForCausalLM)
    for key, tensor in iter_tensors("m.gguf"): ...    # Hugging Face keys, float tensors in the HF layout
    tokenizer_json, settings = read_tokenizer("m.gguf")  # a tokenizer.json text + tokenizer_config.json dict

The file is read as data through ggml-org's `gguf` package (GGUFReader maps it, `gguf.quants.dequantize`
expands quantized blocks): nothing in it is executed; its chat template is text, rendered later by the
tokenizer's sandboxed Jinja. llama.cpp's converter interleaves the rows of the Q and K projections for
its rope layout; `unpermute_rows` puts them back in the Hugging Face (rotate-half) order.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .errors import UserError
from .model import ModelConfig

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
SUPPORTED_ARCHITECTURES = ("llama",)  # llama.cpp writes Llama and Mistral (v0.1-v0.3) models as "llama"
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's split regex (tokenizers' ByteLevel(use_regex=True) applies it) and Llama 3's, as in their
# tokenizer.json files; llama.cpp's "default" chain of splits (llm_tokenizer_bpe, each regex splits the
# pieces of the previous one, keeping what lies between matches).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
DEFAULT_REGEXES = (r"[\p{P}\$\+<=>\^~\|]+", r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                   r"\p{N}+", r"[0-9][0-9][0-9]")
# tokenizer.ggml.pre values -> the pre-tokenizer llama.cpp gives them (llama-vocab.cpp).
PRE_TOKENIZERS = {"smollm": "smollm", "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3",
                  "gpt2": "gpt2", "gpt-2": "gpt2", "default": "default"}

# GGUF tensor names -> Hugging Face keys ("{i}" is the layer).
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFError(UserError):
    """A GGUF file minispin cannot read faithfully (architecture, tensor type, tokenizer type, missing key)."""


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` names a GGUF file (by its suffix: a folder is a Hugging Face checkpoint)."""
    return str(path).lower().endswith(".gguf")


def _gguf_package():
    try:
        import gguf
    except ImportError:
        raise UserError("reading GGUF files needs the optional package gguf: pip install minispin[gguf]") from None
    return gguf


def open_gguf(path: str | os.PathLike):
    """The file's GGUFReader (memory-mapped, parsed once per file content: parsing a 49k-token vocabulary
    takes seconds, and a run opens the file for its config, tokenizer and each model load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    st = path.stat()
    return _open_cached(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, size: int, mtime_ns: int, inode: int):
    gguf = _gguf_package()
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError/struct errors/... on a damaged file
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _value(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value.item() if isinstance(value, np.generic) else value


def _require(reader, key: str, path: str | os.PathLike) -> Any:
    value = _value(reader, key)
    if value is None:
        raise GGUFError(f"{path}: metadata key {key!r} is missing; minispin needs it to build the model")
    return value


def _architecture(reader, path: str | os.PathLike) -> str:
    arch = _require(reader, "general.architecture", path)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; minispin reads GGUF files of "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama/Mistral-family) models only")
    return arch


# ----------------------------------------------------------------------------- config

def _rope_scaling(reader, arch: str, path: str | os.PathLike) -> dict[str, Any] | None:
    """Hugging Face rope_scaling from llama.cpp's keys; Llama 3.1-style frequency factors (stored as a
    rope_freqs tensor without their parameters) and YaRN are refused rather than guessed."""
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise GGUFError(f"{path}: tensor 'rope_freqs.weight' (per-frequency rope factors, Llama 3.1-style scaling) "
                        "is not supported; convert the original Hugging Face checkpoint instead")
    kind = _value(reader, f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise GGUFError(f"{path}: {arch}.rope.scaling.type {kind!r} is not supported (supported: none, linear)")
    return {"rope_type": "linear", "factor": float(_require(reader, f"{arch}.rope.scaling.factor", path))}


def _torch_dtype(reader) -> str:
    """The dtype name a config should record: that of the matrices when all share F16/BF16, else float32
    (quantized weights dequantize to float32)."""
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) > 1}
    return {"F16": "float16", "BF16": "bfloat16"}.get(kinds.pop(), "float32") if len(kinds) == 1 else "float32"


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig of a GGUF file's `llama.*` metadata (tied embeddings when it has no output.weight)."""
    reader = open_gguf(path)
    arch = _architecture(reader, path)

    def need(key: str) -> Any:
        return _require(reader, f"{arch}.{key}", path)

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_value(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dims = int(_value(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"{path}: {arch}.rope.dimension_count is {rope_dims} but heads are {head_dim} wide; "
                        "partial rotary embeddings are not supported")
    names = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{path}: has no tensor 'token_embd.weight'; not a complete model file")
    vocab = int(names["token_embd.weight"].shape[-1])  # GGUF shapes list the fastest dimension first
    ids = {k: _value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(_value(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim, "max_position_embeddings": int(_value(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_value(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch, path), "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": _torch_dtype(reader), "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
        "pad_token_id": ids["padding"],
    }
    return ModelConfig.from_hf(hf, source=f"{path} (GGUF metadata)")


# ----------------------------------------------------------------------------- weights

def hf_tensor_key(name: str) -> str | None:
    """GGUF tensor name -> Hugging Face key (None for a name minispin does not know)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order. Within each head of width d its converter stores HF row i (first
    rotate-half) at row 2i and HF row i + d/2 (its partner) at row 2i + 1, the adjacent-pair layout of its
    rope; so GGUF row 2i + j of a head is HF row j * d/2 + i, and reading rows as [head, i, j] and
    transposing to [head, j, i] gives the HF order back."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _check_types(reader, path: str | os.PathLike) -> None:
    for t in reader.tensors:
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise GGUFError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which minispin cannot "
                            f"dequantize (supported: {', '.join(SUPPORTED_TYPES)}); use a file quantized with one "
                            "of those")


def _to_torch(t, gguf) -> torch.Tensor:
    """One GGUF tensor as a float torch tensor in the HF [rows, columns] layout: F32/F16/BF16 exactly as
    stored, quantized types through gguf.quants.dequantize (float32)."""
    shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists the fastest-varying dimension first
    kind = t.tensor_type.name
    if kind in ("F32", "F16", "BF16"):
        raw = np.ascontiguousarray(t.data).reshape(-1).view(np.uint8)
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[kind]
        return torch.frombuffer(bytearray(raw.tobytes()), dtype=dtype).reshape(shape)
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)


def iter_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face key, CPU float tensor) for every tensor of a GGUF file, in file order, Q/K rows
    back in the HF order; an unknown tensor keeps its GGUF name (the loader reports it as unexpected).
    Every tensor type is checked before the first is read."""
    gguf = _gguf_package()
    reader = open_gguf(path)
    config = read_config(path)
    _check_types(reader, path)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for t in reader.tensors:
        key = hf_tensor_key(t.name)
        tensor = _to_torch(t, gguf)
        kind = t.name.split(".")[2] if key and t.name.startswith("blk.") else None
        if kind in heads:
            tensor = unpermute_rows(tensor, heads[kind])
        yield key or t.name, tensor


# ----------------------------------------------------------------------------- tokenizer

def _tokens(reader, path: str | os.PathLike) -> tuple[list[str], list[int]]:
    tokens = _require(reader, "tokenizer.ggml.tokens", path)
    types = _value(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise GGUFError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    seen: set[str] = set()
    for i, token in enumerate(tokens):
        if token in seen:
            raise GGUFError(f"{path}: tokenizer.ggml.tokens[{i}] {token!r} is listed twice; a vocabulary needs "
                            "unique tokens")
        seen.add(token)
    return tokens, [int(t) for t in types]


def _added_tokens(tokens: list[str], types: list[int]) -> list[Any]:
    """Control and unknown tokens (special) and user-defined tokens: matched in text before the model
    runs, as llama.cpp and transformers do."""
    from tokenizers import AddedToken

    special = (TOKEN_CONTROL, TOKEN_UNKNOWN)
    return [AddedToken(tok, special=kind in special, normalized=False)
            for tok, kind in zip(tokens, types) if kind in special + (TOKEN_USER_DEFINED,)]


def _pre_tokenizer(pre: str, path: str | os.PathLike):
    """The `tokenizers` pre-tokenizer of a byte-level BPE vocabulary for llama.cpp's tokenizer.ggml.pre."""
    from tokenizers import Regex, pre_tokenizers as pt

    kind = PRE_TOKENIZERS.get(pre)
    if kind is None:
        raise GGUFError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: "
                        f"{', '.join(PRE_TOKENIZERS)}); its text splitting would only be approximated")
    if kind == "gpt2":
        return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if kind == "smollm":  # every digit its own piece, then GPT-2's regex: SmolLM2's own tokenizer.json
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    regexes = (LLAMA3_REGEX,) if kind == "llama3" else DEFAULT_REGEXES
    return pt.Sequence([pt.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
                       + [pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])


def _bpe_tokenizer(reader, tokens: list[str], path: str | os.PathLike):
    """Byte-level BPE ("gpt2"): the vocabulary, the ranked merges and the file's pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models

    merges = _require(reader, "tokenizer.ggml.merges", path)
    pairs = []
    for i, merge in enumerate(merges):
        left, sep, right = merge.partition(" ")
        if not sep or not left or not right:
            raise GGUFError(f"{path}: tokenizer.ggml.merges[{i}] is {merge!r}, not two tokens separated by a space")
        pairs.append((left, right))
    pre = _value(reader, "tokenizer.ggml.pre", "default")
    pre_tokenizer = _pre_tokenizer(pre, path)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    # llama.cpp looks a whole Llama 3 pre-token up in the vocabulary before merging (ignore_merges).
    model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
                       ignore_merges=PRE_TOKENIZERS[pre] == "llama3")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to a SentencePiece BPE vocabulary: every split of a normal piece into two
    pieces of the vocabulary, higher-scored merged pieces first (SentencePiece merges the best-scoring pair)."""
    ids = {tok: i for i, tok in enumerate(tokens)}
    ranked = []
    for i, (piece, kind) in enumerate(zip(tokens, types)):
        if kind != TOKEN_NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-scores[i], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _spm_tokenizer(reader, tokens: list[str], types: list[int], path: str | os.PathLike):
    """SentencePiece BPE ("llama") as tokenizers' BPE with byte fallback: spaces become "▁" and each
    stretch of text between special tokens gets the dummy-prefix "▁" (add_space_prefix), as llama.cpp does."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _require(reader, "tokenizer.ggml.scores", path)
    unknown = [tok for tok, kind in zip(tokens, types) if kind == TOKEN_UNKNOWN]
    model = models.BPE(vocab={tok: i for i, tok in enumerate(tokens)}, merges=_spm_merges(tokens, scores, types),
                       unk_token=unknown[0] if unknown else None, fuse_unk=True, byte_fallback=True)
    tok = Tokenizer(model)
    prefix = bool(_value(reader, "tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if prefix else replace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _special_settings(reader, tokens: list[str], model: str, path: str | os.PathLike) -> dict[str, Any]:
    """tokenizer_config.json's special-token part: bos/eos/unk/pad from their ids, add_bos/add_eos
    (llama.cpp's defaults when absent: a BOS for SentencePiece and Llama 3 vocabularies)."""
    settings: dict[str, Any] = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = _value(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise GGUFError(f"{path}: tokenizer.ggml.{key}_token_id {token_id} is outside the vocabulary "
                            f"({len(tokens)} tokens)")
        settings[f"{name}_token"] = tokens[token_id] if token_id is not None else None
    pre = _value(reader, "tokenizer.ggml.pre", "default")
    default_bos = model == "llama" or PRE_TOKENIZERS.get(pre) == "llama3"
    settings["add_bos_token"] = bool(_value(reader, "tokenizer.ggml.add_bos_token", default_bos))
    settings["add_eos_token"] = bool(_value(reader, "tokenizer.ggml.add_eos_token", False))
    return settings


def _post_processor(settings: dict[str, Any], tokens: list[str]):
    """A post-processor adding BOS/EOS as configured, so that the tokenizer.json written for
    transformers encodes like minispin (which adds them itself from add_bos_token/add_eos_token)."""
    from tokenizers import processors

    ids = {t: i for i, t in enumerate(tokens)}
    bos = [settings["bos_token"]] if settings["add_bos_token"] else []
    eos = [settings["eos_token"]] if settings["add_eos_token"] else []
    return processors.TemplateProcessing(
        single=" ".join(bos + ["$A"] + eos), pair=" ".join(bos + ["$A"] + eos + bos + ["$B:1"] + eos),
        special_tokens=[(t, ids[t]) for t in dict.fromkeys(bos + eos)])


def _chat_template(reader) -> str | list[dict[str, str]] | None:
    """tokenizer.chat_template, plus named ones (tokenizer.chat_template.<name>) in HF's list form."""
    default = _value(reader, "tokenizer.chat_template")
    named = {key.rsplit(".", 1)[1]: _value(reader, key) for key in reader.fields
             if key.startswith("tokenizer.chat_template.")}
    if not named:
        return default
    listed = ([{"name": "default", "template": default}] if default is not None else [])
    return listed + [{"name": name, "template": text} for name, text in named.items()]


def read_tokenizer(path: str | os.PathLike) -> tuple[str, dict[str, Any]]:
    """(tokenizer.json text, tokenizer_config.json dict) built from a GGUF file's tokenizer metadata:
    tokenizer.ggml.model "gpt2" (byte-level BPE, split as tokenizer.ggml.pre says) or "llama"
    (SentencePiece BPE), the special tokens and the chat template."""
    reader = open_gguf(path)
    model = _require(reader, "tokenizer.ggml.model", path)
    tokens, types = _tokens(reader, path)
    if model == "gpt2":
        tok = _bpe_tokenizer(reader, tokens, path)
    elif model == "llama":
        tok = _spm_tokenizer(reader, tokens, types, path)
    else:
        raise GGUFError(f"{path}: tokenizer.ggml.model {model!r} is not supported (supported: gpt2, llama)")
    tok.add_tokens(_added_tokens(tokens, types))
    settings = _special_settings(reader, tokens, model, path)
    tok.post_processor = _post_processor(settings, tokens)
    context = _value(reader, f"{_architecture(reader, path)}.context_length")
    settings.update({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                     "model_max_length": int(context) if context else None,
                     "chat_template": _chat_template(reader)})
    if model == "llama":
        settings["legacy"] = True  # every stretch between special tokens gets the dummy prefix (llama.cpp)
    return tok.to_str(), {k: v for k, v in settings.items() if v is not None}

