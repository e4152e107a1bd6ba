"""minispin.demo.task (CPU): the task generator is deterministic and right (answers recomputed
independently), answer checking, and the character-level tokenizer."""
import json
import random

import pytest

from minispin.demo import task as demo_task
from minispin.tokenizer import load_tokenizer


def _independent_answer(question: str) -> str:
    """The answer recomputed without demo_task's parser."""
    words = question.split()
    if words[0] == "Reverse":
        return "".join(reversed(list(words[1])))
    if words[0] == "Sort":
        return "".join(sorted(list(words[1])))
    a, b = question[len("What is "):-1].split("+")
    return str(int(a) + int(b))


def test_task_is_deterministic_and_correct(tmp_path):
    config = demo_task.TaskConfig(n_train=300, n_test=60)
    train, test = demo_task.make_rows(config)
    assert (train, test) == demo_task.make_rows(config)
    assert demo_task.make_rows(demo_task.TaskConfig(n_train=300, n_test=60, seed=7))[0] != train
    assert len(train) == 300 and len(test) == 60
    assert not {r["prompt"] for r in test} & {r["prompt"] for r in train}  # held out
    assert len({r["prompt"] for r in test}) == 60
    assert {r["skill"] for r in train} == set(demo_task.SKILLS)
    for row in train + test:
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": row["prompt"]}
        assert assistant["role"] == "assistant"
        assert assistant["content"] == _independent_answer(row["prompt"])
        assert demo_task.skill_of(row["prompt"]) == row["skill"]

    # files: same config -> same bytes
    a, b = demo_task.write_task(tmp_path / "a", config), demo_task.write_task(tmp_path / "b", config)
    for key in ("train", "test"):
        assert a[key].read_bytes() == b[key].read_bytes()
    assert [json.loads(line) for line in a["test"].read_text().splitlines()] == test
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a["tokenizer"] / name).read_bytes() == (b["tokenizer"] / name).read_bytes()


def test_answer_checking():
    assert demo_task.is_correct("Reverse abc", "cba")
    assert demo_task.is_correct("Reverse abc", " cba\n")  # surrounding whitespace is ignored
    assert not demo_task.is_correct("Reverse abc", "cb a")
    assert not demo_task.is_correct("Reverse abc", "abc")
    assert demo_task.is_correct("Sort dcab", "abcd")
    assert not demo_task.is_correct("Sort dcab", "abdc")
    assert demo_task.is_correct("What is 47+85?", "132")
    assert not demo_task.is_correct("What is 47+85?", "0132")
    assert not demo_task.is_correct("What is 47+85?", "")
    rng = random.Random(0)
    for _ in range(200):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        assert demo_task.answer_of(f"What is {a}+{b}?") == str(a + b)
    for bad in ("What is 4+?", "Reverse ABC", "Sort", "hello"):
        with pytest.raises(ValueError, match="not a demo-task question"):
            demo_task.answer_of(bad)


def test_tokenizer_is_character_level(tmp_path):
    tok = load_tokenizer(demo_task.write_tokenizer(tmp_path))
    assert tok.vocab_size == demo_task.vocab_size()
    train, _ = demo_task.make_rows(demo_task.TaskConfig(n_train=200, n_test=10))
    for row in train:
        text = row["prompt"] + row["messages"][1]["content"]
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)  # one token per character
        assert tok.unk_id not in ids
        assert tok.decode(ids) == text
    msgs = [{"role": "user", "content": "Sort cab"}, {"role": "assistant", "content": "abc"}]
    assert tok.apply_chat_template(msgs) == "<s><|user|>Sort cab<|assistant|>abc</s>"
    prompt = tok.render_prompt(msgs)
    assert prompt == "<s><|user|>Sort cab<|assistant|>"
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == tok.bos_id and ids[1] == tok.token_to_id("<|user|>") and ids[-1] == tok.token_to_id("<|assistant|>")
    assert len(ids) == 3 + len("Sort cab")
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
