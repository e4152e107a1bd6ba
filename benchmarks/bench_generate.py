"""Generation throughput: minispin's sampler vs Hugging Face `generate` on the same weights.

A randomly initialised Mistral-7B-shaped model (no download) is built with transformers; minispin's
Transformer shares its weight tensors (key mapping `our_key`), so both run the very same numbers.
Prompts of 256 random tokens, 256 new tokens (no early stop), greedy, batch 1/16/64/256. Prints one
JSON line per measurement: tokens/s of each, the speed-up, and at batch 1 the fraction of the memory
bandwidth roofline = (weight bytes read per step x decode tokens/s) / bandwidth of a large on-device
copy measured in the same run (bytes read + written per second).

  python benchmarks/bench_generate.py                 # CUDA, bf16, compile=True (CUDA graph)
  python benchmarks/bench_generate.py --smoke         # CPU, tiny model, seconds (a test runs this)
  python benchmarks/bench_generate.py --batching      # continuous batching vs static batches (CPU ok)
  python benchmarks/bench_generate.py --sampler       # the sampler alone, batch 64 x vocab 32000 (CUDA)
  python benchmarks/bench_generate.py --hf-compare DIR  # a real HF checkpoint folder on the CPU: minispin
      vs transformers generate, alpaca prompts, batch 1 and 32, greedy and top-p (`compare_with_hf`)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402
from minispin.sampler import generate_tokens  # noqa: E402
from minispin.model import ModelConfig, Transformer, our_key  # noqa: E402


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pair(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random transformers MistralForCausalLM and a minispin Transformer sharing its weight tensors."""
    import transformers

    hf_dict = config.to_hf()
    hf_dict.pop("architectures", None)
    hf_dict.pop("model_type", None)
    hf_dict.pop("torch_dtype", None)
    hf_config = transformers.MistralConfig(**hf_dict)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = transformers.MistralForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    hf = hf.to(dtype).eval()
    hf.generation_config.eos_token_id = None  # always generate exactly max_new_tokens
    hf.generation_config.pad_token_id = 0
    with torch.device("meta"):
        ours = Transformer(config)
    for name, param in hf.named_parameters():
        key = our_key(name)
        if key is None:
            continue
        module_name, _, leaf = key.rpartition(".")
        module = ours.get_submodule(module_name) if module_name else ours
        module._parameters[leaf] = torch.nn.Parameter(param.detach(), requires_grad=False)
    ours.tie_weights()
    ours.reset_buffers(device)
    ours.eval()
    return hf, ours


def check_same_logits(hf, ours, device: torch.device, vocab: int) -> float:
    ids = torch.randint(3, vocab, (2, 16), device=device)
    with torch.inference_mode():
        a = hf(ids).logits.float()
        b = ours(ids).float()
    return (a - b).abs().max().item() / max(a.abs().max().item(), 1e-6)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * src.numel() * src.element_size() * repeats / (time.perf_counter() - t)


def time_minispin(model, prompts, new_tokens, batch, compile, device):
    kw = dict(max_new_tokens=new_tokens, temperature=0.0, batch_size=batch, stop_token_ids=[], compile=compile)
    generate_tokens(model, prompts, **kw)  # warm-up: compiles / captures for these shapes
    sync(device)
    t = time.perf_counter()
    out = generate_tokens(model, prompts, **kw)
    sync(device)
    seconds = time.perf_counter() - t
    tokens = sum(len(o.token_ids) for o in out)
    # prefill + first token alone, to separate decode speed from prefill
    generate_tokens(model, prompts, **{**kw, "max_new_tokens": 1})
    sync(device)
    t = time.perf_counter()
    generate_tokens(model, prompts, **{**kw, "max_new_tokens": 1})
    sync(device)
    first = time.perf_counter() - t
    decode_tok_s = len(prompts) * (new_tokens - 1) / max(seconds - first, 1e-9)
    return tokens, seconds, first, decode_tok_s


def time_hf(hf, prompts, new_tokens, device):
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    kw = dict(do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=min(4, new_tokens), **kw)  # warm-up
        sync(device)
        t = time.perf_counter()
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, **kw)
        sync(device)
    seconds = time.perf_counter() - t
    return (out.shape[1] - ids.shape[1]) * ids.shape[0], seconds


