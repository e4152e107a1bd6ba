"""Token-exact pairs (CPU): real answers are the answer's slice of the jointly encoded conversation, generated
answers are trained on their sampled ids (also where decode -> encode does not round-trip), old text-only
data still loads with one note; pair batches (truncation, the flat token list) and the
balanced step plan. References are built independently of minispin's tokenizer wrapper: the
template rendered with jinja2 directly and encoded with the `tokenizers` library / `sentencepiece`."""
from __future__ import annotations

import json
from types import SimpleNamespace

import jinja2
import pytest
import sentencepiece
import torch
from tokenizers import Tokenizer as RustTokenizer

from minispin import generation_job
from minispin.collate import (Pair, collate_pairs, plan_steps, split_step, tokenize_answer,
                              tokenize_pairs, truncate)
from minispin.data import Example, read_examples
from minispin.heldout import answer_logprobs
from minispin.sampler import GeneratedSequence, encode_prompt
from minispin.generation_job import GenerationConfig, run_generation_job, sample_answer
from minispin.methods import JudgeConfig, judge_pairs, spin_pairs, sppo_pairs
from minispin.model import ModelConfig, Transformer
from minispin.tokenizer import SPIN_TEMPLATE, load_tokenizer
import tiny
from tiny import make_pairs

FIXTURES = tiny.FIXTURES / "tokenizers"
ZEPHYR, LLAMA2 = FIXTURES / "zephyr", FIXTURES / "llama2"
# Llama-2's chat format (system turn left out): "<s>[INST] q [/INST] a </s>"
LLAMA2_CHAT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + m['content'].strip() "
               "+ ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}"
               "{% endif %}{% endfor %}")
ANSWERS = ["Hello world.", " leading space", "42", "\nnewline first", "Ünïcödé ☃ text", "two\n\nparagraphs"]
PROMPT = [{"role": "user", "content": "Say something, please."}]


@pytest.fixture(scope="module")
def zephyr():
    return load_tokenizer(ZEPHYR)


@pytest.fixture(scope="module")
def llama2():
    return load_tokenizer(LLAMA2)


def _render(template: str, messages, add_generation_prompt: bool, **tokens) -> str:
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **tokens)


def _zephyr_reference(answer: str) -> tuple[list[int], int]:
    """(joint ids of prompt + answer, number of prompt ids), straight from jinja2 + tokenizers."""
    template = json.loads((ZEPHYR / "tokenizer_config.json").read_text())["chat_template"]
    rust = RustTokenizer.from_file(str(ZEPHYR / "tokenizer.json"))
    rust.no_truncation()
    tokens = dict(bos_token="<s>", eos_token="</s>")
    prompt = _render(template, PROMPT, True, **tokens)
    full = _render(template, PROMPT + [{"role": "assistant", "content": answer}], False, **tokens)
    assert full.startswith(prompt)
    return rust.encode(full, add_special_tokens=False).ids, len(rust.encode(prompt, add_special_tokens=False).ids)


@pytest.mark.parametrize("answer", ANSWERS)
def test_zephyr_chat_real_answer_is_the_slice_of_the_joint_encoding(zephyr, answer):
    joint, n_prompt = _zephyr_reference(answer)
    eos_at = max(i for i, t in enumerate(joint) if t == zephyr.eos_id)  # the assistant turn's "</s>"
    [tp] = tokenize_pairs([Pair(0, PROMPT, answer)], zephyr)
    assert tp.prompt_ids == joint[:n_prompt] == encode_prompt(zephyr, PROMPT)  # = what generation is fed
    assert tp.chosen_ids == joint[n_prompt: eos_at + 1]  # the answer and its end of turn, as SFT trains it
    assert tp.chosen_ids[-1] == zephyr.eos_id and zephyr.decode(joint[eos_at + 1:]) .strip() == ""
    if answer == "Hello world.":  # the old separate encoding started with a "▁Hello" never seen in context
        alone = zephyr.encode(answer, add_special_tokens=False) + [zephyr.eos_id]
        assert zephyr.id_to_token(alone[0]) == "▁Hello" and zephyr.id_to_token(tp.chosen_ids[0]) == "Hello"


