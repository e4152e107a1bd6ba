"""Training by concern: `config` (TrainConfig, TrainResult), `policy` (PolicyHead, FSDP2 wrapping,
activation checkpointing, saving), `reference` (the reference pass), `state` (the no-pickle train
state), `optim` (optimizer, lr schedule, one optimizer step) and `loop` (`train` and its named metrics).

    result = train(model_or_folder, tokenizer, pairs, TrainConfig(), run_dir="runs/x")
    save_trained_model(result.policy, "runs/x/model", tokenizer=tokenizer)
"""
from .config import LOSS_TYPES, TRAIN_OBJECTIVES, TrainConfig, TrainingDiverged, TrainResult
from .loop import train
from .optim import STEP_SUMS, build_optimizer, lr_at, optimizer_step
from .policy import (PolicyHead, apply_activation_checkpointing, batch_loss, full_state_dict, prepare_policy,
                     save_trained_model, sequence_logps, shard_policy, tokenizer_files)
from .reference import reference_logprobs
from .state import STATE_FORMAT, load_train_state, read_train_state_json, save_train_state

__all__ = [
    "TrainConfig", "TrainResult", "TrainingDiverged", "LOSS_TYPES", "TRAIN_OBJECTIVES", "train",
    "STEP_SUMS", "build_optimizer", "lr_at", "optimizer_step", "PolicyHead", "apply_activation_checkpointing",
    "batch_loss", "full_state_dict", "prepare_policy", "save_trained_model",
    "sequence_logps", "shard_policy", "tokenizer_files", "reference_logprobs", "STATE_FORMAT",
    "load_train_state", "read_train_state_json", "save_train_state",
]
