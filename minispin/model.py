"""A hand-written Llama-family decoder that matches Hugging Face LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM and Qwen3ForCausalLM (dense).

One file, plain modules: token embedding, RMSNorm (fp32 compute), rotate-half RoPE (default, linear,
llama3 scaling), grouped-query attention through scaled_dot_product_attention, SwiGLU MLP, optional
Mistral sliding window, tied or untied output head. The families differ only in small config-driven
pieces of the attention block (`ModelConfig.qkv_bias`, `o_bias`, `qk_norm`). Parameter names equal the
Hugging Face names with the leading "model." removed, so checkpoint I/O is a key rename (see `hf_key` /
`our_key`).

The model knows nothing about training. For generation it accepts a static `KVCache`; for the fused
log-prob kernels it exposes `hidden_states(...)` (final normed hidden states) and `output_weight`.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import UserError
from .recompute import recomputable, recompute_scope

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                           "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
QWEN = ("Qwen2ForCausalLM", "Qwen3ForCausalLM")
QWEN3_DEFAULT_HEAD_DIM = 128  # Qwen3Config's head_dim when config.json has none (not hidden/heads)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelConfigError(UserError):
    """A model config we cannot run faithfully (unknown architecture, rope type, unsupported feature)."""


def _rope_from_hf(hf: dict[str, Any], bad: Callable[[str, str], ModelConfigError]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) of a config.json; an unsupported or incomplete rope scaling is refused."""
    # RoPE: 4.x has rope_theta + rope_scaling; 5.x has rope_parameters {rope_theta, rope_type, ...}.
    rope_params = hf.get("rope_parameters")
    if rope_params is not None:
        if not isinstance(rope_params, dict) or "rope_theta" not in rope_params:
            raise bad("rope_parameters", "must be a dict with rope_theta (per-layer-type rope is not supported)")
        rope_theta = rope_params["rope_theta"]
        scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        scaling_key = "rope_parameters"
    else:
        rope_theta = hf.get("rope_theta", 10000.0)
        scaling = dict(hf.get("rope_scaling") or {})
        scaling_key = "rope_scaling"
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise bad(scaling_key, f"has rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "linear" and "factor" not in scaling:
        raise bad(scaling_key, "of type 'linear' needs 'factor'")
    if rope_type == "llama3":
        need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in need if k not in scaling]
        if missing:
            raise bad(scaling_key, f"of type 'llama3' lacks {', '.join(missing)}")
    rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **scaling}
    return float(rope_theta), rope_scaling


