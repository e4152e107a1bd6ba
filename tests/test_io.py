"""Tests for minispin.io: atomic writes, resumable chunked jsonl (incl. kill -9), merging parts."""
import errno
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minispin import io as mio
from minispin.data import read_examples, to_spin_row
from minispin.io import (ChunkedJsonlWriter, CorruptFileError, MergeError, atomic_replace_dir,
                         atomic_write_bytes, atomic_write_json, atomic_write_text, merge_parts,
                         read_jsonl_part, recover_replaced_dir, write_rows_file)
from tiny import FIXTURES

IO_FILE = Path(mio.__file__).resolve()
ALPACA = FIXTURES / "data" / "alpaca_en_demo.json"


def listdir(path):
    return sorted(p.name for p in Path(path).iterdir())


# ----------------------------------------------------------------------------- atomic files

def test_atomic_write_roundtrip_and_mode(tmp_path):
    path = tmp_path / "sub" / "state.json"
    atomic_write_json(path, {"step": 1, "text": "é✓"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"step": 1, "text": "é✓"}
    assert path.read_text(encoding="utf-8").endswith("\n")
    os.chmod(path, 0o640)
    atomic_write_text(path, "second")
    assert path.read_text() == "second" and stat.S_IMODE(path.stat().st_mode) == 0o640
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert listdir(path.parent) == ["state.json"]  # no temp files left


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "final.jsonl"
    path.write_text("old complete content\n")

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "simulated failure in os.replace")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated failure"):
        atomic_write_text(path, "new content that must not appear\n")
    with pytest.raises(OSError, match="simulated failure"):
        write_rows_file(path, [{"index": 0}])
    assert path.read_text() == "old complete content\n"
    assert listdir(tmp_path) == ["final.jsonl"]

    monkeypatch.undo()
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "fsync failed")))
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_bytes(path, b"x" * 100_000)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_text() == "old complete content\n" and listdir(tmp_path) == ["final.jsonl"]
    with pytest.raises(TypeError):  # not serialisable: fails before anything is written
        atomic_write_json(path, {"x": object()})
    assert path.read_text() == "old complete content\n" and listdir(tmp_path) == ["final.jsonl"]


def make_dir(path, files):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_atomic_replace_dir(tmp_path):
    final = tmp_path / "ckpt"
    atomic_replace_dir(make_dir(tmp_path / "tmp1", {"a": "1"}), final)
    assert listdir(tmp_path) == ["ckpt"] and (final / "a").read_text() == "1"
    atomic_replace_dir(make_dir(tmp_path / "tmp2", {"b": "2"}), final)
    assert listdir(tmp_path) == ["ckpt"] and listdir(final) == ["b"]
    with pytest.raises(FileNotFoundError):
        atomic_replace_dir(tmp_path / "nothing", final)


def test_atomic_replace_dir_gives_normal_permissions(tmp_path):
    """A folder staged with tempfile.mkdtemp (0700) holding a 0600 file (as safetensors writes them) lands
    with the permissions mkdir / open would give under the umask, like checkpoints other tools write."""
    import tempfile

    staged = Path(tempfile.mkdtemp(dir=tmp_path))
    (staged / "sub").mkdir(mode=0o700)
    for name in ("model.safetensors", "sub/x"):
        (staged / name).write_text("w")
        os.chmod(staged / name, 0o600)
    final = tmp_path / "ckpt"
    atomic_replace_dir(staged, final)
    umask = os.umask(0)
    os.umask(umask)
    for path, full in ((final, 0o777), (final / "sub", 0o777), (final / "model.safetensors", 0o666),
                       (final / "sub" / "x", 0o666)):
        assert stat.S_IMODE(path.stat().st_mode) == full & ~umask, path


