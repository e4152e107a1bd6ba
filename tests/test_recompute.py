"""minispin.recompute and the decoder's use of it (CPU): the bytes a training forward keeps for backward,
measured against transformers' LlamaModel, and gradients bit-identical to keeping every activation."""
import gc
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minispin.model import Block, ModelConfig, PackedRows, Transformer
from minispin.recompute import RecomputeScope, recomputable
from minispin.training import apply_activation_checkpointing


def smollm2_like(layers: int = 2) -> ModelConfig:
    """SmolLM2-135M's proportions at a third of the width: head_dim 64, kv heads a third of the heads,
    MLP width 8/3 of the hidden size."""
    return ModelConfig(vocab_size=97, hidden_size=192, intermediate_size=512, num_hidden_layers=layers,
                       num_attention_heads=3, num_key_value_heads=1, rms_norm_eps=1e-5, rope_theta=1e5,
                       torch_dtype="float32", architecture="LlamaForCausalLM", tie_word_embeddings=True)


class _NewStorages(TorchDispatchMode):
    """Weak references to the storages that ops create (outputs that are not views of an input) while `on`."""

    def __init__(self):
        super().__init__()
        self.on, self.created = True, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.on:
            inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() and \
                        t.untyped_storage().data_ptr() not in inputs:
                    s = t.untyped_storage()
                    self.created.append((s._weak_ref(), s.data_ptr(), s.nbytes()))
        return out

    def alive_bytes(self) -> int:
        alive = {}
        for ref, ptr, nbytes in self.created:
            if not torch.UntypedStorage._expired(ref):
                alive[ptr] = nbytes
            torch.UntypedStorage._free_weak_ref(ref)
        self.created = []
        return sum(alive.values())


def kept_bytes(forward, layers=None) -> int:
    """Bytes of the storages created during forward() (inside `layers` only, if given) that are still
    alive afterwards while only the autograd graph is held: what the forward keeps for backward."""
    mode = _NewStorages()
    hooks = []
    if layers is not None:
        mode.on = False
        for layer in layers:
            hooks.append(layer.register_forward_pre_hook(lambda *_: setattr(mode, "on", True)))
            hooks.append(layer.register_forward_hook(lambda *_: setattr(mode, "on", False)))
    with mode:
        out = forward()
    for h in hooks:
        h.remove()
    graph = out.grad_fn  # noqa: F841 (keeps the graph, and so what it saved, alive)
    del out
    gc.collect()
    return mode.alive_bytes()


def saved_bytes(forward, exclude) -> int:
    """Bytes of the unique storages autograd saves during forward() (saved_tensors_hooks), except `exclude`'s."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(saved.values())


def hf_pair(cfg: ModelConfig):
    """transformers' LlamaModel (SDPA attention) and a minispin Transformer with the same weights."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf().items() if k != "architectures"})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = transformers.LlamaModel(hf_cfg).float()
    ours = Transformer(cfg)
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ours.tie_weights()
    return hf, ours


def set_recompute(model: Transformer, on: bool) -> None:
    for layer in model.layers:
        layer.recompute_activations = on


def test_decoder_keeps_at_most_half_of_transformers_bytes_per_token():
    """Per token and layer, at SmolLM2's proportions (B=2, T=37): minispin keeps <= 0.5x what
    transformers' LlamaModel keeps; without recomputation both keep the same."""
    hf, ours = hf_pair(smollm2_like())
    ids = torch.randint(0, 97, (2, 37), generator=torch.Generator().manual_seed(1))
    per = 2 * 37 * 2  # tokens x layers

    hf_fwd = lambda: hf(input_ids=ids, use_cache=False).last_hidden_state  # noqa: E731
    hf_kept = kept_bytes(hf_fwd, hf.layers) / per
    # the live-storage count agrees with counting saved tensors through saved_tensors_hooks
    assert kept_bytes(hf_fwd) == saved_bytes(hf_fwd, [*hf.parameters(), ids])

    set_recompute(ours, False)
    keep_all = kept_bytes(lambda: ours.hidden_states(ids), ours.layers) / per
    assert kept_bytes(lambda: ours.hidden_states(ids)) == saved_bytes(lambda: ours.hidden_states(ids),
                                                                      [*ours.parameters(), ids])
    set_recompute(ours, True)
    recompute = kept_bytes(lambda: ours.hidden_states(ids), ours.layers) / per
    assert keep_all == hf_kept
    assert recompute <= 0.5 * hf_kept, (recompute, hf_kept)
    # what is left: x, x after attention, 2 rsqrt, q, k, v, the attention's logsumexp, gate, up (fp32)
    H, kv, I = 192, 64, 512
    assert recompute == 4 * (3 * H + 2 + 2 * kv + 3 + 2 * I)

    # training's packed layout keeps exactly as much per token it runs: two rows of their own, then two rows
    # whose second shares the first's 14 leading tokens (run once: 60 tokens for 74)
    flat = ids.reshape(1, -1)
    pos = torch.arange(37).repeat(2)[None]
    own_rows = PackedRows((Block(0, 37, 0, 0), Block(37, 74, 37, 37)))
    assert kept_bytes(lambda: ours.hidden_states(flat, position_ids=pos, packed=own_rows), ours.layers) / per == recompute
    shared_ids = torch.cat([flat[:, :37], flat[:, 51:]], dim=1)
    shared_pos = torch.cat([torch.arange(37), torch.arange(14, 37)])[None]
    shared = PackedRows((Block(0, 37, 0, 0), Block(37, 60, 0, 14)))
    kept = kept_bytes(lambda: ours.hidden_states(shared_ids, position_ids=shared_pos, packed=shared), ours.layers)
    assert kept / (60 * 2) == recompute


