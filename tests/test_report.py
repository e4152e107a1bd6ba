"""python -m minispin.report (CPU): on a real tiny two-iteration SPIN run (driver-written metrics, models)
the figures are valid PNGs whose line artists carry exactly the run's metrics, one line per metric,
series and iteration; the markdown has the summary and the evaluation table; a run in progress (torn
last line, iteration without metrics) still reports; bad input and a missing matplotlib are one clear
error; the demo's results become the seeds' table; the optional TensorBoard sink mirrors the records."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from minispin.cli import parse_args
from minispin.eval import format_table, make_table, read_table, table_from_demo, write_table
from minispin.report import PANELS, ReportError, _moving_average, find_runs, plot_eval, read_metrics, write_report
from minispin.tensorboard import TensorBoardSink
from tiny_run import ITERATIONS, STEPS, copy_run, tiny_run
from tiny import REPO

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# demo-shaped stage results (minispin.demo.evaluate_stage's keys)
DEMO_STAGES = [
    {"stage": "sft", "model": "m0", "n_test": 600, "exact_match": 0.325,
     "exact_match_by_skill": {"add": 0.054, "reverse": 0.271, "sort": 0.681}},
    {"stage": "continued_sft", "model": "m1", "n_test": 600, "exact_match": 0.345,
     "exact_match_by_skill": {"add": 0.073, "reverse": 0.304, "sort": 0.686}},
    {"stage": "spin_iter0", "model": "m2", "n_test": 600, "exact_match": 0.343,
     "exact_match_by_skill": {"add": 0.063, "reverse": 0.309, "sort": 0.686}},
    {"stage": "spin_iter1", "model": "m3", "n_test": 600, "exact_match": 0.333,
     "exact_match_by_skill": {"add": 0.054, "reverse": 0.285, "sort": 0.691}},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    width, height = _png_size(path.read_bytes())
    pixels = imread(path)  # decodes the whole image (a truncated file fails here)
    assert pixels.shape[:2] == (height, width) and width > 200 and height > 200
    assert pixels.std() > 0.01  # not a blank canvas


def _labelled_lines(ax) -> dict[str, object]:
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def _metrics(run: Path, t: int) -> list[dict]:
    return [json.loads(line) for line in (run / f"iter{t}" / "metrics.jsonl").read_text().splitlines()]


def test_finished_run_figures_lines_and_markdown(run, tmp_path):
    run = copy_run(run, tmp_path / "run")
    write_table(run, table_from_demo(DEMO_STAGES, skills=["reverse", "sort", "add"]))
    report = write_report(run)
    assert sorted(report.figures) == ["eval.png", "training.png"]
    for name in report.figures:
        _check_png(run / "report" / name)

    # training: one panel per metric family, one labelled line per series and iteration, holding the
    # driver's metrics exactly (4 and 8 steps: too few for smoothing, so the solid line is every step)
    fig = report.figures["training.png"]
    axes = fig.get_axes()
    assert [ax.get_title(loc="left") for ax in axes] == [title for title, _ in PANELS]
    offsets = [0, STEPS[0]]
    for ax, (_, series) in zip(axes, PANELS):
        lines = _labelled_lines(ax)
        expected = {f"iter{t}" + (f" {name}" if name else "") for t in range(ITERATIONS) for _, name in series}
        assert set(lines) == expected
        for t in range(ITERATIONS):
            records = _metrics(run, t)
            assert len(records) == STEPS[t]
            for key, name in series:
                line = lines[f"iter{t}" + (f" {name}" if name else "")]
                assert list(line.get_xdata()) == [offsets[t] + r["step"] for r in records]
                assert list(line.get_ydata()) == pytest.approx([r[key] for r in records], rel=0, abs=0)

    # evaluation: rows SFT, iter0, iter1 on the axis; one line per task and the Average in both panels;
    # continued SFT as a reference line
    fig = report.figures["eval.png"]
    ax_abs, ax_diff = fig.get_axes()
    assert [t.get_text() for t in ax_abs.get_xticklabels()] == ["SFT", "iter0", "iter1"]
    table = read_table(run)
    for ax, diff in ((ax_abs, False), (ax_diff, True)):
        lines = _labelled_lines(ax)
        assert set(lines) == {"reverse", "sort", "add", "Average", "continued SFT (Average)"}
        rows = [r for r in table["rows"] if not r["baseline"]]
        sft = rows[0]
        for key in ("reverse", "sort", "add"):
            want = [r["scores"][key] - (sft["scores"][key] if diff else 0) for r in rows]
            assert list(lines[key].get_ydata()) == pytest.approx([w * (100 if diff else 1) for w in want])
        avg = [(r["average"] - (sft["average"] if diff else 0)) * (100 if diff else 1) for r in rows]
        assert list(lines["Average"].get_ydata()) == pytest.approx(avg)

    md = (run / "report" / "report.md").read_text()
    assert "![training](training.png)" in md and "![evaluation](eval.png)" in md
    assert "| Task | reverse | sort | add | Average |" in md
    assert "| continued SFT | 0.3040 | 0.6860 | 0.0730 | 0.3543 |" in md
    summary = [line for line in md.splitlines() if line.startswith("| . |")]
    assert [line.split(" | ")[1:4] for line in summary] == [["0", "done", str(STEPS[0])], ["1", "done", str(STEPS[1])]]
    last = _metrics(run, 1)[-1]  # the last 10% of 8 steps: the last step
    assert f"| {last['loss']:.4f} |" in summary[1]


def test_run_in_progress(run, tmp_path):
    """Torn last metrics line, an iteration whose model is not saved, one with no metrics yet."""
    run = copy_run(run, tmp_path / "run")
    lines = (run / "iter1" / "metrics.jsonl").read_text().splitlines()
    (run / "iter1" / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:17])
    import shutil
    shutil.rmtree(run / "iter1" / "model")
    (run / "iter2").mkdir()
    (run / "state.json").write_text(json.dumps({"iteration": 1, "phase": "train", "models": []}))
    records, torn = read_metrics(run / "iter1" / "metrics.jsonl")
    assert torn and [r["step"] for r in records] == [1, 2, 3]

    report = write_report(run, tmp_path / "out")
    assert sorted(report.figures) == ["training.png"]  # no evaluation table yet
    _check_png(tmp_path / "out" / "training.png")
    loss = _labelled_lines(report.figures["training.png"].get_axes()[0])
    assert set(loss) == {"iter0", "iter1"} and len(loss["iter1"].get_xdata()) == 3
    status = [(s["iteration"], s["status"], s["steps"], s["torn_line"]) for s in report.summaries]
    assert status == [(0, "done", 4, False), (1, "running (train)", 3, True), (2, "not started", 0, False)]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "running (train) (torn last line skipped)" in md and "python -m minispin.eval" in md


def test_folder_of_runs_like_the_demo(run, tmp_path):
    """The demo's --out holds several runs (sft, continued_sft, spin) and the table: one figure per run."""
    root = tmp_path / "demo"
    for name in ("spin", "sft"):
        copy_run(run, root / name)
    write_table(root, table_from_demo(DEMO_STAGES))
    assert [r.name for r in find_runs(root)] == ["sft", "spin"]
    report = write_report(root)
    assert sorted(report.figures) == ["eval.png", "training_sft.png", "training_spin.png"]
    assert "![training spin](training_spin.png)" in report.markdown.read_text()


