"""minispin.runs' run-directory integrity (CPU, no process group): the run lock against a real second
process (and after its kill -9), which temp names are minispin's, content digests, input fingerprints."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from minispin.runs import (RunError, RunLock, changed_inputs, damaged_files, digest_files, fingerprint_inputs,
                           lock_run, phase_done, record_phase, remove_temp_files, temp_files)
from tiny import REPO

HOLDER = """
import sys
from minispin.runs import RunLock
lock = RunLock(sys.argv[1]); lock.acquire()
print("locked", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin (or kills us)
"""


def test_run_lock_refuses_a_second_holder_naming_it_and_a_killed_holder_blocks_nobody(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunError, match=f"is in use by another job \\(pid {holder.pid} on host "
                                           f"{socket.gethostname()}, started 20"):
            lock_run(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".lock").is_file()  # the file outlives the job; the kernel dropped the flock
    lock = lock_run(tmp_path)
    assert lock is not None and f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()
    lock.release()
    with RunLock(tmp_path):  # released: the next job takes it
        pass


def test_only_minispin_temp_names_are_removed(tmp_path):
    (tmp_path / "iter0").mkdir()
    ours = [Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=tmp_path / "iter0")),  # checkpoint.save_model
            Path(tempfile.mkdtemp(prefix=".train_state.tmp-", dir=tmp_path / "iter0")),  # save_train_state
            Path(tempfile.mkstemp(prefix=".state.json.", suffix=".tmp", dir=tmp_path)[1])]  # io atomic writes
    (ours[0] / "model.safetensors").write_bytes(b"x" * 10)
    theirs = [tmp_path / ".hidden", tmp_path / "notes.tmp", tmp_path / "model.tmp-abcdefgh",
              tmp_path / ".model.tmp-short", tmp_path / "iter0" / ".state.json.tmp", tmp_path / "keep.json"]
    for p in theirs:
        p.write_text("user file")
    assert temp_files(tmp_path) == sorted(ours)
    assert remove_temp_files(tmp_path) == sorted(ours)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert temp_files(tmp_path) == []


def test_phase_done_checks_sizes_and_digests_of_every_file(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(os.urandom(5000))
    (model / "config.json").write_text("{}")
    assert not phase_done(tmp_path, "model")  # not recorded: not done
    record_phase(tmp_path, "model", [model])
    assert set(digest_files([model], tmp_path)) == {"model/config.json", "model/model.safetensors"}
    assert phase_done(tmp_path, "model")
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(RunError, match=r"model.safetensors: 1000 bytes, recorded 5000.*delete them"):
        phase_done(tmp_path, "model")
    (model / "model.safetensors").write_bytes(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit
    assert damaged_files({"model/model.safetensors": digest_files([model], tmp_path)["model/model.safetensors"]},
                         tmp_path) == []
    with pytest.raises(RunError, match="model.safetensors: content changed"):
        phase_done(tmp_path, "model")
    (model / "config.json").unlink()
    with pytest.raises(RunError, match="config.json: missing"):
        phase_done(tmp_path, "model")


def test_input_fingerprints_name_the_changed_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    (data / ".cache").mkdir()
    (data / ".cache" / "x").write_text("ignored")
    before = fingerprint_inputs([data])
    assert list(before) == [str((data / "train.jsonl").resolve())]
    (data / ".cache" / "x").write_text("still ignored")
    assert changed_inputs(before, fingerprint_inputs([data])) == []
    (data / "train.jsonl").write_text('{"prompt": "A", "response": "b"}\n')
    (data / "test.jsonl").write_text("{}\n")
    assert changed_inputs(before, fingerprint_inputs([data])) == [
        f"{(data / 'test.jsonl').resolve()}: new file",
        f"{(data / 'train.jsonl').resolve()}: changed (same size, 33 bytes, other content)"]
