"""minispin.methods.dpo (CPU, no model): DPO pairs from TRL and sharegpt preference rows."""
from __future__ import annotations

import json

import pytest

from minispin.methods import dpo_pairs
from methods_helpers import ex


def test_dpo_pairs_from_trl_and_sharegpt_rows(tmp_path):
    from minispin.data import read_preferences

    rows = [
        {"prompt": "Say hi", "chosen": "hi", "rejected": "no"},
        {"prompt": [{"role": "user", "content": "Say yo"}],
         "chosen": [{"role": "user", "content": "Say yo"}, {"role": "assistant", "content": "yo"}],
         "rejected": [{"role": "user", "content": "Say yo"}, {"role": "assistant", "content": "meh"}]},
        {"conversations": [{"from": "human", "value": "Count"}], "chosen": {"from": "gpt", "value": "1 2 3"},
         "rejected": {"from": "gpt", "value": "3 2 1"}},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = dpo_pairs(read_preferences(path))
    assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in pairs] == \
        [("Say hi", "hi", "no"), ("Say yo", "yo", "meh"), ("Count", "1 2 3", "3 2 1")]
    assert [p.index for p in pairs] == [0, 1, 2] and all(p.targets is None for p in pairs)
    with pytest.raises(ValueError, match=r"row 5 \(1-based\).*DPO needs preference rows"):
        dpo_pairs([ex(4)])