def throughput(args) -> None:
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.smoke:
        config = ModelConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             torch_dtype="float32")
        dtype, prompt_len, new_tokens, batches, compile = torch.float32, 16, 16, [1, 4], False
    else:
        config = ModelConfig(num_hidden_layers=args.layers or 32, max_position_embeddings=4096,
                             torch_dtype="bfloat16")  # Mistral-7B's shape
        dtype, prompt_len, new_tokens = torch.bfloat16, args.prompt_len, args.new_tokens or 256
        batches = [int(b) for b in args.batches.split(",")]
        compile = not args.no_compile and device.type == "cuda"
    hf, ours = build_pair(config, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    # a decode step reads every weight once, except the embedding table (one row per token)
    bytes_per_step = weight_bytes - (0 if config.tie_word_embeddings else
                                     ours.embed_tokens.weight.numel() * ours.embed_tokens.weight.element_size())
    emit(bench="generate", device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
         torch=torch.__version__, params=sum(p.numel() for p in ours.parameters()), dtype=str(dtype),
         layers=config.num_hidden_layers, full_model_layers=None if args.smoke else 32,
         prompt_len=prompt_len, new_tokens=new_tokens, compile=compile,
         logits_rel_diff_vs_hf=round(check_same_logits(hf, ours, device, config.vocab_size), 5))
    bandwidth = copy_bandwidth(device, min(4 << 30, 4 * weight_bytes))
    emit(copy_bandwidth_GBs=round(bandwidth / 1e9, 1), weight_bytes_per_step=bytes_per_step)
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        prompts = torch.randint(3, config.vocab_size, (batch, prompt_len), generator=g).tolist()
        tokens, seconds, first, decode_tok_s = time_minispin(ours, prompts, new_tokens, batch, compile, device)
        row = dict(impl="minispin", batch=batch, tokens=tokens, seconds=round(seconds, 3),
                   tok_s=round(tokens / seconds, 1), prefill_first_token_s=round(first, 3),
                   decode_tok_s=round(decode_tok_s, 1))
        if batch == 1:
            row["roofline_fraction"] = round(decode_tok_s * bytes_per_step / bandwidth, 3)
        emit(**row)
        ours_tok_s = tokens / seconds
        if not args.no_hf:
            try:  # the baseline must not cost our rows: transformers' generate API and memory vary by version
                hf_tokens, hf_seconds = time_hf(hf, prompts, new_tokens, device)
            except Exception as err:  # noqa: BLE001
                emit(impl="hf", batch=batch, error=f"{type(err).__name__}: {err}"[:500])
            else:
                emit(impl="hf", batch=batch, tokens=hf_tokens, seconds=round(hf_seconds, 3),
                     tok_s=round(hf_tokens / hf_seconds, 1))
                emit(batch=batch, speedup_vs_hf=round(ours_tok_s / (hf_tokens / hf_seconds), 2))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def batching_study(args) -> None:
    """Continuous batching (refill free slots) vs static batches that wait for their longest row."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         torch_dtype="float32")
    with torch.device(device):
        model = Transformer(config).eval()
    model.reset_buffers(device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(8, 512, (int(n),), generator=g).tolist() for n in torch.randint(8, 40, (160,), generator=g)]
    # 8 stop ids out of 512 on a near-uniform random model: geometric lengths, mean ~64, capped at 128
    kw = dict(max_new_tokens=128, temperature=1.0, seed=0, batch_size=32, stop_token_ids=list(range(8)))
    results = {}
    for refill in (True, False) * args.repeats:  # alternate, keep the best time of each (noisy hosts)
        stats = {}
        sync(device)
        t = time.perf_counter()
        out = generate_tokens(model, prompts, refill=refill, stats=stats, **kw)
        sync(device)
        seconds = time.perf_counter() - t
        if refill not in results or seconds < results[refill][0]:
            results[refill] = (seconds, stats, [o.token_ids for o in out])
    (t_refill, s_refill, o_refill), (t_static, s_static, o_static) = results[True], results[False]
    assert o_refill == o_static  # same samples either way
    for name, t, s in (("continuous", t_refill, s_refill), ("static", t_static, s_static)):
        emit(batching=name, seconds=round(t, 3), tokens=s["tokens"], decode_row_steps=s["row_steps"],
             useful_fraction=round(s["tokens"] / s["row_steps"], 3), tok_s=round(s["tokens"] / t, 1))
    emit(batching_speedup=round(t_static / t_refill, 2),
         row_steps_ratio=round(s_static["row_steps"] / s_refill["row_steps"], 2))


# ----------------------------------------------------------------------------- a real model vs transformers

ALPACA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data" / "alpaca_en_demo.json"
SETTINGS = {"greedy": dict(temperature=0.0), "top_p": dict(temperature=0.7, top_p=0.9)}


def alpaca_prompts(n: int, path: Path = ALPACA) -> list[str]:
    """The first n instructions (with their input, if any) of the alpaca demo data."""
    rows = json.loads(Path(path).read_text())
    return [(r["instruction"] + "\n" + r.get("input", "")).strip() for r in rows[:n]]


def _run_minispin(model, ids: list[list[int]], new_tokens: int, setting: dict, vocab: int, seed: int) -> int:
    from minispin.sampler import generate_tokens
    out = generate_tokens(model, ids, max_new_tokens=new_tokens, batch_size=len(ids), stop_token_ids=[],
                          vocab_limit=vocab, seed=seed, **setting)
    assert all(len(o.token_ids) == new_tokens for o in out)
    return len(ids) * new_tokens


def _run_hf(hf, ids: list[list[int]], new_tokens: int, setting: dict, seed: int) -> int:
    import transformers
    width = max(len(p) for p in ids)
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in ids])  # left padding, masked
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    sample = setting["temperature"] > 0
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens, do_sample=sample, pad_token_id=0, eos_token_id=None,
        **(dict(temperature=setting["temperature"], top_p=setting["top_p"], top_k=0) if sample else {}))
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = hf.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
    assert out.shape == (len(ids), width + new_tokens), out.shape
    return len(ids) * new_tokens


def _ratios(values: list[float]) -> dict:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3),
            "max": round(max(values), 3)}


def compare_with_hf(model_dir: str | Path, prompts: Sequence[str], *, batches: Sequence[int] = (1, 32),
                    settings: Sequence[str] = ("greedy", "top_p"), new_tokens: int = 128, repeats: int = 3,
                    threads: int | None = 2, seed: int = 0) -> list[dict]:
    """minispin's sampler vs transformers' `generate` on one HF checkpoint folder, in one process.

    The prompts (chat template, encoded once by minispin's tokenizer) go to both as the same token ids;
    each prompt gets exactly `new_tokens` new tokens (no EOS stop on either side: equal work). Each
    repeat runs every (batch, setting) for both libraries back to back, alternating which goes first;
    ratios pair the two runs of one repeat. Returns (and prints) one JSON row per run and a summary row
    per (batch, setting) with tok/s medians and minispin / HF ratios (min / median / max), plus
    minispin's top-p / greedy ratio per batch."""
    import transformers

    from minispin import load_model
    from minispin.sampler import encode_prompt
    from minispin.tokenizer import load_tokenizer
    if threads:
        torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_dir)
    ours = load_model(model_dir, dtype=torch.float32).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    assert len(ids) >= max(batches), f"{len(ids)} prompts for batch {max(batches)}"
    run = {"minispin": lambda b, s, n: _run_minispin(ours, ids[:b], n, SETTINGS[s], len(tokenizer), seed),
           "hf": lambda b, s, n: _run_hf(hf, ids[:b], n, SETTINGS[s], seed)}
    for impl in run:  # warm-up: first-call costs (allocator, kernels, caches) out of the timings
        run[impl](min(batches), settings[-1], 4)
    times: dict[tuple, list[float]] = {}
    rows = []
    for r in range(repeats):
        for batch in batches:
            for setting in settings:
                for impl in (("minispin", "hf") if r % 2 == 0 else ("hf", "minispin")):
                    t = time.perf_counter()
                    tokens = run[impl](batch, setting, new_tokens)
                    seconds = time.perf_counter() - t
                    times.setdefault((impl, batch, setting), []).append(tokens / seconds)
                    rows.append(dict(compare="run", impl=impl, batch=batch, setting=setting, repeat=r,
                                     tokens=tokens, seconds=round(seconds, 2), tok_s=round(tokens / seconds, 1)))
                    emit(**rows[-1])
    for batch in batches:
        for setting in settings:
            ms, theirs = times[("minispin", batch, setting)], times[("hf", batch, setting)]
            rows.append(dict(compare="summary", batch=batch, setting=setting, new_tokens=new_tokens,
                             minispin_tok_s=round(statistics.median(ms), 1), hf_tok_s=round(statistics.median(theirs), 1),
                             minispin_over_hf=_ratios([a / b for a, b in zip(ms, theirs)])))
            emit(**rows[-1])
        if "greedy" in settings and "top_p" in settings:
            rows.append(dict(compare="summary", batch=batch, minispin_top_p_over_greedy=_ratios(
                [a / b for a, b in zip(times[("minispin", batch, "top_p")], times[("minispin", batch, "greedy")])])))
            emit(**rows[-1])
    return rows


# ----------------------------------------------------------------------------- the sampler alone

def sampler_timing(args) -> None:
    """The sampler alone on [batch, vocab] logits (7B shape: batch 64, vocab 32000): sample_from_logits
    (candidate sets; the full sort only where they cannot settle a row) vs sample_from_logits_reference
    (a full sort of every row), eager, and on CUDA also compiled into CUDA graphs (mode reduce-overhead)
    as the decode step runs it."""
    import importlib

    from minispin.sampler import counter_uniform, sample_from_logits, sample_from_logits_reference
    sampler = importlib.import_module("minispin.sampler")  # the module (minispin exports generate())
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    batch, vocab = (8, 4000) if args.smoke else (64, 32000)
    g = torch.Generator().manual_seed(0)
    # Zipf-like rows, token of rank r at -s log(1 + r) with s from 0.8 (flat: the sort) to 2.5 (peaked)
    rank = torch.rand(batch, vocab, generator=g).argsort(-1).float()
    logits = (-torch.linspace(0.8, 2.5, batch)[:, None] * torch.log1p(rank)).to(device)
    u = counter_uniform(0, torch.arange(batch, device=device))
    warmup, repeats = (1, 3) if args.smoke else (5, 50)
    for setting, kw in {"top_p": dict(temperature=0.7, top_p=0.9),
                        "top_k_top_p": dict(temperature=0.7, top_k=50, top_p=0.9)}.items():
        want = sample_from_logits_reference(logits, u, **kw)
        sizes = [kw["top_k"]] if kw.get("top_k") else [c for c in sampler.CANDIDATE_SIZES if c < vocab]
        settled = sampler._sample_candidates(logits.float() / kw["temperature"], u, kw["top_p"], kw.get("top_k", 0),
                                             sizes[-1])[1].float().mean().item()
        impls = {"full_sort": lambda: sample_from_logits_reference(logits, u, **kw),
                 "candidates": lambda: sample_from_logits(logits, u, **kw)}
        if device.type == "cuda":
            impls["full_sort_compiled"] = torch.compile(lambda: sample_from_logits_reference(logits, u, **kw),
                                                        mode="reduce-overhead", fullgraph=True)
            impls["candidates_compiled"] = torch.compile(lambda: sample_from_logits(logits, u, **kw),
                                                         mode="reduce-overhead", fullgraph=True)
        for impl, fn in impls.items():
            timing = common.time_fn(fn, device, warmup, repeats)
            emit(sampler=impl, setting=setting, batch=batch, vocab=vocab, device=str(device), ms=round(timing["ms"], 3),
                 ms_min=round(timing["ms_min"], 3), settled_by_candidates=round(settled, 3),
                 same_tokens_as_full_sort=bool(torch.equal(fn().clone(), want)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, tiny sizes (seconds)")
    parser.add_argument("--batching", action="store_true", help="continuous vs static batching study")
    parser.add_argument("--sampler", action="store_true", help="the sampler alone: candidate sets vs full sort")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 (--hf-compare: 128)")
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="--batching / --hf-compare: runs of each")
    parser.add_argument("--hf-compare", metavar="MODEL_DIR", default=None,
                        help="a real HF checkpoint folder: minispin vs transformers generate on alpaca prompts, "
                             "batch 1 and 32, greedy and top-p (T 0.7, top-p 0.9), on the CPU")
    parser.add_argument("--threads", type=int, default=2, help="--hf-compare: torch CPU threads")
    args = parser.parse_args()
    if args.hf_compare:
        compare_with_hf(args.hf_compare, alpaca_prompts(32), new_tokens=args.new_tokens or 128, repeats=args.repeats,
                        threads=args.threads)
    elif args.sampler:
        sampler_timing(args)
    elif args.batching:
        batching_study(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
