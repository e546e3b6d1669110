"""Whether the Triton interpreter computes bfloat16 as a GPU does.

Triton's CPU interpreter (``TRITON_INTERPRET=1``) keeps bfloat16 tensors as their uint16
bit patterns, and (Triton 3.6 to 3.9; its maintainers call bf16 unsupported there):

- ``tl.dot`` of bf16 operands multiplies the bit patterns as integers: every result is
  wrong (attention outputs of 1e9 where 1 was right);
- a float32 to bfloat16 cast drops the low 16 bits (rounds toward zero), where a GPU
  rounds to nearest even: twice the error of every bf16 store.

:func:`bfloat16_is_exact` runs one tiny kernel that does both and compares with PyTorch,
so the ops can refuse bf16 on an interpreter that would give wrong answers, and accept
it on one that has been fixed (a later Triton, or a patched interpreter such as the
test suite's ``tests/interpreter_like_gpu.py``) without knowing which.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 16


@triton.jit
def _bfloat16_probe_kernel(Left, Right, Product, Wide, Narrow, BLOCK: tl.constexpr):
    """Product = Left @ Right (bf16 operands, float32 result); Narrow = Wide as bf16."""
    rows = tl.arange(0, BLOCK)
    square = rows[:, None] * BLOCK + rows[None, :]
    product = tl.dot(tl.load(Left + square), tl.load(Right + square))
    tl.store(Product + square, product)
    tl.store(Narrow + rows, tl.load(Wide + rows).to(tl.bfloat16))


def bfloat16_is_exact() -> bool:
    """True when a bf16 ``tl.dot`` and a float32 to bf16 cast give what a GPU gives: the
    exact product of small integers, and rounding to nearest even. Runs the probe on CPU
    tensors, so call it only where kernels run on the interpreter; the answer does not
    change within a process unless the interpreter is patched, so callers may cache it
    once it is True."""
    # The probe's own PyTorch products in float32 whatever the caller's autocast.
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        return _run_probe()


def _run_probe() -> bool:
    generator = torch.Generator().manual_seed(0)
    left = torch.randint(-8, 9, (_BLOCK, _BLOCK), generator=generator).to(torch.bfloat16)
    right = torch.randint(-8, 9, (_BLOCK, _BLOCK), generator=generator).to(torch.bfloat16)
    product = torch.empty(_BLOCK, _BLOCK, dtype=torch.float32)
    # 1 + 0.75 ulp rounds to 1 + 1 ulp (bf16 keeps 7 fraction bits), and its negative to
    # -(1 + 1 ulp): truncation would leave both at magnitude 1.
    ulp = 2.0 ** -7
    wide = torch.tensor([1.0 + 0.75 * ulp, -(1.0 + 0.75 * ulp), 3.0, 0.0] * (_BLOCK // 4),
                        dtype=torch.float32)
    narrow = torch.empty(_BLOCK, dtype=torch.bfloat16)
    _bfloat16_probe_kernel[(1,)](left, right, product, wide, narrow, BLOCK=_BLOCK)
    return (torch.equal(product, left.float() @ right.float())
            and torch.equal(narrow, wide.to(torch.bfloat16)))
