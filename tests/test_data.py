"""Tests for minispin.data: real fixture files, synthetic rows of every format, malformed rows."""
import json
import subprocess
import sys

import pytest

from minispin.errors import UserError
from minispin.data import (DataError, Example, PreferenceExample, ReadResult, data_files, load_rows,
                           read_examples, read_preferences, to_spin_row)
import tiny

FIXTURES = tiny.FIXTURES / "data"
SPIN_PARQUET = FIXTURES / "spin_format_test_prefs.parquet"
ALPACA = FIXTURES / "alpaca_en_demo.json"
DPO = FIXTURES / "dpo_en_demo.json"


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# ----------------------------------------------------------------------------- real fixture files

def test_spin_parquet_fixture():
    pytest.importorskip("pyarrow")
    examples = read_examples(SPIN_PARQUET)
    assert isinstance(examples, ReadResult) and examples.skipped == [] and examples.n_rows == 2625
    assert len(examples) == 2625
    assert [e.index for e in examples] == list(range(2625))
    assert all(e.source == str(SPIN_PARQUET) for e in examples)
    assert all(e.generated is None for e in examples)  # a file before generation
    with_system = [e for e in examples if e.prompt[0]["role"] == "system"]
    assert len(with_system) == 1484
    assert all([m["role"] for m in e.prompt] == ["system", "user"] for e in with_system)
    assert all([m["role"] for m in e.prompt] == ["user"] for e in examples if e.prompt[0]["role"] != "system")

    first = examples[0]
    assert first.prompt[0]["content"].startswith("Là một chuyên viên IT có năng lực")
    assert first.prompt[1]["content"].startswith("Tôi đã cài đặt Keras với backend Tensorflow và CUDA.")
    assert first.prompt_text == first.prompt[1]["content"]
    assert first.real.startswith("Có, Keras với backend Tensorflow có thể buộc sử dụng CPU hoặc GPU.")
    assert first.extra == {} and first.scores is None
    no_system = examples[2]
    assert no_system.prompt == [user("Cung cấp một ví dụ về hệ thống thu thập dữ liệu trong ngành công nghiệp.")]
    assert no_system.real.startswith("Một ví dụ về hệ thống thu thập dữ liệu trong công nghiệp là")
    assert examples[2624].prompt[0]["role"] == "system"
    assert examples[2624].prompt[1]["content"].startswith("Hướng dẫn chi tiết: Trong bài tập này")

    limited = read_examples(SPIN_PARQUET, limit=10)
    assert [e.index for e in limited] == list(range(10)) and limited[3] == examples[3]


def test_spin_fixture_without_generations_is_refused_for_training():
    pytest.importorskip("pyarrow")
    with pytest.raises(DataError) as err:
        read_examples(SPIN_PARQUET, require_generated=True)
    assert err.value.index == 0 and err.value.key == "generated"
    assert "spin_format_test_prefs.parquet: row 1 (1-based): key 'generated'" in str(err.value)
    warnings = []
    pairs = read_preferences(SPIN_PARQUET, on_error="skip", limit=50, warn=warnings.append)
    assert len(pairs) == 0 and [s.index for s in pairs.skipped] == list(range(50))
    assert len(warnings) == 1 and "skipped 50 of 50 rows" in warnings[0]


def test_alpaca_fixture():
    raw = json.loads(ALPACA.read_text(encoding="utf-8"))
    examples = read_examples(ALPACA)
    assert len(examples) == len(raw) == 999
    assert examples[0].prompt == [user("Describe a process of making crepes.")]
    assert examples[0].real.startswith("Making crepes is an easy and delicious process!")
    assert examples[5].prompt == [user("Given the parameters of a triangle, find out its perimeter."
                                       "\n\nSide 1 = 4\nSide 2 = 6\nSide 3 = 8")]
    assert examples[998].prompt == [user("Paraphrase the sentence to remove the cliche.\n\n" + raw[998]["input"])]
    for example, row in zip(examples, raw):
        expected = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
        assert example.prompt == [user(expected)] and example.real == row["output"]
        assert example.generated is None and example.extra == {}
    assert sum("\n\n" + r["input"] in e.prompt_text for e, r in zip(examples, raw) if r["input"]) == 412


