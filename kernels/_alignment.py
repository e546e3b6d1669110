"""Alignment facts a launcher proves and passes to a kernel, so that its loads and stores
are compiled to 16-byte vectors."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# The widest global load or store is 16 bytes per thread.
VECTOR_BYTES = 16


def stride_multiple(*tensors: torch.Tensor, sizes: tuple[int, ...] = ()) -> int:
    """The largest power of 2, at most one 16-byte vector of elements, that divides every
    stride of ``tensors`` but the last, and every one of ``sizes`` (a launcher passes it to
    a kernel as a constant; ``sizes`` are the lengths a kernel masks its vectors with).

    Triton only learns that an integer argument is a multiple of 16, and only when it is.
    A (batch, length, heads, 88) tensor has a head stride of 88 and a cross-entropy row of
    BERT's 30524 classes a row stride of 30524: neither is, so without this fact every
    load of such a tile is compiled to one element per instruction. With it
    (``known_multiple``), an 88-wide head loads 16 bytes at a time and a 30524-wide row 8.
    """
    vector = VECTOR_BYTES // tensors[0].element_size()
    common = math.gcd(*sizes, *(stride for tensor in tensors for stride in tensor.stride()[:-1]))
    # The lowest set bit of the common divisor is the largest power of 2 dividing all;
    # 0 (no strides, or all 0) divides nothing away.
    return min(vector, common & -common) if common else vector


@triton.jit
def known_multiple(value, MULTIPLE: tl.constexpr):
    """``value``, which the launcher guarantees is a multiple of MULTIPLE, written so that
    the compiler knows it too (the product of a quotient and MULTIPLE is a multiple of
    MULTIPLE); the division costs a shift."""
    return value // MULTIPLE * MULTIPLE
