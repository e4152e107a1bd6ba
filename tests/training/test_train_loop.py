"""minispin.training.loop, train() end to end (CPU, tiny models; one CUDA test): SFT loss and accumulation
against float64, 2-rank FSDP2 (gloo) == 1 rank, resume after kill -9, NaN stop, clear errors, truncation."""
from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minispin.collate import Pair, tokenize_pairs
from minispin.sampler import encode_prompt
from minispin.model import Transformer
from minispin.tokenizer import load_tokenizer
from minispin.training import TrainConfig, TrainingDiverged, save_trained_model, train
from tiny import FIXTURES, REPO, make_model_dir, make_pairs, tiny_config
from train_helpers import _float64_stats


def test_sft_loss_is_mean_token_nll(setup):
    _, model_dir, tok = setup
    from minispin.checkpoint import load_model

    pairs = [Pair(p.index, p.prompt, p.chosen) for p in make_pairs(3, seed=2)]
    model = load_model(model_dir, dtype=torch.float32)
    m64 = copy.deepcopy(model).double()
    nll, count = 0.0, 0
    for p in pairs:
        prompt = encode_prompt(tok, p.prompt, None)
        ids = prompt + tok.encode(p.chosen, add_special_tokens=False) + [tok.eos_id]
        logp = torch.log_softmax(m64(torch.tensor([ids]))[0], -1)
        nll -= logp[len(prompt) - 1: len(ids) - 1].gather(1, torch.tensor(ids[len(prompt):])[:, None]).sum().item()
        count += len(ids) - len(prompt)
    result = train(model, tok, pairs, TrainConfig(objective="sft", lr=1e-4, max_steps=1, global_batch_size=3,
                                                   micro_batch_size=1, progress=False, device="cpu"))
    assert result.history[0]["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_accumulation_and_metrics_match_float64(setup):
    """One optimizer step over 4 pairs: micro-batches of 1 (4 accumulation steps) and of 4 give the
    float64 loss/rewards and the same gradient norm."""
    _, model_dir, tok = setup
    from minispin.checkpoint import load_model

    pairs = make_pairs(4, seed=3)
    refs = {i: (-10.0 - i, -20.0 + i) for i in range(4)}
    flat_refs = [refs[i][0] for i in range(4)] + [refs[i][1] for i in range(4)]
    records = []
    for micro in (1, 4):
        model = load_model(model_dir, dtype=torch.float32)
        if micro == 1:
            loss64, _, _, r_real64, r_gen64, grads64 = _float64_stats(model, tok, pairs, flat_refs, 0.1, "sigmoid")
        cfg = TrainConfig(lr=1e-4, max_steps=1, global_batch_size=4, micro_batch_size=micro, progress=False,
                          max_grad_norm=0.0, device="cpu")
        records.append(train(model, tok, pairs, cfg, ref_logps=refs).history[0])
    norm64 = math.sqrt(sum((g ** 2).sum().item() for g in grads64.values()))
    for rec in records:
        assert rec["loss"] == pytest.approx(loss64, rel=1e-5)
        assert rec["rewards/real"] == pytest.approx(r_real64.mean().item(), abs=1e-5)
        assert rec["rewards/generated"] == pytest.approx(r_gen64.mean().item(), abs=1e-5)
        assert rec["margins"] == pytest.approx((r_real64 - r_gen64).mean().item(), abs=1e-5)
        assert rec["accuracies"] == pytest.approx((r_real64 > r_gen64).double().mean().item())
        assert rec["grad_norm"] == pytest.approx(norm64, rel=1e-4)
        assert rec["pairs"] == 4 and rec["tokens_per_s"] > 0 and rec["lr"] > 0


@pytest.mark.parametrize("name", ["hf-tiny-qwen2", "hf-tiny-qwen3"])
def test_qwen_spin_step_matches_float64_and_moves_biases_and_norms(setup, name):
    """One SPIN step on the transformers-made Qwen fixtures (the char tokenizer's ids fit their vocabularies):
    loss and gradient norm equal the float64 reference, and the update reaches Qwen2's q/k/v biases and
    Qwen3's q/k norms (transformers' own gradients for these: tests/test_model.py)."""
    _, _, tok = setup
    from minispin.checkpoint import load_model

    pairs = make_pairs(2, seed=5)
    refs = {0: (-10.0, -20.0), 1: (-12.0, -9.0)}
    model = load_model(FIXTURES / name, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss64, *_, grads64 = _float64_stats(model, tok, pairs, [-10.0, -12.0, -20.0, -9.0], 0.1, "sigmoid")
    cfg = TrainConfig(lr=1e-3, max_steps=1, global_batch_size=2, micro_batch_size=2, progress=False,
                      max_grad_norm=0.0, device="cpu")
    result = train(model, tok, pairs, cfg, ref_logps=refs)
    record = result.history[0]
    assert record["loss"] == pytest.approx(loss64, rel=1e-5)
    assert record["grad_norm"] == pytest.approx(math.sqrt(sum((g ** 2).sum().item() for g in grads64.values())),
                                                rel=1e-4)
    new = [n for n in before if n.endswith(".bias") or "_norm." in n]
    assert len(new) == 2 * (3 if name.endswith("qwen2") else 2)
    after = dict(result.model.named_parameters())
    assert all(grads64[n].abs().max() > 0 and not torch.equal(after[n], before[n]) for n in new)


WORKER = textwrap.dedent('''
    import json, sys, torch
    from minispin.collate import Pair
    from minispin.tokenizer import load_tokenizer
    from minispin.training import TrainConfig, train, save_trained_model
    import minispin.distributed as dist
    model_dir, run_dir, out_dir, pairs_file = sys.argv[1:5]
    tok = load_tokenizer(model_dir)
    pairs = [Pair(**p) for p in json.load(open(pairs_file))]
    cfg = TrainConfig(**json.loads(sys.argv[5]))
    result = train(model_dir, tok, pairs, cfg, run_dir=run_dir)
    save_trained_model(result.policy, out_dir, tokenizer=tok, dtype=None)
    del result
    info = dist.DistInfo(dist.get_rank(), dist.get_world_size(), 0, torch.device("cpu"), "gloo", True)
    dist.shutdown(info)
''')


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_TEST_KILL_AT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _torchrun(tmp: Path, nproc: int, args: list[str], env: dict) -> subprocess.CompletedProcess:
    script = tmp / "worker.py"
    script.write_text(WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_rank_fsdp_equals_one_rank_and_resumes_after_kill(setup, tmp_path):
    """FSDP2 over gloo with 2 ranks == plain single process (same data); then a 2-rank run killed -9
    at step 3 (checkpoint at step 2) and re-run ends with the same weights as the uninterrupted one."""
    _, model_dir, tok = setup
    pairs = make_pairs(11, seed=4)
    pairs_file = tmp_path / "pairs.json"
    pairs_file.write_text(json.dumps([p.__dict__ for p in pairs]))
    cfg = dict(lr=1e-3, epochs=2, global_batch_size=4, micro_batch_size=1, save_steps=2, max_length=64,
               max_prompt_length=32, progress=False, device="cpu")

    one = train(str(model_dir), tok, pairs, TrainConfig(**cfg), run_dir=tmp_path / "run1")
    save_trained_model(one.policy, tmp_path / "out1", dtype=None)

    res = _torchrun(tmp_path, 2, [str(model_dir), str(tmp_path / "run2"), str(tmp_path / "out2"), str(pairs_file),
                                  json.dumps(cfg)], _clean_env())
    assert res.returncode == 0, res.stderr[-3000:]
    w1 = load_file(tmp_path / "out1" / "model.safetensors")
    w2 = load_file(tmp_path / "out2" / "model.safetensors")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4, rtol=0), k
    m1 = [json.loads(x) for x in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m2) == 6  # ceil(11 / 4) steps x 2 epochs
    for a, b in zip(m1, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-5)
        assert a["pairs"] == b["pairs"]
    ref1 = (tmp_path / "run1" / "reference_logps.jsonl").read_text().splitlines()
    ref2 = (tmp_path / "run2" / "reference_logps.jsonl").read_text().splitlines()
    assert len(ref1) == len(ref2) == 11

    # kill -9 rank 1 right after step 3 (state saved at step 2), then the same command again
    args = [str(model_dir), str(tmp_path / "run3"), str(tmp_path / "out3"), str(pairs_file), json.dumps(cfg)]
    killed = _torchrun(tmp_path, 2, args, _clean_env(MINISPIN_TEST_KILL_AT="train:step=3@rank=1"))
    assert killed.returncode != 0
    state = json.loads((tmp_path / "run3" / "train_state" / "trainer_state.json").read_text())
    assert state["step"] == 2 and not (tmp_path / "out3").exists()
    again = _torchrun(tmp_path, 2, args, _clean_env())
    assert again.returncode == 0, again.stderr[-3000:]
    w3 = load_file(tmp_path / "out3" / "model.safetensors")
    for k in w2:
        assert torch.allclose(w2[k], w3[k], atol=1e-6, rtol=0), k
    assert len((tmp_path / "run3" / "metrics.jsonl").read_text().splitlines()) == 6


GPU_WORKER = textwrap.dedent('''
    import json, sys, torch
    from torch.distributed.tensor import DTensor
    from minispin.collate import Pair
    from minispin.tokenizer import load_tokenizer
    from minispin.training import TrainConfig, train, save_trained_model
    import minispin.distributed as dist
    model_dir, run_dir, out_dir, pairs_file, device = sys.argv[1:6]
    tok = load_tokenizer(model_dir)
    pairs = [Pair(**p) for p in json.load(open(pairs_file))]
    result = train(model_dir, tok, pairs, TrainConfig(**json.loads(sys.argv[6]), device=device), run_dir=run_dir)
    save_trained_model(result.policy, out_dir, tokenizer=tok, dtype=None)
    params = list(result.policy.parameters())
    print(json.dumps({"backend": torch.distributed.get_backend() if dist.is_initialized() else None,
                      "world": dist.get_world_size(), "fsdp": all(isinstance(p, DTensor) for p in params),
                      "dtypes": sorted({str(p.dtype) for p in params}),
                      "devices": sorted({p.device.type for p in params})}))
    del result, params
    dist.shutdown(dist.DistInfo(0, 1, 0, torch.device(device), "nccl", True))
''')


def _fsdp_facts(policy) -> dict:
    """Process-group backend / world size, whether every parameter is an FSDP2 shard, master dtypes."""
    from torch.distributed.tensor import DTensor

    return {"backend": torch.distributed.get_backend(), "world": torch.distributed.get_world_size(),
            "fsdp": all(isinstance(p, DTensor) for p in policy.parameters()),
            "dtypes": sorted({str(p.dtype) for p in policy.parameters()}),
            "devices": sorted({p.device.type for p in policy.parameters()})}


def _tied_plain_run(tmp_path: Path, lr: float):
    """A tied-embedding model trained plainly (CPU, fp32, no process group): the reference run."""
    model_dir = make_model_dir(tmp_path / "tied", seed=3, tie=True)
    tok = load_tokenizer(model_dir)
    pairs = make_pairs(6, seed=5)
    cfg = dict(lr=lr, epochs=1, global_batch_size=4, micro_batch_size=2, max_length=64, max_prompt_length=32,
               progress=False)
    plain = train(str(model_dir), tok, pairs, TrainConfig(**cfg, device="cpu"), run_dir=tmp_path / "run1")
    assert all(p.device.type == "cpu" for p in plain.policy.parameters())  # a real CPU reference, also on GPU hosts
    save_trained_model(plain.policy, tmp_path / "out1", dtype=None)
    return model_dir, tok, pairs, cfg


def _compare_runs(tmp_path: Path, info: dict):
    m1 = [json.loads(x) for x in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "run2" / "metrics.jsonl").read_text().splitlines()]
    w1 = load_file(tmp_path / "out1" / "model.safetensors")
    w2 = load_file(tmp_path / "out2" / "model.safetensors")
    assert len(m1) == len(m2) == 2 and w1.keys() == w2.keys() and "lm_head.weight" not in w2  # tied
    assert info["world"] == 1 and info["fsdp"] and info["dtypes"] == ["torch.float32"]  # fp32 masters
    return m1, m2, w1, w2


@pytest.fixture
def no_process_group():
    """Start without a process group (destroying one an earlier test left behind) and end without one."""
    import minispin.distributed as dist

    if dist.is_initialized():
        torch.distributed.destroy_process_group()
    yield
    if dist.is_initialized():
        torch.distributed.destroy_process_group()


def test_one_rank_process_group_equals_plain_run(tmp_path, no_process_group):
    """The single-GPU path (a one-rank group on an in-memory store, no torchrun or env vars, + FSDP2),
    here over gloo, trains exactly like the plain single process, tied embeddings included."""
    import minispin.distributed as dist

    model_dir, tok, pairs, cfg = _tied_plain_run(tmp_path, lr=1e-3)
    assert not dist.is_initialized()
    group = dist.init_distributed("cpu", single_process_group=True)
    try:
        result = train(str(model_dir), tok, pairs, TrainConfig(**cfg, device="cpu"), run_dir=tmp_path / "run2")
        save_trained_model(result.policy, tmp_path / "out2", dtype=None)
        info = _fsdp_facts(result.policy)
        del result
    finally:
        dist.shutdown(group)
    assert not dist.is_initialized() and info["backend"] == "gloo" and info["devices"] == ["cpu"]
    m1, m2, w1, w2 = _compare_runs(tmp_path, info)
    for a, b in zip(m1, m2):
        for key in ("loss", "logps/real", "logps/generated", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-6, rtol=0), k


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_single_gpu_bf16_training_matches_fp32_cpu(tmp_path):
    """One GPU without torchrun: train() starts a one-rank nccl group itself, FSDP2 computes in bf16 over
    fp32 masters, the Triton kernels run compiled. Step metrics and weights agree with fp32 CPU training."""
    model_dir, _, pairs, cfg = _tied_plain_run(tmp_path, lr=1e-5)
    (tmp_path / "pairs.json").write_text(json.dumps([p.__dict__ for p in pairs]))
    script = tmp_path / "gpu_worker.py"
    script.write_text(GPU_WORKER)
    res = subprocess.run([sys.executable, str(script), str(model_dir), str(tmp_path / "run2"),
                          str(tmp_path / "out2"), str(tmp_path / "pairs.json"), "cuda", json.dumps(cfg)],
                         env=_clean_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["backend"] == "nccl" and info["devices"] == ["cuda"]
    m1, m2, w1, w2 = _compare_runs(tmp_path, info)
    assert all(math.isfinite(b["loss"]) and math.isfinite(b["grad_norm"]) for b in m2)
    a, b = m1[0], m2[0]  # step 1: same weights, so bf16 compute vs fp32 is all that differs
    assert b["loss"] == pytest.approx(a["loss"], abs=1e-2)  # ~log 2: policy == reference
    assert b["logps/real"] == pytest.approx(a["logps/real"], rel=2e-2)
    assert b["logps/generated"] == pytest.approx(a["logps/generated"], rel=2e-2)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=5e-2)
    # step 2 sees an update of ~1e-4 per weight, mostly below bf16 resolution: only loosely comparable
    assert m2[1]["loss"] == pytest.approx(m1[1]["loss"], abs=2e-2)
    for k in w1:  # RMSProp moves each weight by <= ~10 lr per step
        assert torch.isfinite(w2[k]).all() and torch.allclose(w1[k], w2[k], atol=1e-3, rtol=0), k


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_state(setup, tmp_path, monkeypatch):
    _, model_dir, tok = setup
    train_mod = importlib.import_module("minispin.training.step")  # where optimizer_step finds batch_loss

    calls = {"n": 0}
    real_batch_loss = train_mod.batch_loss

    def poisoned(policy, batch, config):
        calls["n"] += 1
        loss, seq = real_batch_loss(policy, batch, config)
        return (loss * float("nan") if calls["n"] == 3 else loss), seq

    monkeypatch.setattr(train_mod, "batch_loss", poisoned)
    cfg = TrainConfig(lr=1e-3, epochs=1, global_batch_size=1, micro_batch_size=1, save_steps=2, progress=False,
                      device="cpu")
    with pytest.raises(TrainingDiverged, match=r"step 3/4: loss nan .* not finite"):
        train(str(model_dir), tok, make_pairs(4), cfg, run_dir=tmp_path)
    state = json.loads((tmp_path / "train_state" / "trainer_state.json").read_text())
    assert state["step"] == 2
    weights = load_file(tmp_path / "train_state" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(train_mod, "batch_loss", real_batch_loss)
    with pytest.raises(ValueError, match=r"saved by a run with other settings \(lr: 0.001 -> 0.002\)"):
        train(str(model_dir), tok, make_pairs(4), dataclasses.replace(cfg, lr=2e-3), run_dir=tmp_path)


def test_clear_errors_for_bad_pairs_and_paths(setup, tmp_path):
    _, model_dir, tok = setup
    with pytest.raises(ValueError, match="pair 1 has no rejected"):
        train(str(model_dir), tok, [make_pairs(2)[0], Pair(1, [{"role": "user", "content": "hi"}], "a")],
              TrainConfig(progress=False, device="cpu"))
    with pytest.raises(ValueError, match="two pairs have index 0"):
        train(str(model_dir), tok, [make_pairs(1)[0], make_pairs(1)[0]], TrainConfig(progress=False, device="cpu"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        train(str(tmp_path / "nowhere"), tok, make_pairs(2), TrainConfig(progress=False, device="cpu"))
    small = Transformer(tiny_config(10))  # the tokenizer's ids do not fit this model's vocabulary
    with pytest.raises(ValueError, match=f"do not match: the tokenizer has {len(tok)} tokens but the model's "
                                         "vocabulary has 10"):  # checked at load, before any pair
        train(small, tok, make_pairs(2), TrainConfig(progress=False, device="cpu"))
    with pytest.raises(ValueError, match=r"row 1 \(1-based\).*outside the model's vocabulary of 10"):
        tokenize_pairs(make_pairs(2), tok, vocab_size=10)
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(loss="dpop")


def test_divergence_message_names_only_a_train_state_that_exists(setup, tmp_path, monkeypatch):
    """NaN at step 3 with a state saved at step 2: the message names it; NaN at step 1: none saved yet."""
    _, model_dir, tok = setup
    step_mod = importlib.import_module("minispin.training.step")
    real_batch_loss = step_mod.batch_loss
    for bad_call, expected in ((3, r"the last good state, step 2, is in .*train_state"),
                               (1, r"no train state saved yet in .*train_state \(the first is written after step 2\)")):
        calls = {"n": 0}

        def poisoned(policy, batch, config, _bad=bad_call):
            calls["n"] += 1
            loss, seq = real_batch_loss(policy, batch, config)
            return (loss * float("nan") if calls["n"] == _bad else loss), seq

        monkeypatch.setattr(step_mod, "batch_loss", poisoned)
        cfg = TrainConfig(lr=1e-3, epochs=1, global_batch_size=1, micro_batch_size=1, save_steps=2, progress=False, device="cpu")
        with pytest.raises(TrainingDiverged, match=expected):
            train(str(model_dir), tok, make_pairs(4), cfg, run_dir=tmp_path / f"run{bad_call}")


def test_truncation_report_small_data_and_positions_are_told_up_front(setup, capsys):
    """Truncated pairs are counted (a warning above 10%); fewer pairs than a global batch is a warning;
    a row longer than the model's positions is refused before training (the tiny model has 128)."""
    _, model_dir, tok = setup
    long_pairs = [Pair(i, [{"role": "user", "content": "What is 1+1? " * 4}], "It is two. " * 6, "no " * 20)
                  for i in range(3)] + make_pairs(7, seed=1)[3:]
    cfg = TrainConfig(lr=1e-3, max_steps=1, global_batch_size=8, micro_batch_size=1, max_length=40,
                      max_prompt_length=20, progress=False, device="cpu")
    train(str(model_dir), tok, long_pairs, cfg)
    err = capsys.readouterr().err
    assert ("[train] warning: 3 of 7 pairs truncated at max_length 40 (3 prompts cut to max_prompt_length 20, "
            "3 pairs' answers cut to 20 tokens)") in err
    assert "[train] warning: 7 pairs, fewer than one global batch (8)" in err
    train(str(model_dir), tok, make_pairs(20), dataclasses.replace(cfg, max_length=64, max_prompt_length=32,
                                                                   global_batch_size=2))
    assert capsys.readouterr().err == ""  # nothing cut, enough pairs: no word
    with pytest.raises(ValueError, match="pair 0 is 1[0-9][0-9] tokens long, beyond the model's 128 positions"):
        train(str(model_dir), tok, [Pair(0, [{"role": "user", "content": "a" * 100}], "b" * 60, "c")],
              TrainConfig(max_length=400, max_prompt_length=200, progress=False, device="cpu"))
