"""minispin.lora (CPU, fp32, tiny models): the same adapters give PEFT + transformers' logits, one step's
adapter gradients equal theirs (dropout included), the exported folder loads in peft, training leaves the
base bit-unchanged and saves base + (alpha/r) B A, only the adapters have optimizer state, a resumed run is
bit-identical, 2 FSDP2 ranks (gloo) train like one, and bad settings / adapter folders are refused clearly."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import minispin.distributed as dist
from minispin.checkpoint import load_model
from minispin.collate import TokenizedPair, collate_pairs
from minispin.config import ConfigError
from minispin.lora import (LORA_TARGETS, AdapterError, LoRALinear, LoraConfig, adapted_modules, add_adapters,
                           load_adapter, merge_adapters, save_adapter)
from minispin.training import PolicyHead, TrainConfig, batch_loss, save_trained_model, train
from tiny import FIXTURES, REPO, make_pairs

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TINY_LLAMA = FIXTURES / "hf-tiny-llama"


def _peft_model(r: int = 4, alpha: float = 8.0, dropout: float = 0.0, targets=LORA_TARGETS, seed: int = 0,
                fixture=TINY_LLAMA):
    """transformers' tiny model with PEFT adapters whose B is random too (init_lora_weights=False)."""
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(fixture), dtype=torch.float32)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                          init_lora_weights=False, task_type="CAUSAL_LM")
    return peft.get_peft_model(hf, cfg)


def _peft_from(folder, fixture=TINY_LLAMA):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(fixture), dtype=torch.float32)
    return peft.PeftModel.from_pretrained(hf, str(folder)).eval()


def _ids(seed: int, shape=(3, 19)) -> torch.Tensor:
    return torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fixture, targets", [(TINY_LLAMA, LORA_TARGETS), (TINY_LLAMA, ("q_proj", "v_proj", "down_proj")),
                                              (FIXTURES / "hf-tiny-qwen2", LORA_TARGETS)])  # Qwen2: q/k/v biases
