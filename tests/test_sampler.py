"""The batched sampler: KV-cache decode vs full recompute, greedy vs step-by-step argmax, padding and
batch-size independence, seeded sampling, stop tokens/strings, the counter-based RNG, encode_prompt."""
import importlib
import math

import pytest
import torch
from safetensors.torch import load_file

from minispin import load_model
from minispin.sampler import (GeneratedSequence, counter_uniform, encode_prompt, generate, generate_tokens,
                               iter_generate_tokens, sample_from_logits, sample_from_logits_reference)
from minispin.model import KVCache
from tiny import FIXTURES

TINY = ["hf-tiny-llama", "hf-tiny-mistral"]
sampler_module = importlib.import_module("minispin.sampler")  # the module even if minispin exports generate()


@pytest.fixture(scope="module")
def models():
    return {name: load_model(FIXTURES / name, dtype=torch.float32) for name in TINY}


def random_prompts(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def argmax_without_cache(model, prompt, steps, stop=()):
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt in stop:
                break
    return out


def check_cache_against_full_recompute(model, prompts, steps):
    """Prefill left-padded prompts into a KVCache, decode greedily; at every step the cached logits must
    equal the logits of a full forward over the whole (left-padded) sequence."""
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, L, dtype=torch.long)
    pos = torch.full((B, L), -1, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, L - len(p):] = torch.tensor(p)
        pos[r, L - len(p):] = torch.arange(len(p))
    cache = KVCache(model.config, B, L + steps + 5, torch.float32, "cpu")
    worst = 0.0
    with torch.no_grad():
        last = model(ids, position_ids=pos, kv_cache=cache, cache_index=torch.arange(L).expand(B, L))[:, -1]
        mask = pos >= 0
        next_pos = torch.tensor([len(p) for p in prompts])
        for step in range(steps):
            ref = model(ids, attention_mask=mask.long())[:, -1]
            worst = max(worst, (last - ref).abs().max().item())
            nxt = ref.argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.bool)], 1)
            last = model(nxt[:, None], position_ids=next_pos[:, None], kv_cache=cache,
                         cache_index=torch.full((B, 1), L + step))[:, -1]
            next_pos = next_pos + 1
    assert worst <= 1e-4, worst


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_logits_equal_full_recompute(models, name):
    check_cache_against_full_recompute(models[name], random_prompts([7, 3, 11, 1]), steps=8)


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_accepts_the_cuda_attention_output_layout(models, name, monkeypatch):
    """On CUDA the fused SDPA kernels (memory-efficient, flash) return [B, heads, L, D] as a transposed
    view of [B, L, heads, D] storage; the grouped-query cache path must not .view() across heads."""
    real = torch.nn.functional.scaled_dot_product_attention

    def sdpa_with_cuda_layout(*args, **kwargs):
        return real(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa_with_cuda_layout)
    assert models[name].config.num_key_value_heads < models[name].config.num_attention_heads  # GQA
    check_cache_against_full_recompute(models[name], random_prompts([7, 3, 11, 1]), steps=3)


def test_sliding_window_cache_equals_full_recompute():
    model = load_model(FIXTURES / "hf-tiny-mistral", dtype=torch.float32)
    model.config.sliding_window = 4
    prompts = random_prompts([9, 2, 6], seed=1)
    check_cache_against_full_recompute(model, prompts, steps=8)
    # and through the sampler (prefill + refill + decode), against argmax without any cache
    out = generate_tokens(model, prompts, max_new_tokens=8, temperature=0, batch_size=2, stop_token_ids=[])
    assert [o.token_ids for o in out] == [argmax_without_cache(model, p, 8) for p in prompts]
    # the window must matter here, or this test shows nothing
    model.config.sliding_window = None
    assert [o.token_ids for o in generate_tokens(model, prompts, max_new_tokens=8, temperature=0,
                                                  stop_token_ids=[])] != [o.token_ids for o in out]


