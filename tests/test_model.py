"""The hand-written model against logits computed by Hugging Face transformers, and config parsing."""
import json

import pytest
import torch
from safetensors.torch import load_file

from minispin import load_model
import minispin.model as model_mod
from minispin.model import ModelConfigError, ModelConfig, Transformer
from tiny import FIXTURES

TINY = ["hf-tiny-llama", "hf-tiny-mistral", "hf-tiny-qwen2", "hf-tiny-qwen3"]
QWEN = ["hf-tiny-qwen2", "hf-tiny-qwen3"]


def expected(name):
    return load_file(str(FIXTURES / name / "expected_logits.safetensors"))


@pytest.mark.parametrize("gqa", ["enable_gqa", "repeat_kv"])
@pytest.mark.parametrize("name", TINY)
def test_logits_match_transformers_fixture_fp32(name, gqa, monkeypatch):
    """CPU. Both grouped-query attention paths: SDPA's enable_gqa (where the torch has it) and
    materialised k/v repeats; both with the padding mask and on the mask-free causal path."""
    if gqa == "enable_gqa" and not model_mod.SDPA_HAS_ENABLE_GQA:
        pytest.skip(f"torch {torch.__version__} has no enable_gqa in scaled_dot_product_attention")
    monkeypatch.setattr(model_mod, "SDPA_HAS_ENABLE_GQA", gqa == "enable_gqa")
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: calls.append((q.shape[1], k.shape[1], kw.get("enable_gqa", False)))
                        or sdpa(q, k, v, **kw))
    e = expected(name)
    model = load_model(FIXTURES / name, dtype=torch.float32, device="cpu")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # the fixtures are GQA
    with torch.no_grad():
        logits = model(e["input_ids"], e["attention_mask"], e["position_ids"])
        full = e["attention_mask"].bool().all(dim=1)  # rows without padding: the mask-free causal path
        causal = model(e["input_ids"][full], None, e["position_ids"][full])
    mask = e["attention_mask"].bool()
    assert torch.isfinite(logits).all()
    assert (logits - e["logits"])[mask].abs().max().item() <= 1e-4
    assert full.any() and (causal - e["logits"][full]).abs().max().item() <= 1e-4
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    expect = (heads, kv_heads, True) if gqa == "enable_gqa" else (heads, heads, False)
    assert calls and all(c == expect for c in calls), calls


@pytest.mark.parametrize("name", TINY)
def test_position_ids_default_from_mask(name):
    e = expected(name)
    model = load_model(FIXTURES / name)
    with torch.no_grad():
        logits = model(e["input_ids"], e["attention_mask"])
    mask = e["attention_mask"].bool()
    assert (logits - e["logits"])[mask].abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", TINY)
def test_bf16_load_within_bf16_tolerance(name):
    e = expected(name)
    model = load_model(FIXTURES / name, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    with torch.no_grad():
        logits = model(e["input_ids"], e["attention_mask"], e["position_ids"]).float()
    mask = e["attention_mask"].bool()
    ref = e["logits"][mask]
    err = (logits[mask] - ref).abs().max().item()
    assert err <= 0.03 * ref.abs().max().item() + 1e-2, err


def test_hidden_states_and_output_weight_give_logits():
    e = expected("hf-tiny-llama")
    model = load_model(FIXTURES / "hf-tiny-llama")
    with torch.no_grad():
        h = model.hidden_states(e["input_ids"], e["attention_mask"], e["position_ids"])
        logits = h @ model.output_weight.T
    mask = e["attention_mask"].bool()
    assert (logits - e["logits"])[mask].abs().max().item() <= 1e-4


def hf_reference(tmp_path, arch, **overrides):
    """Random transformers model saved to tmp_path (biases and norm weights redrawn away from 0 and 1);
    returns (hf_model, folder)."""
    transformers = pytest.importorskip("transformers")
    family = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[arch]
    cls_cfg = getattr(transformers, f"{family}Config")
    cls_model = getattr(transformers, f"{family}ForCausalLM")
    kw = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    kw.update(overrides)
    torch.manual_seed(0)
    hf = cls_model(cls_cfg(**kw)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path)
    return hf, tmp_path


def compare_with_hf(hf, folder, T=20, left_pad=3, right_pad=4):
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (3, T))
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :left_pad] = 0
    mask[2, T - right_pad:] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        ours = load_model(folder, dtype=torch.float32)(ids, mask, pos)
    m = mask.bool()
    return (ours - ref)[m].abs().max().item()


