"""Pure-PyTorch references for every blipfast op.

These are the oracles the tests compare the Triton kernels against, and the path the
public ops take on devices where the kernels do not run (CPU without the Triton
interpreter). They favour clarity over speed and compute in float32 (float64 when given
float64 inputs), returning the input dtype.
"""

from __future__ import annotations

from typing import Optional

import torch


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    kv_index: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference multi-head attention with the semantics of :func:`blipfast.ops.attention`.

    Materializes the (B, H, Lq, Lk) score matrix. A query row with no key to attend to
    gives output 0 (and gradient 0), never NaN. With ``upcast=False`` it computes in the
    input dtype, which measures PyTorch's own rounding error in that dtype (the tests'
    yardstick for tolerances).
    """
    if not upcast:
        compute_dtype = q.dtype
    else:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if kv_index is not None:
        k, v = k[kv_index], v[kv_index]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[kv_index]
    len_q, len_k, head_dim = q.shape[1], k.shape[1], q.shape[3]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale

    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute_dtype), k.to(compute_dtype)) * scale
    allowed = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)
    if causal:
        # Bottom-right aligned: query i sees key j when j <= i + (Lk - Lq).
        allowed = allowed.tril(diagonal=len_k - len_q)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(torch.bool)
    # Fully masked rows: softmax over zeros, then zeroed, so no NaN reaches the output
    # or the gradient.
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~row_has_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * allowed
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute_dtype))
    return out.to(q.dtype)