@pytest.mark.parametrize("answer", ANSWERS)
def test_llama2_sentencepiece_chat_template(llama2, answer):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(LLAMA2 / "tokenizer.model"))
    bos, eos = sp.bos_id(), sp.eos_id()
    # Llama-2 style reference (legacy sentencepiece: every piece between special tokens gets the dummy prefix)
    prompt_piece = "[INST] " + PROMPT[0]["content"].strip() + " [/INST]"
    joint = [bos] + sp.encode(prompt_piece + " " + answer.strip() + " ") + [eos]
    n_prompt = 1 + len(sp.encode(prompt_piece))
    [tp] = tokenize_pairs([Pair(0, PROMPT, answer)], llama2, template=LLAMA2_CHAT)
    assert tp.prompt_ids == joint[:n_prompt] == encode_prompt(llama2, PROMPT, LLAMA2_CHAT)
    assert tp.chosen_ids == joint[n_prompt:]


@pytest.mark.parametrize("name", ["zephyr", "llama2"])
@pytest.mark.parametrize("answer", ANSWERS)
def test_spin_template_merged_boundary(request, name, answer):
    """"### Response: " ends in a space: the prompt's last "▁" merges with the answer's first word. The real
    row is then exactly the joint encoding (no doubled "▁"), split at the longest common prefix, plus EOS."""
    tok = request.getfixturevalue(name)
    text = SPIN_TEMPLATE.format(prompt=PROMPT[0]["content"]) + answer
    joint = [tok.bos_id] + tok.encode(text, add_special_tokens=False)
    gen_prompt = encode_prompt(tok, PROMPT, "spin")
    [tp] = tokenize_pairs([Pair(0, PROMPT, answer)], tok, template="spin")
    assert tp.prompt_ids + tp.chosen_ids == joint + [tok.eos_id]
    merged = joint[:len(gen_prompt)] != gen_prompt
    expected = {"Hello world.": True, " leading space": False, "\nnewline first": False}.get(answer)
    assert expected is None or merged == expected  # a word merges with the space; a space or newline does not
    if merged:
        assert tp.prompt_ids == gen_prompt[:-1] and tok.id_to_token(gen_prompt[-1]) == "▁"
        assert tok.id_to_token(tp.chosen_ids[0]).startswith("▁") and len(tok.id_to_token(tp.chosen_ids[0])) > 1
    else:
        assert tp.prompt_ids == gen_prompt


def _odd_split(tok, word: str) -> list[int]:
    """Ids of `word` split into two pieces that the tokenizer would never produce for it in context."""
    for cut in range(1, len(word)):
        a, b = tok.token_to_id(word[:cut]), tok.token_to_id(word[cut:])
        if a is not None and b is not None:
            return [a, b]
    raise AssertionError(f"no two-piece split of {word!r}")


def test_generated_answer_keeps_its_sampled_ids_when_decode_encode_does_not_round_trip(zephyr):
    sampled = _odd_split(zephyr, "Hello") + [zephyr.eos_id]
    text = zephyr.decode(sampled, skip_special_tokens=True)
    assert text == "Hello"
    _, reencoded = tokenize_answer(zephyr, PROMPT, text)
    assert reencoded != sampled  # decode -> encode gives other ids: the old path trained on those
    [tp] = tokenize_pairs([Pair(0, PROMPT, "Hello there", text, rejected_ids=sampled)], zephyr)
    assert tp.rejected_ids == sampled and tp.rejected_prompt_ids is None
    assert tp.prompt_ids == encode_prompt(zephyr, PROMPT)  # the generation prompt the ids were sampled after
    batch = collate_pairs([tp])
    assert_packs_rows(batch, tp.rows)
    assert tp.rows[1] == (tp.prompt_ids, sampled)


def test_sampled_ids_that_do_not_spell_the_text_are_refused(zephyr):
    ids = zephyr.encode("Goodbye", add_special_tokens=False) + [zephyr.eos_id]
    with pytest.raises(ValueError, match=r"iter0: row 4 \(1-based\).*decode to 'Goodbye', not to its text 'Hello'"):
        tokenize_pairs([Pair(3, PROMPT, "Hi", "Hello", rejected_ids=ids, source="iter0")], zephyr)