@pytest.mark.parametrize("name", ["hf-tiny-qwen2", "hf-tiny-qwen3"])
def test_qwen_cache_and_greedy_generation_equal_transformers(name):
    """CPU. Qwen2 (q/k/v biases, tied head) and Qwen3 (q/k norms, head_dim 20): cached decode equals a full
    recompute, and greedy generation (left-padded prefill, slot refill) equals transformers' generate."""
    transformers = pytest.importorskip("transformers")
    model = load_model(FIXTURES / name, dtype=torch.float32)
    prompts = random_prompts([6, 2, 9], seed=4, vocab=model.config.vocab_size)
    check_cache_against_full_recompute(model, prompts, steps=6)
    hf = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / name, local_files_only=True).eval()
    hf.generation_config.eos_token_id = None  # run all max_new_tokens, as stop_token_ids=[] does
    ours = generate_tokens(model, prompts, max_new_tokens=12, temperature=0, batch_size=2, stop_token_ids=[])
    for prompt, out in zip(prompts, ours):
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        assert out.token_ids == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", TINY)
def test_greedy_equals_stepwise_argmax_and_padding_is_invisible(models, name):
    model = models[name]
    prompts = random_prompts([5, 12, 1, 8, 3, 9, 2], seed=2)
    # batch 3 < 7 prompts: left-padded prefill groups, slot refill and continuous batching all happen
    batched = generate_tokens(model, prompts, max_new_tokens=10, temperature=0, batch_size=3, stop_token_ids=[])
    assert all(o.finish_reason == "length" and len(o.token_ids) == 10 for o in batched)
    assert [o.token_ids for o in batched] == [argmax_without_cache(model, p, 10) for p in prompts]
    alone = [generate_tokens(model, [p], max_new_tokens=10, temperature=0, stop_token_ids=[])[0] for p in prompts]
    assert [o.token_ids for o in alone] == [o.token_ids for o in batched]
    static = generate_tokens(model, prompts, max_new_tokens=10, temperature=0, batch_size=3, refill=False,
                             stop_token_ids=[])
    assert [o.token_ids for o in static] == [o.token_ids for o in batched]


def test_seeded_samples_do_not_depend_on_batch_size_or_order(models):
    model = models["hf-tiny-llama"]
    prompts = random_prompts([4, 9, 2, 7, 5, 11], seed=3)
    kw = dict(max_new_tokens=9, temperature=0.9, top_p=0.95, top_k=100, seed=1234, stop_token_ids=[])
    ref = [o.token_ids for o in generate_tokens(model, prompts, batch_size=6, **kw)]
    for bs in (1, 4):
        assert [o.token_ids for o in generate_tokens(model, prompts, batch_size=bs, **kw)] == ref
    order = [4, 0, 5, 2, 1, 3]
    shuffled = generate_tokens(model, [prompts[i] for i in order], indices=order, batch_size=3, **kw)
    assert {i: o.token_ids for i, o in zip(order, shuffled)} == dict(enumerate(ref))
    # a shard of the prompts (as one rank of several would get) gives the same samples
    shard = generate_tokens(model, prompts[1::2], indices=[1, 3, 5], batch_size=2, **kw)
    assert [o.token_ids for o in shard] == ref[1::2]
    # and the samples really are random: another seed, or another sample number, gives others
    other_seed = generate_tokens(model, prompts, batch_size=6, **{**kw, "seed": 99})
    assert [o.token_ids for o in other_seed] != ref
    other_k = generate_tokens(model, prompts, batch_size=6, sample_ids=[1] * 6, **kw)
    assert all(o.token_ids != r for o, r in zip(other_k, ref))


