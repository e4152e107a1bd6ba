"""DPO: preference rows (TRL prompt/chosen/rejected, sharegpt conversations/chosen/rejected) -> pairs as
they are; no generation."""
from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

from ..collate import Pair
from ..data import PREFERENCE_FORMATS, DataError, read_preferences

DPO_SCHEDULE: list[dict[str, Any]] = [{"lr": 5e-7, "beta": 0.1, "epochs": 1}]


class DataSettings(Protocol):
    """The run settings a method's data reader uses (RunConfig has them; methods never import the driver)."""
    data: str
    split: str | None
    data_format: str
    limit: int | None
    on_bad_row: str


def dpo_pairs(examples: Sequence[Any]) -> list[Pair]:
    """Preference rows (PreferenceExample: chosen / rejected) -> pairs as they are."""
    pairs = []
    for e in examples:
        if not hasattr(e, "chosen"):
            raise DataError("DPO needs preference rows (prompt/chosen/rejected or conversations/chosen/rejected), "
                            "got an SFT row", source=e.source, index=e.index)
        pairs.append(Pair(index=e.index, prompt=list(e.prompt), chosen=e.chosen, rejected=e.rejected,
                          source=e.source))
    return pairs



def read_preference_data(config: DataSettings, warn: Callable[[str], None] | None = None) -> list[Any]:
    """The run's data read as preference rows (TRL / sharegpt / SPIN layouts; see minispin.data)."""
    fmt = config.data_format if config.data_format in PREFERENCE_FORMATS else "auto"
    return read_preferences(config.data, format=fmt, split=config.split, limit=config.limit,
                            on_error=config.on_bad_row, warn=warn)
