"""The built-in demo's task: three small skills with checkable answers, as chat, plus a tiny
character-level tokenizer, written as ordinary files so the demo runs through minispin's real loaders.

Skills (drawn uniformly), each answer exactly checkable:
    reverse   "Reverse kqzt"    -> "tzqk"   (3-6 random lowercase letters)
    sort      "Sort kqzt"       -> "kqtz"   (the same letters in alphabetical order)
    add       "What is 47+38?"  -> "85"     (two numbers 0..99)
A ~1M-parameter model learns them at different speeds (reverse and sort within a few hundred steps,
addition with carries much later), so a short SFT leaves it partially right - SPIN's premise is that
the SFT model's own answers differ from the real ones. Everything is deterministic in the seed:
`python -m minispin.demo.task --out DIR` writes

    DIR/train_sft.jsonl, DIR/test_sft.jsonl   rows {"prompt", "prompt_id", "skill", "messages": [user, assistant]}
                                              (the UltraChat200k layout minispin's data readers take)
    DIR/tokenizer/tokenizer.json               character-level `tokenizers` model with special tokens
    DIR/tokenizer/tokenizer_config.json        bos/eos/pad tokens and a small Jinja chat template
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, USER, ASSISTANT]  # ids 0..5
# Every character a prompt or answer of this task can contain, plus some room for prompts typed by hand.
CHARACTERS = list(string.digits + "+-*=?.,:!' " + string.ascii_lowercase + string.ascii_uppercase)
# One user turn, then the assistant turn closed by EOS; the generation prompt ends where the answer begins.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}" + ASSISTANT + "{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('the demo chat template knows only user and assistant turns') }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)
SKILLS = ("reverse", "sort", "add")
_PATTERNS = {
    "reverse": re.compile(r"^Reverse ([a-z]+)$"),
    "sort": re.compile(r"^Sort ([a-z]+)$"),
    "add": re.compile(r"^What is (\d+)\+(\d+)\?$"),
}


@dataclass(frozen=True)
class TaskConfig:
    """Sizes of the demo task."""

    n_train: int = 20000
    n_test: int = 600
    min_letters: int = 3
    max_letters: int = 6
    max_number: int = 99
    seed: int = 1234


def skill_of(prompt: str) -> str:
    """Which skill a task question asks for; ValueError for text that is not a task question."""
    for skill, pattern in _PATTERNS.items():
        if pattern.match(prompt.strip()):
            return skill
    raise ValueError(f"not a demo-task question (expected 'Reverse abc', 'Sort abc' or 'What is A+B?'): {prompt!r}")


def answer_of(prompt: str) -> str:
    """The correct answer to a task question; ValueError for text that is not one."""
    text = prompt.strip()
    skill = skill_of(text)
    match = _PATTERNS[skill].match(text)
    if skill == "reverse":
        return match.group(1)[::-1]
    if skill == "sort":
        return "".join(sorted(match.group(1)))
    return str(int(match.group(1)) + int(match.group(2)))


def is_correct(prompt: str, generated: str) -> bool:
    """Exact check of a generated answer: its stripped text equals the right answer."""
    return generated.strip() == answer_of(prompt)


def make_question(rng: random.Random, config: TaskConfig) -> tuple[str, str]:
    """(skill, question) drawn from rng."""
    skill = rng.choice(SKILLS)
    if skill == "add":
        return skill, f"What is {rng.randint(0, config.max_number)}+{rng.randint(0, config.max_number)}?"
    n = rng.randint(config.min_letters, config.max_letters)
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(n))
    return skill, ("Reverse " if skill == "reverse" else "Sort ") + word


def make_rows(config: TaskConfig = TaskConfig()) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, test rows): deterministic in config; no test question occurs in train."""
    rng = random.Random(config.seed)
    test: dict[str, str] = {}
    while len(test) < config.n_test:
        skill, q = make_question(rng, config)
        test.setdefault(q, skill)
    train: list[tuple[str, str]] = []
    while len(train) < config.n_train:
        skill, q = make_question(rng, config)
        if q not in test:
            train.append((skill, q))

    def row(split: str, i: int, skill: str, q: str) -> dict[str, Any]:
        return {"prompt": q, "prompt_id": f"{split}-{i}", "skill": skill,
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer_of(q)}]}

    return ([row("train", i, skill, q) for i, (skill, q) in enumerate(train)],
            [row("test", i, skill, q) for i, (q, skill) in enumerate(test.items())])


def tokenizer_files() -> dict[str, str]:
    """{file name: text} of a character-level tokenizer (tokenizers BPE with no merges = one token per
    character; the special tokens are added tokens, so "<|user|>" in text is one token)."""
    from tokenizers import Tokenizer, decoders, models, processors

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK,
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 64,
        "chat_template": CHAT_TEMPLATE,
    }
    return {"tokenizer.json": tok.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(
                {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}, indent=2) + "\n"}


def vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(CHARACTERS)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write the character-level tokenizer files into out_dir (e.g. a model folder); returns it."""
    out = Path(out_dir)
    for name, text in tokenizer_files().items():
        _atomic_write(out / name, text)
    return out


def write_task(out_dir: str | os.PathLike, config: TaskConfig = TaskConfig()) -> dict[str, Path]:
    """Write train/test jsonl and the tokenizer into out_dir (atomic files; same config = same bytes)."""
    out = Path(out_dir)
    train, test = make_rows(config)
    paths = {"train": out / "train_sft.jsonl", "test": out / "test_sft.jsonl", "tokenizer": out / "tokenizer"}
    _atomic_write(paths["train"], "".join(json.dumps(r) + "\n" for r in train))
    _atomic_write(paths["test"], "".join(json.dumps(r) + "\n" for r in test))
    write_tokenizer(paths["tokenizer"])
    return paths


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder to write the task data and tokenizer into")
    p.add_argument("--n-train", type=int, default=TaskConfig.n_train)
    p.add_argument("--n-test", type=int, default=TaskConfig.n_test)
    p.add_argument("--seed", type=int, default=TaskConfig.seed)
    a = p.parse_args(argv)
    paths = write_task(a.out, TaskConfig(n_train=a.n_train, n_test=a.n_test, seed=a.seed))
    print(json.dumps({k: str(v) for k, v in paths.items()}))


if __name__ == "__main__":
    main()
