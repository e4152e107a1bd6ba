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
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
        dtype, prompt_len, new_tokens = torch.bfloat16, args.prompt_len, args.new_tokens
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU, tiny sizes (seconds)")
    parser.add_argument("--batching", action="store_true", help="continuous vs static batching study")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="--batching: best of this many runs")
    args = parser.parse_args()
    if args.batching:
        batching_study(args)
    else:
        throughput(args)


if __name__ == "__main__":
    main()
