"""SPIN driver tests (CPU, tiny model, char tokenizer): two iterations end to end, resume after kill -9
in every phase equals an uninterrupted run bit for bit, checkpoints load in transformers with equal
logits, the paper's schedule as one config, continued SFT, clear errors."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minispin.checkpoint import load_model, save_model
from minispin.data import DataError
from minispin.model import Transformer
from minispin.config import ConfigError
from minispin.driver import PAPER_SCHEDULE, RunConfig, resolve, run_record, spin
from minispin.errors import UserError
from minispin.training import TrainConfig
from minispin.runs import RunError, temp_files
from tiny import REPO, VOCAB_SIZE, tiny_config, write_char_tokenizer

N_PROMPTS = 10


def _write_base(root: Path) -> tuple[Path, Path]:
    """A tiny fp32 Llama checkpoint folder with a char-level tokenizer, and 10 SFT rows."""
    model_dir = root / "sft-model"
    write_char_tokenizer(model_dir)
    config = tiny_config()
    torch.manual_seed(0)
    save_model(Transformer(config), model_dir,
               extra_files=[str(model_dir / "tokenizer.json"), str(model_dir / "tokenizer_config.json")])
    data = root / "sft.jsonl"
    rows = [{"prompt": f"What is {i}+{3 * i}?", "response": f"It is {4 * i}."} for i in range(N_PROMPTS)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def _argv(model_dir: Path, data: Path, out: Path) -> list[str]:
    return ["--model", str(model_dir), "--data", str(data), "--output_dir", str(out),
            "--iterations", '[{"lr": 1e-3, "beta": 0.1}, {"lr": 5e-4, "beta": 0.5}]',
            "--epochs", "1", "--global_batch_size", "2", "--micro_batch_size", "1", "--reference_batch_size", "2",
            "--max_length", "48", "--max_prompt_length", "24", "--max_new_tokens", "8",
            "--generation.batch_size", "4", "--generation.chunk_size", "2", "--save_steps", "2",
            "--progress", "false", "--device", "cpu"]


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MINISPIN_TEST_KILL_AT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if kill_at:
        env["MINISPIN_TEST_KILL_AT"] = kill_at
    return env


def _run_cli(argv: list[str], kill_at: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minispin", *argv], env=_env(kill_at), capture_output=True,
                          text=True, timeout=300)


def _one_iteration(argv: list[str]) -> list[str]:
    """The same run cut to its first iteration (same settings, so the same iteration-0 model)."""
    argv = list(argv)
    argv[argv.index("--iterations") + 1] = '[{"lr": 1e-3, "beta": 0.1}]'
    return argv


def _same_weights(a: Path, b: Path) -> bool:
    w_a, w_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return w_a.keys() == w_b.keys() and all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def _wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("spin")
    model_dir, data = _write_base(root)
    return root, model_dir, data


@pytest.fixture(scope="module")
def uninterrupted(base):
    root, model_dir, data = base
    out = root / "run-uninterrupted"
    res = _run_cli(_argv(model_dir, data, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_two_iterations_end_to_end(uninterrupted):
    out = uninterrupted
    state = json.loads((out / "state.json").read_text())
    assert state["phase"] == "done" and state["models"] == [str(out / "iter0" / "model"), str(out / "iter1" / "model")]
    for t, n_pairs, n_steps in ((0, N_PROMPTS, 5), (1, 2 * N_PROMPTS, 10)):  # iteration 1 mixes in iteration 0
        it = out / f"iter{t}"
        generated = [json.loads(x) for x in (it / "generated.jsonl").read_text().splitlines()]
        assert [g["index"] for g in generated] == list(range(N_PROMPTS))
        assert all(g["real"][:-1] == g["generated"][:-1] for g in generated)
        refs = [json.loads(x) for x in (it / "reference_logps.jsonl").read_text().splitlines()]
        assert sorted(r["index"] for r in refs) == list(range(n_pairs))
        assert all(r["chosen"] < 0 and r["rejected"] < 0 for r in refs)
        metrics = [json.loads(x) for x in (it / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == list(range(1, n_steps + 1))
        assert sum(m["pairs"] for m in metrics) == n_pairs
        for key in ("loss", "rewards/real", "rewards/generated", "margins", "accuracies", "logps/real",
                    "logps/generated", "lr", "grad_norm", "tokens_per_s"):
            assert all(key in m and m[key] == m[key] for m in metrics), key
        assert abs(metrics[0]["margins"]) < 1e-4  # policy == reference at the first step
        assert not (it / "train_state").exists()  # removed once the model is saved
        assert (it / "model" / "tokenizer.json").is_file()
    # the generations of iteration 1 come from the trained model, with another seed
    g0 = (out / "iter0" / "generated.jsonl").read_text()
    assert g0 != (out / "iter1" / "generated.jsonl").read_text()


def test_saved_checkpoint_loads_in_transformers_with_equal_logits(uninterrupted):
    transformers = pytest.importorskip("transformers")
    path = uninterrupted / "iter1" / "model"
    ours = load_model(path, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    start = load_model(uninterrupted.parent / "sft-model", dtype=torch.float32)
    assert not torch.equal(start.lm_head.weight, ours.lm_head.weight)  # it did train


def test_resume_after_kill_in_every_phase_matches_uninterrupted(base, uninterrupted):
    """kill -9 in generation, then in the reference pass, then in training (after a checkpoint), then
    right after iteration 0's model is saved, then in iteration 1's generation; each time the same
    command continues. The final weights equal the uninterrupted run's bit for bit."""
    root, model_dir, data = base
    out = root / "run-killed"
    argv = _argv(model_dir, data, out)

    def killed(spec: str) -> dict:
        res = _run_cli(argv, kill_at=spec)
        assert res.returncode == -signal.SIGKILL, (spec, res.returncode, res.stderr[-2000:])
        return json.loads((out / "state.json").read_text())

    state = killed("generate:rows=4")
    assert state["phase"] == "generate" and not (out / "iter0" / "generated.jsonl").exists()
    parts = list((out / "iter0").glob("generated.jsonl.part-*"))
    assert len(parts) == 1 and len(parts[0].read_text().splitlines()) == 4

    state = killed("reference:batch=1")
    assert state["phase"] == "reference" and (out / "iter0" / "generated.jsonl").exists()
    assert len(list((out / "iter0").glob("reference_logps.jsonl.part-*"))) == 1

    state = killed("train:step=3")
    assert state["phase"] == "train"
    assert json.loads((out / "iter0" / "train_state" / "trainer_state.json").read_text())["step"] == 2

    # kills inside saves (temp folder written, not renamed yet) leave temp folders; the next start removes them
    killed("stage_train_state:step=4")
    assert [p.name.startswith(".train_state.tmp-") for p in temp_files(out)] == [True]
    killed("stage_model")
    assert [p.name.startswith(".model.tmp-") for p in temp_files(out)] == [True]  # the earlier one is gone
    assert not (out / "iter0" / "model").exists()
    assert (out / ".lock").is_file()  # the lock file of a killed job stays and blocks nobody

    state = killed("save:iteration=0")
    assert state["phase"] == "save" and (out / "iter0" / "model" / "config.json").exists()

    state = killed("generate:rows=2")
    assert state["iteration"] == 1 and state["phase"] == "generate"

    res = _run_cli(argv)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((out / "state.json").read_text())["phase"] == "done"
    assert temp_files(out) == [] and not list(out.rglob("*.tmp*"))
    for t in (0, 1):
        for name in ("generated.jsonl", "reference_logps.jsonl", "metrics.jsonl"):
            a = [json.loads(x) for x in (uninterrupted / f"iter{t}" / name).read_text().splitlines()]
            b = [json.loads(x) for x in (out / f"iter{t}" / name).read_text().splitlines()]
            if name == "metrics.jsonl":  # timings differ
                a = [{k: v for k, v in m.items() if k not in ("tokens_per_s", "step_time_s")} for m in a]
                b = [{k: v for k, v in m.items() if k not in ("tokens_per_s", "step_time_s")} for m in b]
            assert a == b, (t, name)
        w_a = load_file(uninterrupted / f"iter{t}" / "model" / "model.safetensors")
        w_b = load_file(out / f"iter{t}" / "model" / "model.safetensors")
        assert w_a.keys() == w_b.keys()
        for k in w_a:
            assert torch.equal(w_a[k], w_b[k]), (t, k)


