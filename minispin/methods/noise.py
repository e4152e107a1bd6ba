"""Noise for any pairwise method: label smoothing of the pair loss and NEFTune noise on the input
embeddings of training forwards; "noise_spin" = SPIN's schedule with both on."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

def noise_schedule(schedule: Sequence[dict[str, Any]], label_smoothing: float = 0.1,
                   neftune_alpha: float = 5.0) -> list[dict[str, Any]]:
    """A schedule with noise added to every iteration (label smoothing eps and NEFTune alpha)."""
    return [dict(d, label_smoothing=label_smoothing, neftune_alpha=neftune_alpha) for d in schedule]



def row_lengths(token_index: torch.Tensor, num_rows: int, row_len: int) -> torch.Tensor:
    """Length (prompt + answer tokens, no padding) of every right-padded row of a micro-batch, from the flat
    response-token positions (token_index = row * T + t, the state at t predicts the token at t + 1):
    the last predicting position + 2. Rows without response tokens get the full row length."""
    rows = torch.div(token_index, row_len, rounding_mode="floor")
    last = token_index - rows * row_len
    lengths = torch.zeros(num_rows, dtype=torch.int64, device=token_index.device)
    lengths = lengths.scatter_reduce(0, rows, last + 2, reduce="amax", include_self=True)
    return torch.where(lengths > 0, lengths, torch.full_like(lengths, row_len)).clamp(max=row_len)


def neftune_noise(embeddings: torch.Tensor, lengths: torch.Tensor, alpha: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """NEFTune noise for embeddings [B, T, d]: uniform(-1, 1) * alpha / sqrt(L_b * d) on the first L_b
    positions of row b (L_b = its non-padding length), zero on padding. fp32, same device."""
    B, T, d = embeddings.shape
    noise = torch.empty(B, T, d, dtype=torch.float32, device=embeddings.device)
    noise.uniform_(-1.0, 1.0, generator=generator)
    L = lengths.to(device=embeddings.device, dtype=torch.float32).clamp(min=1.0)
    scale = alpha / torch.sqrt(L * d)
    valid = torch.arange(T, device=embeddings.device)[None, :] < lengths.to(embeddings.device)[:, None]
    return noise * (scale[:, None, None] * valid[:, :, None])


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