def test_sliding_window_matches_transformers(tmp_path):
    hf, folder = hf_reference(tmp_path, "mistral", sliding_window=5)
    assert ModelConfig.from_hf(json.loads((folder / "config.json").read_text())).sliding_window == 5
    assert compare_with_hf(hf, folder) <= 1e-4
    # No padding, no mask: the fast causal path must still apply the window.
    ids = torch.randint(0, 101, (2, 17))
    with torch.no_grad():
        err = (load_model(folder)(ids) - hf(input_ids=ids).logits).abs().max().item()
    assert err <= 1e-4


@pytest.mark.parametrize("gqa", ["enable_gqa", "unmasked_blocks_only", "repeat_kv"])
@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 5)])
def test_packed_rows_with_shared_prefixes_match_transformers_row_by_row(tmp_path, family, window, gqa, monkeypatch):
    """CPU fp32. Pairs packed as training packs them (minispin.collate: a rejected row attends to the prompt
    it shares with the chosen row instead of repeating it; odd lengths, answers that begin alike, a rejected
    row equal to its chosen row, a one-token prompt): every row's logits at every position equal
    transformers' on that row alone, also under a sliding window shorter than the rows. Each GQA path a
    block can take: SDPA's enable_gqa for all blocks, for the unmasked ones only (what CUDA's fused kernels
    allow), or repeated k/v heads for all."""
    from minispin.collate import TokenizedPair, collate_pairs

    modes = {"enable_gqa": lambda q, masked: True, "unmasked_blocks_only": lambda q, masked: not masked,
             "repeat_kv": lambda q, masked: False}
    monkeypatch.setattr(model_mod, "sdpa_gqa_without_copies", modes[gqa])
    hf, folder = hf_reference(tmp_path, family, **({"sliding_window": window} if window else {}))
    g = torch.Generator().manual_seed(3)
    r = lambda n: torch.randint(0, 101, (n,), generator=g).tolist()  # noqa: E731
    answer = r(6)
    tps = [TokenizedPair(0, r(7), r(5), r(9)), TokenizedPair(1, r(1), answer, answer[:3] + r(4)),
           TokenizedPair(2, r(4), answer, list(answer)), TokenizedPair(3, r(11), r(2), r(1))]
    model = load_model(folder, dtype=torch.float32, device="cpu")
    for share in (True, False):
        batch = collate_pairs(tps, share_prefix=share)
        with torch.no_grad():
            hidden = model.hidden_states(batch.input_ids, position_ids=batch.position_ids, packed=batch.packed)
            ours = model.lm_head(hidden[0, batch.token_index])
        rows = [t.rows[0] for t in tps] + [t.rows[1] for t in tps]
        for row, (prompt, ans) in enumerate(rows):
            with torch.no_grad():
                ref = hf(input_ids=torch.tensor([prompt + ans])).logits[0, len(prompt) - 1: -1]
            assert (ours[batch.seq_index == row] - ref).abs().max().item() <= 1e-4, (share, row)
    assert collate_pairs(tps).input_ids.shape[1] < batch.input_ids.shape[1]  # shared prompts ran once


def test_head_dim_not_hidden_over_heads_matches_transformers(tmp_path):
    hf, folder = hf_reference(tmp_path, "mistral", head_dim=24)
    assert load_model(folder).config.head_dim == 24
    assert compare_with_hf(hf, folder) <= 1e-4


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16},
])
def test_rope_scaling_matches_transformers(tmp_path, scaling):
    hf, folder = hf_reference(tmp_path, "llama", rope_parameters={"rope_theta": 500000.0, **scaling})
    assert compare_with_hf(hf, folder) <= 1e-4


def test_tied_embeddings_match_transformers(tmp_path):
    hf, folder = hf_reference(tmp_path, "llama", tie_word_embeddings=True)
    model = load_model(folder)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert compare_with_hf(hf, folder) <= 1e-4


def test_qwen3_attention_bias_matches_transformers(tmp_path):
    """Qwen3 with attention_bias: biases on q/k/v and on o (the fixture has none); 3 heads, 1 kv head,
    head_dim 24 != hidden/heads."""
    hf, folder = hf_reference(tmp_path, "qwen3", attention_bias=True, hidden_size=48, num_attention_heads=3,
                              num_key_value_heads=1, head_dim=24)
    attn = load_model(folder).layers[0].self_attn
    assert attn.o_proj.bias is not None and attn.q_norm.weight.shape == (24,)
    assert compare_with_hf(hf, folder) <= 1e-4