def test_dpo_sharegpt_fixture():
    raw = json.loads(DPO.read_text(encoding="utf-8"))
    pairs = read_preferences(DPO)
    assert len(pairs) == 300 and all(isinstance(p, PreferenceExample) for p in pairs)
    assert [p.index for p in pairs] == list(range(300))
    for pair, row in zip(pairs, raw):
        assert pair.chosen == row["chosen"]["value"] and pair.rejected == row["rejected"]["value"]
        assert [m["content"] for m in pair.prompt] == [m["value"] for m in row["conversations"]]
        assert pair.prompt[-1]["role"] == "user" and pair.scores is None
    assert pairs[0].prompt == [user("Hi! I'd like to create a new language game simulating the first "
                                    "person perspective of a character named Angela.")]
    assert [m["role"] for m in pairs[1].prompt] == ["system", "user"]
    assert pairs[1].prompt[0]["content"].startswith("You are a teacher. Given a task, you explain")
    assert pairs[1].chosen.startswith("In this task, you are asked to identify the part-of-speech (")
    assert [m["role"] for m in pairs[4].prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert pairs[4].prompt[1] == assistant("Jane Austen")
    assert sum(p.prompt[0]["role"] == "system" for p in pairs) == 80
    with pytest.raises(DataError, match="use read_preferences"):
        read_examples(DPO)


# ----------------------------------------------------------------------------- synthetic formats

def test_ultrachat_rows_use_first_turn_only(tmp_path):
    path = write_jsonl(tmp_path / "train_sft.jsonl", [
        {"prompt": "Hi?", "prompt_id": "abc", "messages": [user("Hi?"), assistant("Hello."),
                                                           user("More?"), assistant("No.")]},
        {"prompt": "Q", "prompt_id": "def", "messages": [system("Be brief."), user("Q"), assistant("A")]},
    ])
    a, b = read_examples(path)
    assert a.prompt == [user("Hi?")] and a.real == "Hello." and a.generated is None
    assert a.extra == {"prompt": "Hi?", "prompt_id": "abc"}
    assert b.prompt == [system("Be brief."), user("Q")] and b.real == "A" and b.index == 1


def test_prompt_response_rows(tmp_path):
    path = write_jsonl(tmp_path / "pr.jsonl", [
        {"prompt": "p0", "response": "r0"},
        {"prompt": "p1", "completion": "r1", "system": "sys", "id": 7},
        {"prompt": "p2", "answer": "r2"},
        {"prompt": [system("s"), user("u"), assistant("a"), user("p3")], "response": "r3"},
        {"prompt": "p4"},
    ])
    with pytest.raises(DataError, match=r"pr.jsonl: line 5: key 'response': missing"):
        read_examples(path)
    ex = read_examples(path, require_real=False)
    assert [e.real for e in ex] == ["r0", "r1", "r2", "r3", ""]
    assert ex[1].prompt == [system("sys"), user("p1")] and ex[1].extra == {"id": 7}
    assert ex[3].prompt == [system("s"), user("u"), assistant("a"), user("p3")]
    forced = read_examples(path, format="prompt_response", limit=3)
    assert [e.prompt_text for e in forced] == ["p0", "p1", "p2"]


def test_alpaca_history_and_system(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Translate", "input": "  ", "output": "ok", "system": "S",
         "history": [["h1", "a1"]]},
        {"instruction": "", "input": "only input", "output": "ok"},
    ])
    a, b = read_examples(path)
    assert a.prompt == [system("S"), user("h1"), assistant("a1"), user("Translate")]
    assert b.prompt == [user("only input")]


