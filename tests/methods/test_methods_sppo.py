"""minispin.methods.sppo (CPU, no model): prompt-only data, the win-rate matrix against float64, the winner /
loser choice and targets checked by hand, pairs from scored samples or precomputed probabilities."""
from __future__ import annotations

import json
import math

import pytest
import torch

from minispin.data import PreferenceExample
from minispin.methods import decision_counts, sppo_choice, sppo_pairs, win_rate_matrix
from methods_helpers import PROMPT, ex


def test_sppo_prompts_need_no_answers_and_may_come_from_preference_rows(tmp_path):
    """SPPO samples its candidates: prompt-only rows are enough, preference rows give their prompts."""
    from minispin.methods import read_prompts
    from minispin.driver import RunConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ("Say hi", "Count")))
    got = read_prompts(RunConfig(model="m", data=str(prompts), method="sppo"))
    assert [(e.prompt, e.real, e.generated) for e in got] == \
        [([{"role": "user", "content": "Say hi"}], "", None), ([{"role": "user", "content": "Count"}], "", None)]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps({"prompt": "Say yo", "chosen": "yo", "rejected": "no"}) + "\n")
    got = read_prompts(RunConfig(model="m", data=str(prefs), method="sppo"))
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
    with pytest.raises(ValueError, match=r"row 1 \(1-based\).*the samples have no scores"):
        sppo_pairs([ex(0, samples=["a", "b"])])
    with pytest.raises(ValueError, match=r"row 1 \(1-based\).*no 'samples'"):
        sppo_pairs([ex(0)])
    with pytest.raises(ValueError, match="expected 2 scores"):
        sppo_pairs([ex(0, samples=["a", "b"], sample_scores=[1.0])])
    bad = PreferenceExample(index=1, prompt=list(PROMPT), chosen="g", rejected="b", source="d",
                            scores={"chosen_probs_win": 1.5, "chosen_probs_lose": 0.3})
    with pytest.raises(ValueError, match="not a probability"):
        sppo_pairs([bad])
    counts = decision_counts(sppo_pairs([e, ex(1, samples=["x", "y"], sample_scores=[1.0, 1.0])]))
    assert counts == {"pairs": 2, "sppo": 1, "sppo_tied": 1}
