"""Training settings and results: TrainConfig (the SPIN paper's defaults), TrainResult, TrainingDiverged."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import torch.nn as nn

from ..collate import TruncationReport
from ..model import Transformer
from ..tensorboard import tensorboard_available
from ..config import ConfigError, records_given
from ..lora import LORA_TARGETS, LoraConfig, parse_targets
from .losses import LOSS_TYPES
TRAIN_OBJECTIVES = ("pairwise", "sft")  # TrainConfig.objective: pair loss vs the reference | NLL of the real answers


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; training stopped before applying that step."""


@records_given
@dataclass
class TrainConfig:
    """Training hyperparameters; defaults are the SPIN paper's (zephyr-7b, iteration 0)."""
    # may change between a run and its resume: they do not change the result (minispin.config)
    RESUME_FREE: ClassVar[tuple[str, ...]] = ("save_steps", "status_every", "progress", "device",
                                              "reference_batch_size", "tensorboard")

    objective: str = "pairwise"  # "pairwise": pair loss vs the frozen reference; "sft": NLL of the real answers
    loss: str = "sigmoid"  # one of LOSS_TYPES (minispin.training.losses); sigmoid: the paper's logistic loss
    beta: float = 0.1
    label_smoothing: float = 0.0  # default for pairs without their own label_smoothing
    neftune_alpha: float = 0.0  # NEFTune noise on the input embeddings of training forwards (0: off; NEFTune: 5-15)
    reference_free: bool = False  # pairwise loss on policy log-probs only (no reference pass)
    lr: float = 5e-7
    epochs: float = 2  # may be fractional (e.g. 0.5: the first half of one permutation)
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when smaller)
    global_batch_size: int = 64  # pairs per optimizer step, over all ranks and accumulation steps
    micro_batch_size: int = 2  # pairs per forward per rank (2 rows each: chosen + rejected)
    reference_batch_size: int | None = None  # pairs per forward in the reference pass (default 2x micro)
    max_length: int = 1024
    max_prompt_length: int | None = None  # None: half of max_length (the paper: 512 of 1024)
    template: str | None = None  # prompt template, the same one the generation job used
    optimizer: str = "rmsprop"  # rmsprop | adamw
    weight_decay: float = 0.0
    rmsprop_alpha: float = 0.99
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    eps: float = 1e-8
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still logged)
    seed: int = 42
    activation_checkpointing: bool = False
    mixed_precision: bool = True  # CUDA: bf16 compute with fp32 master weights (FSDP2 policy)
    reshard_after_forward: bool = True
    save_steps: int = 100  # training-state checkpoint every N steps (0: only at the end); needs run_dir
    status_every: int = 10  # status line every N steps when stderr is not a terminal
    progress: bool = True
    tensorboard: bool = False  # also copy the metrics to <run_dir>/tensorboard (pip install minispin[tensorboard])
    device: str | None = None  # None: cuda when available, else cpu
    # LoRA (minispin.lora): r > 0 trains fresh adapters on the frozen model; 0 = full fine-tuning
    lora_r: int = 0
    lora_alpha: float = LoraConfig.alpha  # the update is scaled by lora_alpha / lora_r
    lora_dropout: float = LoraConfig.dropout  # dropout on the adapters' input (training forwards only)
    lora_targets: str = ",".join(LORA_TARGETS)  # comma-separated Hugging Face module names

    def __post_init__(self) -> None:
        if self.objective not in TRAIN_OBJECTIVES:
            raise ValueError(f"objective must be one of {TRAIN_OBJECTIVES}, got {self.objective!r}")
        if self.loss not in LOSS_TYPES:
            raise ValueError(f"loss must be one of {LOSS_TYPES}, got {self.loss!r}")
        if self.optimizer not in ("rmsprop", "adamw"):
            raise ValueError(f"optimizer must be 'rmsprop' or 'adamw', got {self.optimizer!r}")
        if self.max_prompt_length is None:
            self.max_prompt_length = self.max_length // 2
        for name in ("global_batch_size", "micro_batch_size", "max_length", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not (self.lr >= 0 and math.isfinite(self.lr)) or not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"lr must be >= 0 and beta > 0 (finite numbers), got lr {self.lr}, beta {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.save_steps < 0 or self.status_every < 1:
            raise ValueError(f"save_steps must be >= 0 and status_every >= 1, got {self.save_steps}, "
                             f"{self.status_every}")
        for name in ("reference_batch_size", "max_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {getattr(self, name)}")
        if not (self.neftune_alpha >= 0 and math.isfinite(self.neftune_alpha)):
            raise ValueError(f"neftune_alpha must be a finite number >= 0, got {self.neftune_alpha}")
        if self.tensorboard and not tensorboard_available():
            raise ValueError("tensorboard=True needs the tensorboard package: pip install minispin[tensorboard]")
        if self.lora_r < 0:
            raise ConfigError(f"--lora_r must be >= 0 (0: full fine-tuning), got {self.lora_r}")
        _ = self.lora  # LoraConfig checks the other lora_* settings when lora_r > 0

    @property
    def needs_reference(self) -> bool:
        return self.objective == "pairwise" and not self.reference_free

    @property
    def lora(self) -> LoraConfig | None:
        """The LoRA settings (None: full fine-tuning)."""
        if not self.lora_r:
            return None
        return LoraConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=parse_targets(self.lora_targets))


@dataclass
class TrainResult:
    """What `train` returns. model: the trained Transformer (in single-process mode trained in place;
    under FSDP its parameters are shards - use `save_trained_model` to write a checkpoint)."""
    model: Transformer
    policy: nn.Module
    steps: int
    history: list[dict] = field(default_factory=list)  # metrics of the steps run in this call
    metrics_path: Path | None = None
    truncation: TruncationReport | None = None  # how many pairs were cut (None: the caller tokenized them)
