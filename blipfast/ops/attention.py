"""The public fused attention op: argument checking and dispatch."""

from __future__ import annotations

import math
from typing import Optional

import torch

from blipfast import reference
from blipfast.kernels import attention as attention_kernels
from blipfast.ops._checks import (SUPPORTED_DTYPES, check_index_vector, check_values,
                                  checked_index, is_finite, type_name, value_range)
from blipfast.ops._dispatch import savable_by_autograd, use_triton

MIN_HEAD_DIM = 16
MAX_HEAD_DIM = 128


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    kv_index: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
) -> torch.Tensor:
    """Fused multi-head attention (self or cross), forward and backward in Triton.

    Layouts:
        q: (B, Lq, H, D), k and v: (Bk, Lk, H, D) -- a projection output viewed as heads.
        Any strides are accepted without copies (an SDPA-layout (B, H, L, D) tensor
        transposed to this view works). Returns (B, Lq, H, D) in q's dtype, contiguous.

    Args:
        causal: query i sees key j only when ``j <= i + (Lk - Lq)`` (bottom-right
            aligned, as flash-attn does), so a 1-token decode step over a cache works.
            Over a fixed-length (static) cache, a 1-token step passes the filled
            positions as ``key_padding_mask`` instead, so shapes stay fixed.
        key_padding_mask: bool (Bk, Lk), True = attend. Applied inside the kernel; no
            (B, 1, Lq, Lk) mask is built. Combines with ``causal``.
        kv_index: integer (B,). Query batch row b attends to ``k[kv_index[b]]``,
            ``v[kv_index[b]]`` and that row of ``key_padding_mask``. This scores one
            image's keys against several texts without repeating them in memory;
            gradients into k and v sum over the rows sharing them. Without it, Bk == B.
        softmax_scale: multiplies q.k before the softmax; default ``1 / sqrt(D)``.

    A query row whose keys are all masked gets output 0 and gradient 0 (never NaN). Masked
    keys are left out of the softmax but their k and v are still read, as SDPA reads them:
    they must be finite (fill a preallocated cache with zeros, not ``torch.empty``). A NaN
    or inf in a masked key's v gives NaN outputs; in its k, the output can stay finite
    while q's gradient is NaN (SDPA's output is NaN there too).

    Masks over a concatenated sequence, such as BLIP-2's Q-Former masks over
    [queries; text], are calls on views of one q, k, v: queries-only rows attend to
    ``k[:, :Q]``; text rows that see every query and the text causally are
    ``attention(q[:, Q:], k, v, causal=True)`` (the bottom-right alignment makes the
    queries a prefix every text row sees); see ``tests/test_attention_masks.py``.

    Supported: head dims 16 to 128 (any, e.g. 64, 80, 88, 96), float16, bfloat16 and
    float32 (float32 uses full-precision products, no tf32). Accumulation and softmax
    statistics are float32 for every dtype. CUDA tensors run the Triton kernels; CPU
    tensors run them through the Triton interpreter when ``TRITON_INTERPRET=1``, and the
    PyTorch reference (:func:`blipfast.reference.attention`) otherwise.

    Raises:
        TypeError: a non-tensor argument, mixed or unsupported dtypes, a non-bool mask, a
            non-integer kv_index.
        ValueError: wrong ranks or shapes, mismatched heads or head dims, an unsupported
            head dim, tensors on different devices, kv_index out of range (CPU; on CUDA
            an out-of-range kv_index fails a device-side assertion instead, so that the
            check needs no host synchronisation). Under torch.compile the range is
            checked when the compiled graph runs, the same way; inside a CUDA graph
            capture it is not checked.
    """
    check_attention_arguments(q, k, v, causal, key_padding_mask, kv_index, softmax_scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if kv_index is not None and torch.compiler.is_compiling():
        # Traced, the range check above was skipped; the kernels would read (and in the
        # backward write) rows outside k and v, and the reference would index from the
        # end. Checked when the graph runs instead.
        kv_index = checked_index(kv_index, k.shape[0], "attention: kv_index (rows of k and v)")
    if not use_triton(q.device, q, op="attention"):
        return reference.attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                   kv_index=savable_by_autograd(kv_index),
                                   softmax_scale=scale).contiguous()
    return attention_kernels.fused_attention(q, k, v, key_padding_mask, kv_index, bool(causal),
                                             scale)


def check_attention_arguments(q, k, v, causal, key_padding_mask, kv_index, softmax_scale,
                              kernel_limits: bool = True):
    """Raise on arguments :func:`attention` does not take. ``kernel_limits=False`` skips
    the kernels' own limits (dtypes and head dims) for callers that run the reference
    (:func:`blipfast.reference.attention`) outside them, checking everything else."""
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"attention: {name} must be a torch.Tensor, got {type_name(tensor)}")
        if tensor.dim() != 4:
            raise ValueError(f"attention: {name} must have 4 dimensions (batch, length, heads, "
                             f"head_dim), got shape {tuple(tensor.shape)}")
        if kernel_limits and tensor.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"attention: {name} has dtype {tensor.dtype}; supported: "
                            "float16, bfloat16, float32")
        if tensor.device != q.device:
            raise ValueError(f"attention: {name} is on {tensor.device} but q is on {q.device}")
    if not (k.dtype == v.dtype == q.dtype):
        raise TypeError(f"attention: q, k and v must share one dtype, got q {q.dtype}, "
                        f"k {k.dtype}, v {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    batch, _, num_heads, head_dim = q.shape
    key_batch, len_k, key_heads, key_head_dim = k.shape
    if key_heads != num_heads:
        raise ValueError(f"attention: q has {num_heads} heads but k and v have {key_heads}")
    if key_head_dim != head_dim:
        raise ValueError(f"attention: q has head dim {head_dim} but k and v have {key_head_dim}")
    if kernel_limits and not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {head_dim} of q is not supported; "
                         f"supported: {MIN_HEAD_DIM} to {MAX_HEAD_DIM}")
    if not isinstance(causal, bool):
        raise TypeError(f"attention: causal must be a bool, got {type_name(causal)}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError("attention: softmax_scale must be a float or None, got "
                            f"{type_name(softmax_scale)}")
        if not is_finite(softmax_scale):
            raise ValueError(f"attention: softmax_scale must be finite, got {softmax_scale}")

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError("attention: key_padding_mask must be a bool tensor or None, got "
                            f"{type_name(key_padding_mask)}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError("attention: key_padding_mask must have dtype torch.bool (True = "
                            f"attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (key_batch, len_k):
            raise ValueError(f"attention: key_padding_mask must have shape (Bk, Lk) = "
                             f"{(key_batch, len_k)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {key_padding_mask.device} "
                             f"but q is on {q.device}")

    if kv_index is None:
        if key_batch != batch:
            raise ValueError(f"attention: k and v have batch {key_batch} but q has {batch}; "
                             "pass kv_index to map query rows to key rows")
        return
    check_index_vector("attention", "kv_index", kv_index, batch, q.device, "q is",
                       shape_name="(B,) = ")
    check_values(kv_index, lambda index: (index >= 0) & (index < key_batch),
                 lambda: f"attention: kv_index values must lie in [0, {key_batch}) (the "
                         "batch of k and v)", found=value_range)