def test_merged_boundary_gives_each_row_its_own_prompt(zephyr):
    """SPIN template: the real row's prompt is one token shorter than the generated row's (which is the
    prompt the sample was drawn after); collation puts each row's own prompt before its answer."""
    sampled = zephyr.encode("Hi", add_special_tokens=False)[1:] + [zephyr.eos_id]  # drop the leading "▁"
    text = zephyr.decode(sampled, skip_special_tokens=True)
    [tp] = tokenize_pairs([Pair(0, PROMPT, "Hello world.", text, rejected_ids=sampled)], zephyr, template="spin")
    gen_prompt = encode_prompt(zephyr, PROMPT, "spin")
    assert tp.rejected_prompt_ids == gen_prompt and tp.prompt_ids == gen_prompt[:-1]
    for share in (True, False):
        batch = collate_pairs([tp], share_prefix=share)
        assert_packs_rows(batch, tp.rows)
        assert batch.labels.tolist() == tp.chosen_ids + tp.rejected_ids
    assert tp.length == max(len(p) + len(a) for p, a in tp.rows)


def test_sample_answer_finish_reasons(zephyr):
    decode = lambda t: zephyr.decode(t, skip_special_tokens=True)  # noqa: E731
    eos = zephyr.eos_id
    ids = zephyr.encode("Hi there.", add_special_tokens=False)
    assert sample_answer(GeneratedSequence(ids + [eos], "stop"), decode, eos) == ("Hi there.", ids + [eos])
    assert sample_answer(GeneratedSequence(ids, "length"), decode, eos) == ("Hi there.", ids)  # never ended
    nl = zephyr.token_to_id("<0x0A>")
    text, kept = sample_answer(GeneratedSequence(ids + [nl, nl], "stop_string", "\n\n"), decode, eos)
    assert (text, kept) == ("Hi there.", ids + [eos])  # whole tokens before the stop string, then EOS
    # a stop string that starts inside a token: the token is dropped, and the text follows the kept ids
    words = zephyr.encode("Hello world", add_special_tokens=False)
    assert [zephyr.id_to_token(t) for t in words] == ["▁Hello", "▁world"]
    text, kept = sample_answer(GeneratedSequence(words, "stop_string", "lo w"), decode, eos)
    assert (text, kept) == ("", [eos]) and decode(kept) == text


def _fake_sampler(streams: dict[tuple[int, int], list[int]]):
    """Stands in for iter_generate_tokens: yields the given ids for (example index, sample k)."""
    def iterate(model, prompts, *, indices, sample_ids, **kwargs):
        for pos, (i, k) in enumerate(zip(indices, sample_ids)):
            yield pos, GeneratedSequence(list(streams[(i, k)]), "stop")
    return iterate


def test_generation_job_rows_carry_the_sampled_ids_into_training(zephyr, tmp_path, monkeypatch):
    """End to end: job row -> read_examples -> pair builders -> tokenize_pairs trains on the sampled ids."""
    eos = zephyr.eos_id
    odd = _odd_split(zephyr, "Hello") + [eos]
    plain = zephyr.encode("Fine", add_special_tokens=False) + [eos]
    examples = [Example(index=i, prompt=PROMPT, real="Hello world.", generated=None, source="x") for i in range(2)]
    monkeypatch.setattr(generation_job, "iter_generate_tokens",
                        _fake_sampler({(0, 0): odd, (0, 1): plain, (1, 0): plain, (1, 1): odd}))
    # the job checks the tokenizer against the model's vocabulary and positions before it generates
    model = SimpleNamespace(config=SimpleNamespace(eos_token_id=eos, vocab_size=len(zephyr),
                                                   max_position_embeddings=2048))
    out = run_generation_job(model, zephyr, examples, tmp_path / "generated.jsonl",
                             GenerationConfig(num_samples=2, progress=False))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["generated_ids"] == odd and rows[0]["samples_ids"] == [odd, plain]
    assert rows[0]["generated"][-1]["content"] == "Hello" and rows[0]["samples"] == ["Hello", "Fine"]
    notes = []
    back = read_examples(out, format="spin", require_real=False, warn=notes.append)
    assert notes == [] and back[0].generated_ids == odd and back[1].extra["samples_ids"] == [plain, odd]

    [tp0, tp1] = tokenize_pairs(spin_pairs(back, None), zephyr)
    assert tp0.rejected_ids == odd and tp1.rejected_ids == plain
    assert tp0.chosen_ids == tokenize_answer(zephyr, PROMPT, "Hello world.")[1]  # the real one: in context
    # judge flip: the generated answer becomes chosen and keeps its ids
    scored = [Example(index=e.index, prompt=e.prompt, real=e.real, generated=e.generated, source=e.source,
                      extra=e.extra, scores={"score_real": 0.0, "score_generated": 1.0},
                      generated_ids=e.generated_ids) for e in back]
    [flipped, _] = tokenize_pairs(judge_pairs(scored, JudgeConfig()), zephyr)
    assert flipped.chosen_ids == odd
    # SPPO: the chosen / rejected samples keep their sampled ids
    for e in back:
        e.extra["sample_scores"] = [1.0, 0.0]
    [s0, s1] = tokenize_pairs(sppo_pairs(back, JudgeConfig()), zephyr)
    assert (s0.chosen_ids, s0.rejected_ids) == (odd, plain) and (s1.chosen_ids, s1.rejected_ids) == (plain, odd)