@dataclass
class ModelConfig:
    """Architecture hyperparameters; defaults are Mistral-7B's (the base of zephyr-7b-sft-full)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # normalised: {"rope_type": ..., "factor": ..., ...}
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen3: biases on q/k/v and o (Llama's meaning; refused for Llama/Mistral)
    architecture: str = "MistralForCausalLM"
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ModelConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ModelConfigError(f"architecture {self.architecture!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        if self.attention_bias and self.architecture != "Qwen3ForCausalLM":
            raise ModelConfigError(f"attention_bias is implemented for Qwen3ForCausalLM only, "
                                   f"not {self.architecture}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(f"rope_scaling type {rope_type!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES.get(self.torch_dtype, torch.float32)

    # What a family adds to the Llama attention block; everything else is shared.
    @property
    def qkv_bias(self) -> bool:
        """Biases on the q/k/v projections: always in Qwen2, with attention_bias in Qwen3."""
        return self.architecture == "Qwen2ForCausalLM" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        """A bias on the output projection (Qwen3 with attention_bias; Qwen2 never has one)."""
        return self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """Qwen3: an RMSNorm over each head's q and k vector (head_dim wide), applied before RoPE."""
        return self.architecture == "Qwen3ForCausalLM"

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face config.json dict (transformers 4.x or 5.x layout); refuse what we cannot run."""

        def bad(key: str, why: str) -> ModelConfigError:
            return ModelConfigError(f"{source}: field {key!r} {why}")

        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        arch = archs[0] if archs else {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}.get(model_type)
        if arch not in SUPPORTED_ARCHITECTURES or len(archs) > 1:
            raise bad("architectures", f"is {archs or model_type!r}; minispin runs only "
                      f"{' / '.join(SUPPORTED_ARCHITECTURES)}")
        if model_type is not None and model_type != SUPPORTED_ARCHITECTURES[arch]:
            raise bad("model_type", f"is {model_type!r}, which does not match architecture {arch}")
        if hf.get("attention_bias") and arch not in QWEN:  # Qwen3 reads it; Qwen2 ignores it, as transformers does
            raise bad("attention_bias", f"is true; biases in {arch}'s attention projections are not implemented")
        if hf.get("mlp_bias"):
            raise bad("mlp_bias", "is true; biases in MLP projections are not implemented")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise bad("hidden_act", f"is {act!r}; only 'silu' (SwiGLU) is implemented")
        if (hf.get("pretraining_tp") or 1) != 1:
            raise bad("pretraining_tp", "is not 1; tensor-parallel pretraining slices are not implemented")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(hf.get(key), int):
                raise bad(key, f"is missing or not an integer (got {hf.get(key)!r})")

        rope_theta, rope_scaling = _rope_from_hf(hf, bad)

        sliding_window = hf.get("sliding_window") if arch == "MistralForCausalLM" else None
        if hf.get("use_sliding_window") is False:
            sliding_window = None
        windowed = _qwen_sliding_layers(hf) if arch in QWEN else []
        if windowed:
            window = hf.get("sliding_window", 4096)
            raise bad("use_sliding_window", f"is true (window {window} on layers {windowed}); "
                      f"Qwen's per-layer sliding window is not implemented (outputs equal full attention only "
                      f"up to {window} tokens: set it to false if your sequences are that short)")
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if dtype not in _DTYPES:
            raise bad("torch_dtype", f"is {dtype!r}; expected one of {', '.join(_DTYPES)}")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim", QWEN3_DEFAULT_HEAD_DIM if arch == "Qwen3ForCausalLM" else None),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            sliding_window=sliding_window,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=arch == "Qwen3ForCausalLM" and bool(hf.get("attention_bias", False)),
            architecture=arch,
            torch_dtype=dtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """config.json in the transformers 4.x layout (which transformers 5.x also reads)."""
        hf: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": SUPPORTED_ARCHITECTURES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if self.architecture == "MistralForCausalLM":
            hf["sliding_window"] = self.sliding_window
        elif self.architecture in QWEN:  # full attention on every layer (a sliding window is refused on load)
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        else:
            hf["mlp_bias"] = False
            hf["pretraining_tp"] = 1
        if self.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM"):  # the families with this field
            hf["attention_bias"] = self.attention_bias
        return hf


def _qwen_sliding_layers(hf: dict[str, Any]) -> list[int]:
    """The layers a Qwen2/Qwen3 config.json runs with a sliding window, by transformers' rule (layer_types
    if given, else layers from max_window_layers on); empty when use_sliding_window is off."""
    if not hf.get("use_sliding_window") or hf.get("sliding_window", 4096) is None:
        return []
    n = hf.get("num_hidden_layers", 0)
    types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28) else
                                      "full_attention" for i in range(n)]
    return [i for i, kind in enumerate(types) if kind == "sliding_attention"]


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse RoPE frequencies (fp32, [head_dim // 2]) including linear / llama3 scaling."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, T, D] already in x's dtype."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        r = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        normed, out = _rms_scale(h, r, self.weight, x.dtype)
        # Under a RecomputeScope only x and r are kept for backward: the upcast, the normalized x and the
        # output (the next projections' input) are rebuilt from them.
        recomputable((h, normed, out), _rms_rebuild, x, r, self.weight)
        return out


def _rms_scale(h: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype):
    normed = (h * r).to(dtype)
    return normed, weight * normed


def _rms_rebuild(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor):
    h = x.float()
    return (h, *_rms_scale(h, r, weight, x.dtype))


class KVCache:
    """Static per-layer key/value cache [batch, kv_heads, max_len, head_dim] plus the RoPE position of each slot.

    `positions[b, s]` is the token position stored in slot s of row b, or -1 for an empty slot; the model
    derives the attention mask from it, so callers (the sampler) only say where each new token goes.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.positions = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.max_len = max_len


def _sdpa_has_enable_gqa() -> bool:
    """torch's scaled_dot_product_attention takes `enable_gqa` (torch >= 2.5)."""
    kv = torch.zeros(1, 1, 1, 8)
    try:
        F.scaled_dot_product_attention(torch.zeros(1, 2, 1, 8), kv, kv, enable_gqa=True)
    except TypeError:
        return False
    return True


