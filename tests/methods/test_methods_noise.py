"""minispin.methods.noise (CPU, tiny shapes): NEFTune's noise scale per row, the row lengths of a packed
batch, the hook only in training mode, also in PolicyHead's training forwards."""
from __future__ import annotations

import math

import pytest
import torch

from minispin.collate import Pair, collate_pairs, tokenize_pairs
from minispin.methods import neftune, neftune_noise, position_row_lengths
from methods_helpers import PROMPT


def test_neftune_noise_scale_per_row():
    torch.manual_seed(0)
    d, alpha = 4096, 5.0
    row_of = [7] * 7 + [3] * 3 + [5] * 5  # three packed rows of 7, 3 and 5 tokens
    emb = torch.zeros(1, len(row_of), d)
    lengths = torch.tensor(row_of)
    noise = neftune_noise(emb, lengths, alpha)
    start = 0
    for L in (7, 3, 5):
        bound = alpha / math.sqrt(L * d)
        row = noise[0, start: start + L]
        assert row.abs().max() <= bound * (1 + 1e-6)
        assert row.abs().max() > 0.95 * bound  # uniform over the whole [-bound, bound]
        assert row.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)  # uniform(-1,1) variance 1/3
        start += L
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(neftune_noise(emb, lengths, alpha, g1), neftune_noise(emb, lengths, alpha, g2))


def test_row_lengths_of_a_packed_batch():
    from minispin.collate import TokenizedPair

    tps = [TokenizedPair(0, [1, 7, 8], [9, 2], [9, 9, 9, 9, 2]), TokenizedPair(1, [1, 7], [5, 2], [2])]
    batch = collate_pairs(tps, share_prefix=False)
    got = position_row_lengths(batch.position_ids, batch.packed)
    # pair by pair: chosen row then rejected row, each position labelled with its row's length
    assert got.tolist() == [5] * 5 + [8] * 8 + [4] * 4 + [3] * 3
    with pytest.raises(ValueError, match="share_prefix=False"):  # shared tokens cannot take two rows' noise
        shared = collate_pairs(tps)
        position_row_lengths(shared.position_ids, shared.packed)


def test_neftune_hook_only_in_training_mode():
    emb = torch.nn.Embedding(10, 16)
    ids = torch.tensor([[1, 2, 3, 0]])
    clean = emb(ids)
    with neftune(emb, 5.0, torch.tensor([3, 3, 3, 1])):  # rows of 3 and 1 tokens
        noisy = emb(ids)
        emb.eval()
        evaluated = emb(ids)
        emb.train()
    after = emb(ids)
    assert not torch.equal(noisy[0, :3], clean[0, :3]) and not torch.equal(noisy[0, 3], clean[0, 3])
    assert torch.equal(evaluated, clean) and torch.equal(after, clean)  # eval mode / hook removed
    assert (noisy - clean)[0, :3].abs().max() <= 5.0 / math.sqrt(3 * 16) + 1e-6


def test_policy_neftune_only_in_training_forwards(tiny):
    from minispin.training import PolicyHead

    model, tok = tiny
    pairs = [Pair(0, list(PROMPT), "5", "6"), Pair(1, [{"role": "user", "content": "Sort cab"}], "abc", "cba")]
    batch = collate_pairs(tokenize_pairs(pairs, tok, max_length=48, max_prompt_length=24), share_prefix=False)
    plain, noisy = PolicyHead(model), PolicyHead(model, neftune_alpha=5.0)
    args = (batch.input_ids, batch.position_ids, batch.packed, batch.token_index, batch.labels)
    with torch.no_grad():
        clean = plain(*args)
        torch.manual_seed(1)
        a = noisy(*args)
        torch.manual_seed(1)
        b = noisy(*args)
        noisy.eval()
        evaluated = noisy(*args)  # the reference pass runs in eval mode: no noise
    assert torch.equal(a, b) and not torch.allclose(a, clean)  # seeded noise, changes the log-probs
    assert torch.equal(evaluated, clean)
    assert not model.embed_tokens._forward_hooks  # the hook is gone after each forward
