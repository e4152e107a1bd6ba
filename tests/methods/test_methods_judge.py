"""minispin.methods.judge (CPU, no model): judge-SPIN flips, judge settings, judges given as a function (file
or module) or a command (JSON lines; examples/judge_command.py), and their resumable score cache."""
from __future__ import annotations

import sys

import pytest

from minispin.methods import (FLIPPED, KEPT, SMOOTHED, JudgeConfig, adaptive_pairs, attach_judge_scores,
                              attach_sample_scores, judge_decision, judge_pairs, load_scorer, score_prompts,
                              sppo_pairs, summarize_pairs)
from methods_helpers import PROMPT, ex
from tiny import REPO


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


def test_judge_config_validation():
    with pytest.raises(ValueError, match="not both"):
        JudgeConfig(function="a:b", command="x")
    with pytest.raises(ValueError, match="module:function"):
        JudgeConfig(function="nocolon")
    with pytest.raises(ValueError, match="tau"):
        JudgeConfig(tau=-1.0)
    with pytest.raises(ValueError, match="smoothing"):
        JudgeConfig(smoothing=0.7)


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


def test_example_judge_command_speaks_the_protocol():
    judge = JudgeConfig(command=f"{sys.executable} {REPO / 'examples' / 'judge_command.py'}")
    q = [{"role": "user", "content": "What is 2+3?"}]
    assert load_scorer(judge)([(0, q, ["5", "6"]), (1, [{"role": "user", "content": "Sort ba"}], ["ab", "ba"])]) == \
        [[10.0, pytest.approx(3.6)], [10.0, 0.0]]