SDPA_HAS_ENABLE_GQA = _sdpa_has_enable_gqa()
_FUSED_GQA: dict[tuple, bool] = {}  # (device type, dtype, head_dim, masked) -> a fused kernel takes enable_gqa


def sdpa_gqa_without_copies(q: torch.Tensor, masked: bool) -> bool:
    """Whether grouped-query attention can go through SDPA's `enable_gqa` instead of repeated k/v.

    CPU: whenever torch has `enable_gqa` (its kernels share k/v heads or repeat them internally, never
    worse than our repeat). CUDA: when one of the fused kernels (flash, memory-efficient, cuDNN) accepts
    `enable_gqa` for this dtype, head size and mask kind - which of them do depends on the torch
    version, and the math fallback would materialise the [T, T] scores - probed once with a tiny call.
    """
    if not SDPA_HAS_ENABLE_GQA:
        return False
    if q.device.type != "cuda":
        return True
    key = (q.device.type, q.dtype, q.shape[-1], masked)
    if key not in _FUSED_GQA:
        if torch.compiler.is_compiling():
            return False  # no probing inside a trace; the eager path fills the table
        _FUSED_GQA[key] = _probe_fused_gqa(q.device, q.dtype, q.shape[-1], masked)
    return _FUSED_GQA[key]


def _probe_fused_gqa(device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool) -> bool:
    q = torch.randn(1, 4, 16, head_dim, device=device, dtype=dtype)
    kv = torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool, device=device).tril() if masked else None
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    with warnings.catch_warnings(), sdpa_kernel(fused):
        warnings.simplefilter("ignore")  # "kernel not used because ..." for each refusing backend
        try:
            F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask, is_causal=not masked, enable_gqa=True)
        except RuntimeError:
            return False
    return True


class Block(NamedTuple):
    """Queries start..end-1 of a packed sequence, which see the keys key_start..prefix_end-1 (a prefix shared
    with the row laid out before them) and, causally, themselves; the keys prefix_end..start-1 are hidden."""
    start: int
    end: int
    key_start: int
    prefix_end: int