def test_same_adapters_give_peft_logits_both_ways(tmp_path, fixture, targets):
    """CPU fp32. PEFT's adapters read into our model give PEFT's logits, and our exported folder loaded by
    PeftModel.from_pretrained onto transformers gives ours (<= 1e-5)."""
    pm = _peft_model(targets=targets, fixture=fixture).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    ours = load_model(fixture, dtype=torch.float32)
    lora = load_adapter(ours, tmp_path / "peft")
    assert lora == LoraConfig(r=4, alpha=8.0, dropout=0.0, targets=targets)
    assert sorted(n.rpartition(".")[2] for n in adapted_modules(ours)) == sorted(targets * 2)  # 2 layers
    assert all(m.lora_B.weight.abs().sum() > 0 for m in adapted_modules(ours).values())  # a real update
    ids = _ids(1) % ours.config.vocab_size
    with torch.no_grad():
        theirs, got = pm(input_ids=ids).logits, ours(ids)
        plain = load_model(fixture, dtype=torch.float32)(ids)
    assert (got - plain).abs().max() > 1e-3  # the adapters change the logits ...
    assert torch.allclose(got, theirs, atol=1e-5, rtol=1e-5)  # ... exactly as PEFT's do

    save_adapter(ours, tmp_path / "ours", base_model=str(fixture))
    cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"], cfg["task_type"]) == ("LORA", 4, 8.0, "none",
                                                                                           "CAUSAL_LM")
    assert cfg["base_model_name_or_path"] == str(fixture) and sorted(cfg["target_modules"]) == sorted(targets)
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    a = keys["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
    b = keys["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    H, q = ours.config.hidden_size, ours.config.num_attention_heads * ours.config.head_dim
    assert a.shape == (4, H) and b.shape == (q, 4) and a.dtype == b.dtype == torch.float32
    with torch.no_grad():
        reloaded = _peft_from(tmp_path / "ours", fixture)(input_ids=ids).logits
        merged = merge_adapters(ours)(ids)
    assert torch.allclose(merged, got, atol=1e-5, rtol=1e-5)
    assert not adapted_modules(ours) and (ours.layers[0].self_attn.q_proj.bias is not None) == ("qwen2" in str(fixture))
    assert torch.allclose(reloaded, got, atol=1e-5, rtol=1e-5)


def _batch(seed: int, pairs: int = 3):
    g = torch.Generator().manual_seed(seed)
    r = lambda n: torch.randint(3, 512, (n,), generator=g).tolist()  # noqa: E731
    tokenized = [TokenizedPair(i, r(4 + i), r(5 + 2 * i), r(3 + 3 * i)) for i in range(pairs)]
    refs = {i: (-300.0 - 7 * i, -310.0 + 5 * i) for i in range(pairs)}
    # rows of their own (no shared prompt), so that transformers can run them under a block-diagonal mask
    return collate_pairs(tokenized, share_prefix=False, ref_logps=refs)


def _peft_loss(pm, batch, beta: float) -> torch.Tensor:
    """SPIN's sigmoid loss from transformers' full logits: summed response log-probs vs the references."""
    N = batch.input_ids.shape[1]
    allowed = torch.zeros(1, 1, N, N, dtype=torch.bool)  # each row attends causally to itself only
    for start, end, _, _ in batch.packed.blocks:
        allowed[0, 0, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    logits = pm(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=allowed).logits.flatten(0, 1)
    logp = torch.log_softmax(logits[batch.token_index], -1).gather(1, batch.labels[:, None])[:, 0]
    seq = torch.zeros(batch.num_rows).index_add(0, batch.seq_index, logp)
    P = batch.num_pairs
    z = beta * ((seq[:P] - batch.ref_logps[:P]) - (seq[P:] - batch.ref_logps[P:]))
    return torch.nn.functional.softplus(-z).mean()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_one_step_adapter_gradients_equal_peft(tmp_path, dropout):
    """CPU fp32. Same batch, same loss (SPIN sigmoid, beta 0.1), same adapters: every adapter gradient
    equals PEFT + transformers' within 1e-4 relative; the frozen base gets none. With dropout, the same
    seed gives both the same masks (both draw them in the blocks' order: q, k, v, o, gate, up, down)."""
    pm = _peft_model(dropout=dropout, seed=3).train()
    pm.save_pretrained(str(tmp_path / "peft"))
    model = load_model(TINY_LLAMA, dtype=torch.float32)
    load_adapter(model, tmp_path / "peft")
    policy = PolicyHead(model).train()
    batch = _batch(5)
    torch.manual_seed(11)
    loss, _ = batch_loss(policy, batch, TrainConfig(beta=0.1, device="cpu"))
    loss.backward()
    torch.manual_seed(11)
    peft_loss = _peft_loss(pm, batch, 0.1)
    peft_loss.backward()
    assert loss.item() == pytest.approx(peft_loss.item(), rel=1e-5)
    theirs = {n.replace("base_model.model.model.", "").replace(".default", ""): p.grad
              for n, p in pm.named_parameters() if p.requires_grad}
    ours = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 7 * 2
    for name, g in ours.items():
        rel = (g - theirs[name]).norm() / theirs[name].norm()
        assert theirs[name].norm() > 0 and rel <= 1e-4, (name, rel.item())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_init_is_peft_kaiming_and_zero_b_and_seeded():
    """A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0: a fresh model computes the base
    model exactly; the same seed gives the same A and leaves the global RNG untouched."""
    model = load_model(TINY_LLAMA, dtype=torch.float32)
    ids = _ids(2)
    with torch.no_grad():
        before = model(ids)
    state = torch.get_rng_state()
    names = add_adapters(model, LoraConfig(r=8, alpha=16), seed=7)
    assert torch.equal(torch.get_rng_state(), state) and len(names) == 14
    down = model.layers[1].mlp.down_proj
    assert isinstance(down, LoRALinear) and down.lora_A.weight.shape == (8, 176) and down.scaling == 2.0
    bound = 1 / math.sqrt(176)
    a = down.lora_A.weight.detach()
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound and a.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.1)
    assert all(torch.equal(m.lora_B.weight, torch.zeros_like(m.lora_B.weight)) for m in adapted_modules(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids), before)
    again = load_model(TINY_LLAMA, dtype=torch.float32)
    add_adapters(again, LoraConfig(r=8, alpha=16), seed=7)
    assert torch.equal(again.layers[1].mlp.down_proj.lora_A.weight, a)
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())


LORA = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.1)
TRAIN = dict(lr=1e-2, epochs=1, global_batch_size=2, micro_batch_size=1, max_length=64, max_prompt_length=32,
             progress=False, device="cpu", optimizer="adamw", **LORA)