def test_bad_input_is_one_clear_error(run, tmp_path):
    run = copy_run(run, tmp_path / "run")
    path = run / "iter0" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ReportError, match=r"iter0/metrics.jsonl: line 2 is not a metrics record"):
        write_report(run)
    res = subprocess.run([sys.executable, "-m", "minispin.report", str(run)], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {path}: line 2 is not a metrics record "
                                               "(Expecting property name enclosed in double quotes: line 1 "
                                               "column 2 (char 1)); training rewrites this file when it "
                                               "resumes, or delete the line"]
    with pytest.raises(ReportError, match="holds no minispin run"):
        write_report(tmp_path / "run" / "iter0" / "model")
    with pytest.raises(ReportError, match="does not exist"):
        write_report(tmp_path / "nowhere")


def test_missing_matplotlib_names_the_extra(run, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(ReportError, match=r"^matplotlib is not installed: pip install minispin\[plot\]$"):
        write_report(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written


def test_table_from_demo_rows_columns_average():
    table = table_from_demo(DEMO_STAGES, skills=["reverse", "sort", "add"])
    assert [c["key"] for c in table["columns"]] == ["reverse", "sort", "add"]
    assert [(r["name"], r["baseline"]) for r in table["rows"]] == [
        ("SFT", False), ("continued SFT", True), ("iter0", False), ("iter1", False)]
    assert table["rows"][0]["average"] == pytest.approx((0.271 + 0.681 + 0.054) / 3)
    assert table["rows"][2]["exact_match_all"] == 0.343


def test_a_table_of_unlike_columns_has_no_average_and_its_own_change_unit():
    """The chat demo's columns (log p(real), log p(sample), their gap) have no meaningful mean: no Average
    column or line; differences from the first row in nats, not points; the baseline drawn per column."""
    columns = [{"key": "real", "label": "log p(real)"}, {"key": "gap", "label": "gap"}]
    rows = [{"name": "start", "scores": {"real": -1.5, "gap": -0.6}},
            {"name": "continued SFT", "scores": {"real": -1.7, "gap": -0.4}, "baseline": True},
            {"name": "SPIN iter 0", "scores": {"real": -2.2, "gap": -0.2}}]
    table = make_table(columns, rows, source="demo", average=False, change=(1.0, "nats per token"))
    assert all(r["average"] is None for r in table["rows"]) and table["average"] is None
    assert format_table(table, digits=1).splitlines()[:3] == ["| Task | log p(real) | gap |", "|---|---|---|",
                                                              "| start | -1.5 | -0.6 |"]
    ax_abs, ax_diff = plot_eval(table).get_axes()
    assert "(nats per token)" in ax_diff.get_title(loc="left")
    lines = _labelled_lines(ax_diff)
    assert set(lines) == {"log p(real)", "gap", "continued SFT (log p(real))", "continued SFT (gap)"}
    assert list(lines["log p(real)"].get_ydata()) == pytest.approx([0.0, -0.7])
    assert list(lines["continued SFT (gap)"].get_ydata()) == pytest.approx([0.2, 0.2])
    assert set(_labelled_lines(ax_abs)) == set(lines)


def test_moving_average():
    assert _moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 1) == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert _moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert _moving_average([0.0, 0.0, 3.0, 0.0, 0.0, 0.0], 3) == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_tensorboard_sink_mirrors_the_records(run, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _metrics(run, 1)
    sink = TensorBoardSink(tmp_path / "tb")
    for r in records:
        sink(r)
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"loss", "margins", "rewards/real", "rewards/generated", "accuracies"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [r["step"] for r in records]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in records], rel=1e-6)