def test_text_only_rows_of_older_versions_load_with_one_note(zephyr, tmp_path):
    path = tmp_path / "old.jsonl"
    rows = [{"real": PROMPT + [{"role": "assistant", "content": "Hello world."}],
             "generated": PROMPT + [{"role": "assistant", "content": f"Old answer {i}"}], "index": i}
            for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    notes = []
    examples = read_examples(path, format="spin", warn=notes.append)
    assert len(notes) == 1 and "3 of 3 rows" in notes[0] and "re-encoded from the text" in notes[0]
    assert all(e.generated_ids is None for e in examples)
    tps = tokenize_pairs(spin_pairs(examples, None), zephyr)
    for e, tp in zip(examples, tps):  # both sides tokenized in context
        assert tp.rejected_ids == tokenize_answer(zephyr, PROMPT, e.generated)[1]
        assert tp.rejected_ids[-1] == zephyr.eos_id


def test_bad_generated_ids_are_a_row_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    row = {"real": PROMPT + [{"role": "assistant", "content": "A"}],
           "generated": PROMPT + [{"role": "assistant", "content": "B"}], "generated_ids": [5, "x"]}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 1: key 'generated_ids': expected a list of token ids"):
        read_examples(path)


def test_evaluation_scores_the_tokens_training_uses(zephyr):
    """answer_logprobs sums log p over exactly tokenize_pairs' answer ids (float64 recomputation)."""
    config = ModelConfig(vocab_size=zephyr.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         architecture="LlamaForCausalLM", torch_dtype="float32", eos_token_id=zephyr.eos_id)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    examples = [(PROMPT, a) for a in ANSWERS[:3]]
    got = answer_logprobs(model, zephyr, examples)
    for (prompt, answer), (logp, n) in zip(examples, got):
        [tp] = tokenize_pairs([Pair(0, prompt, answer)], zephyr)
        ids = tp.prompt_ids + tp.chosen_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0].double()
        ref = torch.log_softmax(logits, -1)
        expected = sum(float(ref[len(tp.prompt_ids) - 1 + k, t]) for k, t in enumerate(tp.chosen_ids))
        assert n == len(tp.chosen_ids) and logp == pytest.approx(expected, abs=1e-4)