def test_training_keeps_the_base_and_saves_base_plus_scaled_ba(setup, tmp_path):
    """train() with --lora_r 4: the base weights stay bit for bit, only adapters have optimizer state (in
    the train state too), and the saved model is W + (alpha/r) B A (bit for bit the fp32 formula; float64
    within 1e-6); the exported adapter on the base in peft gives the saved model's logits."""
    _, model_dir, tok = setup
    base = load_model(model_dir, dtype=torch.float32)
    result = train(str(model_dir), tok, make_pairs(6, seed=2), TrainConfig(**TRAIN, save_steps=2), run_dir=tmp_path / "run")
    model = result.model
    for name, p in base.named_parameters():
        assert torch.equal(model.get_parameter(name), p), name
    state = tmp_path / "run" / "train_state"
    assert {k.split(".lora_")[0] for k in load_file(state / "model.safetensors")} == \
        {"model." + n for n in adapted_modules(model)}
    assert all(".lora_" in k for k in load_file(state / "optimizer.safetensors"))
    save_trained_model(result.policy, tmp_path / "merged", dtype=None)
    save_adapter(model, tmp_path / "adapter", base_model=str(model_dir))
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert not any("lora" in k for k in merged)
    for name, m in adapted_modules(model).items():
        a, b, w = m.lora_A.weight.detach(), m.lora_B.weight.detach(), base.get_parameter(name + ".weight")
        assert b.abs().max() > 0  # it trained
        assert torch.equal(merged[f"model.{name}.weight"], w + 2.0 * (b @ a))
        exact = w.double() + 2.0 * (b.double() @ a.double())
        assert torch.allclose(merged[f"model.{name}.weight"].double(), exact, atol=1e-6, rtol=0)
    assert torch.equal(merged["model.norm.weight"], base.norm.weight)
    ids = _ids(3, (2, 11)) % base.config.vocab_size
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        via_peft = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()(input_ids=ids).logits
        saved = load_model(tmp_path / "merged", dtype=torch.float32)(ids)
        in_memory = merge_adapters(model).eval()(ids)
    assert torch.allclose(via_peft, saved, atol=1e-5, rtol=1e-5) and torch.equal(saved, in_memory)


def test_lora_resume_is_bit_identical(setup, tmp_path, monkeypatch):
    """A run stopped right after step 3 (train state saved at step 2, with dropout's RNG) and run again ends
    with the adapters of an uninterrupted run, bit for bit."""
    _, model_dir, tok = setup
    pairs = make_pairs(8, seed=6)
    cfg = TrainConfig(**TRAIN, save_steps=2)
    whole = train(str(model_dir), tok, pairs, cfg, run_dir=tmp_path / "whole").model

    class Stop(Exception):
        pass

    def stop_at_step_3(phase, **counters):
        if phase == "train" and counters.get("step") == 3:
            raise Stop

    monkeypatch.setattr(dist, "kill_point", stop_at_step_3)
    with pytest.raises(Stop):
        train(str(model_dir), tok, pairs, cfg, run_dir=tmp_path / "cut")
    monkeypatch.undo()
    resumed = train(str(model_dir), tok, pairs, cfg, run_dir=tmp_path / "cut").model
    assert json.loads((tmp_path / "cut" / "train_state" / "trainer_state.json").read_text())["step"] == 4
    for name, p in whole.named_parameters():
        assert torch.equal(resumed.get_parameter(name), p), name
    lines = lambda run: [{k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "step_time_s")}  # noqa: E731
                         for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert lines("whole") == lines("cut")


