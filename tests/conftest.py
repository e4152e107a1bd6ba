"""Test-wide settings: one intra-op thread per process (CI has 2 cores and several tests start
2-rank torchrun jobs, which oversubscribe the machine with torch's default thread count)."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
