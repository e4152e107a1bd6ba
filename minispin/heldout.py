"""Held-out evaluation of a chat model on data with checkable answers: exact match and answer log-prob.

- `exact_match`: greedy generation (temperature 0, through `minispin.generate`) of every prompt; a
  prediction counts when its text, stripped of surrounding whitespace, equals the stripped real answer
  (or when `check(example, text)` says so, for tasks with several right spellings).
- `mean_logprob`: the mean over examples of log p(real answer + end of turn | prompt), the SUMMED
  log-prob of the answer's tokens and its closing EOS (the template's end of turn) - the quantity
  SPIN's loss moves (REFERENCE.md §1). Summed rather than per token so that it reads as
  "log-probability of producing exactly this answer"; `answer_logprobs` also returns the token counts for a per-token mean.

Prompts are encoded by `minispin.sampler.encode_prompt` (greedy answers) and real answers by
`minispin.collate.tokenize_answers` (the answer's slice of the jointly encoded conversation, with its
end of turn) - the same token ids the generation job and the training loop use, with the same template.
`exact_match_per_question` gives the per-question correctness that `minispin.stats` needs for
intervals and paired differences between stages.
Distributed runs may split the examples over ranks (`distributed=True`, call on every rank); otherwise
any one process can evaluate alone (the eval sets this is meant for are small).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from . import distributed as dist
from .collate import tokenize_answers
from .sampler import completion_text, encode_prompt, generate_tokens, tokenizer_stop_ids, truncate_prompt
from .tokenizer import check_tokenizer_fits

__all__ = ["exact_match", "exact_match_per_question", "mean_logprob", "greedy_answers", "answer_logprobs",
           "example_parts"]


def example_parts(example: Any) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, real answer) of an `Example`, a {"prompt", "real"} dict, a UltraChat-style
    {"messages": [user, assistant]} dict or a (prompt, answer) tuple (a str prompt is one user turn)."""
    if isinstance(example, tuple) and len(example) == 2:
        prompt, real = example
    elif isinstance(example, dict):
        if "real" in example:
            prompt, real = example["prompt"], example["real"]
        elif "messages" in example:
            msgs = example["messages"]
            if not msgs or msgs[-1].get("role") != "assistant":
                raise ValueError(f"evaluate: example {example!r} has no final assistant message")
            prompt, real = msgs[:-1], msgs[-1]["content"]
        else:
            raise ValueError(f"evaluate: example dict needs 'prompt' and 'real' (or 'messages'), got keys {sorted(example)}")
    else:
        prompt, real = getattr(example, "prompt", None), getattr(example, "real", None)
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not isinstance(real, str):
        raise ValueError(f"evaluate: cannot read a prompt (messages) and a real answer (str) from {example!r}")
    return prompt, real


def _shard(n: int, distributed: bool) -> list[int]:
    """Positions this rank evaluates: all of them, or every world-th one under `distributed`."""
    if not distributed:
        return list(range(n))
    return list(range(dist.get_rank(), n, dist.get_world_size()))


def _gather(local: dict[int, Any], distributed: bool, n: int) -> list[Any]:
    """Per-position results from every rank, in position order."""
    merged: dict[int, Any] = dict(local)
    if distributed and dist.get_world_size() > 1:
        merged = {}
        for part in dist.all_gather_json([[i, v] for i, v in local.items()]):
            merged.update({int(i): v for i, v in part})
    return [merged[i] for i in range(n)]


@torch.no_grad()
def greedy_answers(model: Any, tokenizer: Any, examples: Sequence[Any], template: str | None = None,
                   max_new_tokens: int | None = None, batch_size: int = 64, *, distributed: bool = False,
                   max_prompt_length: int | None = None) -> list[str]:
    """The greedy (temperature 0) answer text of every example, without the stop token, not stripped.

    max_new_tokens None: the longest real answer in tokens + 8 (room to be wrong, and a correct answer
    must have stopped by then)."""
    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    parts = [example_parts(e) for e in examples]
    mine = _shard(len(parts), distributed)
    if max_new_tokens is None:
        longest = max((len(tokenizer.encode(real, add_special_tokens=False)) for _, real in parts), default=0)
        max_new_tokens = longest + 8
    prompts = [encode_prompt(tokenizer, parts[i][0], template, max_prompt_length) for i in mine]
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        seqs = generate_tokens(model, prompts, max_new_tokens=max_new_tokens, temperature=0.0,
                               batch_size=batch_size, stop_token_ids=tokenizer_stop_ids(model, tokenizer),
                               indices=mine) if prompts else []
    finally:
        model.train(was_training)
    local = {i: completion_text(seq, decode) for i, seq in zip(mine, seqs)}
    return _gather(local, distributed, len(parts))


