"""The public fused residual-add + LayerNorm ops: argument checking and dispatch. Their
outputs are marked recomputable (:mod:`blipfast.ops.recompute`)."""

from __future__ import annotations

from typing import Optional

import torch

from blipfast import reference
from blipfast.kernels import layer_norm as layer_norm_kernels
from blipfast.ops._checks import (check_feature_vector, check_rows_input, is_finite,
                                  type_name)
from blipfast.ops._dispatch import use_triton
from blipfast.ops.recompute import mark_recomputable

# Wider rows than the kernels hold in registers go to the PyTorch reference.
MAX_KERNEL_FEATURES = layer_norm_kernels.MAX_FEATURES


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
    if not _use_kernels("layer_norm", x, residual, weight, bias):
        return reference.layer_norm(x, weight, bias, residual=residual, eps=eps)
    normed = layer_norm_kernels.fused_layer_norm(x, residual, weight, bias, eps, False)[0]
    # Its backward keeps x and residual: the output can be made again from them.
    mark_recomputable(normed, _normalize, x, residual, weight, bias, eps)
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

    ``eps`` (keyword-only, default 1e-5 as ``nn.LayerNorm``'s): added to the variance
    before the square root, as in :func:`layer_norm`; a positive finite number.

    Dtypes, where it runs and errors: as :func:`layer_norm` (the reference path is
    :func:`blipfast.reference.add_layer_norm`); residual is required here.
    """
    _check_arguments("add_layer_norm", x, residual, weight, bias, eps, residual_required=True)
    eps = float(eps)
    if not _use_kernels("add_layer_norm", x, residual, weight, bias):
        normalized, total = reference.add_layer_norm(x, residual, weight, bias, eps=eps)
        return normalized.contiguous(), total.contiguous()  # as the kernel's
    normed, total = layer_norm_kernels.fused_layer_norm(x, residual, weight, bias, eps, True)
    # The output normalizes the stored sum, which the backward keeps: recomputed from it
    # alone, bit for bit.
    mark_recomputable(normed, _normalize, total, None, weight, bias, eps)
    return normed, total


def _use_kernels(op: str, x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    return x.shape[-1] <= MAX_KERNEL_FEATURES and use_triton(x.device, x, *others, op=op)


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
                            f"{type_name(residual)}")
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
        raise TypeError(f"{op}: eps must be a float, got {type_name(eps)}")
    if not (is_finite(eps) and eps > 0):
        raise ValueError(f"{op}: eps must be a positive finite number, got {eps}")



def _normalize(x, residual, weight, bias, eps) -> torch.Tensor:
    """The forward kernel's output alone, without autograd: the recomputation of a
    LayerNorm output (:mod:`blipfast.ops.recompute`)."""
    return layer_norm_kernels.layer_norm_forward(x, residual, weight, bias, eps, False)[0]