def test_counter_uniform_is_splitmix64():
    mask = (1 << 64) - 1
    golden = 0x9E3779B97F4A7C15

    def mix(x):
        x &= mask
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & mask
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    def reference(seed, *counters):
        h = mix(seed + golden)
        for c in counters:
            h = mix(h + c * golden + golden)
        return (h >> 40) / 2**24

    index = torch.tensor([0, 1, 2, 12345, 2**40 + 7])
    step = torch.tensor([0, 0, 255, 3, 1])
    for seed in (0, 1, 2**62 + 11):
        got = counter_uniform(seed, index, torch.zeros_like(index), step).tolist()
        want = [reference(seed, i, 0, s) for i, s in zip(index.tolist(), step.tolist())]
        assert got == want
    u = counter_uniform(7, torch.arange(100000), torch.zeros(100000, dtype=torch.long))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01 and u.unique().numel() > 99000


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (7, 1.0), (0, 0.6), (12, 0.8)])
def test_inverse_cdf_sampling_matches_the_filtered_distribution(top_k, top_p):
    torch.manual_seed(0)
    V, N, temperature = 37, 20000, 0.7
    logits = torch.randn(V) * 2
    uniform = (torch.arange(N, dtype=torch.float64) + 0.5) / N  # a uniform grid: exact expected counts
    tokens = sample_from_logits(logits.expand(N, V), uniform.float(), temperature, top_p, top_k)
    probs = torch.softmax(logits.double() / temperature, -1)
    sorted_p, order = probs.sort(descending=True)
    keep = torch.zeros(V, dtype=torch.bool)
    if top_k:
        sorted_p = sorted_p[:top_k]
    mass_before = sorted_p.cumsum(0) - sorted_p
    kept = order[: int((mass_before < top_p).sum())]
    keep[kept] = True
    expected = torch.where(keep, probs, 0.0)
    expected = expected / expected.sum() * N
    counts = torch.bincount(tokens, minlength=V).double()
    assert (counts[~keep] == 0).all()
    assert (counts - expected).abs().max() <= 2, (counts, expected)
    assert sample_from_logits(logits[None], None, temperature=0).item() == logits.argmax().item()


# ----------------------------------------------------------------------------- the candidate-set sampler

SETTINGS = [(0.7, 0.9, 0), (1.0, 0.5, 0), (1.3, 0.98, 0), (1.0, 0.999, 0), (0.7, 0.9, 50), (1.0, 1.0, 20),
            (0.8, 0.9, 1000), (0.8, 0.9, 1500), (0.9, 1.0, 5000)]  # (temperature, top_p, top_k)


