"""Pairs -> token ids -> packed micro-batches for one concatenated forward pass.

A `Pair` is one training example: a prompt (messages), the chosen answer (SPIN: the real one), the
rejected answer (SPIN: the model's own; None for continued SFT), and optional per-pair extras
(label smoothing, SPPO targets, precomputed reference log-probs).

Tokenization (`tokenize_answers`, the ONE place an answer becomes training ids - SFT, SPIN, DPO, judge,
noise, adaptive, SPPO and `minispin.heldout` all use it):
- an answer whose sampled token ids came with it (`Pair.chosen_ids` / `Pair.rejected_ids`, stored by the
  generation job as "generated_ids") is trained on exactly those ids, after the generation prompt
  `minispin.sampler.encode_prompt` (the ids the sampler was fed). Re-encoding the decoded text would
  not give them back in general (decode -> encode does not round-trip);
- an answer known only as text (the real answer, preference data, rows from older versions) is
  tokenized IN CONTEXT: the conversation prompt + answer is rendered with the template once (the
  tokenizer's Jinja chat template, the "spin" one or a Jinja string) and encoded once, and the answer
  is the slice after the rendered prompt - the ids SFT on that template trains, not encode(answer) on
  its own (which would start with a "▁" the model never sees after "<|assistant|>\n").
  Boundary: the prompt's encoding must be a prefix of the joint encoding. When the prompt's last
  token(s) merge with the answer's first (the "spin" template ends in a space: ":", "▁" + "Hello" ->
  ":", "▁Hello"), the boundary is the longest common prefix, and that row's prompt is the joint
  encoding up to it (so that prompt + answer is exactly the joint encoding; the pair's other row may
  then have a prompt one token longer, `TokenizedPair.rejected_prompt_ids`).
  End of turn: the answer keeps the template's end-of-turn token (the last EOS / stop id in the slice,
  zephyr's "</s>") and drops what the template writes after it (zephyr's "\n" between turns); a
  template without one (the "spin" template) gets EOS appended - the token a sampled answer ends with.
Truncation (the paper's, as the public SPIN/TRL collator): if prompt + longer answer exceeds
`max_length`, the prompt is cut to its last `max_prompt_length` tokens (keeping a leading BOS); if
still too long, both answers are cut to `max_length - max_prompt_length` tokens.

A micro-batch holds P pairs as 2P rows, chosen_0..chosen_{P-1} then rejected_0..rejected_{P-1}, packed end
to end in one sequence with no padding (`minispin.model.PackedRows`): each pair is its prompt and chosen
answer, then the rejected answer, which attends to the prompt where it lies instead of repeating it. On
the peer benchmark's 64 alpaca pairs (micro-batches of 4) that runs 44% fewer tokens through the decoder
than length-grouped right-padded rows did (15,328 vs 27,512: a third were padding, and a sixth of the
rest a second copy of a prompt). Instead of [2P, T] labels the loss gets a flat
list of the response tokens only: `token_index` (the packed position whose hidden state predicts the
token), `labels` (the token) and `seq_index` (its row), so the LM head (the fused `linear_logprobs`
kernel) only ever touches response tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .data import DataError
from .model import Block, PackedRows
from .sampler import encode_prompt, truncate_prompt


@dataclass
class Pair:
    """One training pair. index: its position in the iteration's pair list (the key of reference
    log-probs). rejected None = continued SFT (only the chosen/real answer is used). chosen_ids /
    rejected_ids: the answer's token ids as sampled (a generated answer: the ids the model produced,
    ending with its stop token), used as they are; None = tokenize the text in context."""
    index: int
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str | None = None
    label_smoothing: float | None = None
    targets: tuple[float, float] | None = None  # SPPO: (target for chosen, target for rejected)
    ref_chosen: float | None = None  # summed reference log-prob of the chosen answer
    ref_rejected: float | None = None
    source: str = ""  # where the pair came from (e.g. "iter0", "iter1"), for logs
    extra: dict[str, Any] = field(default_factory=dict)
    chosen_ids: list[int] | None = None
    rejected_ids: list[int] | None = None


@dataclass
class TokenizedPair:
    """Token ids of a pair after truncation; answers end with their end of turn unless cut by truncation
    (or sampled without one). rejected_prompt_ids: the rejected row's prompt when it differs from the
    chosen row's (a merged boundary, see the module doc); None = prompt_ids."""
    index: int
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int] | None
    rejected_prompt_ids: list[int] | None = None

    @property
    def rows(self) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, answer ids) of the chosen row and, if any, the rejected row."""
        rows = [(self.prompt_ids, self.chosen_ids)]
        if self.rejected_ids is not None:
            rows.append((self.rejected_prompt_ids if self.rejected_prompt_ids is not None else self.prompt_ids,
                         self.rejected_ids))
        return rows

    @property
    def length(self) -> int:
        """Length of the longer of the two rows (the step planner groups pairs by it: ranks get similar work)."""
        return max(len(p) + len(a) for p, a in self.rows)


@dataclass
class TruncationReport:
    """How many pairs `tokenize_pairs` cut: prompts cut to max_prompt_length, answers cut to
    max_length - max_prompt_length (a pair may count in both)."""
    pairs: int = 0
    prompts_cut: int = 0
    answers_cut: int = 0
    pairs_cut: int = 0  # pairs with any cut

    def describe(self, max_length: int, max_prompt_length: int) -> str:
        return (f"{self.pairs_cut} of {self.pairs} pairs truncated at max_length {max_length} "
                f"({self.prompts_cut} prompts cut to max_prompt_length {max_prompt_length}, "
                f"{self.answers_cut} pairs' answers cut to {max_length - max_prompt_length} tokens)")


def truncate(prompt_ids: list[int], answers: list[list[int]], max_length: int, max_prompt_length: int,
             bos_id: int | None = None) -> tuple[list[int], list[list[int]]]:
    """The paper's truncation: keep the prompt's END (and a leading BOS), then cut answers if needed."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be smaller than max_length ({max_length})")
    longer = max(len(a) for a in answers)
    if len(prompt_ids) + longer > max_length:
        prompt_ids = truncate_prompt(prompt_ids, max_prompt_length, bos_id)
    if len(prompt_ids) + longer > max_length:
        keep = max_length - max_prompt_length
        answers = [a[:keep] for a in answers]
    return prompt_ids, answers


