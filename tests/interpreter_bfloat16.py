"""bfloat16 for the Triton interpreter as a GPU computes it, so the kernels run in bf16
on CPU.

The interpreter keeps a bfloat16 tensor as its uint16 bit patterns, and gets two things
wrong with them (Triton's maintainers call bf16 unsupported in the interpreter):

- ``tl.dot`` multiplies the bit patterns as integers, which makes every bf16 result
  wrong. :func:`install` widens bfloat16 operands to float32 first: exactly, as a
  bfloat16 number is the top half of a float32 one. The product is then what the GPU's
  bf16 matrix instructions compute: exact products, accumulated in float32 (the order of
  the additions may differ, as it does between GPU tile configurations).
- A float32 to bfloat16 cast (``.to(tl.bfloat16)``, and so every bf16 store of a float32
  value) drops the low 16 bits, rounding toward zero, where a GPU rounds to nearest even
  (Triton's default rounding for the cast): that doubled the error of bf16 outputs.
  :func:`install` rounds to nearest even, overflowing to infinity as the GPU does.

Nothing else changes; any other operation a kernel ran on bf16 values without a cast
would still see bit patterns, and fail its test against the reference rather than pass
it. The GPU tests (``test_*_gpu.py``) remain the check of the compiled kernels in bf16.
"""

from __future__ import annotations

import functools
import inspect

import numpy as np

_INSTALLED_MARK = "_blipfast_bfloat16_dot"


def _widened(handle, tl, TensorHandle):
    """``handle`` as float32 when it holds bfloat16 bit patterns, else itself."""
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    bits = handle.data.astype(np.uint32) << np.uint32(16)
    return TensorHandle(bits.view(np.float32), tl.float32)


def _rounded_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """float32 ``values`` as bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = values.astype(np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) \
        >> np.uint32(16)
    return np.where(np.isnan(values), np.uint32(0x7FC0), rounded).astype(np.uint16)


def _check_parameters(method, expected: list[str]) -> None:
    parameters = list(inspect.signature(method).parameters)
    if parameters[:len(expected)] != expected:
        raise RuntimeError(f"tests/interpreter_bfloat16.py: the Triton interpreter's "
                           f"{method.__name__} takes {parameters}, not {expected}; update "
                           "the bf16 patch")


def install() -> None:
    """Patch the interpreter's dot and float32 to bfloat16 cast (idempotent; the
    originals stay reachable as ``__wrapped__``). Raises if
    the interpreter's builder no longer has the ``create_dot(a, b, d, ...)`` and
    ``cast_impl(src, dst_type)`` this was written against (Triton 3.6 to 3.9), rather
    than leaving bf16 wrong."""
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, _INSTALLED_MARK, False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl
    _check_parameters(original_dot, ["self", "a", "b", "d"])
    _check_parameters(original_cast, ["self", "src", "dst_type"])
    tensor_handle = interpreter.TensorHandle

    @functools.wraps(original_dot)
    def create_dot(self, a, b, d, *args, **kwargs):
        return original_dot(self, _widened(a, tl, tensor_handle),
                            _widened(b, tl, tensor_handle), d, *args, **kwargs)

    @functools.wraps(original_cast)
    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return tensor_handle(_rounded_to_bfloat16(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    setattr(create_dot, _INSTALLED_MARK, True)
    builder.create_dot, builder.cast_impl = create_dot, cast_impl