WORKER = textwrap.dedent('''
    import json, sys, torch
    from minispin.collate import Pair
    from minispin.lora import save_adapter
    from minispin.tokenizer import load_tokenizer
    from minispin.training import TrainConfig, train, save_trained_model
    import minispin.distributed as dist
    model_dir, run_dir, out_dir, pairs_file = sys.argv[1:5]
    tok = load_tokenizer(model_dir)
    pairs = [Pair(**p) for p in json.load(open(pairs_file))]
    result = train(model_dir, tok, pairs, TrainConfig(**json.loads(sys.argv[5])), run_dir=run_dir)
    save_adapter(result.model, out_dir + "/adapter", base_model=model_dir)
    save_trained_model(result.policy, out_dir + "/model", dtype=None)
    params = list(result.policy.named_parameters())
    # only rank 0 prints: two ranks writing to one pipe can run their lines together
    facts = json.dumps({"frozen": sorted({str(p.dtype) for n, p in params if not p.requires_grad}),
                        "trainable": sorted({str(p.dtype) for n, p in params if p.requires_grad}),
                        "fsdp": all(hasattr(p, "full_tensor") for n, p in params),
                        "devices": sorted({p.device.type for n, p in params})})
    if dist.get_rank() == 0:
        print(facts, flush=True)
    del result, params
    dist.shutdown(dist.DistInfo(dist.get_rank(), dist.get_world_size(), 0, torch.device("cpu"), "gloo", True))
''')


