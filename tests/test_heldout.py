"""minispin.heldout against plain recomputations: a naive greedy loop and float64 log-softmax sums."""
import math

import pytest
import torch

from minispin.demo import task as demo_task
from minispin.heldout import (answer_logprobs, exact_match, exact_match_per_question, example_parts, greedy_answers,
                               mean_logprob)
from minispin.model import ModelConfig, Transformer
from minispin.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(demo_task.write_tokenizer(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def model(tokenizer):
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         architecture="LlamaForCausalLM", torch_dtype="float32", bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    torch.manual_seed(0)
    m = Transformer(config)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)  # peaked enough that greedy answers differ between prompts
        # make EOS likely enough that some greedy answers stop early
        m.lm_head.weight[tokenizer.eos_id] += 0.4 * m.norm.weight.sign()
    return m.eval()


def _prompt_ids(tokenizer, question):
    text = tokenizer.render_prompt([{"role": "user", "content": question}])
    return tokenizer.encode(text, add_special_tokens=False)


def _naive_greedy(model, tokenizer, question, max_new_tokens):
    """Full forward each step (no cache, no batching), argmax, stop at EOS."""
    ids = _prompt_ids(tokenizer, question)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if nxt == tokenizer.eos_id:
                break
            out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=True)


def _naive_logprob(model, tokenizer, question, answer):
    p = _prompt_ids(tokenizer, question)
    a = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_id]
    with torch.no_grad():
        logits = model(torch.tensor([p + a]))[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(a)), len(a)


QUESTIONS = ["Reverse abc", "Sort zyxw", "What is 12+7?", "Reverse hello", "Sort q", "What is 99+99?", "Reverse ab",
             "Sort banana", "What is 3+4?"]


def test_greedy_answers_match_naive_loop(model, tokenizer):
    examples = [(q, "x") for q in QUESTIONS]
    got = greedy_answers(model, tokenizer, examples, max_new_tokens=6, batch_size=4)
    want = [_naive_greedy(model, tokenizer, q, 6) for q in QUESTIONS]
    assert got == want
    assert len(set(want)) > 1  # the check means something: answers differ between prompts


def test_exact_match_counts_right_answers(model, tokenizer):
    naive = [_naive_greedy(model, tokenizer, q, 6) for q in QUESTIONS]
    # every other example's "real" answer is the model's own greedy answer (with stray spaces), the rest wrong
    examples = [{"prompt": [{"role": "user", "content": q}], "real": (f" {a} " if i % 2 == 0 else a + "#")}
                for i, (q, a) in enumerate(zip(QUESTIONS, naive))]
    want = sum(1 for i in range(len(QUESTIONS)) if i % 2 == 0) / len(QUESTIONS)
    assert exact_match(model, tokenizer, examples, max_new_tokens=6, batch_size=3) == pytest.approx(want)
    # a custom check replaces the string comparison
    assert exact_match(model, tokenizer, examples, max_new_tokens=6, check=lambda e, text: True) == 1.0
    # per question (the input of minispin.stats): exactly the even ones are right
    hits = exact_match_per_question(model, tokenizer, examples, max_new_tokens=6, batch_size=3)
    assert hits == [i % 2 == 0 for i in range(len(QUESTIONS))]


def test_mean_logprob_matches_float64_recomputation(model, tokenizer):
    examples = [(q, demo_task.answer_of(q)) for q in QUESTIONS]
    naive = [_naive_logprob(model, tokenizer, q, a) for q, a in examples]
    got = answer_logprobs(model, tokenizer, examples, batch_size=4)  # several right-padded batches
    for (g, gn), (w, wn) in zip(got, naive):
        assert gn == wn
        assert g == pytest.approx(w, abs=1e-4)
    assert mean_logprob(model, tokenizer, examples, batch_size=5) == pytest.approx(
        sum(w for w, _ in naive) / len(naive), abs=1e-4)
    assert mean_logprob(model, tokenizer, examples, per_token=True) == pytest.approx(
        sum(w for w, _ in naive) / sum(n for _, n in naive), abs=1e-5)
    assert all(math.isfinite(v) and v < 0 for v, _ in got)


def test_distributed_flag_without_process_group_is_local(model, tokenizer):
    examples = [(q, demo_task.answer_of(q)) for q in QUESTIONS[:4]]
    assert answer_logprobs(model, tokenizer, examples, distributed=True) == answer_logprobs(model, tokenizer, examples)


def test_example_forms():
    msgs = [{"role": "user", "content": "Sort ba"}]
    assert example_parts(("Sort ba", "ab")) == (msgs, "ab")
    assert example_parts({"prompt": msgs, "real": "ab"}) == (msgs, "ab")
    assert example_parts({"messages": msgs + [{"role": "assistant", "content": "ab"}]}) == (msgs, "ab")
    class Ex:  # like minispin.data.Example: attributes prompt / real
        prompt, real = msgs, "ab"

    assert example_parts(Ex()) == (msgs, "ab")
    with pytest.raises(ValueError, match="prompt"):
        example_parts({"question": "x"})
    with pytest.raises(ValueError, match="assistant"):
        example_parts({"messages": msgs})
    with pytest.raises(ValueError):
        exact_match(None, None, [])
