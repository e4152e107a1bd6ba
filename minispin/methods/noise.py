"""Noise for any pairwise method: label smoothing of the pair loss and NEFTune noise on the input
embeddings of training forwards; "noise_spin" = SPIN's schedule with both on."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from ..model import PackedRows


def noise_schedule(schedule: Sequence[dict[str, Any]], label_smoothing: float = 0.1,
                   neftune_alpha: float = 5.0) -> list[dict[str, Any]]:
    """A schedule with noise added to every iteration (label smoothing eps and NEFTune alpha)."""
    return [dict(d, label_smoothing=label_smoothing, neftune_alpha=neftune_alpha) for d in schedule]



def position_row_lengths(position_ids: torch.Tensor, packed: PackedRows) -> torch.Tensor:
    """The length of the row each position of a packed sequence belongs to [N] (NEFTune's L), on the device of
    position_ids [1, N] (no host sync: a row starts where its positions restart at 0). Rows must not share
    tokens (collate_pairs(..., share_prefix=False)): a shared token would get one row's noise in both."""
    if any(block.key_start != block.start for block in packed.blocks):
        raise ValueError("NEFTune needs rows that share no tokens: collate with share_prefix=False")
    pos = position_ids.reshape(-1)
    row = torch.cumsum(pos == 0, 0) - 1
    last = torch.zeros_like(pos).scatter_reduce(0, row, pos, reduce="amax", include_self=True)
    return last[row] + 1


def neftune_noise(embeddings: torch.Tensor, lengths: torch.Tensor, alpha: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """NEFTune noise for the embeddings [1, N, d] of packed rows: uniform(-1, 1) * alpha / sqrt(L * d) on
    each position, L = the length of its row (`lengths` [N]). fp32, same device."""
    noise = torch.empty(embeddings.shape, dtype=torch.float32, device=embeddings.device)
    noise.uniform_(-1.0, 1.0, generator=generator)
    L = lengths.to(device=embeddings.device, dtype=torch.float32).clamp(min=1.0)
    return noise * (alpha / torch.sqrt(L * embeddings.shape[-1]))[None, :, None]


@contextmanager
def neftune(embedding: torch.nn.Module, alpha: float, lengths: torch.Tensor,
            generator: torch.Generator | None = None) -> Iterator[None]:
    """While active, every forward of `embedding` (in training mode) adds `neftune_noise` to its output.
    For the training forward only: wrap the policy's forward with it, never the reference pass or
    generation."""
    def hook(module, args, output):
        if not module.training or alpha <= 0:
            return output
        return output + neftune_noise(output, lengths, alpha, generator).to(output.dtype)

    handle = embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
