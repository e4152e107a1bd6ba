"""Training by concern: `config` (TrainConfig, TrainResult), `losses` (each pair loss once, on per-sequence
log-probs), `policy` (PolicyHead, FSDP2 wrapping, activation checkpointing, saving), `reference` (the
reference pass), `state` (the no-pickle train state), `optim` (optimizer, lr schedule, memory model), `step`
(one optimizer step: micro-batches -> loss -> backward -> clip -> update) and `loop` (`train`).

    result = train(model_or_folder, tokenizer, pairs, TrainConfig(), run_dir="runs/x")
    save_trained_model(result.policy, "runs/x/model", tokenizer=tokenizer)
"""
from .config import TRAIN_OBJECTIVES, TrainConfig, TrainingDiverged, TrainResult
from .losses import LOSS_TYPES, LOSSES, pair_loss
from .loop import train
from .optim import build_optimizer, lr_at
from .policy import (PolicyHead, apply_activation_checkpointing, full_state_dict, prepare_policy,
                     save_trained_model, shard_policy, tokenizer_files)
from .reference import reference_logprobs
from .state import STATE_FORMAT, load_train_state, read_train_state_json, save_train_state
from .step import STEP_SUMS, batch_loss, optimizer_step

__all__ = [
    "TrainConfig", "TrainResult", "TrainingDiverged", "LOSS_TYPES", "LOSSES", "pair_loss", "TRAIN_OBJECTIVES",
    "train", "STEP_SUMS", "build_optimizer", "lr_at", "optimizer_step", "PolicyHead",
    "apply_activation_checkpointing", "batch_loss", "full_state_dict", "prepare_policy", "save_trained_model",
    "shard_policy", "tokenizer_files", "reference_logprobs", "STATE_FORMAT",
    "load_train_state", "read_train_state_json", "save_train_state",
]