def _stop_ids(tokenizer: Any) -> set[int]:
    """Ids that end an assistant turn: EOS plus the tokenizer's stop ids (generation_config.json)."""
    ids = set(getattr(tokenizer, "stop_ids", None) or [])
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    return ids


def _check_spelling(tokenizer: Any, ids: Sequence[int], text: str, stop: set[int]) -> None:
    """Given answer ids must spell the answer's text (minus a final stop token): catches rows whose text
    was edited after generation, which would otherwise train on an answer nobody sees."""
    body = list(ids[:-1]) if ids and ids[-1] in stop else list(ids)
    if tokenizer.decode(body, skip_special_tokens=True) != text and \
            tokenizer.decode(body, skip_special_tokens=False) != text:
        raise ValueError(f"the answer's token ids decode to {tokenizer.decode(body)[:60]!r}, not to its text "
                         f"{text[:60]!r} (text edited after generation? drop the ids column to re-encode the text)")


def tokenize_answers(tokenizer: Any, prompt: list[dict[str, str]],
                     answers: Sequence[tuple[str, Sequence[int] | None]], template: str | None = None
                     ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each (text, sampled ids or None) answer to one prompt, untruncated: the
    sampled ids after the generation prompt, or the text's slice of the jointly encoded conversation
    (see the module doc). The prompt is rendered and encoded once for all answers."""
    eos = tokenizer.eos_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; answers need one to end")
    stop = _stop_ids(tokenizer)
    gen_prompt = encode_prompt(tokenizer, prompt, template)
    prompt_text = raw_prompt = lead = None
    out = []
    for text, ids in answers:
        if ids is not None:
            _check_spelling(tokenizer, ids, text, stop)
            out.append((gen_prompt, [int(t) for t in ids]))
            continue
        if prompt_text is None:
            prompt_text = tokenizer.render_prompt(prompt, template)
            raw_prompt = list(tokenizer.encode(prompt_text, add_special_tokens=False))
            # what encode_prompt adds in front of the rendered text (the "spin" template's BOS)
            lead = gen_prompt[: len(gen_prompt) - len(raw_prompt)]
            assert lead + raw_prompt == gen_prompt, "encode_prompt must be (lead tokens) + encode(rendered prompt)"
        full_text = tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": text}],
                                                  template=template)
        if not full_text.startswith(prompt_text):
            raise ValueError(f"the template {template or 'chat'!r} renders the conversation with its answer so that "
                             "it does not start with the rendered prompt; cannot tell where the answer begins")
        joint = list(tokenizer.encode(full_text, add_special_tokens=False))
        k = len(raw_prompt)
        if joint[:k] != raw_prompt:  # the prompt's last token(s) merge with the answer's first
            k = next((i for i, (a, b) in enumerate(zip(raw_prompt, joint)) if a != b), min(k, len(joint)))
        answer = joint[k:]
        ends = [j for j, t in enumerate(answer) if t in stop]
        # keep the end of turn and drop the separator after it; no end of turn in the template: append EOS
        answer = answer[: ends[-1] + 1] if ends else answer + [eos]
        out.append((gen_prompt if k == len(raw_prompt) else lead + joint[:k], answer))
    return out


def tokenize_answer(tokenizer: Any, prompt: list[dict[str, str]], answer: str, template: str | None = None,
                    *, answer_ids: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """`tokenize_answers` for one answer: (prompt ids, answer ids)."""
    return tokenize_answers(tokenizer, prompt, [(answer, answer_ids)], template)[0]


def tokenize_pairs(pairs: Sequence[Pair], tokenizer: Any, *, template: str | None = None,
                   max_length: int = 1024, max_prompt_length: int = 512,
                   vocab_size: int | None = None, report: TruncationReport | None = None) -> list[TokenizedPair]:
    """Tokenize (`tokenize_answer`) and truncate every pair (see the module doc). vocab_size: refuse token
    ids the model cannot embed, naming the pair (a tokenizer/model mismatch would otherwise fail deep
    inside a kernel). report: filled with how many prompts / answers were cut."""
    bos = getattr(tokenizer, "bos_id", None)
    out = []
    for pair in pairs:
        sides = [(pair.chosen, pair.chosen_ids)]
        if pair.rejected is not None:
            sides.append((pair.rejected, pair.rejected_ids))
        try:
            rows = tokenize_answers(tokenizer, pair.prompt, sides, template)
        except ValueError as err:
            raise DataError(str(err), source=pair.source, index=pair.index) from None
        if not rows[0][0]:
            raise DataError("the prompt encodes to no tokens", source=pair.source, index=pair.index)
        answers = [a for _, a in rows]
        cut = [truncate(p, answers, max_length, max_prompt_length, bos) for p, _ in rows]
        if report is not None:
            p_cut = any(len(c[0]) < len(p) for c, (p, _) in zip(cut, rows))
            a_cut = any(c[1] != answers for c in cut)
            report.pairs += 1
            report.prompts_cut += p_cut
            report.answers_cut += a_cut
            report.pairs_cut += p_cut or a_cut
        prompts = [c[0] for c in cut]
        rejected_prompt = prompts[1] if len(rows) > 1 and prompts[1] != prompts[0] else None
        tp = TokenizedPair(pair.index, prompts[0], cut[0][1][0], cut[1][1][1] if len(rows) > 1 else None,
                           rejected_prompt)
        if vocab_size is not None:
            for name, ids in (("prompt", tp.prompt_ids), ("chosen", tp.chosen_ids), ("rejected", tp.rejected_ids),
                              ("rejected prompt", tp.rejected_prompt_ids)):
                if ids and (max(ids) >= vocab_size or min(ids) < 0):
                    raise DataError(f"{name} has token id {max(ids)} outside the model's vocabulary of {vocab_size} "
                                    "(tokenizer and model do not match)", source=pair.source, index=pair.index)
        out.append(tp)
    return out


@dataclass
class PairBatch:
    """One packed micro-batch (see module doc): rows 0..P-1 chosen, P..2P-1 rejected (SFT: P rows), packed
    end to end in one sequence as `packed` describes. The training step uses the flat token_index / labels /
    seq_index (no [rows, T] label tensor)."""
    input_ids: torch.Tensor  # [1, N] int64, no padding
    position_ids: torch.Tensor  # [1, N] int64: each token's position in its row
    packed: PackedRows
    token_index: torch.Tensor  # [N'] int64: the packed position whose hidden state predicts the token
    labels: torch.Tensor  # [N'] int64
    seq_index: torch.Tensor  # [N'] int64: the token's row in [0, num_rows)
    pair_index: list[int]  # Pair.index of each pair
    num_pairs: int  # P
    num_rows: int  # 2P (SFT: P)
    num_tokens: int  # tokens of the rows, prompt + answer (shared tokens count in each row; for tokens/s)
    ref_logps: torch.Tensor | None = None  # [2P] fp32: ref chosen then ref rejected
    label_smoothing: torch.Tensor | None = None  # [P] fp32
    targets: torch.Tensor | None = None  # [2P] fp32 (SPPO)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PairBatch":
        def move(t):
            return t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t
        return PairBatch(**{k: move(v) for k, v in self.__dict__.items()})

    def pin_memory(self) -> "PairBatch":
        return PairBatch(**{k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                            for k, v in self.__dict__.items()})


def _shared_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two rows have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def collate_pairs(tokenized: Sequence[TokenizedPair], *, sft: bool = False, share_prefix: bool = True,
                  pairs: Sequence[Pair] | None = None,
                  ref_logps: dict[int, tuple[float, float]] | None = None) -> PairBatch:
    """Pack tokenized pairs into a PairBatch. sft=True packs only the chosen rows.

    share_prefix: a pair's rejected row reuses the leading tokens it has in common with the chosen row (its
    prompt, bar a token merged into the answer), so they run once: the same log-probs for less work (a third
    of the peer benchmark's tokens are prompt). False gives every row tokens of its own (NEFTune draws each
    row's noise apart).
    pairs: the Pair objects (same order) for label_smoothing/targets; ref_logps: {pair index: (chosen,
    rejected)} summed reference log-probs.
    """
    if not tokenized:
        raise ValueError("collate_pairs: empty micro-batch")
    if not sft and any(t.rejected_ids is None for t in tokenized):
        raise ValueError("collate_pairs: a pair without a rejected answer in a pairwise batch")
    P = len(tokenized)
    rows_of_pair = [[p + a for p, a in t.rows[: 1 if sft else 2]] for t in tokenized]  # each row's ids
    R = P if sft else 2 * P
    ids, positions, blocks = [], [], []
    token_index, flat_labels, seq_index = [], [], []
    num_tokens = 0
    for j, (t, pair_rows) in enumerate(zip(tokenized, rows_of_pair)):
        start = len(ids)  # where the pair's chosen row, and with it any shared prefix, begins
        for side, row in enumerate(pair_rows):
            shared = _shared_length(pair_rows[0], row) if side and share_prefix else 0
            own_start = len(ids)  # where this row's own tokens (after the shared prefix) begin
            ids.extend(row[shared:])
            positions.extend(range(shared, len(row)))
            if len(row) > shared:
                key_start = start if shared else own_start
                blocks.append(Block(own_start, len(ids), key_start, key_start + shared))
            first = max(len(t.rows[side][0]), 1)  # the answer's first token; position 0 has no predecessor
            # the packed position of the hidden state at each row position i that predicts a label
            token_index.extend(start + i if i < shared else own_start + i - shared for i in range(first - 1, len(row) - 1))
            flat_labels.extend(row[first:])
            seq_index.extend([j + side * P] * (len(row) - first))
            num_tokens += len(row)
    batch = PairBatch(
        input_ids=torch.tensor([ids], dtype=torch.int64),
        position_ids=torch.tensor([positions], dtype=torch.int64),
        packed=PackedRows(tuple(blocks)),
        token_index=torch.tensor(token_index, dtype=torch.int64),
        labels=torch.tensor(flat_labels, dtype=torch.int64),
        seq_index=torch.tensor(seq_index, dtype=torch.int64),
        pair_index=[t.index for t in tokenized], num_pairs=P, num_rows=R, num_tokens=num_tokens)
    if ref_logps is not None and not sft:
        try:
            ref = [ref_logps[t.index] for t in tokenized]
        except KeyError as e:
            raise KeyError(f"no reference log-probs for pair {e.args[0]}") from None
        batch.ref_logps = torch.tensor([c for c, _ in ref] + [r for _, r in ref], dtype=torch.float32)
    if pairs is not None:
        if any(p.label_smoothing is not None for p in pairs):
            batch.label_smoothing = torch.tensor([p.label_smoothing or 0.0 for p in pairs], dtype=torch.float32)
        if any(p.targets is not None for p in pairs):
            missing = [p.index for p in pairs if p.targets is None]
            if missing:
                raise ValueError(f"pairs {missing[:5]} have no SPPO targets while others in the batch do")
            batch.targets = torch.tensor([p.targets[0] for p in pairs] + [p.targets[1] for p in pairs],
                                         dtype=torch.float32)
    return batch


# ----------------------------------------------------------------------------- batching schedule

def epoch_permutation(num_items: int, seed: int, epoch: int) -> list[int]:
    """A seeded random order of 0..num_items-1, different per epoch, identical on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=g).tolist()