def test_spin_rows_with_generations_scores_and_multiturn(tmp_path):
    prompt = [system("s"), user("u1"), assistant("a1"), user("u2")]
    path = write_jsonl(tmp_path / "iter0.jsonl", [
        {"real": prompt + [assistant("real")], "generated": prompt + [assistant("gen")],
         "index": 12, "score_real": 7, "score_generated": 8.5},
        {"real": [user("q"), assistant("r")], "generated": [user("q"), assistant(None)]},
        {"real": [user("q"), assistant("r")], "generated": [user("q")]},
        {"real": [user("q"), assistant("r")]},
        {"real": [system("s"), user("q"), assistant("r")], "generated": [user("q"), assistant("g")]},
    ])
    ex = read_examples(path)
    assert ex[0].prompt == prompt and ex[0].real == "real" and ex[0].generated == "gen"
    assert ex[0].scores == {"score_real": 7.0, "score_generated": 8.5}
    assert ex[0].extra == {"index": 12}
    assert [e.generated for e in ex[1:]] == [None, None, None, "g"]
    assert ex[4].prompt == [system("s"), user("q")]  # the prompt comes from `real`
    pairs = read_preferences(path, on_error="skip", warn=lambda msg: None)
    assert len(pairs) == 2 and pairs[0].chosen == "real" and pairs[0].rejected == "gen"
    assert pairs[0].scores == {"score_real": 7.0, "score_generated": 8.5}
    assert [s.index for s in pairs.skipped] == [1, 2, 3]


def test_to_spin_row_round_trip(tmp_path):
    examples = read_examples(ALPACA, limit=20) + read_preferences(DPO, limit=0)
    rows = [to_spin_row(e, f"generated {e.index}") for e in examples]
    assert rows[0] == {"real": [user("Describe a process of making crepes."), assistant(examples[0].real)],
                       "generated": [user("Describe a process of making crepes."), assistant("generated 0")],
                       "index": 0}
    rows[0]["real"][0]["content"] = "mutated"
    assert examples[0].prompt[0]["content"] == "Describe a process of making crepes."  # no aliasing
    rows[0] = to_spin_row(examples[0], "generated 0")
    back = read_examples(write_jsonl(tmp_path / "spin.jsonl", rows), require_generated=True)
    for original, again in zip(examples, back):
        assert (again.prompt, again.real, again.generated) == (original.prompt, original.real,
                                                               f"generated {original.index}")
        assert again.extra == {"index": original.index}
    with pytest.raises(TypeError):
        to_spin_row(examples[0], None)


def test_trl_preference_variants(tmp_path):
    conv_c = [system("s"), user("q"), assistant("good")]
    conv_r = [system("s"), user("q"), assistant("bad")]
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "q0", "chosen": "c0", "rejected": "r0", "chosen_score": 4.5, "rejected_score": 1,
         "real_score": None},
        {"chosen": conv_c, "rejected": conv_r},  # implicit prompt
        {"prompt": "q", "chosen": conv_c, "rejected": conv_r, "score_chosen": 9, "score_rejected": 3},
        {"prompt": [user("q3")], "chosen": [assistant("c3")], "rejected": [assistant("r3")],
         "chosen_probs": 0.7, "chosen_probs_win": 0.6, "chosen_probs_lose": 0.4, "source": "x"},
    ])
    p = read_preferences(path)
    assert (p[0].prompt, p[0].chosen, p[0].rejected) == ([user("q0")], "c0", "r0")
    assert p[0].scores == {"chosen_score": 4.5, "rejected_score": 1.0} and p[0].extra == {}
    assert (p[1].prompt, p[1].chosen, p[1].rejected) == ([system("s"), user("q")], "good", "bad")
    assert p[2].prompt == [system("s"), user("q")] and p[2].scores == {"score_chosen": 9.0, "score_rejected": 3.0}
    assert p[3].prompt == [user("q3")] and p[3].extra == {"source": "x"}
    assert p[3].scores == {"chosen_probs": 0.7, "chosen_probs_win": 0.6, "chosen_probs_lose": 0.4}


# ----------------------------------------------------------------------------- files and directories

