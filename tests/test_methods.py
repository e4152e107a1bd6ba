"""Beyond plain SPIN (minispin.methods): judge flips, the adaptive tau rule and its counts, DPO pairs,
SPPO win-rate matrix / choice / targets, judges given as a function or a command (and their cache),
NEFTune noise, and the losses these pairs reach through collation + the fused pair loss, checked
against hand-computed cases and float64 recomputations. CPU, tiny shapes."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from minispin.collate import Pair, collate_pairs, tokenize_pairs
from minispin.data import Example, PreferenceExample
from minispin.methods import (FLIPPED, KEPT, SMOOTHED, JudgeConfig, adaptive_decision, adaptive_pairs,
                              attach_judge_scores, attach_sample_scores, decision_counts, dpo_pairs,
                              judge_decision, judge_pairs, load_scorer, neftune, neftune_noise, row_lengths,
                              score_prompts, sppo_choice, sppo_pairs, summarize_pairs, win_rate_matrix)
from tiny import tiny_config, write_char_tokenizer

PROMPT = [{"role": "user", "content": "What is 2+3?"}]


def ex(index: int, real: str = "5", generated: str = "6", scores: dict | None = None, source: str = "iter0",
       **extra) -> Example:
    return Example(index=index, prompt=list(PROMPT), real=real, generated=generated, source=source,
                   extra=dict(extra), scores=scores)


# ----------------------------------------------------------------------------- judge-SPIN

def test_judge_flips_only_when_generated_scores_strictly_higher():
    assert judge_decision(7.0, 8.0) == FLIPPED
    assert judge_decision(8.0, 7.0) == KEPT
    assert judge_decision(7.0, 7.0) == KEPT  # a tie keeps SPIN's assumption
    examples = [ex(0, "a", "b", {"score_real": 1.0, "score_generated": 9.0}),
                ex(1, "c", "d", {"score_real": 9.0, "score_generated": 1.0}),
                ex(2, "e", "f", {"score_real": 4.0, "score_generated": 4.0}, source="iter1")]
    pairs = judge_pairs(examples)
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a"), ("c", "d"), ("e", "f")]
    assert [p.extra["decision"] for p in pairs] == [FLIPPED, KEPT, KEPT]
    assert all(p.label_smoothing is None for p in pairs)
    assert pairs[0].extra["score_real"] == 1.0 and pairs[0].extra["score_generated"] == 9.0
    stats = summarize_pairs(pairs)
    assert (stats["pairs"], stats["flipped"], stats["kept"], stats["trusted"], stats["smoothed"]) == (3, 1, 2, 3, 0)
    assert stats["by_source"]["iter0"]["flipped"] == 1 and stats["by_source"]["iter1"]["flipped"] == 0
    # other column names
    judge = JudgeConfig(real_column="gpt_real_score", generated_column="gpt_gen_score")
    p = judge_pairs([ex(0, "a", "b", {"gpt_real_score": 2.0, "gpt_gen_score": 3.0})], judge)[0]
    assert (p.chosen, p.rejected) == ("b", "a")


def test_missing_judge_scores_name_the_row_and_the_fix():
    with pytest.raises(ValueError, match=r"iter0: row 7: no judge score score_generated.*judge.function"):
        judge_pairs([ex(7, scores={"score_real": 1.0})])
    with pytest.raises(ValueError, match="row 3"):
        adaptive_pairs([ex(3)])


# ----------------------------------------------------------------------------- adaptive

def test_adaptive_tau_boundary_exactly_tau_is_trusted():
    tau = 5.0
    assert adaptive_decision(7.0, 2.0, tau) == KEPT  # margin exactly 5 -> trusted, real preferred
    assert adaptive_decision(2.0, 7.0, tau) == FLIPPED  # margin exactly 5 -> trusted, generated preferred
    assert adaptive_decision(2.0, 6.75, tau) == SMOOTHED  # margin 4.75 < 5
    assert adaptive_decision(0.25, 0.5, 0.25) == FLIPPED  # exact binary fractions: margin == tau
    assert adaptive_decision(3.0, 3.0, 0.0) == KEPT  # tau 0 trusts every pair; a tie is kept
    assert adaptive_decision(10.0, 0.0, float(1e9)) == SMOOTHED


def test_adaptive_pairs_smoothing_and_counts():
    judge = JudgeConfig(tau=5.0, smoothing=0.2)
    scores = [(9.0, 1.0), (1.0, 9.0), (5.0, 7.0), (7.0, 2.0), (2.0, 7.0), (4.0, 4.0), (0.0, 4.9)]
    examples = [ex(i, f"r{i}", f"g{i}", {"score_real": a, "score_generated": b}, source=("iter1" if i < 4 else "iter0"))
                for i, (a, b) in enumerate(scores)]
    pairs = adaptive_pairs(examples, judge)
    expected = [KEPT, FLIPPED, SMOOTHED, KEPT, FLIPPED, SMOOTHED, SMOOTHED]
    assert [p.extra["decision"] for p in pairs] == expected
    for p, d, i in zip(pairs, expected, range(7)):
        if d == FLIPPED:
            assert (p.chosen, p.rejected) == (f"g{i}", f"r{i}")
        else:  # kept and smoothed pairs keep SPIN's orientation
            assert (p.chosen, p.rejected) == (f"r{i}", f"g{i}")
        assert p.label_smoothing == (0.2 if d == SMOOTHED else 0.0)
    stats = summarize_pairs(pairs)
    assert {k: stats[k] for k in ("pairs", "trusted", "kept", "flipped", "smoothed")} == \
        {"pairs": 7, "trusted": 4, "kept": 2, "flipped": 2, "smoothed": 3}
    assert stats["by_source"]["iter1"] == {"pairs": 4, "kept": 2, "flipped": 1, "smoothed": 1, "trusted": 3}
    assert stats["by_source"]["iter0"] == {"pairs": 3, "kept": 0, "flipped": 1, "smoothed": 2, "trusted": 1}


def test_judge_config_validation():
    with pytest.raises(ValueError, match="not both"):
        JudgeConfig(function="a:b", command="x")
    with pytest.raises(ValueError, match="module:function"):
        JudgeConfig(function="nocolon")
    with pytest.raises(ValueError, match="tau"):
        JudgeConfig(tau=-1.0)
    with pytest.raises(ValueError, match="smoothing"):
        JudgeConfig(smoothing=0.7)


# ----------------------------------------------------------------------------- DPO

def test_dpo_pairs_from_trl_and_sharegpt_rows(tmp_path):
    from minispin.data import read_preferences

    rows = [
        {"prompt": "Say hi", "chosen": "hi", "rejected": "no"},
        {"prompt": [{"role": "user", "content": "Say yo"}],
         "chosen": [{"role": "user", "content": "Say yo"}, {"role": "assistant", "content": "yo"}],
         "rejected": [{"role": "user", "content": "Say yo"}, {"role": "assistant", "content": "meh"}]},
        {"conversations": [{"from": "human", "value": "Count"}], "chosen": {"from": "gpt", "value": "1 2 3"},
         "rejected": {"from": "gpt", "value": "3 2 1"}},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = dpo_pairs(read_preferences(path))
    assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in pairs] == \
        [("Say hi", "hi", "no"), ("Say yo", "yo", "meh"), ("Count", "1 2 3", "3 2 1")]
    assert [p.index for p in pairs] == [0, 1, 2] and all(p.targets is None for p in pairs)
    with pytest.raises(ValueError, match="row 4: DPO needs preference rows"):
        dpo_pairs([ex(4)])


# ----------------------------------------------------------------------------- SPPO

def test_sppo_prompts_need_no_answers_and_may_come_from_preference_rows(tmp_path):
    """SPPO samples its candidates: prompt-only rows are enough, preference rows give their prompts."""
    from minispin.methods import read_prompts
    from minispin.driver import SpinConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ("Say hi", "Count")))
    got = read_prompts(SpinConfig(model="m", data=str(prompts), method="sppo"))
    assert [(e.prompt, e.real, e.generated) for e in got] == \
        [([{"role": "user", "content": "Say hi"}], "", None), ([{"role": "user", "content": "Count"}], "", None)]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "Say yo", "chosen": "yo", "rejected": "no"}) + "\n")
    got = read_prompts(SpinConfig(model="m", data=str(prefs), method="sppo"))
    assert [(e.index, e.prompt[-1]["content"], e.generated) for e in got] == [(0, "Say yo", None)]


def test_win_rate_matrix_matches_float64_and_is_stable():
    scores = [0.3, -1.7, 2.5, 2.5, 40.0, -700.0]
    P = torch.tensor(win_rate_matrix(scores), dtype=torch.float64)
    s = torch.tensor(scores, dtype=torch.float64)
    assert torch.allclose(P, torch.sigmoid(s[:, None] - s[None, :]), rtol=1e-15, atol=1e-300)
    assert torch.all(P.diagonal() == 0.5)
    assert torch.allclose(P + P.T, torch.ones_like(P), atol=1e-15)
    assert P[4, 5] == 1.0 and P[5, 4] >= 0.0  # no overflow at differences of 740


def test_sppo_choice_targets_hand_checked():
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    c = sppo_choice([1.0, 3.0, 2.0])
    assert (c.winner, c.loser, c.tied) == (1, 0, False)
    assert c.prob_win == pytest.approx((sig(2) + 0.5 + sig(1)) / 3, abs=1e-15)
    assert c.prob_lose == pytest.approx((0.5 + sig(-2) + sig(-1)) / 3, abs=1e-15)
    assert c.prob_winner_beats_loser == pytest.approx(sig(2), abs=1e-15)
    # numbers: P_win = (0.880797 + 0.5 + 0.731059) / 3 = 0.703952
    assert c.prob_win == pytest.approx(0.703952, abs=1e-6)
    c = sppo_choice([3.0, 1.0, 3.0, 1.0])  # ties: first argmax, first argmin
    assert (c.winner, c.loser) == (0, 1)
    c = sppo_choice([2.0, 2.0, 2.0])  # all tie: loser = first other index, both targets 1/2
    assert (c.winner, c.loser, c.tied, c.prob_win, c.prob_lose) == (0, 1, True, 0.5, 0.5)
    with pytest.raises(ValueError, match="at least 2"):
        sppo_choice([1.0])


def test_sppo_pairs_from_samples_and_precomputed_probs():
    e = ex(0, real="5", generated="4", samples=["4", "5", "55", "6"], sample_scores=[9.0, 10.0, 0.0, 9.5])
    (p,) = sppo_pairs([e])
    c = sppo_choice([9.0, 10.0, 0.0, 9.5])
    assert (p.chosen, p.rejected) == ("5", "55")  # argmax / argmin among the samples only
    assert p.targets == (c.prob_win, c.prob_lose) and p.extra["decision"] == "sppo"
    assert p.extra["chosen_probs"] == c.prob_winner_beats_loser
    pref = PreferenceExample(index=3, prompt=list(PROMPT), chosen="good", rejected="bad", source="d",
                             scores={"chosen_probs": 0.9, "chosen_probs_win": 0.8, "chosen_probs_lose": 0.3})
    (q,) = sppo_pairs([pref])
    assert (q.chosen, q.rejected, q.targets, q.extra["decision"]) == ("good", "bad", (0.8, 0.3), "sppo_precomputed")
    with pytest.raises(ValueError, match="row 0: the samples have no scores"):
        sppo_pairs([ex(0, samples=["a", "b"])])
    with pytest.raises(ValueError, match="row 0: no 'samples'"):
        sppo_pairs([ex(0)])
    with pytest.raises(ValueError, match="expected 2 scores"):
        sppo_pairs([ex(0, samples=["a", "b"], sample_scores=[1.0])])
    bad = PreferenceExample(index=1, prompt=list(PROMPT), chosen="g", rejected="b", source="d",
                            scores={"chosen_probs_win": 1.5, "chosen_probs_lose": 0.3})
    with pytest.raises(ValueError, match="not a probability"):
        sppo_pairs([bad])
    counts = decision_counts(sppo_pairs([e, ex(1, samples=["x", "y"], sample_scores=[1.0, 1.0])]))
    assert counts == {"pairs": 2, "sppo": 1, "sppo_tied": 1}


# ----------------------------------------------------------------------------- judges: function, command, cache

JUDGE_SOURCE = '''
CALLS = []
def score(prompt, responses):
    CALLS.append(len(responses))
    return [float(len(r)) for r in responses]
def bad(prompt, responses):
    return [1.0]
'''

COMMAND_SOURCE = '''
import json, sys
for line in sys.stdin:
    row = json.loads(line)
    scores = [float(len(r)) for r in row["responses"]]
    print(json.dumps({"index": row["index"], "scores": scores} if row["index"] % 2 else scores))
'''


def test_function_judge_from_file(tmp_path):
    f = tmp_path / "my_judge.py"
    f.write_text(JUDGE_SOURCE)
    scorer = load_scorer(JudgeConfig(function=f"{f}:score"))
    assert scorer([(0, PROMPT, ["ab", "abcd"]), (1, PROMPT, ["x", "", "yyy"])]) == [[2.0, 4.0], [1.0, 0.0, 3.0]]
    assert load_scorer(JudgeConfig()) is None
    with pytest.raises(ValueError, match="expected 2 scores"):
        load_scorer(JudgeConfig(function=f"{f}:bad"))([(5, PROMPT, ["a", "b"])])
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        load_scorer(JudgeConfig(function=f"{f}:missing"))
    with pytest.raises(ImportError, match="cannot import module"):
        load_scorer(JudgeConfig(function="no_such_module_xyz:score"))
    with pytest.raises(RuntimeError, match="judge json:loads failed on row 3: TypeError"):
        load_scorer(JudgeConfig(function="json:loads"))([(3, PROMPT, ["a"])])  # not a judge: a clear error


def test_function_judge_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_judge_module.py").write_text(JUDGE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_scorer(JudgeConfig(function="my_judge_module:score"))([(0, PROMPT, ["abc"])]) == [[3.0]]


def test_command_judge_json_lines(tmp_path):
    script = tmp_path / "judge_cmd.py"
    script.write_text(COMMAND_SOURCE)
    judge = JudgeConfig(command=f"{sys.executable} {script}")
    items = [(0, PROMPT, ["ab", "abcd"]), (1, PROMPT, ["x", "yyy"]), (2, PROMPT, ["", "z"])]
    assert load_scorer(judge)(items) == [[2.0, 4.0], [1.0, 3.0], [0.0, 1.0]]
    fail = JudgeConfig(command=f"{sys.executable} -c \"import sys; sys.exit('judge down')\"")
    with pytest.raises(RuntimeError, match="exited with status 1: judge down"):
        load_scorer(fail)(items)
    short = JudgeConfig(command=f"{sys.executable} -c \"print('[1, 2]')\"")
    with pytest.raises(ValueError, match="3 prompts in, 1 result lines out"):
        load_scorer(short)(items)
    junk = JudgeConfig(command=f"{sys.executable} -c \"print('nope')\"")
    with pytest.raises(ValueError, match="output line 1 .row 0.: not JSON"):
        load_scorer(junk)(items[:1])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_scorer(JudgeConfig(command="/no/such/judge-binary"))(items)


def test_scores_are_cached_and_stale_cache_refused(tmp_path):
    calls = []

    def scorer(items):
        calls.append([i for i, _, _ in items])
        return [[float(len(r)) for r in rs] for _, _, rs in items]

    judge = JudgeConfig(prompts_per_call=2)
    items = [(i, PROMPT, ["a" * i, "b"]) for i in range(5)]
    cache = tmp_path / "judge_scores"
    got = score_prompts(items, judge, cache, scorer=scorer)
    assert got == {i: [float(i), 1.0] for i in range(5)} and calls == [[0, 1], [2, 3], [4]]
    assert score_prompts(items, judge, cache, scorer=scorer) == got and len(calls) == 3  # all cached
    more = items + [(7, PROMPT, ["c", "dd"])]
    assert score_prompts(more, judge, cache, scorer=scorer)[7] == [1.0, 2.0] and calls[-1] == [7]
    stale = [(0, PROMPT, ["changed", "b"])]
    with pytest.raises(ValueError, match="stale"):
        score_prompts(stale, judge, cache, scorer=scorer)


def test_attach_scores_for_judge_spin_and_sppo(tmp_path):
    f = tmp_path / "len_judge.py"
    f.write_text(JUDGE_SOURCE)
    judge = JudgeConfig(function=f"{f}:score", tau=2.0, smoothing=0.1)
    examples = [ex(0, "12", "1234"), ex(1, "1234", "1"), ex(2, "12", "123")]
    scored = attach_judge_scores(examples, judge, tmp_path / "cache")
    assert [(e.scores["score_real"], e.scores["score_generated"]) for e in scored] == [(2, 4), (4, 1), (2, 3)]
    assert [p.extra["decision"] for p in adaptive_pairs(scored, judge)] == [FLIPPED, KEPT, SMOOTHED]
    assert attach_judge_scores(examples, JudgeConfig()) == examples  # no judge: columns are used
    sppo = attach_sample_scores([ex(0, samples=["aaa", "a", "aa"])], judge)
    assert sppo[0].extra["sample_scores"] == [3.0, 1.0, 2.0]
    assert (sppo_pairs(sppo)[0].chosen, sppo_pairs(sppo)[0].rejected) == ("aaa", "a")


# ----------------------------------------------------------------------------- NEFTune

def test_neftune_noise_scale_and_padding():
    torch.manual_seed(0)
    B, T, d, alpha = 3, 7, 4096, 5.0
    emb = torch.zeros(B, T, d)
    lengths = torch.tensor([7, 3, 5])
    noise = neftune_noise(emb, lengths, alpha)
    for b, L in enumerate(lengths.tolist()):
        bound = alpha / math.sqrt(L * d)
        row = noise[b, :L]
        assert row.abs().max() <= bound * (1 + 1e-6)
        assert row.abs().max() > 0.95 * bound  # uniform over the whole [-bound, bound]
        assert row.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)  # uniform(-1,1) variance 1/3
        assert torch.all(noise[b, L:] == 0)  # no noise on padding
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(neftune_noise(emb, lengths, alpha, g1), neftune_noise(emb, lengths, alpha, g2))


def test_row_lengths_from_collated_batch():
    from minispin.collate import TokenizedPair

    tps = [TokenizedPair(0, [1, 7, 8], [9, 2], [9, 9, 9, 9, 2]), TokenizedPair(1, [1, 7], [5, 2], [2])]
    batch = collate_pairs(tps, pad_id=0)
    R, T = batch.input_ids.shape
    got = row_lengths(batch.token_index, R, T)
    expected = [len(t.prompt_ids) + len(t.chosen_ids) for t in tps] + [len(t.prompt_ids) + len(t.rejected_ids)
                                                                       for t in tps]
    assert got.tolist() == expected == [5, 4, 8, 3]


def test_neftune_hook_only_in_training_mode():
    emb = torch.nn.Embedding(10, 16)
    ids = torch.tensor([[1, 2, 3, 0]])
    clean = emb(ids)
    with neftune(emb, 5.0, torch.tensor([3])):
        noisy = emb(ids)
        emb.eval()
        evaluated = emb(ids)
        emb.train()
    after = emb(ids)
    assert not torch.equal(noisy, clean) and torch.equal(noisy[0, 3], clean[0, 3])  # padding untouched
    assert torch.equal(evaluated, clean) and torch.equal(after, clean)  # eval mode / hook removed
    assert (noisy - clean).abs().max() <= 5.0 / math.sqrt(3 * 16) + 1e-6


# ----------------------------------------------------------------------------- losses through collation + kernel

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from minispin.model import Transformer
    from minispin.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("methods_tok")
    write_char_tokenizer(folder)
    tokenizer = load_tokenizer(folder)
    torch.manual_seed(0)
    model = Transformer(tiny_config(max_positions=64))
    return model, tokenizer


def _seq_logps64(model, tok, pairs):
    """float64, full logits: summed log-probs of chosen then rejected answers (+ EOS)."""
    import copy

    from minispin.sampler import encode_prompt

    m64 = copy.deepcopy(model).double()
    out = []
    for side in ("chosen", "rejected"):
        for p in pairs:
            prompt = encode_prompt(tok, p.prompt, None)
            ids = prompt + tok.encode(getattr(p, side), add_special_tokens=False) + [tok.eos_id]
            logp = torch.log_softmax(m64(torch.tensor([ids]))[0], dim=-1)
            out.append(logp[len(prompt) - 1: len(ids) - 1].gather(1, torch.tensor(ids[len(prompt):])[:, None]).sum())
    return torch.stack(out).detach()


def test_adaptive_and_sppo_losses_through_collate_and_kernel_match_float64(tiny):
    """The pairs' per-pair label smoothing and SPPO targets reach the fused pair loss: loss == float64."""
    from minispin.training import PolicyHead, TrainConfig, batch_loss

    model, tok = tiny
    judge = JudgeConfig(tau=3.0, smoothing=0.25)
    examples = [ex(0, "5", "6", {"score_real": 9.0, "score_generated": 1.0}),
                ex(1, "12", "7", {"score_real": 1.0, "score_generated": 9.0}),
                ex(2, "a b", "ab", {"score_real": 5.0, "score_generated": 4.0})]
    pairs = adaptive_pairs(examples, judge)
    refs = [-11.0, -9.5, -20.25, -13.0, -8.0, -17.5]
    ref_map = {i: (refs[i], refs[3 + i]) for i in range(3)}
    batch = collate_pairs(tokenize_pairs(pairs, tok, max_length=48, max_prompt_length=24), tok.pad_id,
                          pairs=pairs, ref_logps=ref_map)
    assert batch.label_smoothing.tolist() == [0.0, 0.0, 0.25]
    policy = PolicyHead(model)
    beta = 0.5
    loss, seq, _ = batch_loss(policy, batch, TrainConfig(beta=beta))
    seq64 = _seq_logps64(model, tok, pairs)
    assert torch.allclose(seq.double(), seq64, atol=2e-4)
    ref = torch.tensor(refs, dtype=torch.float64)
    z = beta * ((seq64[:3] - ref[:3]) - (seq64[3:] - ref[3:]))
    eps = torch.tensor([0.0, 0.0, 0.25], dtype=torch.float64)
    want = ((1 - eps) * torch.nn.functional.softplus(-z) + eps * torch.nn.functional.softplus(z)).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)
    # the flipped pair (1) trains the generated answer as chosen: its z has the opposite sign of the SPIN pair's
    assert pairs[1].chosen == "7"

    # SPPO: eta = 1/beta = 1000, targets from the win-rate matrix
    sppo = sppo_pairs([ex(0, samples=["5", "55", "6"], sample_scores=[10.0, 0.0, 6.0]),
                       ex(1, samples=["1", "2", "3", "4"], sample_scores=[1.0, 2.0, 3.0, 4.0])])
    batch = collate_pairs(tokenize_pairs(sppo, tok, max_length=48, max_prompt_length=24), tok.pad_id,
                          pairs=sppo, ref_logps={0: (-3.0, -4.0), 1: (-2.5, -2.0)})
    loss, seq, _ = batch_loss(policy, batch, TrainConfig(beta=1e-3, loss="sppo"))
    seq64 = _seq_logps64(model, tok, sppo)
    ref = torch.tensor([-3.0, -2.5, -4.0, -2.0], dtype=torch.float64)
    lr = seq64 - ref
    t = torch.tensor([sppo[0].targets[0], sppo[1].targets[0], sppo[0].targets[1], sppo[1].targets[1]],
                     dtype=torch.float64)
    per = ((lr[:2] - 1000 * (t[:2] - 0.5)) ** 2 + (lr[2:] - 1000 * (t[2:] - 0.5)) ** 2) / 2
    assert loss.item() == pytest.approx(per.mean().item(), rel=1e-5)
    c = sppo_choice([10.0, 0.0, 6.0])
    assert batch.targets.tolist() == pytest.approx([c.prob_win, sppo[1].targets[0], c.prob_lose, sppo[1].targets[1]])