@pytest.mark.parametrize("name", QWEN)
def test_qwen_config_fields_read_as_transformers_reads_them(name):
    """Defaults that differ by family: Qwen3's head_dim is 128 when config.json has none (not hidden/heads);
    Qwen2 ignores attention_bias (its q/k/v biases are always there, o_proj has none); a sliding window
    switched on for no layer (max_window_layers >= layers) is full attention."""
    transformers = pytest.importorskip("transformers")
    hf = {k: v for k, v in json.loads((FIXTURES / name / "config.json").read_text()).items()
          if k not in ("head_dim", "layer_types")}
    hf.update(attention_bias=True, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    ref = transformers.AutoConfig.for_model(**hf)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert cfg.head_dim == (128 if name.endswith("qwen3") else 16)
    assert set(ref.layer_types) == {"full_attention"} and cfg.sliding_window is None
    assert (cfg.qkv_bias, cfg.o_bias, cfg.qk_norm) == ((True, False, False) if name.endswith("qwen2") else
                                                       (True, True, True))


@pytest.mark.parametrize("change", [dict(max_window_layers=1), dict(layer_types=["full_attention",
                                                                                 "sliding_attention"])])
def test_qwen_sliding_window_is_refused_in_one_line(change):
    """Layer 1 has a window, by max_window_layers (no layer_types) or by layer_types, as transformers reads it."""
    transformers = pytest.importorskip("transformers")
    hf = {k: v for k, v in json.loads((FIXTURES / "hf-tiny-qwen2" / "config.json").read_text()).items()
          if k != "layer_types"}
    hf.update(use_sliding_window=True, sliding_window=8, **change)
    assert transformers.AutoConfig.for_model(**hf).layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(ModelConfigError, match=r"'use_sliding_window' is true \(window 8 on layers \[1\]\)") as e:
        ModelConfig.from_hf(hf, source="q/config.json")
    assert "\n" not in str(e.value) and str(e.value).startswith("q/config.json")


def lm_loss(logits, ids, mask):
    """Mean next-token negative log-likelihood over the pairs of real (unpadded) tokens."""
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    return -logp[(mask[:, :-1] * mask[:, 1:]).bool()].mean()


@pytest.mark.parametrize("name", QWEN)
def test_qwen_gradients_match_transformers_float64(name):
    """CPU, float64 on both sides, padded rows included: the loss reaches Qwen2's q/k/v biases and Qwen3's
    q/k norms, and every parameter's gradient equals transformers' autograd gradient."""
    transformers = pytest.importorskip("transformers")
    e = expected(name)
    ours = load_model(FIXTURES / name, dtype=torch.float64)
    hf = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / name, local_files_only=True).double()
    args = (e["input_ids"], e["attention_mask"], e["position_ids"])
    lm_loss(ours(*args), e["input_ids"], e["attention_mask"]).backward()
    lm_loss(hf(*args).logits, e["input_ids"], e["attention_mask"]).backward()
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    for n, p in ours.named_parameters():
        ref = theirs[model_mod.hf_key(n)]
        assert (p.grad - ref).abs().max().item() <= 1e-9 * ref.abs().max().item(), n
    new = [n for n, p in ours.named_parameters() if n.endswith(".bias") or "_norm." in n]
    assert len(new) == 2 * (3 if name.endswith("qwen2") else 2)  # 2 layers x (q/k/v biases | q/k norms)
    assert all(ours.get_parameter(n).grad.abs().min() > 0 for n in new)


BASE = json.loads((FIXTURES / "hf-tiny-llama" / "config.json").read_text())


def test_config_reads_transformers_5_layout():
    hf = {k: v for k, v in BASE.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    hf.update(rope_parameters={"rope_type": "linear", "rope_theta": 1234.0, "factor": 4.0}, dtype="bfloat16")
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_theta == 1234.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert cfg.dtype == torch.bfloat16 and cfg.head_dim == 16


def test_config_reads_legacy_rope_scaling_type_key():
    cfg = ModelConfig.from_hf({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_config_round_trips_through_hf_layout():
    cfg = ModelConfig.from_hf({**BASE, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg


@pytest.mark.parametrize("change, field", [
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architectures"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"torch_dtype": "float8"}, "torch_dtype"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_unsupported_config_is_refused_naming_the_field(change, field):
    with pytest.raises(ModelConfigError, match=field):
        ModelConfig.from_hf({**BASE, **change}, source="x/config.json")


def test_left_padding_rows_stay_finite():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, architecture="LlamaForCausalLM")
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :6] = 0
    with torch.no_grad():
        padded = model(ids, mask)
        alone = model(ids[:1, 6:])
    assert torch.isfinite(padded).all()
    assert (padded[0, 6:] - alone[0]).abs().max().item() <= 1e-5