def loss_and_grads(model: Transformer, ids, mask, weight):
    model.zero_grad(set_to_none=True)
    out = model.hidden_states(ids, mask)
    loss = (out.float() * weight).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if n != "lm_head.weight"}


@pytest.mark.parametrize("case", ["causal", "padding_mask", "bf16", "repeat_kv", "qwen2", "qwen3"])
def test_recomputed_gradients_are_bit_identical(case, monkeypatch):
    """Same loss and gradients, bit for bit, with and without recomputation, for every family's block; also
    through full activation checkpointing (which turns the scope off: the whole block is recomputed)."""
    import minispin.model as model_mod
    if case == "repeat_kv":
        monkeypatch.setattr(model_mod, "SDPA_HAS_ENABLE_GQA", False)
    # Qwen2: q/k/v biases; Qwen3: q/k RMSNorms (recomputed too) and, with attention_bias, o_proj's bias
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(case, "LlamaForCausalLM")
    cfg = ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, torch_dtype="float32",
                      architecture=arch, attention_bias=case == "qwen3")
    torch.manual_seed(0)
    model = Transformer(cfg)
    if case == "bf16":
        model = model.to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 61, (3, 13), generator=g)
    mask = None
    if case == "padding_mask":
        mask = torch.ones(3, 13, dtype=torch.long)
        mask[1, :4] = 0
        mask[2, 9:] = 0
    weight = torch.randn(3, 13, 64, generator=g)

    set_recompute(model, False)
    ref_loss, ref_grads = loss_and_grads(model, ids, mask, weight)
    set_recompute(model, True)
    loss, grads = loss_and_grads(model, ids, mask, weight)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)

    apply_activation_checkpointing(model)
    assert not any(layer.recompute_activations for layer in model.layers)
    loss, grads = loss_and_grads(model, ids, mask, weight)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(grads[n], ref_grads[n]) for n in ref_grads)


def test_gradients_match_transformers():
    """fp32, random inputs: parameter gradients within fp32 rounding of transformers' LlamaModel's."""
    hf, ours = hf_pair(smollm2_like())
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (2, 21), generator=g)
    weight = torch.randn(2, 21, 192, generator=g)
    (hf(input_ids=ids, use_cache=False).last_hidden_state * weight).sum().backward()
    _, grads = loss_and_grads(ours, ids, None, weight)
    for name, p in hf.named_parameters():
        diff = (grads[name] - p.grad).abs().max() / p.grad.abs().max()
        assert diff < 1e-4, (name, diff.item())


def test_marked_tensor_is_freed_and_rebuilt_as_a_view():
    """A marked tensor that autograd saves, as a view and as the op's own output (exp saves its result),
    is not kept alive by the graph, and backward gives the gradients of the unmarked computation."""
    g = torch.Generator().manual_seed(4)
    x0, w0 = torch.randn(4, 6, generator=g), torch.randn(3, 4, generator=g)

    def run(mark: bool):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with RecomputeScope():
            y = torch.exp(x)
            if mark:
                recomputable(y, torch.exp, x)
            z = y.t()[1:] @ w.t()  # mm saves a strided view of y
        ref = weakref.ref(y)
        storage = y.untyped_storage()._weak_ref()
        del y
        gc.collect()
        freed = torch.UntypedStorage._expired(storage)
        torch.UntypedStorage._free_weak_ref(storage)
        (z * torch.arange(z.numel()).view_as(z)).sum().backward()
        return freed, ref, x.grad, w.grad

    freed, _, gx, gw = run(mark=True)
    kept, _, rx, rw = run(mark=False)
    assert freed and not kept
    assert torch.equal(gx, rx) and torch.equal(gw, rw)
