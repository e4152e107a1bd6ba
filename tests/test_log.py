"""minispin.log (CPU only, no process group): the rank-0 print and the one progress line."""
from minispin.log import Progress, print0, warn0


def test_print0_and_warn0_write_one_line_on_stderr(capsys):
    print0("hello", prefix="run")
    warn0("careful")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "[run] hello\nwarning: careful\n"


def test_progress_line_shows_done_total_rate_eta_and_resume():
    bar = Progress(100, "train", start=40, unit="steps", enabled=False)
    assert bar.line(now=bar.t0 + 1.0) == "[train] 40/100 steps | resumed from 40"  # nothing run yet: no rate
    bar.update(50, "loss 1.0", tokens=2000)
    line = bar.line(now=bar.t0 + 5.0)  # 10 steps in 5 s since the resume: 2 steps/s, 50 left -> 25 s
    assert line == ("[train] 50/100 steps | 2 steps/s | ETA 0:25 | 2000 tokens | 400 tok/s | resumed from 40 "
                    "| loss 1.0")
    bar.update(100)
    assert "ETA" not in bar.line(now=bar.t0 + 30.0) and "100/100" in bar.line()


def test_progress_prints_every_n_and_at_the_end_when_not_a_terminal(capsys):
    bar = Progress(5, "reference", every=2, unit="batches")
    for done in range(1, 6):
        bar.update(done)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["[reference] 2/5 batches", "[reference] 4/5 batches",
                                                         "[reference] 5/5 batches"]