def _worker(tmp_path, cfg: dict, nproc: int | None) -> dict:
    """WORKER under torchrun (nproc ranks) or as one plain process (a GPU: train() starts its own group);
    returns rank 0's facts about the trained policy's parameters."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_TEST_KILL_AT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    args = [str(p) for p in (cfg.pop("model_dir"), tmp_path / "run2", tmp_path / "out2",
                             tmp_path / "pairs.json")]
    res = subprocess.run([sys.executable, *launcher, str(script), *args, json.dumps(cfg)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _plain_run(setup, tmp_path, **overrides) -> dict:
    """The reference: a plain fp32 CPU run (adapters + merged model in out1/), pairs written for the worker."""
    _, model_dir, tok = setup
    pairs = make_pairs(6, seed=4)
    (tmp_path / "pairs.json").write_text(json.dumps([p.__dict__ for p in pairs]))
    cfg = dict(TRAIN, lora_dropout=0.0, global_batch_size=4, optimizer="rmsprop", save_steps=1, **overrides)
    one = train(str(model_dir), tok, pairs, TrainConfig(**cfg), run_dir=tmp_path / "run1")
    save_adapter(one.model, tmp_path / "out1" / "adapter", base_model=str(model_dir))
    save_trained_model(one.policy, tmp_path / "out1" / "model", dtype=None)
    return dict(cfg, model_dir=model_dir)


def test_two_fsdp_ranks_train_adapters_like_one(setup, tmp_path):
    """FSDP2 over gloo, 2 ranks (frozen base + sharded fp32 adapters, adapters initialised into each rank's
    shard): the same adapters and merged model as the plain single process, and the same base."""
    facts = _worker(tmp_path, _plain_run(setup, tmp_path, lr=1e-3), nproc=2)
    assert facts == {"frozen": ["torch.float32"], "trainable": ["torch.float32"], "fsdp": True, "devices": ["cpu"]}
    for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        w1, w2 = load_file(tmp_path / "out1" / name), load_file(tmp_path / "out2" / name)
        assert w1.keys() == w2.keys()
        for k in w1:
            assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), (name, k)
    adapters = load_file(tmp_path / "out2" / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapters.items())
    state = load_file(tmp_path / "run2" / "train_state" / "model.safetensors")
    assert state.keys() == {k.removeprefix("base_model.model.") for k in adapters}  # only adapters, full shapes


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_single_gpu_lora_keeps_a_bf16_base_and_matches_fp32_cpu(setup, tmp_path):
    """One GPU without torchrun (train() starts a one-rank nccl group, FSDP2 bf16 compute): the frozen base is
    stored in bf16, the adapters in fp32 (the only optimizer state); the step metrics and the merged model
    agree with the fp32 CPU run."""
    cfg = _plain_run(setup, tmp_path, lr=1e-5)
    facts = _worker(tmp_path, dict(cfg, device="cuda"), nproc=None)
    assert facts == {"frozen": ["torch.bfloat16"], "trainable": ["torch.float32"], "fsdp": True, "devices": ["cuda"]}
    m1, m2 = ([json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("run1", "run2"))
    assert len(m1) == len(m2) == 2 and all(math.isfinite(m["loss"]) for m in m2)
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], abs=1e-2)  # ~log 2: policy == reference
    assert m2[0]["grad_norm"] == pytest.approx(m1[0]["grad_norm"], rel=5e-2)
    w1, w2 = (load_file(tmp_path / out / "model" / "model.safetensors") for out in ("out1", "out2"))
    for k in w1:  # bf16 rounding of the base (~0.4%) plus an update of ~1e-4
        assert torch.allclose(w1[k], w2[k].float(), atol=2e-3, rtol=1e-2), k


def test_bad_lora_settings_and_adapter_folders_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--lora_targets 'q_proj,lm_head': .* unknown: lm_head"):
        TrainConfig(lora_r=4, lora_targets="q_proj,lm_head")
    with pytest.raises(ConfigError, match="--lora_r must be >= 0"):
        TrainConfig(lora_r=-1)
    with pytest.raises(ConfigError, match="--lora_dropout must be in"):
        TrainConfig(lora_r=4, lora_dropout=1.0)
    with pytest.raises(ConfigError, match="--lora_alpha must be"):
        TrainConfig(lora_r=4, lora_alpha=0)
    assert TrainConfig(lora_r=0, lora_targets="nonsense").lora is None  # full fine-tuning ignores them
    assert TrainConfig(lora_r=2, lora_targets=" v_proj, q_proj").lora.targets == ("q_proj", "v_proj")

    pm = _peft_model(r=2)
    pm.save_pretrained(str(tmp_path / "a"))
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(dict(cfg, use_dora=True)))
    model = load_model(TINY_LLAMA, dtype=torch.float32)
    with pytest.raises(AdapterError, match=f"{cfg_file}: key 'use_dora' is True; minispin supports only False"):
        load_adapter(model, tmp_path / "a")
    cfg_file.write_text(json.dumps(dict(cfg, target_modules=["q_proj", "lm_head"])))
    with pytest.raises(AdapterError, match="unknown: lm_head"):
        load_adapter(model, tmp_path / "a")
    cfg_file.write_text(json.dumps(cfg))
    add_adapters(model, LoraConfig(r=3))
    with pytest.raises(AdapterError, match="adapters of rank 2 .* but the model has rank 3"):
        load_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_adapters(model, LoraConfig(r=3))


# the 24 GB question's models (config.json shapes) and settings: max_length 1024 (prompt 512), micro-batch 1
MODELS_24GB = {
    "Llama-2-7B": dict(vocab_size=32000, intermediate_size=11008, num_key_value_heads=32),
    "Mistral-7B": dict(vocab_size=32000, intermediate_size=14336, num_key_value_heads=8),
    "Llama-3-8B": dict(vocab_size=128256, intermediate_size=14336, num_key_value_heads=8),
}


def test_memory_model_puts_lora_7b_and_8b_on_one_24gb_card():
    """CPU. The step's memory model (bench_train prints it next to the measured peak) with LoRA r 16 on every
    projection, bf16 base, activation checkpointing: Llama-2-7B, Mistral-7B and Llama-3-8B stay under 22.5 GiB
    (a 24 GB card less the CUDA context), full fine-tuning does not; its adapter count is the real one."""
    from minispin.model import ModelConfig, Transformer
    from minispin.training.optim import memory_estimate

    settings = dict(micro_batch_size=1, max_length=1024, max_prompt_length=512, activation_checkpointing=True)
    for name, shape in MODELS_24GB.items():
        cfg = ModelConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, torch_dtype="bfloat16",
                          architecture="LlamaForCausalLM", **shape)
        for optimizer in ("rmsprop", "adamw"):
            m = memory_estimate(cfg, TrainConfig(lora_r=16, optimizer=optimizer, **settings))
            assert m["total"] == pytest.approx(sum(v for k, v in m.items() if k != "total"))
            assert m["total"] < 22.5, (name, optimizer, m)
            assert m["base_weights"] > 0.75 * m["total"]  # the bf16 base is most of it
        assert memory_estimate(cfg, TrainConfig(**settings))["total"] > 70  # full fine-tuning: not on 24 GB
        with torch.device("meta"):
            model = Transformer(cfg)
        add_adapters(model, LoraConfig(r=16))
        adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert m["weights_fp32"] == pytest.approx(4 * adapters / 2 ** 30)
        assert m["base_weights"] == pytest.approx(2 * (sum(p.numel() for p in model.parameters()) - adapters) / 2 ** 30)


# ----------------------------------------------------------------------------- the driver: python -m minispin --lora_r

from test_driver import _argv, _run_cli, _write_base  # noqa: E402 (the driver tests' tiny run and CLI helpers)

LORA_ARGV = ["--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0.1"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("spin-lora")
    model_dir, data = _write_base(root)
    out = root / "run-uninterrupted"
    res = _run_cli(_argv(model_dir, data, out) + LORA_ARGV)
    assert res.returncode == 0, res.stderr[-3000:]
    return root, model_dir, data, out


def test_two_lora_iterations_each_adapter_loads_in_peft_on_the_previous_model(lora_run):
    """CPU. `python -m minispin --lora_r 4`, 2 iterations: each iteration's adapter folder, loaded by peft onto
    the model that iteration started from (transformers), gives the logits of its merged <iter>/model/, and
    names that model as its base; iteration 1 trained fresh adapters on iteration 0's merged model."""
    _, model_dir, _, out = lora_run
    ids = _ids(4, (2, 15)) % 40
    starts = [model_dir, out / "iter0" / "model"]
    for t, start in enumerate(starts):
        it = out / f"iter{t}"
        cfg = json.loads((it / "adapter" / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(start) and (cfg["r"], cfg["lora_alpha"]) == (4, 8.0)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(start), dtype=torch.float32)
        merged = transformers.AutoModelForCausalLM.from_pretrained(str(it / "model"), dtype=torch.float32)
        with torch.no_grad():
            expected, before = merged(input_ids=ids).logits, hf(input_ids=ids).logits
            got = peft.PeftModel.from_pretrained(hf, str(it / "adapter")).eval()(input_ids=ids).logits
        assert (expected - before).abs().max() > 1e-3  # the iteration changed the model
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), t
        phases = json.loads((it / "phases.json").read_text())
        assert "adapter/adapter_model.safetensors" in phases["model"]["files"]
        assert not (it / "train_state").exists()
    metrics = [json.loads(x) for x in (out / "iter1" / "metrics.jsonl").read_text().splitlines()]
    assert abs(metrics[0]["margins"]) < 1e-4  # fresh adapters (B = 0): iteration 1 starts at its reference


def test_lora_resume_after_kill_in_every_save_matches_uninterrupted(lora_run):
    """kill -9 in training (after a checkpoint: adapters, their optimizer state and dropout's RNG), inside the
    adapter's save (temp folder written), then in iteration 1's training (on iteration 0's merged model); the
    same command then ends with the uninterrupted run's adapters and merged models, bit for bit."""
    import signal

    root, model_dir, data, uninterrupted = lora_run
    out = root / "run-killed"
    argv = _argv(model_dir, data, out) + LORA_ARGV
    for spec in ("train:step=3", "stage_adapter", "train:step=7"):
        res = _run_cli(argv, kill_at=spec)
        assert res.returncode == -signal.SIGKILL, (spec, res.returncode, res.stderr[-2000:])
    res = _run_cli(argv)
    assert res.returncode == 0, res.stderr[-3000:]
    for t in (0, 1):
        for name in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
            a, b = load_file(uninterrupted / f"iter{t}" / name), load_file(out / f"iter{t}" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (t, name)
        assert (out / f"iter{t}" / "adapter" / "adapter_config.json").read_text() == \
            (uninterrupted / f"iter{t}" / "adapter" / "adapter_config.json").read_text().replace(
                str(uninterrupted), str(out))