def exact_match_per_question(model: Any, tokenizer: Any, examples: Sequence[Any], template: str | None = None,
                             max_new_tokens: int | None = None, batch_size: int = 64, *,
                             check: Callable[[Any, str], bool] | None = None, distributed: bool = False,
                             max_prompt_length: int | None = None) -> list[bool]:
    """Per example (in order): is the greedy answer right? (stripped texts equal, or check(example, text)).
    The input of `minispin.stats.wilson_interval` and of `paired_bootstrap` between two stages."""
    if not examples:
        raise ValueError("exact_match: no examples")
    answers = greedy_answers(model, tokenizer, examples, template, max_new_tokens, batch_size,
                             distributed=distributed, max_prompt_length=max_prompt_length)
    if check is None:
        return [text.strip() == example_parts(e)[1].strip() for e, text in zip(examples, answers)]
    return [bool(check(e, text)) for e, text in zip(examples, answers)]


def exact_match(model: Any, tokenizer: Any, examples: Sequence[Any], template: str | None = None,
                max_new_tokens: int | None = None, batch_size: int = 64, *,
                check: Callable[[Any, str], bool] | None = None, distributed: bool = False,
                max_prompt_length: int | None = None) -> float:
    """Fraction of examples whose greedy answer equals the real answer (both stripped), in [0, 1].

    check(example, generated_text) -> bool replaces the string comparison when given."""
    hits = exact_match_per_question(model, tokenizer, examples, template, max_new_tokens, batch_size, check=check,
                                    distributed=distributed, max_prompt_length=max_prompt_length)
    return sum(hits) / len(hits)


@torch.no_grad()
def answer_logprobs(model: Any, tokenizer: Any, examples: Sequence[Any], template: str | None = None,
                    batch_size: int = 32, *, distributed: bool = False,
                    max_prompt_length: int | None = None) -> list[tuple[float, int]]:
    """(summed log-prob, token count) of every example's real answer + its end of turn given its prompt,
    tokenized as training tokenizes it (`tokenize_answers`).

    Right-padded batches through `model.hidden_states` (causal attention: right padding never touches
    real tokens), then the LM head only at answer positions via `minispin.kernels.linear_logprobs`
    (Triton on CUDA, chunked fp32 torch on CPU; never the full [tokens, vocab] logits)."""
    from minispin.kernels import linear_logprobs

    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError("answer_logprobs: the tokenizer has no EOS token")
    parts = [example_parts(e) for e in examples]
    mine = _shard(len(parts), distributed)
    rows = []
    for i in mine:
        prompt, real = parts[i]
        [(p, a)] = tokenize_answers(tokenizer, prompt, [(real, None)], template)
        rows.append((i, truncate_prompt(p, max_prompt_length, getattr(tokenizer, "bos_id", None)), a))
    device = model.embed_tokens.weight.device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else eos
    was_training = model.training
    model.eval()
    local: dict[int, tuple[float, int]] = {}
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            T = max(len(p) + len(a) for _, p, a in chunk)
            ids = torch.full((len(chunk), T), pad, dtype=torch.long)
            where, labels, owner = [], [], []
            for r, (_, p, a) in enumerate(chunk):
                ids[r, : len(p) + len(a)] = torch.tensor(p + a)
                where.extend(r * T + len(p) - 1 + k for k in range(len(a)))  # the state that predicts a[k]
                labels.extend(a)
                owner.extend([r] * len(a))
            hidden = model.hidden_states(ids.to(device)).flatten(0, 1)
            hidden = hidden.index_select(0, torch.tensor(where, device=device))
            weight = model.output_weight
            token_logps = linear_logprobs(hidden, weight.to(hidden.dtype), torch.tensor(labels, device=device))
            sums = torch.zeros(len(chunk), dtype=torch.float64, device=device)
            sums.index_add_(0, torch.tensor(owner, device=device), token_logps.double())
            for r, (i, _, a) in enumerate(chunk):
                local[i] = (float(sums[r]), len(a))
    finally:
        model.train(was_training)
    return [tuple(v) for v in _gather(local, distributed, len(parts))]


def mean_logprob(model: Any, tokenizer: Any, examples: Sequence[Any], template: str | None = None,
                 batch_size: int = 32, *, per_token: bool = False, distributed: bool = False,
                 max_prompt_length: int | None = None) -> float:
    """Mean over examples of the summed log-prob of the real answer + end of turn (per_token=True: total
    log-prob / total answer tokens instead)."""
    if not examples:
        raise ValueError("mean_logprob: no examples")
    values = answer_logprobs(model, tokenizer, examples, template, batch_size, distributed=distributed,
                             max_prompt_length=max_prompt_length)
    if per_token:
        return sum(v for v, _ in values) / sum(n for _, n in values)
    return sum(v for v, _ in values) / len(values)
