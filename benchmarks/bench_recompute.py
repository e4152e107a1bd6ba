"""Decoder forward + backward time with activations kept, recomputed (the default) or fully checkpointed.

SmolLM2-135M's layer shapes (hidden 576, 9 heads, 3 kv heads, MLP 1536), 8 rows x 384 tokens, random
weights, fp32 on the CPU; the loss is a random projection of the final hidden states, so only the decoder
is timed (the LM head is the same in all three). The modes alternate within one process; each mode's
median and the per-repeat ratios to "keep" (min / median / max) are printed as JSON lines.

    python benchmarks/bench_recompute.py                        # 4 layers, 6 repeats
    python benchmarks/bench_recompute.py --layers 30 --repeats 3
    python benchmarks/bench_recompute.py --smoke                # 1 tiny layer, seconds
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minispin.model import ModelConfig, Transformer  # noqa: E402
from minispin.training import apply_activation_checkpointing  # noqa: E402


def build(layers: int, smoke: bool) -> Transformer:
    width = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4, num_key_value_heads=2) if smoke else \
        dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)
    cfg = ModelConfig(vocab_size=49152, num_hidden_layers=layers, rope_theta=1e5, torch_dtype="float32",
                      architecture="LlamaForCausalLM", tie_word_embeddings=True, **width)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    model.embed_tokens.weight.requires_grad_(False)  # time the decoder, not the embedding's dense gradient
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=384)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.repeats, args.rows, args.tokens = 1, 2, 2, 32
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.smoke)
    checkpointed = copy.deepcopy(model)
    apply_activation_checkpointing(checkpointed)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (args.rows, args.tokens), generator=g)
    weight = torch.randn(args.rows, args.tokens, model.config.hidden_size, generator=g)

    def step(m: Transformer, recompute: bool) -> float:
        for layer in m.layers:
            layer.recompute_activations = recompute and m is model
        start = time.perf_counter()
        (m.hidden_states(ids) * weight).sum().backward()
        m.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    modes = {"keep": lambda: step(model, False), "recompute": lambda: step(model, True),
             "checkpoint": lambda: step(checkpointed, False)}
    for run in modes.values():  # warm-up
        run()
    times = {name: [] for name in modes}
    for rep in range(args.repeats):
        for name in (list(modes) if rep % 2 == 0 else list(modes)[::-1]):
            times[name].append(modes[name]())
    for name, ts in times.items():
        ratios = sorted(t / k for t, k in zip(ts, times["keep"]))
        print(json.dumps({"mode": name, "layers": args.layers, "tokens": args.rows * args.tokens,
                          "threads": args.threads, "median_s": statistics.median(ts), "min_s": min(ts),
                          "ratio_to_keep": [ratios[0], statistics.median(ratios), ratios[-1]]}), flush=True)


if __name__ == "__main__":
    main()