def test_atomic_replace_dir_rolls_back_and_recovers(tmp_path, monkeypatch):
    final = make_dir(tmp_path / "ckpt", {"model": "old"})
    new = make_dir(tmp_path / "ckpt.tmp", {"model": "new"})
    real_rename, calls = os.rename, []

    def rename_failing_second_time(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "simulated failure")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_failing_second_time)
    with pytest.raises(OSError, match="simulated failure"):
        atomic_replace_dir(new, final)
    monkeypatch.undo()
    assert (final / "model").read_text() == "old" and (new / "model").read_text() == "new"
    assert listdir(tmp_path) == ["ckpt", "ckpt.tmp"]

    # a crash between the two renames leaves only ckpt.old: recovered before the next replace
    os.rename(final, tmp_path / "ckpt.old")
    assert recover_replaced_dir(final) and (final / "model").read_text() == "old"
    assert not recover_replaced_dir(final)
    os.rename(final, tmp_path / "ckpt.old")
    atomic_replace_dir(new, final)
    assert listdir(tmp_path) == ["ckpt"] and (final / "model").read_text() == "new"
    make_dir(tmp_path / "ckpt.old", {"model": "stale"})  # stale leftover next to a good dir
    atomic_replace_dir(make_dir(tmp_path / "t3", {"model": "newer"}), final)
    assert listdir(tmp_path) == ["ckpt"] and (final / "model").read_text() == "newer"


# ----------------------------------------------------------------------------- chunked writer

def row(k, text=None):
    return {"index": k, "generated": text if text is not None else f"answer {k} é\n✓"}


def test_writer_resume_and_no_duplicates(tmp_path):
    path = tmp_path / "out.partial.jsonl"
    with ChunkedJsonlWriter(path) as w:
        assert w.done == set()
        assert w.write_rows([row(0), row(1), row(1, "dup in chunk")]) == 2
        assert w.write_rows([]) == 0 and w.write_rows([row(1, "again")]) == 0
        assert w.rows_ignored == 2
    with ChunkedJsonlWriter(path) as w:
        assert w.done == {0, 1} and w.truncated_bytes == 0
        assert w.write_rows([row(0), row(5), row(2)]) == 2
    rows = read_jsonl_part(path)
    assert [r["index"] for r in rows] == [0, 1, 5, 2] and rows[1] == row(1)
    with ChunkedJsonlWriter(path) as w:
        with pytest.raises(ValueError, match="'index' must be an integer"):
            w.write_rows([{"index": "3"}])
        with pytest.raises(ValueError, match="'index' must be an integer"):
            w.write_rows([{"index": True}])
        with pytest.raises(ValueError, match="expected a dict row"):
            w.write_rows([[3]])
        with pytest.raises(RuntimeError, match="open for writing in another process"):
            ChunkedJsonlWriter(path)
        assert w.write_rows([row(3)]) == 1
    with pytest.raises(ValueError, match="closed"):
        w.write_rows([row(4)])
    assert sorted(r["index"] for r in read_jsonl_part(path)) == [0, 1, 2, 3, 5]


def test_writer_truncates_torn_tail(tmp_path):
    path = tmp_path / "p.jsonl"
    with ChunkedJsonlWriter(path) as w:
        w.write_rows([row(0), row(1)])
    good = path.read_bytes()
    torn = json.dumps(row(2)).encode()[:17]
    path.write_bytes(good + torn)
    assert [r["index"] for r in read_jsonl_part(path)] == [0, 1]  # read-only: file unchanged
    assert path.read_bytes() == good + torn
    with ChunkedJsonlWriter(path) as w:
        assert w.done == {0, 1} and w.truncated_bytes == len(torn)
        assert path.read_bytes() == good
        w.write_rows([row(2)])
    assert [r["index"] for r in read_jsonl_part(path)] == [0, 1, 2]

    # undecodable complete lines at the very end (garbage left by a crash) are dropped too
    good = path.read_bytes()
    path.write_bytes(good + b"\x00\x00\x00\n" + b'{"index": 9, "gen\n' + b'{"ind')
    with ChunkedJsonlWriter(path) as w:
        assert w.done == {0, 1, 2} and path.read_bytes() == good