@dataclass(frozen=True)
class PackedRows:
    """Rows packed end to end in one sequence [1, N], no padding; rows that begin alike share those tokens.

    A row of its own is one Block (start, end, start, start). A pair whose chosen and rejected rows share a
    prompt is two blocks, [prompt + chosen] then [rejected] with the prompt as its prefix and the chosen
    answer hidden, so the prompt runs once: position t's hidden state depends only on tokens 0..t, the same
    in both rows. Blocks cover 0..N-1 in order; every row's positions count from 0 (its prefix's tokens are
    positions 0..p-1).
    """
    blocks: tuple[Block, ...]

    def masks(self, sliding_window: int | None, device: torch.device, dtype: torch.dtype) -> "PackedMasks":
        """Each block's [queries, keys] additive mask (0 or -inf, in the attention's dtype) over its keys
        key_start..end-1; None: plain causal. Additive and made once per forward, with rows 8-aligned in
        memory: SDPA would otherwise copy a mask into that form in every layer and keep the copy for backward."""
        out = []
        for start, end, key_start, prefix_end in self.blocks:
            n, p = end - start, prefix_end - key_start
            windowed = sliding_window is not None and p + n > sliding_window
            if p == 0 and not windowed:
                out.append(None)
                continue
            q_pos = torch.arange(p, p + n, device=device)
            k_pos = torch.cat([torch.arange(p, device=device),
                               torch.full((start - prefix_end,), -1, device=device),  # the other row: hidden
                               q_pos])
            allowed = (k_pos[None, :] >= 0) & (k_pos[None, :] <= q_pos[:, None])
            if windowed:
                allowed &= q_pos[:, None] - k_pos[None, :] < sliding_window
            keys = end - key_start
            mask = torch.empty(n, -(-keys // 8) * 8, dtype=dtype, device=device)[:, :keys]
            out.append(mask.fill_(0.0).masked_fill_(~allowed, float("-inf")))
        return PackedMasks(self, tuple(out))


class PackedMasks(NamedTuple):
    """What the attention layers of a packed forward get in place of a mask: the layout and its block masks."""
    rows: PackedRows
    masks: tuple[torch.Tensor | None, ...]


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedMasks,
                     gqa: tuple[bool, bool]) -> tuple[torch.Tensor, ...]:
    """Attention over a packed sequence, q/k/v [1, heads, N, D], one SDPA call per block (no [N, N] scores):
    returns the output [1, N, heads * D] and each block's SDPA output (what SDPA keeps for backward: the
    recompute recipe rebuilds them all). gqa: whether SDPA's enable_gqa serves (unmasked, masked) blocks;
    where it does not, the block repeats its own keys' k/v heads."""
    rep = q.shape[1] // k.shape[1]
    blocks = []
    for (start, end, key_start, _), mask in zip(packed.rows.blocks, packed.masks):
        kb, vb, grouped = k[:, :, key_start:end], v[:, :, key_start:end], {}
        if rep > 1 and gqa[mask is not None]:
            grouped = {"enable_gqa": True}
        elif rep > 1:
            kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
        blocks.append(F.scaled_dot_product_attention(q[:, :, start:end], kb, vb, attn_mask=mask,
                                                     is_causal=mask is None, **grouped))
    y = torch.cat([b.transpose(1, 2) for b in blocks], dim=1)
    return (y.flatten(2), *blocks)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=config.o_bias)
        # Qwen3 normalises every head's q and k vector before RoPE; the other families pass them through.
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | PackedMasks | None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache_index: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k_cache, v_cache = cache
            rows = torch.arange(B, device=x.device).unsqueeze(1)
            k_cache[rows, :, cache_index] = k.transpose(1, 2).to(k_cache.dtype)
            v_cache[rows, :, cache_index] = v.transpose(1, 2).to(v_cache.dtype)
            k, v = k_cache, v_cache
            if self.n_kv_heads != self.n_heads:
                # GQA without copying the cache: the `rep` query heads of each kv head become extra
                # query rows of that kv head ([B, kv, rep*T, D]), all sharing the row's mask.
                rep, S = self.n_heads // self.n_kv_heads, k.shape[2]
                qg = q.reshape(B, self.n_kv_heads, rep * T, self.head_dim)
                mask_g = mask.unsqueeze(2).expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
                y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask_g)  # [B, kv, rep*T, D]
                # back to [B, T, heads*D] with head j*rep + r. No .view across heads: the CUDA fused
                # kernels return a [B, rep*T, kv, D] memory layout, which cannot be viewed as [B, heads, T, D].
                y = y.unflatten(2, (rep, T)).permute(0, 3, 1, 2, 4)
                return self.o_proj(y.reshape(B, T, self.n_heads * self.head_dim))
        if isinstance(mask, PackedMasks):  # the attention output and every block's output are rebuilt in backward
            gqa = (sdpa_gqa_without_copies(q, False), sdpa_gqa_without_copies(q, True))  # per block kind
            attend = functools.partial(packed_attention, packed=mask, gqa=gqa)
            return self.o_proj(recomputable(attend(q, k, v), attend, q, k, v)[0])
        gqa = {}
        if self.n_kv_heads != self.n_heads:
            if sdpa_gqa_without_copies(q, mask is not None):
                gqa = {"enable_gqa": True}
            else:
                rep = self.n_heads // self.n_kv_heads
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        attend = functools.partial(F.scaled_dot_product_attention, attn_mask=mask, is_causal=mask is None, **gqa)
        # Under a RecomputeScope the attention output (o_proj's input) is recomputed from q, k and v, which
        # SDPA keeps anyway: one more attention forward in backward for 2.3 of SmolLM2's 23 KB per token.
        y = recomputable(attend(q, k, v), attend, q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        # Under a RecomputeScope only gate and up are kept; silu(gate) and the product are rebuilt.
        _, hidden = recomputable(_swiglu(gate, up), _swiglu, gate, up)
        return self.down_proj(hidden)


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    act = F.silu(gate)
    return act, act * up


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # With grad on, rebuild the norm outputs, SwiGLU's activations and the attention output in backward
        # instead of keeping them: less than half the bytes kept per token (minispin.recompute).
        self.recompute_activations = True

    def forward(self, x, cos, sin, mask, cache=None, cache_index=None):
        with recompute_scope(self.recompute_activations):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_index)
            return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Llama / Mistral / Qwen2 / Qwen3 ForCausalLM. `forward` returns logits [B, T, V]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config, device="cpu"), persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute non-persistent buffers (after building on the meta device or `to_empty`)."""
        device = device if device is not None else self.embed_tokens.weight.device
        self.inv_freq = rope_inv_freq(self.config, device=device)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, H] output projection, for fused log-prob kernels that never build logits."""
        return self.lm_head.weight

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float().unsqueeze(-1) * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _padding_mask(self, attention_mask: torch.Tensor, T: int) -> torch.Tensor:
        """[B, 1, T, T] bool: causal, key not padding, inside the sliding window; the diagonal is always
        allowed so that padding query rows stay finite (their outputs are meaningless but not NaN)."""
        idx = torch.arange(T, device=attention_mask.device)
        allowed = (idx[None, :] <= idx[:, None]) & attention_mask.bool()[:, None, :]
        if self.config.sliding_window is not None:
            allowed = allowed & (idx[:, None] - idx[None, :] < self.config.sliding_window)
        allowed = allowed | torch.eye(T, dtype=torch.bool, device=attention_mask.device)
        return allowed.unsqueeze(1)

    def _cache_mask(self, cache: KVCache, position_ids: torch.Tensor, cache_index: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S] bool from the positions stored in each cache slot (-1 = empty)."""
        slot_pos = cache.positions[:, None, :]
        q_pos = position_ids[:, :, None]
        allowed = (slot_pos >= 0) & (slot_pos <= q_pos)
        if self.config.sliding_window is not None:
            allowed = allowed & (q_pos - slot_pos < self.config.sliding_window)
        own = torch.arange(cache.max_len, device=cache_index.device)[None, None, :] == cache_index[:, :, None]
        return (allowed | own).unsqueeze(1)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                      cache_index: torch.Tensor | None = None, packed: PackedRows | None = None) -> torch.Tensor:
        """Final normed hidden states [B, T, H].

        attention_mask [B, T] (1 = token, 0 = padding, either side); None means no padding, or right
        padding only (pure causal attention, the fast path: right padding never affects real tokens).
        position_ids default to cumsum(mask) - 1. With `kv_cache`, `cache_index` [B, T] gives the cache
        slot of every new token; slots whose position is -1 are never attended to, so a padding token
        written with position_ids -1 is invisible to the rest of the row. With `packed` (training), input_ids
        [1, N] are rows packed end to end as PackedRows describes, and position_ids [1, N] are required.
        """
        B, T = input_ids.shape
        if packed is not None and (position_ids is None or B != 1 or attention_mask is not None or kv_cache is not None):
            raise ValueError("hidden_states: packed rows take input_ids and position_ids [1, N], no mask or cache")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            else:
                position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids.clamp(min=0), x.dtype)
        if kv_cache is not None:
            if cache_index is None:
                raise ValueError("hidden_states: kv_cache given without cache_index")
            rows = torch.arange(B, device=input_ids.device).unsqueeze(1)
            kv_cache.positions[rows, cache_index] = position_ids
            mask = self._cache_mask(kv_cache, position_ids, cache_index)
        elif packed is not None:
            # the masks in the dtype the attention runs in (autocast's, under autocast)
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            mask = packed.masks(self.config.sliding_window, input_ids.device, dtype)
        elif attention_mask is not None:
            mask = self._padding_mask(attention_mask, T)
        elif self.config.sliding_window is not None and T > self.config.sliding_window:
            mask = self._padding_mask(torch.ones(B, T, dtype=torch.bool, device=input_ids.device), T)
        else:
            mask = None
        for i, layer in enumerate(self.layers):
            cache = (kv_cache.k[i], kv_cache.v[i]) if kv_cache is not None else None
            x = layer(x, cos, sin, mask, cache, cache_index)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                cache_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, kv_cache, cache_index))


def hf_key(name: str) -> str:
    """Our parameter name -> the Hugging Face checkpoint key."""
    return name if name.startswith("lm_head.") else "model." + name


def our_key(hf_name: str) -> str | None:
    """Hugging Face checkpoint key -> our parameter name (None for keys we ignore, like rotary inv_freq)."""
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    if hf_name.startswith("model."):
        return hf_name[len("model."):]
    return hf_name
