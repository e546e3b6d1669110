"""The public fused bias + GELU op: argument checking and dispatch."""

from __future__ import annotations

from typing import Optional

import torch

from blipfast import reference
from blipfast.ops._checks import check_feature_vector, check_rows_input
from blipfast.ops._dispatch import use_triton


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``gelu(x + bias)`` with the exact (erf) GELU, fused in Triton, forward and backward.

    Meant for the first FFN projection of a BERT / ViT layer: run the matmul without its
    bias, then ``bias_gelu(x, fc1.bias)``. Matches ``F.gelu(x + bias, approximate="none")``,
    i.e. ``y = 0.5 * z * (1 + erf(z / sqrt(2)))`` with ``z = x + bias``.

    Shapes and layouts:
        x: (..., N), at least one dimension. Any strides; the kernels read rows in place
        when the last dimension has unit stride and the leading dimensions collapse into
        one row stride (e.g. a column slice of a wider tensor), and copy x first
        otherwise (e.g. a transposed tensor).
        bias: (N,), or None for a plain GELU.
        Returns a contiguous tensor shaped like x.

    Dtypes:
        x and bias each float16, bfloat16 or float32; they may differ (a float32 bias
        with bf16/fp16 activations is the mixed-precision case). The result and x's
        gradient have x's dtype (unlike ``x + bias`` in PyTorch, which would promote to
        float32); bias's gradient has bias's dtype. All arithmetic is float32: z and
        GELU are computed once and rounded once. The backward recomputes z from the
        saved x (nothing else is saved) and sums bias's gradient over the rows in float32
        from the unrounded float32 gradient of x.

    Where it runs:
        CUDA tensors run the Triton kernels; CPU tensors run them through the Triton
        interpreter when ``TRITON_INTERPRET=1``, and the PyTorch reference
        (:func:`blipfast.reference.bias_gelu`) otherwise. Traceable by torch.compile
        (a torch.library custom op with a fake and an autograd formula).

    Raises:
        TypeError: x or bias is not a tensor (bias may be None), or has a dtype other
            than float16, bfloat16, float32.
        ValueError: x has no dimension, bias's shape is not (N,) with N = x.shape[-1],
            or bias is on another device than x.
    """
    _check_bias_gelu_arguments(x, bias)
    if not use_triton(x.device):
        return reference.bias_gelu(x, bias)
    from blipfast.kernels.bias_gelu import fused_bias_gelu

    return fused_bias_gelu(x, bias)


def _check_bias_gelu_arguments(x, bias) -> None:
    check_rows_input("bias_gelu", x)
    check_feature_vector("bias_gelu", "bias", bias, x)