def rows_of_every_kind(n, vocab, seed):
    """Logit rows from peaked (a few tokens hold the nucleus) to flat (it spans most of the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1.3, 0.8, n)[:, None]  # std 0.05 .. 6.3
    return torch.randn(n, vocab, generator=g) * scale


class PathSpy:
    """Counts the rows each path of sample_from_logits draws: candidate sets by size, and the full sort."""

    def __init__(self, monkeypatch):
        self.candidates, self.sorted_rows = {}, 0
        real_candidates, real_sorted = sampler_module._sample_candidates, sampler_module._sample_sorted

        def candidates(scaled, uniform, top_p, top_k, size, probs=None):
            token, complete = real_candidates(scaled, uniform, top_p, top_k, size, probs)
            self.candidates[size] = self.candidates.get(size, 0) + int(complete.sum())
            return token, complete

        def sorted_(scaled, *args):
            self.sorted_rows += scaled.shape[0]
            return real_sorted(scaled, *args)
        monkeypatch.setattr(sampler_module, "_sample_candidates", candidates)
        monkeypatch.setattr(sampler_module, "_sample_sorted", sorted_)


@pytest.mark.parametrize("temperature,top_p,top_k", SETTINGS)
def test_candidate_sampler_draws_the_full_sorts_token(temperature, top_p, top_k, monkeypatch):
    """CPU. Token for token (same uniform), the candidate-set sampler gives what the stable full-vocabulary
    sort gives, on rows from peaked to flat: rows the smallest set settles, rows the larger one settles,
    rows only the sort settles (flat rows, top_p near 1, top_k past the largest set), all three present
    where the setting allows them. With top-k the candidate path's probabilities are the sort's bit for
    bit; with top-p alone the normaliser is summed in another order (~1e-7 relative), so a draw could
    differ only if a uniform fell within that distance of a CDF step: none does for these fixed seeds."""
    vocab = 3001
    logits = rows_of_every_kind(300, vocab, seed=1)
    u = counter_uniform(5, torch.arange(300))
    want = sample_from_logits_reference(logits, u, temperature, top_p, top_k)
    spy = PathSpy(monkeypatch)
    got = sample_from_logits(logits, u, temperature, top_p, top_k)
    assert torch.equal(got, want)
    settled = sum(spy.candidates.values())
    assert settled + spy.sorted_rows == 300
    if top_k > 1024:  # a top-k past the largest set: the sort
        assert settled == 0
    elif top_k:  # one set: exactly the top k
        assert settled == 300
    else:  # top-p alone: flat rows are sorted; the 64-set settles peaked rows, the 1024-set more
        assert spy.sorted_rows > 0
        assert top_p > 0.99 or spy.candidates[64] > 0 and spy.candidates[1024] > 0
    # the branch torch.compile / CUDA graphs take (both paths, torch.where) draws the same tokens
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert torch.equal(sample_from_logits(logits, u, temperature, top_p, top_k), want)


def test_candidate_sampler_compiles_whole_and_keeps_ties_and_batches_apart(monkeypatch):
    """CPU. Ties rank by token id on either side of a candidate set's edge; a row's token does not depend
    on the other rows of its batch (nor on which path they take); temperature 0 is the argmax; the
    sampler traces as one graph under torch.compile(fullgraph=True) and draws the same tokens there."""
    monkeypatch.setattr(sampler_module, "CANDIDATE_SIZES", (4, 16))
    vocab = 40
    base = torch.linspace(3, -3, vocab)
    tied = [base.clone() for _ in range(4)]
    tied[0][[2, 20, 21, 35]] = base[2].item()  # ranks 2-5 tied: across the 4-set's edge, inside the 16-set
    tied[1][:] = 0.0  # every token tied: the nucleus is the lowest ids
    tied[2][[14, 22, 30, 31, 39]] = base[14].item()  # ranks 14-18 tied: across the 16-set's edge
    tied[3][[0, 39]] = 9.0  # a tie at the top
    logits = torch.cat([torch.stack(tied), rows_of_every_kind(60, vocab, seed=2)])
    u = counter_uniform(9, torch.arange(len(logits)))
    for temperature, top_p, top_k in [(1.0, 0.5, 0), (0.8, 0.9, 0), (1.0, 0.3, 4), (1.0, 1.0, 3), (1.0, 0.7, 12)]:
        want = sample_from_logits_reference(logits, u, temperature, top_p, top_k)
        assert torch.equal(sample_from_logits(logits, u, temperature, top_p, top_k), want)
        one_by_one = [sample_from_logits(logits[i:i + 1], u[i:i + 1], temperature, top_p, top_k) for i in range(8)]
        assert torch.equal(torch.cat(one_by_one), want[:8])
    all_tied = sample_from_logits(tied[1].expand(500, vocab), counter_uniform(3, torch.arange(500)), 1.0, 0.1, 0)
    assert set(all_tied.tolist()) == set(range(4))  # 4 tokens of 1/40 reach 0.1: the 4 lowest ids
    assert torch.equal(sample_from_logits(logits, None, temperature=0), logits.argmax(-1))
    assert sample_from_logits(tied[3][None], None, temperature=0).item() == 0
    compiled = torch.compile(sample_from_logits, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(logits, u, 0.8, 0.9, 0), sample_from_logits_reference(logits, u, 0.8, 0.9, 0))


def exact_distribution(logits, temperature, top_p, top_k):
    """The filtered distribution in float64, from its definition: rank by (logit descending, id), keep the
    first top_k, then each token whose predecessors' mass is below top_p; renormalise."""
    z = logits.double() / temperature
    order = sorted(range(len(z)), key=lambda i: (-z[i].item(), i))
    if top_k:
        order = order[:top_k]
    p = torch.softmax(z[order], -1)
    before = torch.cumsum(p, 0) - p
    kept = [i for i, m in zip(order, before.tolist()) if m < top_p]
    dist = torch.zeros(len(z), dtype=torch.float64)
    dist[kept] = torch.softmax(z, -1)[kept]
    return dist / dist.sum()


def bernstein_bound(n, p, false_failure):
    """t with P(|Binomial(n, p) - n p| >= t) <= false_failure, by Bernstein's inequality."""
    L = math.log(2 / false_failure)
    return L / 3 + math.sqrt(L * L / 9 + 2 * L * n * p * (1 - p))


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 0.9, 0), (1.0, 0.6, 0), (1.0, 0.999, 0),
                                                     (1.0, 1.0, 7), (0.8, 0.8, 12), (1.0, 0.9, 25)])