def test_tensorboard_sink_purges_rerun_steps(tmp_path):
    """A resumed run re-runs the steps after its last checkpoint: TensorBoard shows them once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb", purge_step=1)
    for step in range(1, 5):
        sink({"step": step, "loss": float(step)})
    sink.close()
    sink = TensorBoardSink(tmp_path / "tb", purge_step=3)  # resumed from step 2
    for step in range(3, 6):
        sink({"step": step, "loss": 10.0 * step})
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]


def test_training_writes_tensorboard_when_asked(tmp_path):
    """TrainConfig(tensorboard=True): <run_dir>/tensorboard holds every metrics.jsonl record."""
    pytest.importorskip("tensorboard")
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from minispin.collate import Pair
    from minispin.model import Transformer
    from minispin.tokenizer import load_tokenizer
    from minispin.training import TrainConfig, train
    from tiny import tiny_config, write_char_tokenizer

    write_char_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    pairs = [Pair(i, [{"role": "user", "content": f"what is {i}+1?"}], f"it is {i + 1}.", "no") for i in range(6)]
    config = TrainConfig(lr=1e-3, epochs=1, global_batch_size=2, micro_batch_size=2, max_length=32,
                         max_prompt_length=16, progress=False, device="cpu", tensorboard=True)
    train(Transformer(tiny_config()), tok, pairs, config, run_dir=tmp_path / "it")
    records = [json.loads(line) for line in (tmp_path / "it" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "it" / "tensorboard"))
    acc.Reload()
    assert len(records) == 3
    for key in ("loss", "margins", "accuracies", "rewards/real", "rewards/generated", "lr", "grad_norm"):
        assert [(e.step, e.value) for e in acc.Scalars(key)] == [(r["step"], pytest.approx(r[key], rel=1e-6))
                                                                 for r in records]


def test_tensorboard_missing_is_a_clear_error(monkeypatch):
    from minispin.training import TrainConfig

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(ValueError, match=r"^tensorboard=True needs the tensorboard package: "
                                         r"pip install minispin\[tensorboard\]$"):
        TrainConfig(tensorboard=True)
    assert TrainConfig().tensorboard is False  # off unless asked for


def test_driver_writes_iteration_summaries_and_run_table(run, tmp_path, capfd):
    """Each iteration ends with summary.json (pairs, steps, time, last-10%-of-steps means, truncation counts,
    model); the run
    ends with <run>/summary.json and a table of all iterations, also when every iteration was done earlier."""
    from minispin.driver import spin
    from minispin.runs import metrics_summary, read_metrics

    total = json.loads((run / "summary.json").read_text())["iterations"]
    assert [s["iteration"] for s in total] == list(range(ITERATIONS))
    for t, s in enumerate(total):
        assert s == json.loads((run / f"iter{t}" / "summary.json").read_text())
        records, torn = read_metrics(run / f"iter{t}" / "metrics.jsonl")
        assert not torn and s["pairs"] == 8 * (t + 1) and s["steps"] == STEPS[t] == len(records)
        last = records[-max(1, len(records) // 10):]
        assert s["loss"] == pytest.approx(sum(r["loss"] for r in last) / len(last))
        assert s["margins"] == pytest.approx(sum(r["margins"] for r in last) / len(last))
        assert {k: v for k, v in s.items() if k in metrics_summary(records)} == metrics_summary(records)
        assert s["model"] == str(run / f"iter{t}" / "model") and s["wall_seconds_this_call"] > 0
        # the one long answer (tiny_run.LONG) is cut once per iteration's new pairs; no prompt is long
        assert (s["pairs_truncated"], s["answers_truncated"], s["prompts_truncated"]) == (t + 1, t + 1, 0)

    resumed = copy_run(run, tmp_path / "run")
    capfd.readouterr()
    spin(parse_args(["--config", str(resumed / "config.json"), "--out", str(resumed)]))  # every iteration done earlier: the table again, from the summaries on disk
    err = capfd.readouterr().err.splitlines()
    head = err.index(next(line for line in err if line.startswith("[run] iter  pairs  steps")))
    rows = [line.split()[1:] for line in err[head + 2: head + 2 + ITERATIONS]]
    assert [r[:3] for r in rows] == [[str(t), str(8 * (t + 1)), str(STEPS[t])] for t in range(ITERATIONS)]
    assert [float(r[4]) for r in rows] == [pytest.approx(s["loss"], abs=6e-5) for s in total]
    assert [r[-1] for r in rows] == [str(t + 1) for t in range(ITERATIONS)]  # the "cut" column
    assert err[head + 2 + ITERATIONS] == f"[run] summary: {resumed / 'summary.json'}"
