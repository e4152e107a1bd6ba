"""The optional TensorBoard copy of the training metrics (TrainConfig.tensorboard, `--tensorboard`):
every record written to metrics.jsonl also goes to TensorBoard event files. The JSON lines stay the
source of truth (python -m minispin.report reads them); needs `pip install minispin[tensorboard]`."""
from __future__ import annotations

import math
import os
from typing import Any

__all__ = ["TensorBoardSink", "tensorboard_available"]


class TensorBoardSink:
    """Copies each metrics record (the dict written to metrics.jsonl) to TensorBoard event files in
    `log_dir`, as scalars by step. `purge_step`: on a resumed run, TensorBoard drops the events it
    already has from that step on, so re-run steps are not shown twice. Needs the tensorboard package."""

    def __init__(self, log_dir: str | os.PathLike, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("TensorBoard output was asked for but the tensorboard package is not installed: "
                         "pip install minispin[tensorboard]") from None
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def __call__(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def tensorboard_available() -> bool:
    """Whether TensorBoard output can be written (the tensorboard package is importable)."""
    try:
        import tensorboard  # noqa: F401  (optional dependency)
    except ImportError:
        return False
    return True