def test_candidate_sampler_follows_the_exact_distribution(temperature, top_p, top_k, monkeypatch):
    """CPU, statistical. 40000 draws per row (the sampler's own counter-based uniforms) from a peaked, a
    medium and a flat row (settled by the 4-set, the 16-set, the sort), and a row whose nucleus ends in
    a tie: no token outside the float64 support is ever drawn, and every token's count is within
    Bernstein's bound of its expectation. Each count's bound fails with probability <= 1e-8 by chance,
    so with 4 rows x 64 tokens x 6 settings the test fails falsely with probability < 1e-5 (and never
    for these fixed seeds: the counter RNG is deterministic)."""
    monkeypatch.setattr(sampler_module, "CANDIDATE_SIZES", (4, 16))
    vocab, draws = 64, 40000
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(vocab, generator=g) * s for s in (4.0, 1.5, 0.1)]
    tie = torch.full((vocab,), -2.0)
    tie[[2, 7, 11, 40, 50]] = 0.0  # 5 tied tokens of ~0.16: a nucleus of 0.6 / 0.8 / 0.9 ends inside them
    rows.append(tie)
    for r, row in enumerate(rows):
        u = counter_uniform(11, torch.full((draws,), r), torch.arange(draws))
        counts = torch.bincount(sample_from_logits(row.expand(draws, vocab), u, temperature, top_p, top_k),
                                minlength=vocab).double()
        dist = exact_distribution(row, temperature, top_p, top_k)
        assert (counts[dist == 0] == 0).all(), (r, counts[dist == 0].nonzero())
        for t in dist.nonzero().flatten().tolist():
            bound = bernstein_bound(draws, dist[t].item(), 1e-8)
            assert abs(counts[t] - draws * dist[t]) <= bound, (r, t, counts[t], draws * dist[t], bound)


def test_stop_tokens_and_max_new_tokens(models):
    model = models["hf-tiny-mistral"]
    prompts = random_prompts([6, 4, 8], seed=4)
    free = [argmax_without_cache(model, p, 12) for p in prompts]
    stop = free[0][3]  # prompt 0 must stop at its 4th token (or earlier if it appears before)
    out = generate_tokens(model, prompts, max_new_tokens=12, temperature=0, stop_token_ids=[stop], batch_size=2)
    for o, f in zip(out, free):
        if stop in f:
            cut = f.index(stop) + 1
            assert o.token_ids == f[:cut] and o.finish_reason == "stop"
        else:
            assert o.token_ids == f and o.finish_reason == "length"
    assert len(out[0].token_ids) <= 4
    # the model's eos ids are the default stop tokens
    model_eos = model.config.eos_token_id
    default = generate_tokens(model, prompts, max_new_tokens=12, temperature=0)
    for o, f in zip(default, free):
        want = f[: f.index(model_eos) + 1] if model_eos in f else f
        assert o.token_ids == want
    assert [o.token_ids for o in generate_tokens(model, prompts, max_new_tokens=1, temperature=0)] == \
        [f[:1] for f in free]
    assert [o.token_ids for o in generate_tokens(model, prompts, max_new_tokens=0)] == [[], [], []]


def test_stop_strings(models):
    model = models["hf-tiny-llama"]

    def decode(ids):  # a toy detokenizer: one letter per token
        return "".join(chr(97 + t % 26) for t in ids)

    prompts = random_prompts([5, 7, 3, 6], seed=5)
    free = [argmax_without_cache(model, p, 14) for p in prompts]
    stop_string = decode(free[1][4:6])  # 2 letters that prompt 1 writes at tokens 5-6
    out = generate_tokens(model, prompts, max_new_tokens=14, temperature=0, stop_token_ids=[],
                          stop_strings=[stop_string], decode=decode, batch_size=2, sync_every=3)
    for o, f in zip(out, free):
        text = decode(f)
        if stop_string in text:
            end = text.index(stop_string) + len(stop_string)  # 1 char per token
            assert o.token_ids == f[:end] and o.finish_reason == "stop_string" and o.stop_string == stop_string
        else:
            assert o.token_ids == f and o.finish_reason == "length"
    assert out[1].finish_reason == "stop_string" and len(out[1].token_ids) <= 6
    with pytest.raises(ValueError, match="decode"):
        generate_tokens(model, prompts, stop_strings=["x"])