def test_writer_refuses_corruption_in_the_middle(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(json.dumps(row(0)).encode() + b"\n" + b"garbage\n" + json.dumps(row(1)).encode() + b"\n")
    with pytest.raises(CorruptFileError, match="line 2 is not valid JSON but later lines are"):
        ChunkedJsonlWriter(path)
    path.write_text(json.dumps({"generated": "no key"}) + "\n")
    with pytest.raises(CorruptFileError, match="line 1: row key 'index' must be an integer"):
        ChunkedJsonlWriter(path)


def test_writer_failed_write_leaves_clean_file(tmp_path, monkeypatch):
    path = tmp_path / "p.jsonl"
    w = ChunkedJsonlWriter(path)
    w.write_rows([row(0)])
    before = path.read_bytes()
    real_write = os.write

    def half_write_then_disk_full(fd, data):
        if len(data) > 10:
            real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_write_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        w.write_rows([row(1, "x" * 1000), row(2)])
    monkeypatch.undo()
    assert path.read_bytes() == before and w.done == {0}
    assert w.write_rows([row(1), row(2)]) == 2
    w.close()
    assert [r["index"] for r in read_jsonl_part(path)] == [0, 1, 2]


# ----------------------------------------------------------------------------- finalize and merge

def test_finalize_sorts_and_checks_expected_keys(tmp_path):
    part = tmp_path / "out.partial.jsonl"
    with ChunkedJsonlWriter(part) as w:
        w.write_rows([row(3), row(1)])
        w.write_rows([row(0)])
    with pytest.raises(MergeError, match=r"missing 2 keys: \[2, 4\]; unexpected 0 keys"):
        w.finalize(tmp_path / "out.jsonl", expected_keys=set(range(5)))
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(MergeError, match=r"unexpected 1 keys: \[3\]"):
        w.finalize(tmp_path / "out.jsonl", expected_keys={0, 1})
    report = ChunkedJsonlWriter(part).finalize(tmp_path / "out.jsonl", expected_keys={0, 1, 3})
    assert (report.rows, report.duplicates_dropped) == (3, 0)
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [row(0), row(1), row(3)]
    merge_parts([part], tmp_path / "out.json", order=[3, 0, 1], remove_parts=True)
    assert json.loads((tmp_path / "out.json").read_text()) == [row(3), row(0), row(1)]
    assert not part.exists()
    with pytest.raises(MergeError, match="part file missing"):
        merge_parts([part], tmp_path / "again.jsonl")
    with pytest.raises(ValueError, match="unsupported output type"):
        write_rows_file(tmp_path / "out.csv", [row(0)])


def test_merge_rank_parts(tmp_path, caplog):
    parts = [tmp_path / f"gen.rank{r}.jsonl" for r in range(3)]
    for r, part in enumerate(parts):
        with ChunkedJsonlWriter(part) as w:
            w.write_rows([row(k) for k in range(r, 20, 3)])
    with open(parts[1], "a") as f:  # a row written twice (e.g. shards that overlapped)
        f.write(json.dumps(row(0)) + "\n")
    with caplog.at_level("WARNING", logger="minispin.io"):
        report = merge_parts(parts, tmp_path / "gen.jsonl", expected_keys=set(range(20)))
    assert report.duplicates_dropped == 1 and "dropped 1 exact duplicate" in caplog.text
    assert [json.loads(line)["index"] for line in open(tmp_path / "gen.jsonl")] == list(range(20))
    with open(parts[2], "a") as f:
        f.write(json.dumps(row(4, "a different answer")) + "\n")
    with pytest.raises(MergeError, match=r"rows with the same key differ, 1 keys: \[4\]"):
        merge_parts(parts, tmp_path / "gen2.jsonl")
    assert not (tmp_path / "gen2.jsonl").exists()


def test_finalize_parquet_reads_back_as_spin_data(tmp_path):
    pytest.importorskip("pyarrow")
    examples = read_examples(ALPACA, limit=40)
    part = tmp_path / "iter0.partial.jsonl"
    with ChunkedJsonlWriter(part) as w:
        for start in (30, 0, 10, 20):  # out of order, like a multi-worker job
            w.write_rows([dict(to_spin_row(e, f"gen {e.index}"), **({"extra": 1} if e.index == 35 else {}))
                          for e in examples[start:start + 10]])
    w.finalize(tmp_path / "iter0.parquet", expected_keys={e.index for e in examples})
    back = read_examples(tmp_path / "iter0.parquet", require_generated=True)
    assert [(e.index, e.prompt, e.real, e.generated) for e in back] == \
        [(e.index, e.prompt, e.real, f"gen {e.index}") for e in examples]
    assert back[0].extra == {"index": 0, "extra": None} and back[35].extra == {"index": 35, "extra": 1}


# ----------------------------------------------------------------------------- kill -9

CHILD = r"""
import importlib.util, os, random, sys, time
io_file, path, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spec = importlib.util.spec_from_file_location("standalone_io", io_file)
mio = sys.modules["standalone_io"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mio)

real_write = os.write
def slow_write(fd, data):  # a slow disk: chunks land in 1 KiB pieces, so kills can tear them
    n_written = real_write(fd, bytes(data[:1024]))
    time.sleep(0.001)
    return n_written
os.write = slow_write

def payload(k):
    rng = random.Random(k)
    return "".join(rng.choice("abcé✓\n\"\\ ") for _ in range(rng.randint(500, 6000)))

writer = mio.ChunkedJsonlWriter(path)
print("opened", len(writer.done), writer.truncated_bytes, flush=True)
rng, k = random.Random(seed), 0
while k < n:  # offers every key again, done or not, like a re-run shard
    size = rng.randint(1, 8)
    writer.write_rows([{"index": j, "generated": payload(j)} for j in range(k, min(n, k + size))])
    k += size
writer.close()
print("finished", flush=True)
"""


def expected_payload(k):
    rng = random.Random(k)
    return "".join(rng.choice("abcé✓\n\"\\ ") for _ in range(rng.randint(500, 6000)))


def test_sigkill_at_random_moments_then_resume(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path, n = tmp_path / "gen.partial.jsonl", 150
    rng = random.Random(1234)
    kills = torn_seen = progress_kills = 0
    for attempt in range(40):
        child = subprocess.Popen([sys.executable, str(script), str(IO_FILE), str(path), str(n), str(attempt)],
                                 stdout=subprocess.PIPE, text=True)
        opened = child.stdout.readline().split()
        assert opened[0] == "opened", opened
        # kill until a few kills tore a line (most do: the slow write dominates), then let it finish
        if (kills < 4 or torn_seen < 2) and kills < 30:
            time.sleep(rng.uniform(0.0, 0.05))
            child.send_signal(signal.SIGKILL)
        rc = child.wait(timeout=60)
        child.stdout.close()
        if rc == 0:
            break
        assert rc == -signal.SIGKILL
        kills += 1
        data = path.read_bytes()
        torn_seen += not data.endswith(b"\n")
        progress_kills += 0 < data.count(b"\n") < n
    assert rc == 0, "the last run should finish"
    assert kills >= 4 and progress_kills >= 2, (kills, progress_kills)
    assert torn_seen >= 2, "kills did not land inside chunk writes; the test did not test torn lines"
    data = path.read_bytes()
    assert data.endswith(b"\n")
    rows = [json.loads(line) for line in data.splitlines()]
    assert [r["index"] for r in rows] == list(range(n))  # every key exactly once, in write order
    for r in rows:
        assert r["generated"] == expected_payload(r["index"])
    report = merge_parts([path], tmp_path / "gen.jsonl", expected_keys=set(range(n)))
    assert report.rows == n and report.duplicates_dropped == 0 and report.torn_bytes_ignored == 0


def test_disk_full_errors_name_the_file_being_written(tmp_path, monkeypatch):
    """ENOSPC from os.write / fsync carries no file name; the error says which file was being written
    (os.write and os.fsync are patched: filling a real disk is not possible in a test)."""
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    part = tmp_path / "gen.jsonl.part-00000-of-00001.jsonl"
    with ChunkedJsonlWriter(part) as writer:
        monkeypatch.setattr(os, "write", full)
        with pytest.raises(OSError, match=f"No space left on device \\(disk full\\) while writing {part}") as err:
            writer.write_rows([{"index": 0}])
        monkeypatch.undo()
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(part)
    assert part.read_bytes() == b""  # the half chunk was cut off
    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=f"\\(disk full\\) while writing {tmp_path / 'state.json'}"):
        atomic_write_json(tmp_path / "state.json", {"step": 1})
    monkeypatch.undo()
    assert listdir(tmp_path) == [part.name]