def split_step(items: Sequence[int], lengths: Sequence[int], micro_batch_size: int,
               world_size: int) -> list[list[list[int]]]:
    """Split one optimizer step's items among ranks as length-grouped micro-batches.

    Items are sorted by length (longest first) and cut into world_size * k consecutive micro-batches
    of near-equal size (k = ceil(n / (world_size * micro_batch_size))); micro-batch j goes to rank
    j % world_size. Every rank gets exactly k micro-batches (so FSDP collectives match); when there
    are fewer items than slots some micro-batches are empty (the caller runs them as zero-weight dummies).
    Returns [rank][micro][item].
    """
    n = len(items)
    if n == 0:
        return [[] for _ in range(world_size)]
    k = math.ceil(n / (world_size * micro_batch_size))
    slots = world_size * k
    ordered = sorted(items, key=lambda i: -lengths[i])  # stable: ties keep the step's order
    sizes = [n // slots + (1 if j < n % slots else 0) for j in range(slots)]
    plan: list[list[list[int]]] = [[] for _ in range(world_size)]
    start = 0
    for j, size in enumerate(sizes):
        plan[j % world_size].append(list(ordered[start: start + size]))
        start += size
    return plan


def plan_steps(order: Sequence[int], lengths: Sequence[int], global_batch_size: int, micro_batch_size: int,
               world_size: int) -> list[list[list[list[int]]]]:
    """Cut a data order into optimizer steps of `global_batch_size` items (the last may be smaller),
    each split among ranks by `split_step`. Returns [step][rank][micro][item]."""
    return [split_step(order[s: s + global_batch_size], lengths, micro_batch_size, world_size)
            for s in range(0, len(order), global_batch_size)]
