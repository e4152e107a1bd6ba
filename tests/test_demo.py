"""The built-in demo: its task generator, its end-to-end run (reduced size, 2 torchrun ranks), and the
zephyr example script's argument checks."""
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from minispin.demo import run as demo_run
from minispin.demo import seeds as demo_seeds
from minispin.demo import task as demo_task
from minispin.demo.plateau import PlateauConfig
from minispin.report import write_report
from minispin.stats import wilson_interval
from minispin.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the demo runs the kernels' plain-torch CPU path
    env.pop("MINISPIN_TEST_KILL_AT", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# ----------------------------------------------------------------------------- the task

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


# ----------------------------------------------------------------------------- statistics in the tables

def _stage(name, label, correct, by_skill=None, logp=-3.0):
    return {"stage": name, "label": label, "n_test": len(correct), "correct": correct,
            "exact_match": sum(correct) / len(correct), "mean_logprob": logp, "mean_logprob_per_token": logp / 4,
            "exact_match_by_skill": by_skill or {s: sum(correct) / len(correct) for s in demo_task.SKILLS}}


def test_demo_table_has_intervals_and_paired_differences():
    """Hand-made per-question results: SFT right on 30 of 60; SPIN right on those and 6 more (a paired
    difference of exactly +0.1 that no resample can make negative); continued SFT = SFT."""
    sft = [1] * 30 + [0] * 30
    spin = [1] * 36 + [0] * 24
    stages = [_stage("sft", "SFT", sft), _stage("continued_sft", "continued SFT", list(sft)),
              _stage("spin_iter0", "SPIN iter 0", spin)]
    rows = demo_run.interval_rows(stages)
    assert [r["stage"] for r in rows] == ["SFT", "continued SFT", "SPIN iter 0"]
    assert (rows[0]["low"], rows[0]["high"]) == pytest.approx(wilson_interval(30, 60))
    assert (rows[2]["low"], rows[2]["high"]) == pytest.approx(wilson_interval(36, 60))
    assert "vs_baseline" not in rows[0]
    same = rows[1]["vs_baseline"]
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    better = rows[2]["vs_baseline"]
    assert better["difference"] == pytest.approx(0.1) and 0 < better["low"] < 0.1 < better["high"] <= 0.2
    text = demo_run.format_results(stages)
    lo, hi = wilson_interval(36, 60)
    line = next(x for x in text.splitlines() if x.startswith("SPIN iter 0") and "[" in x)
    assert f"0.600 [{lo:.3f}, {hi:.3f}]" in line
    assert f"+0.100 [{better['low']:+.3f}, {better['high']:+.3f}]" in line
    assert "accuracy [95% CI]" in text and "vs SFT [95% CI, paired]" in text
    assert "mean log p(real)  per token" in text  # the per-skill / log-prob table follows
    assert "60 held-out questions" in text


def _run(seed, values, above=(0.01, 0.05)):
    """A hand-made finished demo run: exact match per stage (SFT first) and per-stage bootstrap intervals."""
    labels = ["SFT", "continued SFT", "SPIN iter 0"]
    stages = [dict(_stage(n, lab, [1, 0]), exact_match=v, mean_logprob=-3.0 - v,
                   exact_match_by_skill={"reverse": v / 2, "sort": v, "add": 2 * v})
              for n, lab, v in zip(["sft", "continued_sft", "spin_iter0"], labels, values)]
    stats = [{"stage": "SFT"}] + [{"stage": lab, "vs_baseline": {"difference": v - values[0], "low": lo, "high": hi}}
                                  for lab, v, (lo, hi) in zip(labels[1:], values[1:], [above, (-0.05, -0.01)])]
    return {"config": {"seed": seed}, "stages": stages, "stats": stats, "seconds_this_run": 1.0}


def test_seeds_aggregation_mean_and_standard_error():
    runs = [_run(0, [0.30, 0.32, 0.25]), _run(1, [0.36, 0.35, 0.31]), _run(2, [0.33, 0.35, 0.37])]
    summary = demo_seeds.aggregate_seeds(runs)
    assert summary["seeds"] == [0, 1, 2]
    by = {s["stage"]: s for s in summary["stages"]}
    assert list(by) == ["sft", "continued_sft", "spin_iter0"]
    sft = by["sft"]["exact_match"]
    # mean 0.33; sample sd = sqrt(((-.03)^2 + .03^2 + 0) / 2) = 0.03; SE = 0.03 / sqrt(3)
    assert sft["mean"] == pytest.approx(0.33) and sft["se"] == pytest.approx(0.03 / math.sqrt(3))
    assert "vs_baseline" not in by["sft"]
    spin = by["spin_iter0"]
    diffs = [-0.05, -0.05, 0.04]  # per seed: SPIN - SFT of the same seed
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    assert spin["vs_baseline"]["mean"] == pytest.approx(mean) and spin["vs_baseline"]["se"] == pytest.approx(sd / math.sqrt(3))
    t975_df2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom
    assert spin["vs_baseline"]["low"] == pytest.approx(mean - t975_df2 * sd / math.sqrt(3), rel=1e-6)
    assert spin["vs_baseline"]["high"] == pytest.approx(mean + t975_df2 * sd / math.sqrt(3), rel=1e-6)
    assert (spin["seeds_above"], spin["seeds_below"]) == (0, 3)
    assert (by["continued_sft"]["seeds_above"], by["continued_sft"]["seeds_below"]) == (3, 0)
    add = spin["exact_match_by_skill"]["add"]
    assert add["mean"] == pytest.approx(2 * (0.25 + 0.31 + 0.37) / 3)
    assert add["se"] == pytest.approx(2 * 0.06 / math.sqrt(3))
    assert by["sft"]["mean_logprob"]["mean"] == pytest.approx(-3.33)
    text = demo_seeds.format_seeds(summary)
    row = next(x for x in text.splitlines() if x.startswith("| SPIN iter 0 |"))
    assert f"| 0.310 ± {0.06 / math.sqrt(3):.3f} | {mean:+.3f} ± {sd / math.sqrt(3):.3f} |" in row
    assert "| 0 / 3 |" in row
    assert text.index("| reverse |") < text.index("| sort |") < text.index("| add |")  # the task's skill order
    # one seed: no standard error, no interval
    one = demo_seeds.aggregate_seeds(runs[:1])
    assert one["stages"][0]["exact_match"]["se"] is None and "low" not in one["stages"][2]["vs_baseline"]
    assert "± n/a" in demo_seeds.format_seeds(one)


def test_compare_stages_per_seed_paired_difference():
    """SPIN iter t minus continued SFT iter t per seed (the plateau summary): +1/4 in one seed, +3/4 in the other
    (there every resample of the 4 questions that keeps a flipped one is positive, none negative)."""
    def run(cont, spin):
        return {"stages": [_stage("continued_sft_iter0", "continued SFT iter 0", cont),
                           _stage("spin_iter0", "SPIN iter 0", spin)]}
    runs = [run([1, 1, 0, 0], [1, 1, 1, 0]), run([0, 0, 0, 1], [1, 1, 1, 1])]
    c = demo_seeds.compare_stages(runs, "continued_sft_iter0", "spin_iter0")
    assert c["values"] == [0.25, 0.75] and c["mean"] == pytest.approx(0.5)
    assert c["se"] == pytest.approx(math.sqrt(((0.25 - 0.5) ** 2 + (0.75 - 0.5) ** 2) / 1) / math.sqrt(2))
    t975_df1 = 12.706204736174705
    assert (c["low"], c["high"]) == pytest.approx((0.5 - t975_df1 * c["se"], 0.5 + t975_df1 * c["se"]), rel=1e-6)
    assert c["seeds_below"] == 0 and c["seeds_above"] <= 1


def test_seed_changes_model_init_sft_order_and_sampling(tmp_path):
    """--seeds: seed s changes the init weights, the training data order and the sampling seed."""
    a = demo_seeds.with_seed(demo_run.DemoConfig.small(), 3)
    b = demo_seeds.with_seed(PlateauConfig.small(), 4)
    assert a.seed == 3 and b.demo.seed == 4 and b.n_spin == PlateauConfig.small().n_spin
    assert demo_run.run_settings(a)["seed"] == 3  # one home: the run's seed drives init order, training and sampling
    tok = demo_task.write_tokenizer(tmp_path / "tok")
    w = [load_file(demo_run.init_model(tmp_path / f"init{s}", tok, demo_seeds.with_seed(a, s)) / "model.safetensors")
         for s in (0, 0, 1)]
    name = next(iter(w[0]))
    assert (w[0][name] == w[1][name]).all() and not (w[0][name] == w[2][name]).all()


# ----------------------------------------------------------------------------- the demo, end to end

STAGES = ["sft", "continued_sft", "spin_iter0", "spin_iter1"]


def test_demo_small_two_ranks_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo" / "seed0"  # also seed 0 of the --seeds study in tmp_path / "demo" (below)
    cmd = [sys.executable, "-m", "minispin.demo", "--small", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert [s["stage"] for s in results["stages"]] == STAGES
    for stage in results["stages"]:
        assert 0.0 <= stage["exact_match"] <= 1.0
        assert set(stage["exact_match_by_skill"]) == set(demo_task.SKILLS)
        assert math.isfinite(stage["mean_logprob"]) and stage["mean_logprob"] < 0
        assert math.isfinite(stage["mean_logprob_per_token"])
        assert stage["n_test"] == 96
    # SFT learned something: its answers are likelier than under a uniform guess over the vocabulary
    assert results["stages"][0]["mean_logprob_per_token"] > -math.log(demo_task.vocab_size()) + 0.5
    # the table is printed (rank 0 only: once) and saved
    for label in ("SFT", "continued SFT", "SPIN iter 0", "SPIN iter 1"):
        assert label in results["table"]
    assert proc.stdout.count("mean log p(real)  per token") == 1
    assert (out / "results.txt").read_text().strip() == results["table"]
    # ... with every stage's 95% interval and its paired difference from SFT, from the per-question results
    assert proc.stdout.count("vs SFT [95% CI, paired]") == 1
    for stage, row in zip(results["stages"], results["stats"]):
        assert len(stage["correct"]) == 96 and sum(stage["correct"]) / 96 == stage["exact_match"]
        assert row["stage"] == stage["label"] and (row["low"], row["high"]) == \
            pytest.approx(wilson_interval(sum(stage["correct"]), 96))
        assert ("vs_baseline" in row) == (stage["stage"] != "sft")
        assert f"{row['accuracy']:.3f} [{row['low']:.3f}, {row['high']:.3f}]" in results["table"]
    # every stage's model is a loadable HF folder with the tokenizer
    for model_dir in ("init", "sft/iter0/model", "continued_sft/iter0/model", "spin/iter0/model", "spin/iter1/model"):
        assert (out / model_dir / "config.json").is_file() and (out / model_dir / "tokenizer.json").is_file()
    # SPIN generated real samples from the SFT model and trained on them (+ mixing at iteration 1)
    gen0 = [json.loads(line) for line in (out / "spin/iter0/generated.jsonl").read_text().splitlines()]
    assert len(gen0) == 128
    # the demo's exact match as the seeds' table, and python -m minispin.report on the finished demo run
    table = json.loads((out / "eval_table.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["SFT", "continued SFT", "iter0", "iter1"]
    assert [c["key"] for c in table["columns"]] == list(demo_task.SKILLS)
    assert [r["scores"] for r in table["rows"]] == [s["exact_match_by_skill"] for s in results["stages"]]
    report = write_report(out)
    assert sorted(report.figures) == ["eval.png", "training_continued_sft.png", "training_sft.png",
                                      "training_spin.png"]
    assert all((out / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in report.figures)

    # re-running with the same --out (here in one process) skips every finished stage, same results
    proc2 = subprocess.run([*cmd, "--nproc", "1"], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())
    assert [s["exact_match"] for s in again["stages"]] == [s["exact_match"] for s in results["stages"]]
    assert "done earlier" in proc2.stderr
    # other settings in the same folder are refused, naming the option
    proc3 = subprocess.run([*cmd, "--nproc", "1", "--seed", "5"], cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert proc3.returncode != 0 and "seed" in proc3.stderr

    # --seeds: a finished seed is read back, not recomputed; the summary is written
    proc4 = subprocess.run([sys.executable, "-m", "minispin.demo", "--small", "--nproc", "1", "--seeds", "1", "--out",
                            str(out.parent)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc4.returncode == 0, proc4.stdout[-3000:] + proc4.stderr[-3000:]
    assert "finished earlier, read back" in proc4.stderr and "[spin]" not in proc4.stderr
    summary = json.loads((out.parent / "seeds.json").read_text())
    assert summary["seeds"] == [0] and summary["seeds_computed_this_run"] == 0
    assert [s["exact_match"]["values"] for s in summary["stages"]] == [[s["exact_match"]] for s in results["stages"]]
    assert (out.parent / "seeds.md").read_text().strip() == summary["table"]


def test_plateau_regime_small(tmp_path):
    """--regime plateau at the reduced size, one process: the demo's SFT, SFT epochs on the fixed set with
    early stopping on the validation split, continued SFT and SPIN with the per-iteration schedule and
    their mechanism metrics; then --seeds reads the finished seed back."""
    out = tmp_path / "demo" / "seed0"
    cmd = [sys.executable, "-m", "minispin.demo", "--small", "--regime", "plateau", "--nproc", "1"]
    proc = subprocess.run([*cmd, "--out", str(out)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads((out / "plateau" / "results.json").read_text())
    config = PlateauConfig.small()
    # the validation questions lie outside the SFT data and the test set
    rows = lambda path: [json.loads(x)["prompt"] for x in path.read_text().splitlines()]  # noqa: E731
    val, train, test = rows(out / "plateau" / "val.jsonl"), rows(out / "task" / "train_sft.jsonl"), \
        rows(out / "task" / "test_sft.jsonl")
    assert len(set(val)) == len(val) == config.n_val and not set(val) & (set(train) | set(test))
    # epoch 0 is the demo's SFT model; early stopping ends `patience` epochs after the best one, or at max_epochs
    assert r["epoch_curve"][0]["model"] == str(out / "sft" / "iter0" / "model")
    curve = [(c["val_exact_match"], c["val_mean_logprob"]) for c in r["epoch_curve"]]
    best = r["best_epoch"]
    assert curve[best] == max(curve) and curve.index(max(curve)) == best
    assert len(curve) == config.max_epochs + 1 or len(curve) - 1 - best == config.patience
    labels = [s["label"] for s in r["stages"]]
    assert labels[0] == "SFT" and labels[-4:] == ["continued SFT iter 0", "continued SFT iter 1", "SPIN iter 0",
                                                  "SPIN iter 1"]
    assert all(len(s["correct"]) == 96 for s in r["stages"])
    # SPIN ran the per-iteration schedule (lr L, L/5; beta 0.1, 5) on the fixed set and logged the mechanism
    gen = [json.loads(x)["real"][0]["content"]
           for x in (out / "plateau" / "spin" / "iter0" / "generated.jsonl").read_text().splitlines()]
    assert sorted(gen) == sorted(train[: config.n_spin])
    spin = r["mechanism"]["spin"]
    assert [(m["lr"], m["beta"]) for m in spin] == [(3e-5, 0.1), (pytest.approx(6e-6), 5.0)]
    for m in spin:
        for key in ("rewards/real", "rewards/generated", "margins", "accuracies", "logps/real", "logps/generated"):
            assert math.isfinite(m[key])
        assert 0 <= m["accuracies"] <= 1 and m["logps/real"] < 0
    assert [m["lr"] for m in r["mechanism"]["continued_sft"]] == [m["lr"] for m in spin]
    assert "SFT validation exact match by epoch" in proc.stdout and "rewards/generated" in proc.stdout
    proc2 = subprocess.run([*cmd, "--seeds", "1", "--out", str(out.parent)], cwd=tmp_path, env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    summary = json.loads((out.parent / "plateau_seeds.json").read_text())
    assert summary["seeds_computed_this_run"] == 0 and summary["best_epoch"]["values"] == [best]
    assert summary["mechanism"]["spin"][1]["margins"]["values"] == [spin[1]["margins"]]
    assert "| spin iter |" in summary["table"]


# ----------------------------------------------------------------------------- examples/spin_zephyr.py

def _example(args, tmp_path):
    return subprocess.run([sys.executable, str(REPO / "examples" / "spin_zephyr.py"), *args], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)


def test_zephyr_example_help(tmp_path):
    proc = _example(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for option in ("--model", "--data", "--output_dir", "--out", "--train.lr", "--iterations"):
        assert option in proc.stdout
    assert "| 1    | iter-0 + iter-1 (100k)        | 5e-7 | 0.1  |" in proc.stdout  # the docstring's layout kept
    assert "pairs per optimizer step, over all ranks and accumulation steps (default: 64)" in \
        " ".join(proc.stdout.split())  # each option: what it is and its default
    assert not (tmp_path / "runs").exists()
    dpo = subprocess.run([sys.executable, str(REPO / "examples" / "dpo.py"), "--help"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert dpo.returncode == 0 and "DPO on preference data" in dpo.stdout and "--out" in dpo.stdout


def test_zephyr_example_path_errors(tmp_path):
    data = tmp_path / "ultrachat"
    data.mkdir()
    (data / "train_sft-00000-of-00001.jsonl").write_text("")
    model = tmp_path / "model"
    model.mkdir()

    proc = _example(["--data", str(data)], tmp_path)
    assert proc.returncode != 0 and "--model is required" in proc.stderr

    proc = _example(["--model", str(tmp_path / "nope"), "--data", str(data)], tmp_path)
    assert proc.returncode != 0 and str(tmp_path / "nope") in proc.stderr and "config.json" in proc.stderr

    proc = _example(["--model", str(model), "--data", str(data)], tmp_path)
    assert proc.returncode != 0
    for missing in ("config.json", "model.safetensors", "tokenizer.json"):
        assert missing in proc.stderr

    (model / "config.json").write_text("{}")
    (model / "model.safetensors.index.json").write_text("{}")
    (model / "tokenizer.model").write_bytes(b"")
    proc = _example(["--model", str(model), "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], tmp_path)
    assert proc.returncode != 0 and str(tmp_path / "missing") in proc.stderr and "train_sft" in proc.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _example(["--model", str(model), "--data", str(empty)], tmp_path)
    assert proc.returncode != 0 and str(empty) in proc.stderr and "train_sft" in proc.stderr

    other = tmp_path / "other"
    other.mkdir()
    (other / "test_sft.parquet").write_bytes(b"")
    proc = _example(["--model", str(model), "--data", str(other)], tmp_path)
    assert proc.returncode != 0 and "train_sft" in proc.stderr and "test_sft.parquet" in proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()  # nothing started
