"""LoRA: low-rank adapters on the frozen model's linear projections, for minispin's own model and training
loop, with the adapters written (and read) in PEFT's file layout; peft itself is never imported.

    model = load_model("zephyr-7b-sft-full", dtype=torch.float32)
    add_adapters(model, LoraConfig(r=16, alpha=16))   # base frozen; fp32 A [r, in] (kaiming), B [out, r] = 0
    ... train (only the adapters have gradients and optimizer state) ...
    save_adapter(model, "out/adapter", base_model="zephyr-7b-sft-full")  # adapter_config.json + .safetensors
    merge_adapters(model)                              # W <- W + (alpha / r) B A: plain nn.Linear again

A `LoRALinear` keeps the base weight under its old name (`layers.0.self_attn.q_proj.weight`), so
checkpoints, FSDP2 wrapping and the train state see the names they saw without adapters; the adapters
are `...q_proj.lora_A.weight` / `...q_proj.lora_B.weight`, PEFT's names without its adapter name
("default"). In the file, keys are PEFT's: "base_model.model." + the Hugging Face name.
The training loop's hooks (minispin.training): `--lora_r R > 0` adds fresh adapters to the model it
starts from, saves only them in the train state, and `save_trained_model` writes the merged model.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from . import distributed as dist
from .checkpoint import copy_into, save_safetensors
from .config import ConfigError
from .errors import UserError
from .io import atomic_replace_dir, with_path
from .model import hf_key

# every linear projection of a decoder block (Llama, Mistral, Qwen), in the order the block runs them
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


class AdapterError(UserError):
    """A PEFT adapter folder minispin cannot load faithfully (missing file, unsupported option, wrong keys)."""


@dataclass(frozen=True)
class LoraConfig:
    """LoRA's settings: rank, alpha (the update is scaled by alpha / r), dropout on the adapters' input,
    and the projections that get adapters (Hugging Face module names)."""
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"--lora_r must be an integer >= 1 for LoRA (0: full fine-tuning), got {self.r!r}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError(f"--lora_alpha must be a finite number > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"--lora_targets {','.join(self.targets)!r}: give distinct names among "
                              f"{','.join(LORA_TARGETS)} (comma-separated)"
                              + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        object.__setattr__(self, "targets", tuple(t for t in LORA_TARGETS if t in self.targets))  # one order

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def parse_targets(text: str) -> tuple[str, ...]:
    """'q_proj, v_proj' -> ('q_proj', 'v_proj') (the --lora_targets option)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


class LoRALinear(nn.Module):
    """A frozen linear projection plus a trainable low-rank update: y = x W^T + b + (alpha/r) B(A(dropout(x))).

    `weight` and `bias` (Qwen's q/k/v; None elsewhere) are the base's own Parameters under their old
    names; lora_A [r, in] and lora_B [out, r]
    are fp32. The adapters' input is cast to their dtype and their output back to x's (a bf16 base with
    fp32 adapters works without FSDP too; under FSDP2's bf16 policy both are bf16 already)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        device = base.weight.device
        # built on meta (no init drawing from the global RNG), then given memory: init_adapters fills them
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device="meta").to_empty(device=device).float()
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device="meta").to_empty(device=device).float()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        return F.linear(x, self.weight, self.bias) + (update * self.scaling).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha:g}"


def adapted_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} in the model's order ({} for a model without adapters)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_param_names(model: nn.Module) -> set[str]:
    """The adapters' parameter names (relative to `model`): what a base checkpoint does not hold."""
    return {f"{name}.{ab}.weight" for name in adapted_modules(model) for ab in ("lora_A", "lora_B")}


def lora_config_of(model: nn.Module) -> LoraConfig | None:
    """The LoraConfig the model's adapters were built with (None without adapters)."""
    modules = adapted_modules(model)
    if not modules:
        return None
    first = next(iter(modules.values()))
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return LoraConfig(r=first.r, alpha=first.alpha, dropout=dropout,
                      targets=tuple({name.rpartition(".")[2] for name in modules}))


def add_adapters(model: nn.Module, lora: LoraConfig, *, seed: int = 0, base_dtype: torch.dtype | None = None) -> list[str]:
    """Freeze every parameter of `model` (cast to base_dtype when given), then replace each target
    projection by a LoRALinear with fresh fp32 adapters, initialised like PEFT (see init_adapters) unless
    the model is on the meta device. Returns the adapted module names."""
    if adapted_modules(model):
        raise ValueError("the model already has LoRA adapters (from an earlier train call?); merge them first "
                         "(minispin.lora.merge_adapters) or pass a fresh model")
    if base_dtype is not None:
        model.to(dtype=base_dtype)
    model.requires_grad_(False)
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] in lora.targets]
    for name, linear in targets:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, LoRALinear(linear, lora.r, lora.alpha, lora.dropout))
    if not any(p.is_meta for p in model.parameters()):
        init_adapters(model, seed)
    return [name for name, _ in targets]


