"""Tiny synthetic GGUF files for the tests (tests/test_gguf.py, tests/test_convert.py): a random Llama written
with gguf.GGUFWriter the way llama.cpp's converter lays it out (its tensor names, Q/K rows permuted), in
any tensor type, with a small byte-level BPE tokenizer."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) on the rows of an HF Q/K weight."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# (hidden, heads, kv heads, intermediate) per block size: the rows of a quantized tensor hold whole blocks.
SHAPES = {1: (48, 3, 1, 72), 32: (96, 3, 1, 160), 256: (256, 4, 2, 512)}
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q4_K": 256, "Q6_K": 256,
         "Q5_0": 32}  # Q5_0: a type minispin refuses
VOCAB, LAYERS = 67, 2
# byte offsets of the fp16 scales inside one block (randomly filled blocks need sane scales)
K_SCALES = {"Q4_K": (0, 2), "Q6_K": (208,)}


def _random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random quantized rows of a type the gguf package cannot quantize: random bits, small fp16 scales."""
    qtype = Q[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for offset in K_SCALES[kind]:
        scale = rng.uniform(1e-3, 1e-2, size=(rows, cols // block)).astype(np.float16)
        data[..., offset:offset + 2] = scale.view(np.uint8).reshape(rows, cols // block, 2)
    return data.reshape(rows, -1)


def _encode(kind: str, w: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Q | None]:
    """(array for GGUFWriter.add_tensor, raw_dtype) of an HF-layout float matrix in GGUF type `kind`."""
    if kind == "F32":
        return w.astype(np.float32), None
    if kind == "F16":
        return w.astype(np.float16), None
    if kind in K_SCALES:
        return _random_blocks(kind, *w.shape, rng), Q[kind]
    return gguf.quants.quantize(w.astype(np.float32), Q[kind]), Q[kind]


def write_tiny_gguf(path: Path, kinds: dict[str, str], tied: bool = False, seed: int = 0,
                    chat_template: str | None = None) -> dict[str, tuple[torch.Tensor, int]]:
    """A tiny random Llama as GGUF (llama.cpp's names, Q/K rows permuted, matrices in the given types by
    role: "embed", "attn", "mlp"; norms F32) with a byte-level BPE tokenizer; returns {HF key: (float32
    tensor in the stored row order, heads whose rows llama.cpp permuted or 0)}: for quantized types what
    the stored blocks decode to."""
    rng = np.random.default_rng(seed)
    hidden, heads, kv, inter = SHAPES[max(BLOCK[k] for k in kinds.values())]
    d = hidden // heads
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": LAYERS, "context_length": 256, "embedding_length": hidden,
                       "feed_forward_length": inter, "attention.head_count": heads,
                       "attention.head_count_kv": kv, "vocab_size": VOCAB}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 5000.0)
    add_byte_tokenizer(w)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    expected = {}

    def add(name: str, hf: str, shape: tuple[int, ...], kind: str, permute_heads: int = 0) -> None:
        value = rng.standard_normal(shape).astype(np.float32) * (0.2 if len(shape) > 1 else 1.0)
        stored = llama_cpp_permute(value, permute_heads) if permute_heads else value
        data, raw = (stored, None) if len(shape) == 1 else _encode(kind, stored, rng)
        w.add_tensor(name, data, raw_dtype=raw)
        decoded = data if raw is None else gguf.quants.dequantize(data, raw)
        decoded = decoded.astype(np.float32).reshape(shape)
        expected[hf] = (torch.from_numpy(decoded), permute_heads)

    add("token_embd.weight", "model.embed_tokens.weight", (VOCAB, hidden), kinds["embed"])
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", p + "input_layernorm.weight", (hidden,), "F32")
        add(f"blk.{i}.attn_q.weight", p + "self_attn.q_proj.weight", (heads * d, hidden), kinds["attn"], heads)
        add(f"blk.{i}.attn_k.weight", p + "self_attn.k_proj.weight", (kv * d, hidden), kinds["attn"], kv)
        add(f"blk.{i}.attn_v.weight", p + "self_attn.v_proj.weight", (kv * d, hidden), kinds["attn"])
        add(f"blk.{i}.attn_output.weight", p + "self_attn.o_proj.weight", (hidden, heads * d), kinds["attn"])
        add(f"blk.{i}.ffn_norm.weight", p + "post_attention_layernorm.weight", (hidden,), "F32")
        add(f"blk.{i}.ffn_gate.weight", p + "mlp.gate_proj.weight", (inter, hidden), kinds["mlp"])
        add(f"blk.{i}.ffn_up.weight", p + "mlp.up_proj.weight", (inter, hidden), kinds["mlp"])
        add(f"blk.{i}.ffn_down.weight", p + "mlp.down_proj.weight", (hidden, inter), kinds["mlp"])
    add("output_norm.weight", "model.norm.weight", (hidden,), "F32")
    if not tied:
        add("output.weight", "lm_head.weight", (VOCAB, hidden), kinds["embed"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def add_byte_tokenizer(w) -> None:
    """A small byte-level BPE vocabulary: lower-case letters, "Ġ" (a space), three merges, two control tokens."""
    merges = ["a b", "ab c", "Ġ a"]
    tokens = ["<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "ab", "abc", "Ġa"]
    tokens += [f"<extra_{i}>" for i in range(VOCAB - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
