"""Small torch.distributed helpers: start from torchrun's environment or as one plain process.

Launch modes:
- `torchrun --nproc_per_node N ...`: RANK/WORLD_SIZE/LOCAL_RANK are set; `init_distributed` starts a
  process group (nccl on CUDA, gloo on CPU) and pins each rank to cuda:LOCAL_RANK.
- a plain `python ...` process: no process group on CPU (rank 0 of 1, everything is local). On CUDA
  `init_distributed(single_process_group=True)` starts a one-rank nccl group on an in-memory store, so
  the training loop can run the very same FSDP2 mixed-precision path on one GPU as on eight.

- `launch(N, command)` (behind `--nproc_per_node N` on minispin's command lines): torchrun's
  standalone launcher run inside this process, quietly - a rank's own "error: ..." line is all a user
  mistake prints, where plain torchrun adds a ~40-line failure block of its own.

Under torchrun each rank also ends when its launcher dies (`exit_with_parent`): torchrun starts every
rank in a session of its own, so a kill -9 of torchrun or of its process group would not reach them.

Also: rank/world/is_main/barrier, a seed helper, all-gather of picklable-free Python data (JSON), and
the `MINISPIN_TEST_KILL_AT` hook with which the tests kill -9 a run at a chosen point.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from .errors import UserError

KILL_ENV = "MINISPIN_TEST_KILL_AT"


@dataclass
class DistInfo:
    """Where this process runs: rank/world, its device, and whether we started the process group."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: no process group
    created_group: bool


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_rank() -> int:
    """The rank torchrun gave this process (0 without torchrun); also valid before the process group
    starts and after it is gone."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that writes files and prints."""
    return get_rank() == 0


def barrier() -> None:
    if is_initialized() and get_world_size() > 1:
        dist.barrier()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_distributed(device: str | torch.device | None = None, *,
                     single_process_group: bool = False) -> DistInfo:
    """Join torchrun's process group (or reuse one already started); else run as one local process.

    device: "cuda" / "cpu" / None (CUDA when available). single_process_group: without torchrun, still
    start a one-rank group (nccl on CUDA, gloo on CPU) so FSDP2 can be used - the path we take on GPU.
    """
    if launched_by_torchrun():
        exit_with_parent()
    try:
        dev = torch.device(device) if device is not None else default_device()
    except RuntimeError:
        raise UserError(f"--device {device!r}: not a device torch knows (use cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    created = False
    if not is_initialized():
        if launched_by_torchrun():
            dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
            created = True
        elif single_process_group:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
            created = True
    if is_initialized():
        backend = dist.get_backend()
    else:
        backend = None
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched_by_torchrun() else 0
    return DistInfo(get_rank(), get_world_size(), local_rank, dev, backend, created)


def launch(nproc: int, command: list[str]) -> int:
    """Run `python command...` as `nproc` ranks on this machine (what `torchrun --standalone
    --nproc_per_node nproc command...` does) and return the job's exit code: 0, or the first failed rank's.
    Quiet: each rank prints its own errors (minispin's one "error:" line); torchrun's failure block,
    traceback and log lines are left out. A rank ended by a signal gets one line (it could print none)."""
    assert nproc >= 1 and command, (nproc, command)
    # torchrun would set 1 thread per rank and warn about it in 4 lines; share the cores instead
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or nproc) // nproc)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(["--standalone", f"--nproc_per_node={nproc}", *command]))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode or 1
        name = signal.Signals(-failure.exitcode).name if -failure.exitcode in signal.valid_signals() else "?"
        print(f"error: rank {rank} was ended by signal {-failure.exitcode} ({name})"
              + (": out of memory?" if name == "SIGKILL" else ""), file=sys.stderr, flush=True)
        return 128 - failure.exitcode
    return 0


_PARENT_WATCH: list[int] = []  # the parent pid being watched (once per process)


def exit_with_parent(poll_s: float = 0.2) -> None:
    """End this process (exit status 1) within `poll_s` seconds of its parent's death: a daemon thread
    compares os.getppid() with the parent at the time of the call (the kernel re-parents an orphan, so the
    pid changes exactly when the parent is gone). For ranks under torchrun, whose launcher may be killed
    with SIGKILL and cannot pass it on. Idempotent."""
    if _PARENT_WATCH:
        return
    parent = os.getppid()
    _PARENT_WATCH.append(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        try:
            print(f"[minispin] rank {os.environ.get('RANK', '?')}: the launcher (pid {parent}) is gone; "
                  "exiting", file=sys.stderr, flush=True)
        except (OSError, ValueError):  # stderr was the dead launcher's pipe
            pass
        os._exit(1)

    threading.Thread(target=watch, name="minispin-exit-with-parent", daemon=True).start()


def shutdown(info: DistInfo | None = None) -> None:
    """Destroy the process group if `info` says we created it (a barrier first: gloo dislikes early exits)."""
    if info is not None and info.created_group and is_initialized():
        gc.collect()  # drop sharded modules / pending work that hold the group before tearing it down
        barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every CUDA device)."""
    random.seed(seed)
    torch.manual_seed(seed)


def all_gather_json(value: Any) -> list[Any]:
    """Gather one JSON-serialisable value from every rank (as UTF-8 bytes, no pickle). Returns per-rank values."""
    if get_world_size() == 1:
        return [value]
    payload = torch.frombuffer(bytearray(json.dumps(value).encode("utf-8")), dtype=torch.uint8)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    size = torch.tensor([payload.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    buf[: payload.numel()] = payload.to(device)
    bufs = [torch.zeros_like(buf) for _ in sizes]
    dist.all_gather(bufs, buf)
    return [json.loads(bytes(b[: int(s.item())].cpu().tolist()).decode("utf-8")) for b, s in zip(bufs, sizes)]


def broadcast_json(value: Any, src: int = 0) -> Any:
    """Rank `src`'s JSON-serialisable value on every rank."""
    if get_world_size() == 1:
        return value
    return all_gather_json(value if get_rank() == src else None)[src]


def all_ranks_true(flag: bool) -> bool:
    """Logical AND of a flag over ranks (e.g. 'every rank found the file')."""
    return all(all_gather_json(bool(flag)))


def kill_point(phase: str, **counters: int) -> None:
    """The one test seam for kill -9 resume tests: SIGKILL this process when MINISPIN_TEST_KILL_AT
    matches "<phase>[:<counter>=<value>][@rank=<r>]". The points, each right after its work is durable:
    "generate:rows=N" (generation job chunk), "judge:rows=N" (judge score cache chunk),
    "reference:batch=B" (reference pass batch), "train:step=S" (optimizer step, after any checkpoint),
    "save:iteration=T" (iteration model saved); and inside saves, with the temp folder written but not yet
renamed into place: "stage_train_state:step=S" (train state), "stage_model" (HF model folder) and "stage_adapter" (LoRA adapter folder). A real kill -9 (no cleanup, no atexit); never set in
    normal runs.
    """
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    spec, _, rank_part = spec.partition("@")
    if rank_part and rank_part.strip() != f"rank={get_rank()}":
        return
    want_phase, _, cond = spec.partition(":")
    if want_phase.strip() != phase:
        return
    if cond:
        key, _, value = cond.partition("=")
        if key.strip() not in counters or counters[key.strip()] != int(value):
            return
    os.kill(os.getpid(), signal.SIGKILL)