# ----------------------------------------------------------------------------- the demo's judge and data

def test_demo_judge_scores_and_margins():
    from minispin.demo import task as demo_task
    from minispin.demo.methods import closeness, demo_judge, demo_score

    q = [{"role": "user", "content": "What is 47+38?"}]
    assert demo_judge(q, ["85", " 85 ", "84", "95", "75", "abc", "", "200"]) == \
        pytest.approx([10.0, 10.0, 3.6, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert demo_score("What is 47+38?", "80") == pytest.approx(4.0 * 0.5)
    assert demo_score("Reverse kqzt", "tzqk") == 10.0
    assert demo_score("Reverse kqzt", "tzkq") == pytest.approx(4.0 * 2 / 4)  # two of four positions right
    assert demo_score("Sort kqzt", "kqtzz") == pytest.approx(4.0 * 4 / 5)  # longer answers lose credit
    assert closeness("", "abc") == 0.0
    # right vs any wrong: margin >= 6; wrong vs wrong: margin < 4 (so tau = 5 trusts exactly one-right pairs)
    for question, wrong in (("What is 5+5?", "10 "), ("What is 5+5?", "11"), ("Sort cba", "acb"),
                            ("Reverse abc", "cbaa")):
        s = demo_score(question, wrong)
        assert (s == 10.0) if wrong.strip() == demo_task.answer_of(question) else (0.0 <= s <= 4.0)


def test_demo_method_data_noise_is_deterministic(tmp_path):
    from minispin.demo import task as demo_task
    from minispin.data import read_examples, read_preferences
    from minispin.demo.methods import write_method_data

    train = tmp_path / "train.jsonl"
    rows, _ = demo_task.make_rows(demo_task.TaskConfig(n_train=50, n_test=5))
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = write_method_data(train, tmp_path / "a", 40, 0.25, seed=0)
    b = write_method_data(train, tmp_path / "b", 40, 0.25, seed=0)
    assert a["spin"].read_bytes() == b["spin"].read_bytes()
    examples = read_examples(a["spin"])
    assert len(examples) == 40
    wrong = [e for e in examples if not demo_task.is_correct(e.prompt_text, e.real)]
    assert len(wrong) == 10 and all(e.extra["noisy"] for e in wrong)
    prefs = read_preferences(a["preferences"])
    assert [p.chosen for p in prefs] == [e.real for e in examples]
    assert all(not demo_task.is_correct(p.prompt[-1]["content"], p.rejected) and p.rejected != p.chosen for p in prefs)


def test_example_judge_command_speaks_the_protocol():
    repo = Path(__file__).resolve().parents[1]
    judge = JudgeConfig(command=f"{sys.executable} {repo / 'examples' / 'judge_command.py'}")
    q = [{"role": "user", "content": "What is 2+3?"}]
    assert load_scorer(judge)([(0, q, ["5", "6"]), (1, [{"role": "user", "content": "Sort ba"}], ["ab", "ba"])]) == \
        [[10.0, pytest.approx(3.6)], [10.0, 0.0]]


# ----------------------------------------------------------------------------- NEFTune in the training forward

def test_policy_neftune_only_in_training_forwards(tiny):
    from minispin.training import PolicyHead

    model, tok = tiny
    pairs = [Pair(0, list(PROMPT), "5", "6"), Pair(1, [{"role": "user", "content": "Sort cab"}], "abc", "cba")]
    batch = collate_pairs(tokenize_pairs(pairs, tok, max_length=48, max_prompt_length=24), tok.pad_id)
    plain, noisy = PolicyHead(model), PolicyHead(model, neftune_alpha=5.0)
    args = (batch.input_ids, batch.token_index, batch.labels)
    with torch.no_grad():
        clean = plain(*args)
        torch.manual_seed(1)
        a = noisy(*args)
        torch.manual_seed(1)
        b = noisy(*args)
        noisy.eval()
        evaluated = noisy(*args)  # the reference pass runs in eval mode: no noise
    assert torch.equal(a, b) and not torch.allclose(a, clean)  # seeded noise, changes the log-probs
    assert torch.equal(evaluated, clean)
    assert not model.embed_tokens._forward_hooks  # the hook is gone after each forward


# ----------------------------------------------------------------------------- the driver, end to end

E2E_JUDGE = '''
import re
def score(prompt, responses):
    """Right answer of 'What is a+b?' -> 10, else 4 x closeness (like the demo's judge)."""
    a, b = map(int, re.findall(r"\\d+", prompt[-1]["content"]))
    out = []
    for r in responses:
        r = r.strip()
        if r == str(a + b):
            out.append(10.0)
        elif r.isdigit():
            out.append(4.0 * max(0.0, 1 - abs(int(r) - a - b) / 10))
        else:
            out.append(0.0)
    return out
'''
N_E2E = 8


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, tiny):
    from minispin.checkpoint import save_model

    model, tok = tiny
    root = tmp_path_factory.mktemp("methods_e2e")
    model_dir = root / "model"
    save_model(model, model_dir, extra_files=[str(Path(tok.tokenizer_file).parent / n)
                                              for n in ("tokenizer.json", "tokenizer_config.json")])
    rows = [{"prompt": f"What is {i}+{2 * i}?", "response": str(3 * i) if i % 4 else str(3 * i + 1)}
            for i in range(N_E2E)]  # every 4th real answer is wrong
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefs = [{"prompt": f"What is {i}+{i}?", "chosen": str(2 * i), "rejected": str(2 * i + 1)} for i in range(N_E2E)]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (root / "judge.py").write_text(E2E_JUDGE)
    return root, model_dir


def _spin_cli(root: Path, model_dir: Path, out: str, *extra: str, data: str = "sft.jsonl", kill_at: str | None = None):
    import subprocess

    argv = ["--model", str(model_dir), "--data", str(root / data), "--output_dir", str(root / out),
            "--epochs", "1", "--global_batch_size", "4", "--micro_batch_size", "2", "--max_length", "48",
            "--max_prompt_length", "24", "--max_new_tokens", "4", "--generation.batch_size", "8",
            "--save_steps", "0", "--progress", "false", "--optimizer", "adamw", "--device", "cpu",
            *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_TEST_KILL_AT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if kill_at:
        env["MINISPIN_TEST_KILL_AT"] = kill_at
    res = subprocess.run([sys.executable, "-m", "minispin", *argv], env=env, capture_output=True, text=True,
                         timeout=300)
    if kill_at:
        assert res.returncode == -9, res.stderr[-3000:]  # killed where asked
    else:
        assert res.returncode == 0, res.stderr[-3000:]
    return root / out, res.stderr


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_adaptive_two_iterations_end_to_end_counts_and_cache(e2e):
    """2 iterations of the adaptive method (judge = a Python file) through the driver: the logged counts
    match the decisions recomputed from the cached scores, iteration 1 mixes in iteration 0's pairs.
    A run killed (-9) while its judge is scoring continues from the judge cache and ends with the same
    pairs and bit-identical weights."""
    from safetensors.torch import load_file

    root, model_dir = e2e
    options = ("--method", "adaptive", "--judge.function", f"{root / 'judge.py'}:score", "--judge.tau", "5",
               "--judge.smoothing", "0.2", "--judge.prompts_per_call", "3",
               "--iterations", '[{"lr": 1e-3, "beta": 0.1}]', "--num_iterations", "2", "--neftune_alpha", "5")
    run, stderr = _spin_cli(root, model_dir, "adaptive", *options)
    _spin_cli(root, model_dir, "adaptive_killed", *options, kill_at="judge:rows=3")
    killed, _ = _spin_cli(root, model_dir, "adaptive_killed", *options)
    assert _jsonl(killed / "pair_stats.jsonl") == _jsonl(run / "pair_stats.jsonl")
    a, b = (load_file(str(r / "iter1" / "model" / "model.safetensors")) for r in (run, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again, _ = _spin_cli(root, model_dir, "adaptive", *options)  # a finished run: nothing to do, nothing changes
    assert len(_jsonl(again / "pair_stats.jsonl")) == 2
    stats = _jsonl(run / "pair_stats.jsonl")
    assert [s["iteration"] for s in stats] == [0, 1] and all(s["method"] == "adaptive" for s in stats)
    for t, s in enumerate(stats):
        c = s["counts"]
        assert c["pairs"] == N_E2E * (t + 1) and c["trusted"] + c["smoothed"] == c["pairs"]
        assert c["trusted"] == c["kept"] + c["flipped"]
        # recompute the decisions of this iteration's new pairs from the cached judge scores
        cached = {r["index"]: r["scores"] for part in (run / f"iter{t}" / "judge_scores").glob("*.jsonl")
                  for r in _jsonl(part)}
        assert sorted(cached) == list(range(N_E2E))
        want = [adaptive_decision(a, b, 5.0) for a, b in cached.values()]
        new = c["by_source"][f"iter{t}"] if t else c
        assert (new["kept"], new["flipped"], new["smoothed"]) == (want.count(KEPT), want.count(FLIPPED),
                                                                  want.count(SMOOTHED))
    assert "iteration 1: judge flipped" in stderr
    assert (run / "iter1" / "model" / "config.json").is_file()
    metrics = _jsonl(run / "iter1" / "metrics.jsonl")
    assert sum(m["pairs"] for m in metrics) == 2 * N_E2E and all(math.isfinite(m["loss"]) for m in metrics)


def test_sppo_with_command_scorer_and_dpo_end_to_end(e2e):
    root, model_dir = e2e
    script = root / "cmd_judge.py"
    script.write_text('''
import json, sys
for line in sys.stdin:  # the untrained model's samples are never right: score their length so scores differ
    row = json.loads(line)
    print(json.dumps([float(len(r)) for r in row["responses"]]))
''')
    # SPPO's prompts need no answers (the real answer is not a candidate); options given on the command line
    # win over SPPO's schedule, the rest of it (beta 1e-3, temperature 0.7, top-p 0.9, 1 epoch) stays
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i}+{i}?"}) + "\n"
                                                for i in range(N_E2E)))
    run, _ = _spin_cli(root, model_dir, "sppo", "--method", "sppo", "--judge.command", f"{sys.executable} {script}",
                       "--lr", "1e-3", "--generation.num_samples", "3", "--num_iterations", "1", data="prompts.jsonl")
    record = json.loads((run / "config.json").read_text())
    schedule = record["iterations"]  # the effective settings of the run's one iteration
    assert record["settings"]["iterations"] is None  # SPPO's recipe, with the given options over it
    assert len(schedule) == 1 and all(e["train"]["lr"] == 1e-3 and e["generation"]["num_samples"] == 3
                                      and e["train"]["beta"] == 1e-3 and e["generation"]["temperature"] == 0.7
                                      for e in schedule)
    generated = _jsonl(run / "iter0" / "generated.jsonl")
    assert all(len(g["samples"]) == 3 and g["real"][-1]["content"] == "" for g in generated)
    c = _jsonl(run / "pair_stats.jsonl")[0]["counts"]
    assert c["pairs"] == N_E2E and c.get("sppo", 0) + c.get("sppo_tied", 0) == N_E2E and c.get("sppo", 0) > 0
    metrics = _jsonl(run / "iter0" / "metrics.jsonl")
    assert metrics[0]["loss"] > 0 and all(math.isfinite(m["loss"]) for m in metrics)
    assert (run / "iter0" / "model" / "config.json").is_file()

    run, _ = _spin_cli(root, model_dir, "dpo", "--method", "dpo", "--iterations", '[{"lr": 1e-3, "beta": 0.1}]',
                       data="prefs.jsonl")
    assert not (run / "iter0" / "generated.jsonl").exists()  # DPO does not generate
    assert len(_jsonl(run / "iter0" / "reference_logps.jsonl")) == N_E2E
    metrics = _jsonl(run / "iter0" / "metrics.jsonl")
    assert sum(m["pairs"] for m in metrics) == N_E2E and abs(metrics[0]["margins"]) < 1e-4


def test_judge_spin_on_scored_data_without_generation(e2e):
    """generate=false: SPIN rows that already hold generated answers and judge-score columns (like the
    report's gpt-score data) are trained on as they are; flips follow the columns."""
    root, model_dir = e2e
    rows = []
    for i in range(N_E2E):
        prompt = [{"role": "user", "content": f"What is {i}+1?"}]
        rows.append({"real": prompt + [{"role": "assistant", "content": str(i + 1)}],
                     "generated": prompt + [{"role": "assistant", "content": str(i + 2)}],
                     "score_real": float(i % 3), "score_generated": 1.0})
    (root / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run, stderr = _spin_cli(root, model_dir, "judge_cols", "--method", "judge_spin", "--generate", "false",
                            "--iterations", '[{"lr": 1e-3, "beta": 0.1}]', "--num_iterations", "1", data="scored.jsonl")
    assert not (run / "iter0" / "generated.jsonl").exists()
    c = _jsonl(run / "pair_stats.jsonl")[0]["counts"]
    flips = sum(1 for r in rows if r["score_generated"] > r["score_real"])  # score_real 0 -> flipped
    assert (c["pairs"], c["flipped"], c["kept"]) == (N_E2E, flips, N_E2E - flips) and flips == 3
    assert f"judge flipped {flips} of {N_E2E} pairs" in stderr


def test_judge_method_without_judge_or_columns_fails_clearly(e2e):
    import subprocess

    root, model_dir = e2e
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "minispin", "--model", str(model_dir), "--data",
                          str(root / "sft.jsonl"), "--output_dir", str(root / "nojudge"), "--method", "judge_spin",
                          "--max_new_tokens", "2", "--progress", "false", "--num_iterations", "1",
                          "--device", "cpu"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2  # refused before any generation, in one line
    assert res.stderr.splitlines() == ["error: method 'judge_spin' needs a judge for the generated answers: "
                                       "--judge.function module:function (or file.py:function) or --judge.command "
                                       "'cmd ...' (see examples/judge_command.py); score columns in the data only "
                                       "serve --generate false"]
    assert not (root / "nojudge").exists()


def test_describe_counts_status_line():
    from minispin.methods import describe_counts

    judge = summarize_pairs(judge_pairs([ex(0, scores={"score_real": 1.0, "score_generated": 2.0}),
                                         ex(1, scores={"score_real": 2.0, "score_generated": 1.0}, source="iter1")]))
    assert describe_counts(judge) == "judge flipped 1 of 2 pairs; kept 1; iter0: 1/1 flipped; iter1: 0/1 flipped"
    adaptive = summarize_pairs(adaptive_pairs([ex(0, scores={"score_real": 1.0, "score_generated": 2.0})],
                                              JudgeConfig(tau=5.0)))
    assert describe_counts(adaptive) == "judge flipped 0 of 1 pairs; trusted 0, smoothed 1"
    sppo = summarize_pairs(sppo_pairs([ex(0, samples=["a", "b"], sample_scores=[1.0, 1.0])]))
    assert describe_counts(sppo) == "1 SPPO pairs, 1 with all scores tied"


def test_near_miss_avoids_given_answers():
    import random

    from minispin.demo.methods import near_miss

    rng = random.Random(0)
    for q, avoid in (("Sort aab", ("aba",)), ("Reverse aaa", ()), ("What is 0+0?", ("1", "2")), ("Sort ab", ("ba",))):
        for _ in range(20):
            miss = near_miss(q, rng, avoid)
            assert miss not in avoid and miss != __import__("minispin.demo.task").demo.task.answer_of(q)


def test_methods_demo_small_runs_adaptive_and_sppo(tmp_path):
    """The comparison pipeline (minispin.demo.methods) at the reduced size, one process: SFT, then the
    adaptive method and SPPO for 2 iterations each; results.json has every iteration's evaluation and the
    per-iteration pair counts (the numbers themselves are not meaningful at this size)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_TEST_KILL_AT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = tmp_path / "demo_methods"
    res = subprocess.run([sys.executable, "-m", "minispin.demo.methods", "--small", "--nproc", "1", "--out", str(out),
                          "--methods", "adaptive,sppo"], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert list(results["methods"]) == ["adaptive", "sppo"]
    for name, r in results["methods"].items():
        assert len(r["iterations"]) == 2 and all(0 <= e["exact_match"] <= 1 for e in r["iterations"])
        assert [s["iteration"] for s in r["pair_stats"]] == [0, 1]
    adaptive = results["methods"]["adaptive"]["pair_stats"]
    assert [s["counts"]["pairs"] for s in adaptive] == [128, 256]  # iteration 1 mixes in iteration 0's pairs
    assert [s["counts"]["pairs"] for s in results["methods"]["sppo"]["pair_stats"]] == [128, 128]  # SPPO does not
    table = (out / "results.md").read_text()
    assert "| adaptive |" in table and "| SPPO |" in table
    # every stage with its interval and its paired difference from SFT
    assert "vs SFT [95% CI, paired]" in table and "adaptive iter 1" in table and "SPPO iter 0" in table
    assert all(len(e["correct"]) == results["sft"]["n_test"] for r in results["methods"].values()
               for e in r["iterations"])


def test_sppo_on_precomputed_probabilities_without_generation(e2e):
    """SPPO's published data layout (prompt / chosen / rejected + chosen_probs_win / _lose) trains as it is."""
    root, model_dir = e2e
    rows = [{"prompt": f"What is {i}+2?", "chosen": str(i + 2), "rejected": str(i + 3), "chosen_probs": 0.9,
             "chosen_probs_win": 0.8, "chosen_probs_lose": 0.25} for i in range(N_E2E)]
    (root / "sppo_data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run, stderr = _spin_cli(root, model_dir, "sppo_offline", "--method", "sppo", "--generate", "false",
                            "--num_iterations", "1", data="sppo_data.jsonl")
    assert not (run / "iter0" / "generated.jsonl").exists() and not (run / "judge_scores").exists()
    assert _jsonl(run / "pair_stats.jsonl")[0]["counts"] == {"pairs": N_E2E, "sppo_precomputed": N_E2E}
    metrics = _jsonl(run / "iter0" / "metrics.jsonl")
    # first step: policy == reference, so the loss is ((1000 (0.8 - 0.5))^2 + (1000 (0.25 - 0.5))^2) / 2
    assert metrics[0]["loss"] == pytest.approx((300.0 ** 2 + 250.0 ** 2) / 2, rel=1e-4)