def test_directory_split_and_global_index(tmp_path):
    write_jsonl(tmp_path / "train_prefs-00001-of-00002.jsonl", [{"prompt": "b", "response": "B"}])
    write_jsonl(tmp_path / "train_prefs-00000-of-00002.jsonl",
                [{"prompt": "a0", "response": "A"}, {"prompt": "a1", "response": "A"}])
    write_jsonl(tmp_path / "test_prefs-00000-of-00001.jsonl", [{"prompt": "t", "response": "T"}])
    write_jsonl(tmp_path / "pretrain.jsonl", [{"prompt": "p", "response": "P"}])
    (tmp_path / "notes.txt").write_text("not data")
    train = read_examples(tmp_path, split="train_prefs")
    assert [(e.index, e.prompt_text) for e in train] == [(0, "a0"), (1, "a1"), (2, "b")]
    assert train[2].source.endswith("train_prefs-00001-of-00002.jsonl")
    assert [e.prompt_text for e in read_examples(tmp_path, split="train")] == ["a0", "a1", "b"]
    assert [e.prompt_text for e in read_examples(tmp_path, split="test")] == ["t"]
    with pytest.raises(DataError, match=r"several splits \(test_prefs, train_prefs\); choose one"):
        read_examples(tmp_path)  # never mix test rows into training silently
    assert [p.name for p in data_files(tmp_path, split="train")][0] == "train_prefs-00000-of-00002.jsonl"
    with pytest.raises(DataError, match="no file name contains split 'validation'"):
        read_examples(tmp_path, split="validation")
    with pytest.raises(DataError, match="only chooses among the files of a folder.*leave out --split"):
        read_examples(tmp_path / "pretrain.jsonl", split="test")  # a split given for one file
    assert load_rows(tmp_path / "pretrain.jsonl") == [{"prompt": "p", "response": "P"}]


def test_directory_of_one_split_and_hf_snapshot_layout(tmp_path):
    """One split's shards (or unsplit files) read without split=; a Hugging Face dataset download
    (<repo>/README.md + <repo>/data/<split>-*.parquet) is read from its data/ folder."""
    write_jsonl(tmp_path / "data" / "train_sft-00001-of-00002.jsonl", [{"prompt": "b", "response": "B"}])
    write_jsonl(tmp_path / "data" / "train_sft-00000-of-00002.jsonl", [{"prompt": "a", "response": "A"}])
    (tmp_path / "README.md").write_text("dataset card")
    assert [e.prompt_text for e in read_examples(tmp_path)] == ["a", "b"]
    write_jsonl(tmp_path / "data" / "test_sft-00000-of-00001.jsonl", [{"prompt": "t", "response": "T"}])
    assert [e.prompt_text for e in read_examples(tmp_path, split="test_sft")] == ["t"]
    with pytest.raises(DataError, match=r"data: the directory holds several splits \(test_sft, train_sft\)"):
        read_examples(tmp_path)
    write_jsonl(tmp_path / "parts" / "part-0.jsonl", [{"prompt": "x", "response": "X"}])
    write_jsonl(tmp_path / "parts" / "part-1.jsonl", [{"prompt": "y", "response": "Y"}])
    assert [e.prompt_text for e in read_examples(tmp_path / "parts")] == ["x", "y"]