def test_resume_with_another_config_is_refused(base, uninterrupted):
    root, model_dir, data = base
    argv = _argv(model_dir, data, uninterrupted) + ["--generation.temperature", "0.5"]
    from minispin.cli import parse_config
    with pytest.raises(ValueError, match="different config.*generation.temperature"):
        spin(parse_config(RunConfig, argv))
    # the same config: everything is done, returns at once
    result = spin(parse_config(RunConfig, _argv(model_dir, data, uninterrupted)))
    assert result.final_model == uninterrupted / "iter1" / "model"


def test_continued_sft_method(base, tmp_path):
    _, model_dir, data = base
    cfg = RunConfig(model=str(model_dir), data=str(data), output_dir=str(tmp_path / "sft"), method="sft",
                     iterations=[{"lr": 1e-3, "epochs": 1}])
    cfg.train.global_batch_size, cfg.train.progress, cfg.train.device = 5, False, "cpu"
    result = spin(cfg)
    assert result.models == [tmp_path / "sft" / "iter0" / "model"]
    assert not (tmp_path / "sft" / "iter0" / "generated.jsonl").exists()
    assert not (tmp_path / "sft" / "iter0" / "reference_logps.jsonl").exists()
    metrics = [json.loads(x) for x in (tmp_path / "sft" / "iter0" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(m["loss"] > 0 and m["logps/real"] < 0 and "margins" not in m for m in metrics)
    assert load_model(result.final_model).config.vocab_size == VOCAB_SIZE


def test_paper_schedule_is_one_config():
    cfg = RunConfig(model="m", data="d")
    its = resolve(cfg)
    assert [t.lr for t, *_ in its] == [5e-7, 5e-7, 1e-7, 1e-7]
    assert [t.beta for t, *_ in its] == [0.1, 0.1, 0.1, 5.0]
    assert len({g.seed for _, g, *_ in its}) == 4  # fresh samples every iteration
    assert all(t.optimizer == "rmsprop" and t.weight_decay == 0 and t.global_batch_size == 64 and t.epochs == 2
               and t.warmup_ratio == 0.1 and t.max_length == 1024 and t.max_prompt_length == 512 for t, *_ in its)
    assert all(g.max_new_tokens == 256 for _, g, *_ in its)
    assert cfg.iterations is None and cfg.mix_previous  # None: the method's recipe, the paper's schedule
    assert [{"lr": t.lr, "beta": t.beta} for t, *_ in its] == PAPER_SCHEDULE
    five = RunConfig(model="m", data="d", num_iterations=5)
    assert resolve(five)[4].train.beta == 5.0  # past the list: its last entry
    over = RunConfig(model="m", data="d", iterations=[{"loss": "hinge", "generation.temperature": 0.7,
                                                        "mix_previous": False}])
    t, g, s, _ = resolve(over)[0]
    assert t.loss == "hinge" and g.temperature == 0.7 and s == {"mix_previous": False}
    with pytest.raises(ConfigError, match=r"iterations\[0\]: unknown per-iteration setting 'lr_max'"):
        RunConfig(model="m", data="d", iterations=[{"lr_max": 1.0}])
    cfg = RunConfig(model="m", data="d", template="spin", max_prompt_length=100)
    assert {(t.template, g.template, t.max_prompt_length, g.max_prompt_length) for t, g, *_ in resolve(cfg)} \
        == {("spin", "spin", 100, 100)}  # one home each: RunConfig.template / max_prompt_length
    with pytest.raises(ConfigError, match="generation.template is set by the run: give template once"):
        cfg.generation.template = "chat"
        resolve(cfg)
    with pytest.raises(ConfigError, match="train.max_prompt_length is set by the run"):
        RunConfig(model="m", data="d", train=TrainConfig(max_prompt_length=64))


def test_given_options_win_over_the_default_schedule(tmp_path):
    """--lr under SPIN's paper schedule, --beta / --generation.num_samples under SPPO's, --neftune_alpha 0
    under noise_spin's (a default value given explicitly) apply to every iteration and are recorded in
    `iterations`; an option that --iterations also sets is refused; in Python, TrainConfig values that
    differ from the defaults win over the default schedule."""
    from minispin.cli import parse_args

    cfg = parse_args(["--model", "m", "--data", "d", "--lr", "1e-7"])
    assert [(t.lr, t.beta) for t, *_ in resolve(cfg)] == [(1e-7, 0.1)] * 3 + [(1e-7, 5.0)]
    cfg = parse_args(["--model", "m", "--data", "d", "--method", "sppo", "--beta", "0.01",
                      "--generation.num_samples", "8"])
    assert [(t.beta, t.lr, t.loss, g.num_samples, g.temperature, s) for t, g, s, _ in resolve(cfg)] == \
        [(0.01, 5e-7, "sppo", 8, 0.7, {"mix_previous": False})] * 3
    cfg = parse_args(["--model", "m", "--data", "d", "--method", "noise_spin", "--neftune_alpha", "0"])
    assert {(t.label_smoothing, t.neftune_alpha) for t, *_ in resolve(cfg)} == {(0.1, 0.0)}
    cfg = parse_args(["--model", "m", "--data", "d", "--iterations", '[{"lr": 1e-3}]', "--beta", "0.5"])
    assert [(t.lr, t.beta) for t, *_ in resolve(cfg)] == [(1e-3, 0.5)]
    with pytest.raises(ConfigError, match="train.lr is set both in iterations"):  # contradictory: which lr?
        parse_args(["--model", "m", "--data", "d", "--iterations", '[{"lr": 1e-3}]', "--train.lr", "1e-4"])
    saved = tmp_path / "config.json"  # a run's config.json as --config: command-line options win over it
    saved.write_text(json.dumps(run_record(RunConfig(model="m", data="d", iterations=[{"lr": 1e-3, "beta": 0.2}]))))
    cfg = parse_args(["--config", str(saved), "--lr", "1e-4"])
    assert [(t.lr, t.beta) for t, *_ in resolve(cfg)] == [(1e-4, 0.2)]
    cfg = RunConfig(model="m", data="d", train=TrainConfig(lr=1e-6))
    assert [(t.lr, t.beta) for t, *_ in resolve(cfg)] == [(1e-6, 0.1)] * 3 + [(1e-6, 5.0)]
    with pytest.raises(ValueError, match="method 'sppo' trains with loss 'sppo', not 'hinge'"):
        RunConfig(model="m", data="d", method="sppo", train=TrainConfig(loss="hinge"))


def test_run_config_check_allows_fixes_before_any_work_and_more_iterations(tmp_path):
    """A run refused before any iteration started (e.g. bad data) takes the corrected options; a started
    run refuses other options but may be extended with more iterations."""
    from minispin.driver import _check_run_config

    run = tmp_path / "run"
    run.mkdir()
    check = lambda cfg: _check_run_config(run, cfg, run_record(cfg))  # noqa: E731
    check(RunConfig(model="m", data="bad.jsonl"))
    check(RunConfig(model="m", data="good.jsonl"))  # nothing started: accepted
    assert json.loads((run / "config.json").read_text())["settings"]["data"] == "good.jsonl"
    (run / "iter0").mkdir()
    with pytest.raises(ValueError, match="different config .*settings.data: 'good.jsonl' -> 'other.jsonl'"):
        check(RunConfig(model="m", data="other.jsonl"))
    check(RunConfig(model="m", data="good.jsonl", num_iterations=6))


def test_clear_errors_for_missing_paths_and_bad_rows(base, tmp_path):
    _, model_dir, data = base
    cpu = TrainConfig(device="cpu")
    with pytest.raises(UserError, match="--model .*nope: no such folder"):
        spin(RunConfig(model=str(tmp_path / "nope"), data=str(data), output_dir=str(tmp_path / "a"), train=cpu))
    with pytest.raises(UserError, match="--data .*missing.jsonl: no such file or folder"):
        spin(RunConfig(model=str(model_dir), data=str(tmp_path / "missing.jsonl"), output_dir=str(tmp_path / "b"),
                        train=cpu))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "fine", "response": "ok"}) + "\n" + json.dumps({"prompt": "q", "response": 7}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: key 'response'"):
        spin(RunConfig(model=str(model_dir), data=str(bad), output_dir=str(tmp_path / "c"), train=cpu))
    with pytest.raises(ValueError, match="--method 'dpo-magic' is not a method"):
        spin(RunConfig(model=str(model_dir), data=str(data), output_dir=str(tmp_path / "d"), method="dpo-magic",
                        train=cpu))


# ----------------------------------------------------------------------------- run-directory integrity

def test_second_job_into_a_run_dir_is_refused_at_once_and_the_first_is_untouched(base, uninterrupted):
    """Job A holds the run directory (stopped with SIGSTOP right after taking the lock, so the test does
    not race it); job B into the same --output_dir, with another beta, stops at once naming A's pid and
    host; A then finishes with the same model as an uninterrupted run."""
    root, model_dir, data = base
    out = root / "run-locked"
    argv = _one_iteration(_argv(model_dir, data, out))
    first = subprocess.Popen([sys.executable, "-m", "minispin", *argv], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def holder():
            try:
                return json.loads((out / ".lock").read_text())["pid"] == first.pid
            except (OSError, ValueError, KeyError):
                return False
        _wait_for(holder, what="job A's lock")
        os.kill(first.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        other = list(argv)
        other[other.index("--iterations") + 1] = '[{"lr": 1e-3, "beta": 0.3}]'
        second = _run_cli(other)
        elapsed = time.monotonic() - t0
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode != 0
    assert "is in use by another job" in second.stderr and f"pid {first.pid} on host {socket.gethostname()}" \
        in second.stderr, second.stderr[-2000:]
    assert elapsed < 60  # at once: no waiting for A (the bulk of it is starting Python and torch)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    assert json.loads(stdout.splitlines()[-1])["models"] == [str(out / "iter0" / "model")]
    assert _same_weights(out / "iter0" / "model", uninterrupted / "iter0" / "model")
    assert json.loads((out / "config.json").read_text())["iterations"][0]["train"]["beta"] == 0.1


def _alive_pids(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):  # a zombie has exited (nobody reaped it yet)
            alive.append(pid)
    return alive


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


LAUNCHERS = {"torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "minispin"],
             "nproc_per_node": ["-m", "minispin", "--nproc_per_node", "2"]}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("launcher_name", list(LAUNCHERS))
def test_kill_of_the_launcher_process_group_leaves_no_rank_running(base, tmp_path, launcher_name):
    """A real 2-rank run (CPU, gloo), started by torchrun or by minispin's --nproc_per_node: SIGKILL to the
    launcher's process group mid-run (the ranks run in sessions of their own, so the signal does not reach
    them); a few seconds later no rank is alive."""
    root, model_dir, data = base
    out = tmp_path / "run-torchrun"
    argv = _one_iteration(_argv(model_dir, data, out))
    launcher = subprocess.Popen([sys.executable, *LAUNCHERS[launcher_name], *argv], env=_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_for(lambda: (out / "state.json").is_file() or launcher.poll() is not None, what="the run to start")
        assert launcher.poll() is None, "the run ended before the test could kill it"
        ranks = _children(launcher.pid)
        assert len(ranks) == 2 and all(os.getsid(r) != os.getsid(launcher.pid) for r in ranks)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    deadline = time.monotonic() + 5
    while _alive_pids(ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    still = _alive_pids(ranks)
    for pid in still:  # do not leave them behind when the test fails
        os.kill(pid, signal.SIGKILL)
    assert not still, f"ranks {still} still running 5 s after the launcher was killed"


def test_damaged_final_weights_are_detected_on_resume(uninterrupted, base, tmp_path):
    """A finished run whose model weights were cut to 1000 bytes, or deleted, is not "done earlier": the
    resume stops naming the file."""
    from minispin.cli import parse_config
    _, model_dir, data = base
    out = tmp_path / "copy"
    shutil.copytree(uninterrupted, out)
    weights = out / "iter1" / "model" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(RunError, match=f"{weights}: 1000 bytes, recorded [0-9]+"):
        spin(parse_config(RunConfig, _argv(model_dir, data, out)))
    (out / "iter0" / "model" / "model.safetensors").unlink()
    with pytest.raises(RunError, match=f"{out / 'iter0' / 'model' / 'model.safetensors'}: missing"):
        spin(parse_config(RunConfig, _argv(model_dir, data, out)))


def test_an_edited_data_file_is_refused_on_resume(base, tmp_path):
    """kill -9 in generation, edit the data file, resume: refused naming the file (before, 4 old and 6 new
    rows were mixed into generated.jsonl); the original data resumes."""
    from minispin.cli import parse_config
    _, model_dir, data = base
    edited = tmp_path / "sft.jsonl"
    shutil.copy(data, edited)
    out = tmp_path / "run"
    argv = _one_iteration(_argv(model_dir, edited, out))
    res = _run_cli(argv, kill_at="generate:rows=4")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    original = edited.read_bytes()
    edited.write_text(original.decode().replace("What is", "Compute", 3))
    with pytest.raises(RunError, match=f"started on other data: {edited.resolve()}: changed"):
        spin(parse_config(RunConfig, argv))
    assert not (out / "iter0" / "generated.jsonl").exists()
    edited.write_bytes(original)
    assert spin(parse_config(RunConfig, argv)).final_model == out / "iter0" / "model"


def test_a_refused_config_change_leaves_config_json_byte_identical(base, tmp_path):
    """Killed mid-training, then resumed with another lr: refused without --allow_config_change, and with
    it refused by the train state (saved with the other lr); config.json is the same bytes after both."""
    from minispin.cli import parse_config
    _, model_dir, data = base
    out = tmp_path / "run"
    argv = _one_iteration(_argv(model_dir, data, out))
    res = _run_cli(argv, kill_at="train:step=3")
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    before = (out / "config.json").read_bytes()
    other = list(argv)
    other[other.index("--iterations") + 1] = '[{"lr": 2e-3, "beta": 0.1}]'
    with pytest.raises(ValueError, match="different config"):
        spin(parse_config(RunConfig, other))
    assert (out / "config.json").read_bytes() == before
    with pytest.raises(ValueError, match="train_state: saved by a run with other settings"):
        spin(parse_config(RunConfig, other + ["--allow_config_change", "true"]))
    assert (out / "config.json").read_bytes() == before


def test_mismatched_tokenizer_fails_before_generation_starts(base, tmp_path):
    from tokenizers import Tokenizer
    _, model_dir, data = base
    tok_dir = tmp_path / "big-tokenizer"
    tok_dir.mkdir()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.add_special_tokens([f"<extra_{i}>" for i in range(40)])
    (tok_dir / "tokenizer.json").write_text(tok.to_str())
    shutil.copy(model_dir / "tokenizer_config.json", tok_dir)
    out = tmp_path / "run"
    cfg = RunConfig(model=str(model_dir), data=str(data), output_dir=str(out), tokenizer=str(tok_dir))
    with pytest.raises(ValueError, match=f"do not match: the tokenizer has {VOCAB_SIZE + 40} tokens but the "
                                         f"model's vocabulary has {VOCAB_SIZE}"):
        spin(cfg)
    assert not (out / "iter0").exists() and not (out / "state.json").exists()


def test_settings_are_validated_before_any_work(base, tmp_path, capsys):
    """Typos and out-of-range values, also in a later iteration's overrides, stop the run when the config is
    built, before the run directory exists (they used to surface after an iteration had trained)."""
    from minispin.cli import parse_args

    _, model_dir, data = base
    given = ["--model", str(model_dir), "--data", str(data), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match="save_dtype must be one of auto, float32, bfloat16, float16, got 'bfloat61'"):
        parse_args(given + ["--save_dtype", "bfloat61"])  # a usage error: python -m minispin prints it as one line
    with pytest.raises(ValueError, match="generation_dtype must be one of"):
        RunConfig(model=str(model_dir), data=str(data), generation_dtype="fp8")
    with pytest.raises(ValueError, match=r"bad sampling settings: temperature -1"):
        RunConfig(model=str(model_dir), data=str(data), iterations=[{}, {"generation.temperature": -1}])
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        RunConfig(model=str(model_dir), data=str(data), iterations=[{"lr": 1e-7}, {"label_smoothing": 0.7}])
    with pytest.raises(ConfigError, match="beta > 0"):
        parse_args(given + ["--beta", "0"])
    assert not (tmp_path / "run").exists()