def test_tokenize_truncate_and_flat_token_list(setup):
    _, _, tok = setup
    pairs = make_pairs(5) + [Pair(5, [{"role": "user", "content": "x" * 40}], "y" * 30, "z" * 3)]
    tps = tokenize_pairs(pairs, tok, max_length=48, max_prompt_length=20)
    for p, tp in zip(pairs[:5], tps[:5]):
        assert tp.prompt_ids == encode_prompt(tok, p.prompt, None)  # the generation job's encoding
        assert tp.chosen_ids == tok.encode(p.chosen, add_special_tokens=False) + [tok.eos_id]
        assert tp.rejected_ids == tok.encode(p.rejected, add_special_tokens=False) + [tok.eos_id]
    long = tps[5]  # prompt 1 + 2 + 40 + 1 = 44 tokens, answer 31 > 48: prompt keeps BOS + its end
    full = encode_prompt(tok, pairs[5].prompt, None)
    assert long.prompt_ids == [full[0]] + full[-19:] and len(long.prompt_ids) == 20
    assert len(long.chosen_ids) == 48 - 20 and long.rejected_ids[-1] == tok.eos_id
    # the paper's rule: prompt cut only when needed, answers cut to max_length - max_prompt_length
    assert truncate([1, 5, 6, 7], [[8, 9]], 10, 3, bos_id=1) == ([1, 5, 6, 7], [[8, 9]])
    assert truncate([1, 5, 6, 7, 8], [[9] * 8], 10, 3, bos_id=1) == ([1, 7, 8], [[9] * 7])

    batch = collate_pairs(tps[:3], pairs=pairs[:3], ref_logps={i: (-1.0 * i, -2.0 * i) for i in range(3)})
    assert batch.ref_logps.tolist() == [0.0, -1.0, -2.0, 0.0, -2.0, -4.0]
    rows = [tp.rows[0] for tp in tps[:3]] + [tp.rows[1] for tp in tps[:3]]
    assert_packs_rows(batch, rows)
    # the rejected rows' prompts are not repeated: each pair is its prompt once and both answers
    assert batch.input_ids.shape[1] == sum(len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids)
                                           for t in tps[:3])
    assert batch.num_tokens == sum(len(p) + len(a) for p, a in rows)
    unshared = collate_pairs(tps[:3], share_prefix=False)
    assert_packs_rows(unshared, rows)
    assert unshared.input_ids.shape[1] == batch.num_tokens
    sft = collate_pairs(tps[:3], sft=True)
    assert sft.num_rows == 3 and sft.ref_logps is None
    assert_packs_rows(sft, rows[:3])


def assert_packs_rows(batch, rows):
    """The packed batch holds exactly `rows` ((prompt ids, answer ids) each): every answer token is labelled
    once, in its row, from the packed position holding the row's previous token at that row position, and
    each block attends to exactly the tokens before it in its row (prefix + its own)."""
    ids, pos = batch.input_ids[0], batch.position_ids[0]
    assert batch.num_rows == len(rows) and ids.shape == pos.shape
    for r, (prompt, answer) in enumerate(rows):
        row = prompt + answer
        mine = batch.seq_index == r
        assert batch.labels[mine].tolist() == answer
        at = batch.token_index[mine]
        first = max(len(prompt), 1) - 1
        assert pos[at].tolist() == list(range(first, len(row) - 1))
        assert ids[at].tolist() == row[first:-1]
    # every block: its keys (visible prefix, then its own tokens) spell a row's beginning, in position order
    starts = [b.start for b in batch.packed.blocks]
    assert starts[0] == 0 and [b.end for b in batch.packed.blocks][:-1] == starts[1:]
    assert batch.packed.blocks[-1].end == ids.numel()
    for start, end, key_start, prefix_end in batch.packed.blocks:
        seen = torch.cat([ids[key_start:prefix_end], ids[start:end]]).tolist()
        assert pos[key_start:prefix_end].tolist() + pos[start:end].tolist() == list(range(len(seen)))
        assert any(len(p) + len(a) >= len(seen) and (p + a)[:len(seen)] == seen for p, a in rows)


def test_step_plan_is_balanced_and_length_grouped():
    lengths = [5, 50, 7, 49, 30, 31, 8, 2, 9, 40, 41]
    plan = plan_steps(list(range(11)), lengths, global_batch_size=8, micro_batch_size=2, world_size=2)
    assert len(plan) == 2
    for step in plan:
        assert len({len(rank_mbs) for rank_mbs in step}) == 1  # same micro-batch count on every rank
    items = sorted(i for step in plan for rank_mbs in step for mb in rank_mbs for i in mb)
    assert items == list(range(11))
    first = [mb for rank_mbs in plan[0] for mb in rank_mbs]
    assert first[0] == [1, 3]  # longest two together
    # fewer items than ranks: an empty micro-batch (run as a zero-weight dummy) keeps ranks in step
    assert split_step([4], lengths, 2, 2) == [[[4]], [[]]]