def test_directory_of_parquet_parts(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    rows = load_rows(SPIN_PARQUET)
    pq.write_table(pa.Table.from_pylist(rows[:1000]), tmp_path / "train_prefs-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[1000:]), tmp_path / "train_prefs-00001-of-00002.parquet")
    split = read_examples(tmp_path, split="train_prefs")
    whole = read_examples(SPIN_PARQUET)
    assert [(e.index, e.prompt, e.real) for e in split] == [(e.index, e.prompt, e.real) for e in whole]


def test_file_level_errors(tmp_path):
    (tmp_path / "lines.json").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    with pytest.raises(DataError, match=r"lines.json: invalid JSON .*Extra data.*name the file .jsonl"):
        read_examples(tmp_path / "lines.json")
    (tmp_path / "obj.json").write_text('{"data": []}')
    with pytest.raises(DataError, match=r"obj.json: expected a JSON array of row objects"):
        read_examples(tmp_path / "obj.json")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 3: invalid JSON"):
        read_examples(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"list.jsonl: line 2: expected a JSON object per row, got list"):
        read_examples(tmp_path / "list.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        read_examples(tmp_path / "data.csv")
    with pytest.raises(DataError, match="no such file or directory"):
        read_examples(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .* files in directory"):
        read_examples(tmp_path / "empty")
    (tmp_path / "fake.parquet").write_bytes(b"not a parquet file at all")
    pytest.importorskip("pyarrow")
    with pytest.raises(DataError, match="fake.parquet: cannot read parquet"):
        read_examples(tmp_path / "fake.parquet")
    with pytest.raises(ValueError, match="on_error"):
        read_examples(tmp_path / "lines.json", on_error="ignore")
    with pytest.raises(ValueError, match="format must be"):
        read_examples(ALPACA, format="sharegpt")


def test_parquet_without_pyarrow_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"pip install pyarrow \(or pip install minispin\[parquet\]\)"):
        read_examples(SPIN_PARQUET)
    assert len(read_examples(ALPACA, limit=3)) == 3  # json still works


# ----------------------------------------------------------------------------- malformed rows

GOOD = {"prompt": "fine", "response": "fine"}
MALFORMED = [  # (row, key named in the error, words of the reason)
    ({"messages": [user("q"), assistant(5)]}, "messages[1].content", "content must be a string, got int"),
    ({"messages": [assistant("hi"), user("q")]}, "messages", "before the first user turn"),
    ({"messages": [system("s"), assistant("a")]}, "messages", "no user turn"),
    ({"messages": [user("q")]}, "messages[1]", "missing or empty answer"),
    ({"messages": [user("q"), user("again"), assistant("a")]}, "messages[1]", "expected the assistant answer"),
    ({"messages": "q"}, "messages", "expected a list of messages, got str"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "unknown role 'bot'"),
    ({"messages": [{"text": "x"}]}, "messages[0]", "neither 'role' nor 'from'"),
    ({"real": [user("   "), assistant("a")]}, "real", "empty prompt"),
    ({"real": [user("q"), assistant("a"), user("q2")]}, "real", "must end with the assistant turn"),
    ({"real": [user("q"), assistant("")]}, "real", "missing or empty answer"),
    ({"real": [assistant("a")]}, "real", "empty prompt"),
    ({"real": [user("q"), assistant("a")], "generated": [user("other"), assistant("g")]}, "generated",
     "differs from the prompt in 'real'"),
    ({"real": [user("q"), assistant("a")], "score_real": "high"}, "score_real", "finite number"),
    ({"real": [user("q"), assistant("a")], "real_score": float("nan")}, "real_score", "finite number"),
    ({"instruction": 3, "output": "o"}, "instruction", "expected a string, got int"),
    ({"instruction": " ", "input": "", "output": "o"}, "instruction", "empty prompt"),
    ({"instruction": "i", "output": "o", "history": [["only one"]]}, "history[0]", "pair of strings"),
    ({"prompt": "", "response": "r"}, "prompt", "empty"),
    ({"prompt": "p", "response": ["r"]}, "response", "expected a string, got list"),
    ({"text": "no known keys"}, None, "cannot detect the row format"),
]


@pytest.mark.parametrize("row,key,reason", MALFORMED)
def test_malformed_row_raises_with_file_index_and_key(tmp_path, row, key, reason):
    path = write_jsonl(tmp_path / "bad_rows.jsonl", [GOOD, GOOD, GOOD, row, GOOD])
    with pytest.raises(DataError) as err:
        read_examples(path)
    assert (err.value.source, err.value.index, err.value.key) == (str(path), 3, key)
    assert str(path) in str(err.value) and "line 4" in str(err.value) and reason in str(err.value)
    if key is not None:
        assert f"key {key!r}" in str(err.value)


def test_skip_mode_reports_every_bad_row(tmp_path, caplog):
    rows = [GOOD] * 30
    bad = {4: MALFORMED[0][0], 9: MALFORMED[9][0], 20: MALFORMED[14][0], 29: MALFORMED[20][0]}
    rows = [bad.get(i, row) for i, row in enumerate(rows)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level("WARNING", logger="minispin.data"):
        result = read_examples(path, on_error="skip")
    assert len(result) == 26 and result.n_rows == 30
    assert [e.index for e in result] == [i for i in range(30) if i not in bad]
    assert [(s.index, s.source) for s in result.skipped] == [(i, str(path)) for i in sorted(bad)]
    assert "key 'messages[1].content'" in result.skipped[0].reason
    summary = [r.getMessage() for r in caplog.records]
    assert len(summary) == 1 and summary[0].startswith("skipped 4 of 30 rows of") and "line 5" in summary[0]


MALFORMED_PREFERENCES = [
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "c"},
      "rejected": {"from": "gpt", "value": "r"}}, "chosen", "expected an assistant ('gpt') answer"),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "c"}},
     "rejected", "missing"),
    ({"conversations": [{"from": "tool", "value": "q"}], "chosen": "c", "rejected": "r"},
     "conversations[0].from", "unknown sender 'tool'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
      "chosen": "c", "rejected": "r"}, "conversations", "must end with a user turn"),
    ({"chosen": [user("q"), assistant("c")], "rejected": [user("other"), assistant("r")]},
     "rejected", "different conversations"),
    ({"chosen": "c", "rejected": "r"}, "prompt", "missing"),
    ({"prompt": "q", "chosen": [user("not q"), assistant("c")], "rejected": [user("not q"), assistant("r")]},
     "prompt", "differs from the last user turn"),
    ({"prompt": "q", "chosen": [user("q")], "rejected": "r"}, "chosen", "must end with an assistant turn"),
    ({"prompt": "q", "chosen": "c", "rejected": "  "}, "rejected", "empty answer"),
    ({"prompt": "q", "chosen": "c", "rejected": "r", "chosen_score": True}, "chosen_score", "finite number"),
]


