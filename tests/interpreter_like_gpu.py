"""The Triton interpreter made to compute as a GPU does where our kernel tests depend on
it: bfloat16, and the order in which a dot product adds.

The interpreter keeps a bfloat16 tensor as its uint16 bit patterns, and gets two things
wrong with them (Triton's maintainers call bf16 unsupported in the interpreter):

- ``tl.dot`` multiplies the bit patterns as integers, which makes every bf16 result
  wrong. :func:`install` widens bfloat16 operands to float32 first: exactly, as a
  bfloat16 number is the top half of a float32 one.
- A float32 to bfloat16 cast (``.to(tl.bfloat16)``, and so every bf16 store of a float32
  value) drops the low 16 bits, rounding toward zero, where a GPU rounds to nearest even
  (Triton's default rounding for the cast): that doubled the error of bf16 outputs.
  :func:`install` rounds to nearest even, overflowing to infinity as the GPU does.

And for every floating-point dtype, the interpreter hands ``tl.dot`` to NumPy's matmul,
whose BLAS may round the same sum differently depending on where it sits: with NumPy
2.4's OpenBLAS on an AMD EPYC (AVX2) machine, ``q @ k.T`` and ``(k @ q.T).T`` differ in
the last bit in a third of a 16 x 32 x 128 tile, and so do two equal rows of one
operand (other machines' CI runs had passed: the BLAS kernel depends on the CPU).
A GPU adds each dot product in one order whichever operand holds it (float32: a loop of
fused multiply-adds over the shared dimension; fp16/bf16: exact products summed per
matrix instruction). Kernels rely on that: the attention backward recomputes the
forward's scores from the transposed product and takes ``exp2(score - logsumexp)``,
where a last-bit difference in a score of 50 is an error of 4 ulps in a probability, and
the contrastive loss gives a tie between two equal queries to the first. :func:`install`
computes every floating-point dot as the GPU's float32 loop does: the accumulator plus
each exact product in turn along the shared dimension, one float32 rounding per step.
That is usually about as exact as PyTorch's own float32 matmul on this CPU, the yardstick
of the tests' tolerances (a float64 dot rounded once would make the kernels' errors 0.4x
PyTorch's; without the fused product's exactness, a float32 loop fails a contrastive case
at logit_scale 1000 by 8%), but not always: PyTorch's BLAS on this CPU (MKL) sums in
blocks and lanes at most shapes, which rounds a long dot product less than one loop
does (at some shapes it is the loop, to the bit), and where a softmax is very sharp
(float32 attention, head dim 128, scores tens apart) the output follows the scores' last
bits, so the kernels' order alone made their gradients 3.5 times PyTorch's error. PyTorch
on a GPU adds in the loop's order too (cuBLAS's float32 matmul: fused multiply-adds
along the shared dimension), so a test may also measure PyTorch's error as it computes
on a GPU: :func:`torch_matmuls_like_gpu`.

Nothing else changes; any other operation a kernel ran on bf16 values without a cast
would still see bit patterns, and fail its test against the reference rather than pass
it. The GPU tests (``test_*_gpu.py``) remain the check of the compiled kernels.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

_INSTALLED_MARK = "_blipfast_dot_like_gpu"


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


def _dot_as_fused_multiply_add_loop(a: np.ndarray, b: np.ndarray,
                                    accumulator: np.ndarray) -> np.ndarray:
    """``accumulator + a @ b`` (``a``: (..., M, K), ``b``: (..., K, N), float16 or float32)
    as a GPU's float32 loop of fused multiply-adds computes it: each product, exact in
    float64, added to the float32 accumulator in turn along K, one rounding to float32 per
    step (through float64, which rounds twice only in rare ties)."""
    a = np.swapaxes(a, -1, -2).astype(np.float64)  # (..., K, M)
    b = b.astype(np.float64)  # (..., K, N)
    result = np.array(accumulator, dtype=np.float32)
    step = np.empty(result.shape, dtype=np.float64)
    for index in range(a.shape[-2]):
        np.multiply(a[..., index, :, None], b[..., index, None, :], out=step)
        step += result
        result[...] = step
    return result


def _check_parameters(method, expected: list[str]) -> None:
    parameters = list(inspect.signature(method).parameters)
    if parameters[:len(expected)] != expected:
        raise RuntimeError(f"tests/interpreter_like_gpu.py: the Triton interpreter's "
                           f"{method.__name__} takes {parameters}, not {expected}; update "
                           "this patch")


def install() -> None:
    """Patch the interpreter's dot (bf16 operands widened; floating-point dots as a
    float32 fused multiply-add loop) and its float32 to bfloat16 cast (idempotent; the
    originals stay reachable as ``__wrapped__``). Raises if the interpreter's builder no
    longer has the ``create_dot(a, b, d, ...)`` and ``cast_impl(src, dst_type)`` this was
    written against (Triton 3.6 to 3.9), rather than leaving bf16 wrong."""
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
        a, b = _widened(a, tl, tensor_handle), _widened(b, tl, tensor_handle)
        floating = (np.float16, np.float32)
        if a.data.dtype in floating and b.data.dtype in floating \
                and d.data.dtype == np.float32:
            return tensor_handle(_dot_as_fused_multiply_add_loop(a.data, b.data, d.data),
                                 d.dtype.scalar)
        return original_dot(self, a, b, d, *args, **kwargs)  # integer and fp8 dots

    @functools.wraps(original_cast)
    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return tensor_handle(_rounded_to_bfloat16(src.data), tl.bfloat16)
        return original_cast(self, src, dst_type)

    setattr(create_dot, _INSTALLED_MARK, True)
    builder.create_dot, builder.cast_impl = create_dot, cast_impl


class _TorchMatmulsLikeGpu(TorchDispatchMode):
    """float32 ``mm``/``bmm`` on CPU tensors as :func:`_dot_as_fused_multiply_add_loop`
    computes them from a zero accumulator; every other operation as PyTorch computes it."""

    _LOOPED = (torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
    # Matmuls PyTorch may run without reaching mm/bmm: refused rather than left in BLAS's
    # order unnoticed.
    _REFUSED = (torch.ops.aten.addmm, torch.ops.aten.baddbmm, torch.ops.aten.addbmm,
                torch.ops.aten.mv, torch.ops.aten.dot, torch.ops.aten.vdot)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        floats_on_cpu = all(isinstance(arg, torch.Tensor) and arg.dtype == torch.float32
                            and arg.device.type == "cpu" for arg in args[:2])
        if func in self._LOOPED and floats_on_cpu and not kwargs:
            a, b = (arg.detach().numpy() for arg in args[:2])
            zeros = np.zeros((*a.shape[:-1], b.shape[-1]), dtype=np.float32)
            return torch.from_numpy(_dot_as_fused_multiply_add_loop(a, b, zeros))
        if func.overloadpacket in self._REFUSED and floats_on_cpu:
            raise NotImplementedError(f"torch_matmuls_like_gpu: {func} is not looped")
        return func(*args, **kwargs)


def torch_matmuls_like_gpu() -> TorchDispatchMode:
    """A context in which PyTorch's float32 matrix products on CPU tensors (``mm`` and
    ``bmm``, which ``matmul``, ``einsum`` and their gradients run on) add each dot product
    as a GPU's float32 loop does, the order the patched interpreter gives the kernels: a
    PyTorch result computed inside measures PyTorch's rounding on a GPU. float32 products
    PyTorch would run another way (``addmm``, ``mv``, ...) raise ``NotImplementedError``."""
    return _TorchMatmulsLikeGpu()


Result = TypeVar("Result")


def in_each_matmul_order(device: torch.device | str, dtype: torch.dtype,
                         runs: Sequence[Callable[[], Result]]) -> list[Result]:
    """Each of ``runs`` (PyTorch computing a yardstick) called as PyTorch computes on
    ``device``, and, where the kernels' float32 dots add as a GPU's loop (float32 on CPU,
    the interpreter), called again inside :func:`torch_matmuls_like_gpu`."""
    results = [run() for run in runs]
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        with torch_matmuls_like_gpu():
            results += [run() for run in runs]
    return results
