"""Facts about where kernels run, and layout helpers, shared by the launchers (and
``blipfast.ops``)."""

from __future__ import annotations

import os

import torch


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU interpreter.

    Triton reads the variable when it is first imported, so set it before that.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot`` on inputs of ``dtype``: float32 inputs get true
    float32 products (no tf32 rounding; callers who choose float32 ask for accuracy);
    bf16/fp16 are the fast path."""
    return "ieee" if dtype == torch.float32 else "tf32"


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (..., N) as a (rows, N) matrix with unit column stride: a view when its
    strides allow one (e.g. a column slice of a wider tensor), a contiguous copy otherwise
    (e.g. a transposed tensor, or leading dims that do not collapse into one stride)."""
    num_cols = tensor.shape[-1]
    rows = tensor.reshape(-1, num_cols)
    if rows.stride(1) != 1 and num_cols > 1:
        rows = rows.contiguous()
    return rows


# Host-side integer helpers for tile arithmetic. Triton's own ``triton.cdiv`` and
# ``triton.next_power_of_2`` are constexpr functions that cost ~2.7 us per call from
# Python; a launcher calls several, on every launch.


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division of non-negative integers."""
    return -(-numerator // denominator)


def next_power_of_2(value: int) -> int:
    """The smallest power of 2 that is >= ``value`` (0 for 0, as Triton's)."""
    return 1 << (value - 1).bit_length() if value > 0 else 0


def needs_autograd(*tensors) -> bool:
    """Whether an op on ``tensors`` (None entries skipped) must record itself for
    autograd. When not (no_grad, inference, or no input requires a gradient), the fused
    ops call their launchers directly: an autograd.Function costs ~7 us per call even
    then, a lot beside a short kernel, and saves tensors nobody will read."""
    return torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in tensors)