@pytest.mark.parametrize("row,key,reason", MALFORMED_PREFERENCES)
def test_malformed_preference_row(tmp_path, row, key, reason):
    good = {"prompt": "q", "chosen": "c", "rejected": "r"}
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, row])
    with pytest.raises(DataError) as err:
        read_preferences(path)
    assert (err.value.index, err.value.key) == (1, key) and reason in str(err.value)
    skipped = read_preferences(path, on_error="skip", warn=lambda msg: None)
    assert len(skipped) == 1 and [s.index for s in skipped.skipped] == [1]


def test_data_modules_do_not_import_torch():
    # load the modules without the package __init__ (which imports the model, hence torch): an empty
    # package object whose path is the source folder, so their relative imports (minispin.errors) resolve
    package = tiny.REPO / "minispin"
    code = ("import sys, types\n"
            "pkg = sys.modules['minispin'] = types.ModuleType('minispin')\n"
            f"pkg.__path__ = [r'{package}']\n"
            "import minispin.data, minispin.io\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith('minispin.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] ['minispin.data', 'minispin.errors', 'minispin.io']"


def test_example_is_frozen():
    example = read_examples(ALPACA, limit=1)[0]
    assert isinstance(example, Example)
    with pytest.raises(AttributeError):
        example.real = "changed"


def test_errors_name_the_1_based_line_or_row_and_the_files_format_key(tmp_path):
    """A row missing `messages` in an UltraChat file is reported as missing `messages` (not `response`:
    it still has a `prompt`), with its 1-based line; a .json row by its 1-based row; a non-UTF-8 byte by
    its line and column, not a byte offset."""
    chat = [{"prompt": f"q{i}", "prompt_id": str(i), "messages": [user(f"q{i}"), assistant(f"a{i}")]}
            for i in range(20)]
    chat[14] = {"prompt": "q14", "prompt_id": "14"}
    path = write_jsonl(tmp_path / "ultrachat.jsonl", chat)
    with pytest.raises(DataError) as err:
        read_examples(path)
    assert str(err.value) == f"{path}: line 15: key 'messages': missing (format 'ultrachat')"
    assert (err.value.index, err.value.key) == (14, "messages")
    as_json = tmp_path / "ultrachat.json"
    as_json.write_text(json.dumps(chat))
    with pytest.raises(DataError, match=r"ultrachat.json: row 15 \(1-based\): key 'messages': missing"):
        read_examples(as_json)
    lines = [json.dumps({"prompt": f"p{i}", "response": "r"}).encode() for i in range(20)]
    lines[16] = b'{"prompt": "caf\xe9", "response": "r"}'
    (tmp_path / "latin1.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl: line 17: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_examples(tmp_path / "latin1.jsonl")
    (tmp_path / "latin1.json").write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    with pytest.raises(DataError, match=r"latin1.json: line 18: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_examples(tmp_path / "latin1.json")
    assert issubclass(DataError, UserError)
