"""Selective recomputation: cheap results are rebuilt in backward instead of kept for it.

Autograd keeps every tensor an op needs for its backward. In a decoder block that includes the RMSNorm
outputs (the q/k/v and gate/up projections' input), SwiGLU's silu(gate) and silu(gate) * up (the down
projection's input), fp32 upcasts, and the attention output (o_proj's input): more than half of the
block's saved bytes, each a cheap function of tensors that autograd keeps anyway (the norm's input and
rsqrt; gate and up; q, k and v).

    with RecomputeScope():                       # a saved_tensors_hooks context, one per decoder block
        act, hidden = recomputable(swiglu(gate, up), swiglu, gate, up)

When the scope closes, every tensor autograd saved inside it that is `act` or `hidden` or a view of one
is replaced by `swiglu` and its inputs, and backward calls `swiglu(gate, up)` again (once for all its
outputs): the same ops on the same inputs, so the rebuilt tensors, and therefore every gradient, are
bit-identical to keeping them. (Because the swap happens at the scope's end, a mark also covers an op's
own saved outputs, which autograd saves before the caller can mark them.) Outside a scope (no grad, eval, or a block under full activation
checkpointing) `recomputable` returns `y` unchanged.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch

_SCOPES: list["RecomputeScope"] = []  # the active scopes, innermost last


class _Recipe:
    """How to rebuild marked tensors (the outputs of one fn); rebuilt once, cached until every saved view is used."""

    def __init__(self, fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], outputs: tuple[torch.Tensor, ...]):
        self.fn, self.inputs = fn, tuple(i.detach() for i in inputs)  # data, not graph
        self.layouts = [(t.shape, t.stride(), t.dtype) for t in outputs]
        self._rebuilt: tuple[torch.Tensor, ...] | None = None

    def rebuilt(self, index: int) -> torch.Tensor:
        if self._rebuilt is None:
            with torch.no_grad():
                out = self.fn(*self.inputs)
            out = out if isinstance(out, tuple) else (out,)
            layouts = [(t.shape, t.stride(), t.dtype) for t in out]
            if layouts != self.layouts:
                raise RuntimeError(f"recompute: {self.fn} rebuilt {layouts}, the forward made {self.layouts}")
            self._rebuilt = out
        return self._rebuilt[index]


class _Saved:
    """One tensor autograd saved inside a scope: the tensor itself, or a recipe and the view's geometry."""

    __slots__ = ("tensor", "storage", "recipe", "index", "view")

    def __init__(self, t: torch.Tensor):
        # detached: a saved output must not point back at its own grad_fn (a reference cycle)
        self.tensor: torch.Tensor | None = t.detach()
        self.storage = t.untyped_storage().data_ptr() if t.layout == torch.strided and t.device.type != "meta" else None
        self.recipe: _Recipe | None = None
        self.index, self.view = 0, None

    def use_recipe(self, recipe: _Recipe, index: int) -> None:
        t, self.tensor = self.tensor, None
        self.recipe, self.index, self.view = recipe, index, (t.shape, t.stride(), t.storage_offset())

    def unpack(self) -> torch.Tensor:
        return self.tensor if self.recipe is None else self.recipe.rebuilt(self.index).as_strided(*self.view)


class RecomputeScope(torch.autograd.graph.saved_tensors_hooks):
    """Within the scope, tensors marked with `recomputable` are saved for backward as their recipe.

    Marked tensors are held (so their memory cannot be reused by another tensor) until the scope exits:
    keep a scope to one block. Saved tensors are matched to marks by storage, so views count.
    """

    def __init__(self) -> None:
        self._marks: dict[int, tuple[torch.Tensor, _Recipe, int]] = {}  # storage -> (tensor, recipe, output)
        self._saved: list[_Saved] = []
        super().__init__(self._pack, _unpack)

    def __enter__(self) -> "RecomputeScope":
        super().__enter__()
        _SCOPES.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _SCOPES.pop()
        super().__exit__(*exc)
        for saved in self._saved:
            mark = self._marks.get(saved.storage)
            if mark is not None and mark[0].dtype == saved.tensor.dtype:
                saved.use_recipe(mark[1], mark[2])
        self._marks.clear()
        self._saved.clear()

    def mark(self, outputs: tuple[torch.Tensor, ...], fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> None:
        recipe = _Recipe(fn, inputs, outputs)
        for index, t in enumerate(outputs):
            # Only a tensor that owns its whole storage: then every tensor sharing that storage is a view of
            # it. A result that is one of the inputs (x.float() of an fp32 x) needs no recipe.
            if (t.numel() and t.layout == torch.strided and t.storage_offset() == 0
                    and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                    and not any(t is i for i in inputs)):
                self._marks[t.untyped_storage().data_ptr()] = (t, recipe, index)

    def _pack(self, t: torch.Tensor) -> _Saved:
        saved = _Saved(t)
        self._saved.append(saved)
        return saved


def _unpack(saved: _Saved) -> torch.Tensor:
    return saved.unpack()


def recompute_scope(enabled: bool = True) -> ContextManager:
    """A RecomputeScope when there will be a backward to save for (grad on, not tracing), else a no-op."""
    if enabled and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return RecomputeScope()
    return nullcontext()


def recomputable(outputs: torch.Tensor | tuple[torch.Tensor, ...], fn: Callable[..., Any],
                 *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Declare outputs == fn(*inputs) (a tensor or a tuple, as fn returns them), bit for bit; inside a
    RecomputeScope backward rebuilds them from the inputs instead of keeping them. The inputs should be
    tensors that autograd keeps anyway. Returns outputs."""
    if _SCOPES:
        _SCOPES[-1].mark(outputs if isinstance(outputs, tuple) else (outputs,), fn, inputs)
    return outputs