def init_adapters(model: nn.Module, seed: int) -> None:
    """A = kaiming-uniform(a=sqrt(5)) (PEFT's and nn.Linear's default), B = 0, so training starts at the
    base model exactly. Drawn from a generator of its own (the run's RNG streams stay as without LoRA),
    in full on every rank and copied into each rank's FSDP2 shard."""
    g = torch.Generator().manual_seed(seed)
    for m in adapted_modules(model).values():
        a = torch.empty(m.lora_A.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        copy_into(m.lora_A.weight, a)
        copy_into(m.lora_B.weight, torch.zeros(m.lora_B.weight.shape))


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + scaling * B A, computed in fp32 (the result is fp32; the caller casts it to the saved dtype)."""
    return weight.float() + scaling * (lora_b.float() @ lora_a.float())


def merge_state_dict(state_dict: dict[str, torch.Tensor], model: nn.Module,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Merge each adapter of a full state dict (our names, e.g. gathered from FSDP) into its base weight, in
    place: W + (alpha/r) B A in `dtype` (None: fp32), the adapter tensors dropped; one merged weight at a
    time, so host memory holds one fp32 temporary. Nothing to do for a model without adapters."""
    for name, m in adapted_modules(model).items():
        a, b = state_dict.pop(f"{name}.lora_A.weight"), state_dict.pop(f"{name}.lora_B.weight")
        merged = merged_weight(state_dict[f"{name}.weight"], a, b, m.scaling)
        state_dict[f"{name}.weight"] = merged if dtype is None else merged.to(dtype)
    return state_dict


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight (in the base weight's dtype) and put plain nn.Linear
    modules back, in place (a model on one device, not FSDP-sharded). Returns the model."""
    for name, m in adapted_modules(model).items():
        with torch.no_grad():
            w = merged_weight(m.weight, m.lora_A.weight, m.lora_B.weight, m.scaling).to(m.weight.dtype)
        linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
        linear.bias = m.bias
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, linear)
    return model


def peft_key(name: str) -> str:
    """Our adapter parameter name -> PEFT's key in adapter_model.safetensors."""
    return PEFT_PREFIX + hf_key(name)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{our name: full fp32 tensor on CPU} of every adapter. Under FSDP a collective (each tensor is
    gathered in turn): call on every rank."""
    out = {}
    for name, m in adapted_modules(model).items():
        for ab in ("lora_A", "lora_B"):
            p = getattr(m, ab).weight
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[f"{name}.{ab}.weight"] = full.detach().to("cpu", torch.float32).contiguous()
    return out


def peft_adapter_config(lora: LoraConfig, base_model: str) -> dict:
    """adapter_config.json as PEFT writes it for a LoRA adapter of a causal LM (the classic fields)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": list(lora.targets), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


def save_adapter(model: nn.Module, path: str | os.PathLike, *, base_model: str) -> Path:
    """Write the model's adapters as a PEFT LoRA folder (adapter_config.json naming `base_model`, the model
    they were trained on, + adapter_model.safetensors, fp32), atomically, on rank 0. Call on every rank."""
    lora = lora_config_of(model)
    if lora is None:
        raise ValueError("save_adapter: the model has no LoRA adapters")
    tensors = {peft_key(k): v for k, v in adapter_state_dict(model).items()}
    path = Path(path)
    if dist.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_adapter_config(lora, base_model), indent=2) + "\n")
            save_safetensors(tensors, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
            dist.kill_point("stage_adapter")
            atomic_replace_dir(tmp, path)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.filename is None:
                raise with_path(e, path) from e
            raise
    dist.barrier()
    return path


# PEFT options that change what the adapter computes; minispin's LoRA is the plain one
_PLAIN = {"bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "modules_to_save": None,
          "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The LoraConfig of a PEFT adapter folder; what minispin cannot compute faithfully raises AdapterError
    naming the file and key."""
    file = Path(path) / ADAPTER_CONFIG
    if not file.is_file():
        raise AdapterError(f"{path}: no {ADAPTER_CONFIG} (expected a PEFT LoRA adapter folder)")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise AdapterError(f"{file}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{file}: key 'peft_type' is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, plain in _PLAIN.items():
        value = cfg.get(key, plain)
        if (value != plain) if isinstance(plain, str) else bool(value):  # off: false / null / {}
            raise AdapterError(f"{file}: key {key!r} is {cfg[key]!r}; minispin supports only {plain!r} (plain LoRA)")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list):
        raise AdapterError(f"{file}: key 'target_modules' is {targets!r}; expected a list of module names among "
                           f"{', '.join(LORA_TARGETS)}")
    try:
        return LoraConfig(r=cfg.get("r"), alpha=float(cfg.get("lora_alpha", 8)),
                          dropout=float(cfg.get("lora_dropout", 0.0)), targets=tuple(targets))
    except (ConfigError, TypeError) as e:
        raise AdapterError(f"{file}: {e}".replace("--lora_", "lora ")) from None


def load_adapter(model: nn.Module, path: str | os.PathLike, *, seed: int = 0) -> LoraConfig:
    """Read a PEFT LoRA adapter folder into `model` (one device): adds adapters as the folder's config says
    when the model has none, then copies the tensors in, checking names and shapes. Returns the config."""
    lora = read_adapter_config(path)
    have = lora_config_of(model)
    if have is None:
        add_adapters(model, lora, seed=seed)
    elif (have.r, have.targets) != (lora.r, lora.targets):
        raise AdapterError(f"{path}: adapters of rank {lora.r} on {','.join(lora.targets)}, but the model has rank "
                           f"{have.r} on {','.join(have.targets)}")
    file = Path(path) / ADAPTER_WEIGHTS
    if not file.is_file():
        raise AdapterError(f"{path}: no {ADAPTER_WEIGHTS}")
    tensors = load_file(str(file))
    params = dict(model.named_parameters())
    expected = {peft_key(n): n for n in adapter_param_names(model)}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [f"{k} {tuple(tensors[k].shape)} vs model {tuple(params[n].shape)}" for k, n in expected.items()
             if k in tensors and tensors[k].shape != params[n].shape]
    if missing or unexpected or wrong:
        problems = [f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise AdapterError(f"{file} does not fit this model ({'; '.join(problems)})")
    for key, name in expected.items():
        copy_into(params[name], tensors[key])
    return lora


# ----------------------------------------------------------------------------- memory model

def adapter_numel(model_config, lora: LoraConfig) -> tuple[int, int]:
    """(adapter parameters of the whole model, the largest adapter tensor's elements)."""
    H, I = model_config.hidden_size, model_config.intermediate_size
    q = model_config.num_attention_heads * model_config.head_dim
    kv = model_config.num_key_value_heads * model_config.head_dim
    shapes = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
              "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    per_layer = sum(lora.r * (i + o) for t, (i, o) in shapes.items() if t in lora.targets)
    largest = max(lora.r * max(i, o) for t, (i, o) in shapes.items() if t in lora.targets)
    return model_config.num_hidden_layers * per_layer, largest


def lora_memory_terms(model_config, lora: LoraConfig, *, params: int, layer_params: int, world_size: int,
                      optimizer_states: int, tokens: int, checkpointing: bool, base_bytes: int = 2) -> dict[str, float]:
    """Bytes per rank of the step's memory terms that LoRA changes (minispin.training.optim.memory_estimate):
    the frozen base in its own dtype (bf16 on GPU: base_bytes 2), fp32 adapters with fp32 gradients and
    optimizer state, FSDP2's gathered bf16 layers (current + prefetched) and root (embeddings + head), the
    adapters' reduce-scatter buffer, and the adapters' extra activations: A's output (r values per token and
    adapter) and, with dropout, each adapter's own dropped input and mask (3 bytes per input value)."""
    adapters, largest = adapter_numel(model_config, lora)
    H, I, V = model_config.hidden_size, model_config.intermediate_size, model_config.vocab_size
    q = model_config.num_attention_heads * model_config.head_dim
    inputs = {"q_proj": H, "k_proj": H, "v_proj": H, "o_proj": q, "gate_proj": H, "up_proj": H, "down_proj": I}
    per_token_layer = sum(2 * lora.r + (3 * inputs[t] if lora.dropout > 0 else 0) for t in lora.targets)
    root = V * H * (1 if model_config.tie_word_embeddings else 2)
    layer_adapters = adapters / model_config.num_hidden_layers
    return {
        "weights_fp32": 4 * adapters / world_size,
        "base_weights": base_bytes * params / world_size,
        "grads_fp32": 4 * adapters / world_size,
        "optimizer_state": 4 * optimizer_states * adapters / world_size,
        "optimizer_temp": 4 * largest / world_size,
        "fsdp_buffers": 2 * 2 * layer_params + 2 * root + 4 * layer_adapters,
        "lora_activations": tokens * per_token_layer * (1 if checkpointing else model_config.num_hidden_layers),
    }
