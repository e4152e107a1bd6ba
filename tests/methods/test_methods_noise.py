"""minispin.methods.noise (CPU, tiny shapes): NEFTune's noise scale and padding, row lengths of a collated
batch, the hook only in training mode, also in PolicyHead's training forwards."""
from __future__ import annotations

import math

import pytest
import torch

from minispin.collate import Pair, collate_pairs, tokenize_pairs
from minispin.methods import neftune, neftune_noise, row_lengths
from methods_helpers import PROMPT


def test_neftune_noise_scale_and_padding():
    torch.manual_seed(0)
    B, T, d, alpha = 3, 7, 4096, 5.0
    emb = torch.zeros(B, T, d)
    lengths = torch.tensor([7, 3, 5])
    noise = neftune_noise(emb, lengths, alpha)
    for b, L in enumerate(lengths.tolist()):
        bound = alpha / math.sqrt(L * d)
        row = noise[b, :L]
        assert row.abs().max() <= bound * (1 + 1e-6)
        assert row.abs().max() > 0.95 * bound  # uniform over the whole [-bound, bound]
        assert row.var().item() == pytest.approx(bound ** 2 / 3, rel=0.05)  # uniform(-1,1) variance 1/3
        assert torch.all(noise[b, L:] == 0)  # no noise on padding
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(neftune_noise(emb, lengths, alpha, g1), neftune_noise(emb, lengths, alpha, g2))


def test_row_lengths_from_collated_batch():
    from minispin.collate import TokenizedPair

    tps = [TokenizedPair(0, [1, 7, 8], [9, 2], [9, 9, 9, 9, 2]), TokenizedPair(1, [1, 7], [5, 2], [2])]
    batch = collate_pairs(tps, pad_id=0)
    R, T = batch.input_ids.shape
    got = row_lengths(batch.token_index, R, T)
    expected = [len(t.prompt_ids) + len(t.chosen_ids) for t in tps] + [len(t.prompt_ids) + len(t.rejected_ids)
                                                                       for t in tps]
    assert got.tolist() == expected == [5, 4, 8, 3]


def test_neftune_hook_only_in_training_mode():
    emb = torch.nn.Embedding(10, 16)
    ids = torch.tensor([[1, 2, 3, 0]])
    clean = emb(ids)
    with neftune(emb, 5.0, torch.tensor([3])):
        noisy = emb(ids)
        emb.eval()
        evaluated = emb(ids)
        emb.train()
    after = emb(ids)
    assert not torch.equal(noisy, clean) and torch.equal(noisy[0, 3], clean[0, 3])  # padding untouched
    assert torch.equal(evaluated, clean) and torch.equal(after, clean)  # eval mode / hook removed
    assert (noisy - clean).abs().max() <= 5.0 / math.sqrt(3 * 16) + 1e-6


def test_policy_neftune_only_in_training_forwards(tiny):
    from minispin.training import PolicyHead

    model, tok = tiny
    pairs = [Pair(0, list(PROMPT), "5", "6"), Pair(1, [{"role": "user", "content": "Sort cab"}], "abc", "cba")]
    batch = collate_pairs(tokenize_pairs(pairs, tok, max_length=48, max_prompt_length=24), tok.pad_id)
    plain, noisy = PolicyHead(model), PolicyHead(model, neftune_alpha=5.0)
    args = (batch.input_ids, batch.token_index, batch.labels)
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
