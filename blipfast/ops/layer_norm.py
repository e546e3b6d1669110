"""The public fused residual-add + LayerNorm ops: argument checking and dispatch, and
the option of recomputing their outputs in the backward instead of keeping them."""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from typing import Callable, Iterator, Optional

import torch

from blipfast import reference
from blipfast.ops._checks import check_feature_vector, check_rows_input
from blipfast.ops._dispatch import use_triton

# Wider rows than the kernels hold in registers go to the PyTorch reference
# (blipfast.kernels.layer_norm.MAX_FEATURES, repeated here so that importing this module
# does not import triton).
MAX_KERNEL_FEATURES = 65536


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    residual: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """LayerNorm over the last dimension of ``x + residual``, in one fused kernel.

    Computes ``s = x + residual`` (just ``x`` without a residual), then
    ``(s - mean(s)) / sqrt(var(s) + eps) * weight + bias`` over the last dimension, with
    the biased variance: ``torch.nn.functional.layer_norm(x + residual, (N,), weight,
    bias, eps)``, except that the sum is never rounded to x's dtype before normalizing.

    Layouts:
        x: (..., N), any leading shape (e.g. (B, L, N) or (rows, N)). Rows may be strided
            views (a slice of a wider tensor) without a copy; a last dimension whose
            stride is not 1 (a transposed view) is copied first.
        residual: None, or the same shape and dtype as x (any strides, as x).
        weight, bias: None or (N,). They may have another float dtype than x (float32
            parameters with bf16 or fp16 activations); gradients come back in their dtype.
        Returns (..., N) in x's dtype, contiguous.

    Dtypes: float16, bfloat16 and float32. The sum, mean, variance and normalization are
    computed in float32 for every dtype; only the output is rounded to x's dtype.

    Where it runs: CUDA tensors run the Triton kernels (forward and backward; gradients
    flow to x, residual, weight and bias). CPU tensors run them through the Triton
    interpreter when ``TRITON_INTERPRET=1``, and the PyTorch reference
    (:func:`blipfast.reference.layer_norm`) otherwise, as do rows wider than 65536
    features. Traceable by ``torch.compile`` (a custom op).

    Raises:
        TypeError: a non-tensor x, residual, weight or bias; an unsupported dtype; a
            residual whose dtype differs from x's; a non-number eps.
        ValueError: a 0-dimensional x or empty last dimension; a residual shaped unlike
            x; a weight or bias not shaped (N,); tensors on different devices; an eps
            that is not a positive finite number.
    """
    _check_arguments("layer_norm", x, residual, weight, bias, eps)
    eps = float(eps)
    if not _use_kernels(x):
        return reference.layer_norm(x, weight, bias, residual=residual, eps=eps)
    from blipfast.kernels.layer_norm import fused_layer_norm

    normed = fused_layer_norm(x, residual, weight, bias, eps, False)[0]
    _RECOMPUTABLE.register(normed, x, residual, weight, bias, eps)
    return normed


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(LayerNorm(x + residual), x + residual)`` in one fused kernel, for pre-norm
    transformer blocks, where the sum is the next residual stream::

        normed, hidden = add_layer_norm(branch_out, hidden, norm.weight, norm.bias)

    The sum is returned rounded to x's dtype, and it is this returned sum that is
    normalized (over the last dimension, in float32), as PyTorch's ``LayerNorm(x +
    residual)`` normalizes the sum in x's dtype. (:func:`layer_norm` instead normalizes
    the float32 sum, which it does not return.) So the backward needs only the sum: one
    saved activation per call rather than x and residual, which in a pre-norm stack
    halves what the LayerNorms keep for the backward. Gradients flowing into the sum
    reach x and residual along with those of the normalized output.

    Layouts:
        x, residual: (..., N), the same shape and dtype, any row strides (a last
            dimension whose stride is not 1 is copied first).
        weight, bias: None or (N,), any float dtype of the three below.
        Returns (normalized, sum), both shaped like x in x's dtype, contiguous.

    Dtypes, where it runs and errors: as :func:`layer_norm` (the reference path is
    :func:`blipfast.reference.add_layer_norm`); residual is required here.
    """
    _check_arguments("add_layer_norm", x, residual, weight, bias, eps, residual_required=True)
    eps = float(eps)
    if not _use_kernels(x):
        return reference.add_layer_norm(x, residual, weight, bias, eps=eps)
    from blipfast.kernels.layer_norm import fused_layer_norm

    normed, total = fused_layer_norm(x, residual, weight, bias, eps, True)
    # The output normalizes the stored sum: recomputed from it alone, bit for bit.
    _RECOMPUTABLE.register(normed, total, None, weight, bias, eps)
    return normed, total


def _use_kernels(x: torch.Tensor) -> bool:
    return use_triton(x.device) and x.shape[-1] <= MAX_KERNEL_FEATURES


def _check_arguments(op, x, residual, weight, bias, eps, residual_required=False):
    check_rows_input(op, x)
    if x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape "
                         f"{tuple(x.shape)}")

    if residual is None:
        if residual_required:
            raise TypeError(f"{op}: residual must be a torch.Tensor, got NoneType")
    else:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{op}: residual must be a torch.Tensor"
                            f"{'' if residual_required else ' or None'}, got "
                            f"{type(residual).__name__}")
        if residual.dtype != x.dtype:
            raise TypeError(f"{op}: residual has dtype {residual.dtype} but x has {x.dtype}; "
                            "they must match")
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have the shape of x {tuple(x.shape)}, got "
                             f"{tuple(residual.shape)}")
        if residual.device != x.device:
            raise ValueError(f"{op}: residual is on {residual.device} but x is on {x.device}")

    check_feature_vector(op, "weight", weight, x)
    check_feature_vector(op, "bias", bias, x)

    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"{op}: eps must be a float, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps}")


# --------------------------------------------------------------------------------------
# Recomputing LayerNorm outputs in the backward
# --------------------------------------------------------------------------------------


class _Recomputed:
    """What a later op's backward holds in place of a LayerNorm output (or a view of it):
    the function that recomputes the output, and the view's geometry."""

    __slots__ = ("recompute", "size", "stride", "offset")

    def __init__(self, recompute: Callable[[], torch.Tensor], view: torch.Tensor):
        self.recompute = recompute
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def tensor(self) -> torch.Tensor:
        return self.recompute().as_strided(self.size, self.stride, self.offset)