def test_bad_prompts_are_refused_with_their_index(models):
    model = models["hf-tiny-llama"]
    with pytest.raises(ValueError, match=r"prompt 1 \(index 8\) is empty"):
        generate_tokens(model, [[5], []], indices=[7, 8], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_tokens(model, [[5, 512]], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate_tokens(model, [[5]], top_p=0.0)


def test_streaming_and_progress_line(models, capsys):
    model = models["hf-tiny-llama"]
    prompts = random_prompts([3, 5, 4, 6, 2], seed=6)
    stats, seen = {}, {}
    for i, seq in iter_generate_tokens(model, prompts, max_new_tokens=5, temperature=0, batch_size=2,
                                       stop_token_ids=[], progress=True, stats=stats):
        assert not torch.is_inference_mode_enabled()  # the caller's code between results runs normally
        seen[i] = seq
    assert sorted(seen) == list(range(5)) and all(isinstance(s, GeneratedSequence) for s in seen.values())
    assert stats["tokens"] == 25 and stats["slots"] == 2
    err = capsys.readouterr().err
    assert "5/5 prompts" in err and "tok/s" in err
    calls = []
    generate_tokens(model, prompts, max_new_tokens=5, temperature=0, stop_token_ids=[],
                    progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(k, 5) for k in range(1, 6)] and calls[-1][2] == 25
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- with a real tokenizer

@pytest.fixture(scope="module")
def zephyr():
    from minispin.tokenizer import load_tokenizer
    return load_tokenizer(FIXTURES / "tokenizers" / "zephyr")


def tiny_model_for(tokenizer, seed=0):
    from minispin.model import ModelConfig, Transformer
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, torch_dtype="float32")
    return Transformer(config).eval()


def test_encode_prompt_templates_and_truncation(zephyr):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colours."}]
    chat = encode_prompt(zephyr, msgs)
    text = zephyr.render_prompt(msgs, None)
    assert text.startswith("<|system|>") and text.endswith("<|assistant|>\n")
    assert chat == zephyr.encode(text, add_special_tokens=False)  # the template writes its own specials
    assert chat[0] != zephyr.bos_id  # zephyr's template has no BOS, so none is added
    spin = encode_prompt(zephyr, msgs, "spin")
    assert spin[0] == zephyr.bos_id and spin[1:] == zephyr.encode(zephyr.render_prompt(msgs, "spin"), False)
    assert zephyr.decode(spin, skip_special_tokens=True).startswith("### Instruction: Be brief.")
    cut = encode_prompt(zephyr, msgs, "spin", max_prompt_length=6)
    assert len(cut) == 6 and cut[0] == zephyr.bos_id and cut[1:] == spin[-5:]  # BOS + the END
    cut_chat = encode_prompt(zephyr, msgs, None, max_prompt_length=5)
    assert cut_chat == chat[-5:]


def test_generate_api_with_tokenizer(zephyr):
    model = tiny_model_for(zephyr)
    prompts = ["Hello there", [{"role": "user", "content": "What is 2+2?"}]]
    out = generate(model, zephyr, prompts, max_new_tokens=12, temperature=1.0, seed=5)
    again = generate(model, zephyr, prompts[::-1], max_new_tokens=12, temperature=1.0, seed=5, indices=[1, 0])
    assert [c.token_ids for c in out] == [c.token_ids for c in again[::-1]]
    for c in out:
        body = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
        assert c.text == zephyr.decode(body, skip_special_tokens=True) and len(c.token_ids) <= 12
    # a stop string cuts the text before it
    letter = next(ch for ch in out[0].text if ch.isalpha())
    cut = generate(model, zephyr, prompts[:1], max_new_tokens=12, temperature=1.0, seed=5, stop=[letter])[0]
    assert cut.finish_reason == "stop_string" and letter not in cut.text
    assert out[0].text.startswith(cut.text)


def test_compiled_decode_step_traces_whole_and_matches_eager(models, monkeypatch):
    """compile=True runs the decode step through torch.compile(fullgraph=True): the model, sampling
    and bookkeeping must trace as one graph (no graph breaks). aot_eager keeps this cheap on CPU;
    Inductor/CUDA graphs are checked by the CUDA test below and the benchmark."""
    import importlib
    gen = importlib.import_module("minispin.sampler")  # the module even if minispin exports generate()
    model = models["hf-tiny-llama"]
    monkeypatch.setattr(gen, "_compiled_decode_one_token",
                        torch.compile(gen.decode_one_token, backend="aot_eager", fullgraph=True, dynamic=False))
    prompts = random_prompts([4, 7, 2], seed=7)
    kw = dict(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3, batch_size=2, stop_token_ids=[])
    assert [o.token_ids for o in generate_tokens(model, prompts, compile=True, **kw)] == \
        [o.token_ids for o in generate_tokens(model, prompts, **kw)]
    # every (slots, cache length, sampling setting) compiles one more version of the step; past dynamo's
    # recompile limit fullgraph=True fails hard, so the sampler must raise the limit while it calls the step
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    kw.update(batch_size=3, temperature=0.7)
    with config.patch(**{limit: 1}):  # (monkeypatch's undo would delete the key from dynamo's config)
        assert [o.token_ids for o in generate_tokens(model, prompts, compile=True, **kw)] == \
            [o.token_ids for o in generate_tokens(model, prompts, **kw)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager_on_cuda():
    """CUDA. The model on the GPU gives transformers' CPU fp32 logits (the fixture); the CUDA-graph decode
    gives the eager decode's tokens; the counter-based sampler noise equals the CPU's."""
    model = load_model(FIXTURES / "hf-tiny-mistral", dtype=torch.float32, device="cuda")
    e = load_file(str(FIXTURES / "hf-tiny-mistral" / "expected_logits.safetensors"))
    with torch.no_grad():
        logits = model(e["input_ids"].cuda(), e["attention_mask"].cuda(), e["position_ids"].cuda()).cpu()
    mask = e["attention_mask"].bool()
    assert (logits - e["logits"])[mask].abs().max().item() <= 1e-4
    prompts = random_prompts([5, 9, 3, 12, 1], seed=8)
    for kw in (dict(temperature=0), dict(temperature=0.8, top_p=0.9, seed=5)):
        kw.update(max_new_tokens=12, batch_size=3, stop_token_ids=[])
        eager = [o.token_ids for o in generate_tokens(model, prompts, **kw)]
        assert [o.token_ids for o in generate_tokens(model, prompts, compile=True, **kw)] == eager
    index, step = torch.arange(1000), torch.arange(1000) % 7
    assert torch.equal(counter_uniform(5, index.cuda(), step.cuda()).cpu(), counter_uniform(5, index, step))


def test_vocab_limit_never_samples_padded_embedding_rows(models):
    model = models["hf-tiny-llama"]
    prompts = random_prompts([3, 6, 4], seed=5)
    kw = dict(max_new_tokens=12, temperature=1.5, seed=7, stop_token_ids=[])
    unlimited = [t for o in generate_tokens(model, prompts, **kw) for t in o.token_ids]
    assert max(unlimited) >= 100  # the check below is not vacuous
    for greedy in (False, True):
        out = generate_tokens(model, prompts, vocab_limit=100, **{**kw, "temperature": 0.0 if greedy else 1.5})
        assert all(t < 100 for o in out for t in o.token_ids)


def test_refill_writes_the_decode_state_in_place(models):
    """A captured CUDA graph replays on fixed addresses: prefill into free slots (refill) and steps must
    update the sampler's state and cache tensors in place, never rebind or reallocate them."""
    import importlib
    gen = importlib.import_module("minispin.sampler")
    model = models["hf-tiny-llama"]

    def state(decoder):
        return decoder.state.tensors() + [decoder.cache.positions, *decoder.cache.k, *decoder.cache.v]

    with torch.inference_mode():
        sampling = gen.Sampling(temperature=0.9, top_p=0.9, top_k=0, vocab_limit=model.config.vocab_size)
        decoder = gen.Decoder(model, num_slots=3, max_len=64, max_new_tokens=5, stop_token_ids=[],
                              sampling=sampling, seed=1, compile=False)
        objects = state(decoder)
        addresses = [(t.data_ptr(), t.shape) for t in objects]
        decoder.prefill([0, 2], random_prompts([4, 6], seed=9), [0, 1], [0, 0])
        decoder.decode_n_tokens(1)
        decoder.prefill([1], random_prompts([9], seed=10), [2], [0])  # refill a free slot mid-run
        decoder.decode_n_tokens(1)
        assert all(a is b for a, b in zip(state(decoder), objects, strict=True))
        assert [(t.data_ptr(), t.shape) for t in objects] == addresses
        assert decoder.state.n_gen.tolist() == [3, 2, 3] and decoder.state.pos.tolist() == [6, 10, 8]
