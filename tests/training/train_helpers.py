"""The training tests' float64 reference (CPU): per-sequence log-probs, pair loss, rewards and gradients
recomputed with plain torch and full logits; shared by the policy and loop tests."""
from __future__ import annotations

import copy

import torch

from minispin.model import Transformer
from minispin.sampler import encode_prompt


def _float64_stats(model: Transformer, tok, pairs, refs, beta, loss_type):
    """Plain torch, float64, full logits: per-sequence summed log-probs, loss and grads."""
    m64 = copy.deepcopy(model).double()
    seqs_real, seqs_gen = [], []
    for p in pairs:
        prompt = encode_prompt(tok, p.prompt, None)
        for answer, out in ((p.chosen, seqs_real), (p.rejected, seqs_gen)):
            ids = prompt + tok.encode(answer, add_special_tokens=False) + [tok.eos_id]
            logp = torch.log_softmax(m64(torch.tensor([ids]))[0], dim=-1)
            targets = torch.tensor(ids[len(prompt):])
            out.append(logp[len(prompt) - 1: len(ids) - 1].gather(1, targets[:, None]).sum())
    real, gen = torch.stack(seqs_real), torch.stack(seqs_gen)
    ref = torch.tensor(refs, dtype=torch.float64)
    P = len(pairs)
    r_real, r_gen = beta * (real - ref[:P]), beta * (gen - ref[P:])
    z = r_real - r_gen
    per = torch.nn.functional.softplus(-z) if loss_type == "sigmoid" else torch.relu(1 - z)
    loss = per.mean()
    loss.backward()
    grads = {n: p.grad for n, p in m64.named_parameters()}
    return loss.item(), real.detach(), gen.detach(), r_real.detach(), r_gen.detach(), grads