class _RecomputableOutputs(threading.local):
    """LayerNorm outputs made while recomputation is on, by storage address: a weak
    reference to the output and the function recomputing it. Saved-tensor hooks replace a
    saved tensor on such a storage by a :class:`_Recomputed`; any other saved tensor is
    kept as usual. Per thread, as saved-tensor hooks are."""

    def __init__(self):
        self.active = False
        self.outer_hooks: Optional[tuple[Callable, Callable]] = None  # see CHAIN_TO_OUTER_HOOKS
        self._outputs: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor]]] = {}

    def register(self, normed, x, residual, weight, bias, eps) -> None:
        """Record that ``normed`` is the kernel's LayerNorm of ``x + residual`` (of ``x``
        without a residual). Only outputs with an autograd history are recorded: their
        LayerNorm's backward already keeps x, residual and the parameters, so the
        recomputation holds nothing extra."""
        if not self.active or not normed.requires_grad or torch.compiler.is_compiling():
            return
        from blipfast.kernels.layer_norm import layer_norm_forward

        def recompute() -> torch.Tensor:
            return layer_norm_forward(x, residual, weight, bias, eps, False)[0]

        address = normed.untyped_storage().data_ptr()
        outputs = self._outputs
        # The entry goes when the output does, before its storage can be reused.
        reference = weakref.ref(normed, lambda _: outputs.pop(address, None))
        outputs[address] = (reference, recompute)

    def pack(self, saved: torch.Tensor):
        entry = self._outputs.get(saved.untyped_storage().data_ptr())
        if entry is not None:
            output = entry[0]()
            if output is not None and output.dtype == saved.dtype:
                return _Recomputed(entry[1], saved)
        if self.outer_hooks is not None:
            outer_pack, outer_unpack = self.outer_hooks
            return _PackedByOuterHooks(outer_pack(saved), outer_unpack)
        return saved

    @staticmethod
    def unpack(packed):
        # Self-contained: the backward may run after the context has ended, on another
        # thread.
        if isinstance(packed, (_Recomputed, _PackedByOuterHooks)):
            return packed.tensor()
        return packed

    def clear(self) -> None:
        self.active = False
        self.outer_hooks = None
        self._outputs.clear()


