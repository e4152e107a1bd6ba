"""minispin.training.state (CPU, tiny model): the train state is safetensors + JSON (no pickle), and a
damaged or missing state file is named, with the fix."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from minispin.training import TrainConfig, train
from tiny import make_pairs


def test_trainer_state_is_safetensors_and_json(setup, tmp_path):
    _, model_dir, tok = setup
    from minispin.checkpoint import load_model

    model = load_model(model_dir, dtype=torch.float32)
    cfg = TrainConfig(lr=1e-4, epochs=1, global_batch_size=2, micro_batch_size=2, save_steps=1, progress=False,
                      device="cpu")
    train(model, tok, make_pairs(4), cfg, run_dir=tmp_path)
    state_dir = tmp_path / "train_state"
    assert sorted(p.name for p in state_dir.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                           "trainer_state.json"]
    optim = load_file(state_dir / "optimizer.safetensors")
    assert "state.model.layers.0.self_attn.q_proj.weight.square_avg" in optim
    assert optim["state.model.layers.0.self_attn.q_proj.weight.step"].item() == 2
    meta = json.loads((state_dir / "trainer_state.json").read_text())
    assert meta["step"] == meta["total_steps"] == 2
    assert sorted(meta["data_order"][0]) == [0, 1, 2, 3] and isinstance(meta["rng"][0]["torch"], str)
    weights = load_file(state_dir / "model.safetensors")
    for name, p in model.named_parameters():
        assert torch.equal(weights["model." + name], p.detach())


def test_a_damaged_train_state_file_is_named(setup, tmp_path):
    _, model_dir, tok = setup
    cfg = TrainConfig(lr=1e-3, epochs=1, global_batch_size=2, micro_batch_size=1, save_steps=1, progress=False, device="cpu")
    train(str(model_dir), tok, make_pairs(4), cfg, run_dir=tmp_path)
    weights = tmp_path / "train_state" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(ValueError, match=f"{weights}: damaged train state file \\(1000 bytes, written with {size}\\); "
                                         "delete .*train_state to restart"):
        train(str(model_dir), tok, make_pairs(4), cfg, run_dir=tmp_path)
    (tmp_path / "train_state" / "optimizer.safetensors").unlink()
    with pytest.raises(ValueError, match=r"train_state/model.safetensors: damaged"):  # the first damaged file
        train(str(model_dir), tok, make_pairs(4), cfg, run_dir=tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match=r"train_state/model.safetensors: missing from the train state"):
        train(str(model_dir), tok, make_pairs(4), cfg, run_dir=tmp_path)