class _PackedByOuterHooks:
    """A saved tensor as the saved-tensor hooks outside the recomputation packed it, and
    their unpack hook."""

    __slots__ = ("value", "unpack")

    def __init__(self, value, unpack: Callable):
        self.value, self.unpack = value, unpack

    def tensor(self) -> torch.Tensor:
        return self.unpack(self.value)


_RECOMPUTABLE = _RecomputableOutputs()

# Whether recomputation takes effect under other saved-tensor hooks, passing them every
# saved tensor but the recomputed LayerNorm outputs. For tools that record saved tensors
# with their own hooks (bench/activation_census.py), not for training: under an outer
# activation checkpoint, the recomputation would keep the LayerNorm inputs alive.
CHAIN_TO_OUTER_HOOKS = False


@contextlib.contextmanager
def recomputed_layer_norm_outputs() -> Iterator[bool]:
    """Inside this context, the outputs of :func:`layer_norm` and :func:`add_layer_norm`
    are not kept by the ops that consume them: their backward recomputes the output with
    the forward kernel from what the LayerNorm's own backward keeps anyway (x and
    residual; for :func:`add_layer_norm` the returned sum, whose normalization is the
    output, so the recomputed output is bit for bit the original).

    In a pre-norm transformer block the LayerNorm outputs feed the QKV projection and the
    first FFN projection, whose weight gradients need them: that is two (B, L, D) tensors
    per layer (1.27 GiB for ViT-B at batch 64, 384 px, bf16), for one extra LayerNorm
    forward per LayerNorm in the backward. (In a post-norm stack the output is the next
    residual stream, kept by the next LayerNorm's backward anyway: nothing to gain.)

    It works through ``torch.autograd.graph.saved_tensors_hooks``, and yields whether it
    took effect (nested inside itself, the outer context applies). It does not take
    effect in torch.compile'd code, when gradients are disabled, or when other saved-tensor
    hooks are active (activation checkpointing, CPU offloading: they must see every saved
    tensor); inside activation checkpointing started within it, the checkpoint's hooks
    apply. Only outputs of the Triton kernels (not of the CPU reference path) are
    recomputed; outputs consumed through a dtype cast (e.g. an fp32 output under bf16
    autocast) are kept as usual.
    """
    if _RECOMPUTABLE.active:
        yield True
        return
    has_outer_hooks, outer_hooks = _outer_saved_tensor_hooks()
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or (has_outer_hooks and not (CHAIN_TO_OUTER_HOOKS and outer_hooks))):
        yield False
        return
    _RECOMPUTABLE.active = True
    _RECOMPUTABLE.outer_hooks = outer_hooks
    try:
        with torch.autograd.graph.saved_tensors_hooks(_RECOMPUTABLE.pack,
                                                      _RECOMPUTABLE.unpack):
            yield True
    finally:
        _RECOMPUTABLE.clear()


def _outer_saved_tensor_hooks() -> tuple[bool, Optional[tuple[Callable, Callable]]]:
    """(whether saved-tensor hooks are in effect on this thread, their (pack, unpack) or
    None). Where this torch cannot tell, hooks are assumed, unknown."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top_hooks is None:
        return True, None
    hooks = top_hooks(False)
    return hooks is not None, hooks
