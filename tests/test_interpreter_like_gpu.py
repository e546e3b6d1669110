"""The Triton interpreter made to compute as a GPU does (``interpreter_like_gpu.py``,
installed by conftest.py): its bf16 dot and its float32 -> bfloat16 cast against
PyTorch's, bit for bit, and the interpreter's own versions, which the patch replaces,
shown wrong; every floating-point dot as a float32 fused multiply-add loop, bit for bit,
the same whichever operand holds a row; and PyTorch's own float32 matmuls made that loop
(``torch_matmuls_like_gpu``, for the attention and contrastive tests' yardsticks)."""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import interpreter_like_gpu

pytestmark = pytest.mark.interpreter


@triton.jit
def _dot_kernel(A, B, Out, SIZE: tl.constexpr):
    rows = tl.arange(0, SIZE)[:, None] * SIZE
    cols = tl.arange(0, SIZE)[None, :]
    a = tl.load(A + rows + cols)
    b = tl.load(B + rows + cols)
    tl.store(Out + rows + cols, tl.dot(a, b))


@triton.jit
def _cast_kernel(X, Out, SIZE: tl.constexpr):
    offsets = tl.arange(0, SIZE)
    tl.store(Out + offsets, tl.load(X + offsets).to(tl.bfloat16))


@triton.jit
def _dot_with_accumulator_kernel(A, B, C, Out, M: tl.constexpr, N: tl.constexpr,
                                 K: tl.constexpr):
    """Out = C + A @ B.T, A (M, K), B (N, K), C (M, N)."""
    a = tl.load(A + tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :])
    b = tl.load(B + tl.arange(0, N)[:, None] * K + tl.arange(0, K)[None, :])
    out_offsets = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    c = tl.load(C + out_offsets)
    tl.store(Out + out_offsets, tl.dot(a, tl.trans(b), c, input_precision="ieee"))


def _dot_with_accumulator(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    out = torch.empty(c.shape, dtype=torch.float32)
    _dot_with_accumulator_kernel[(1,)](a, b, c, out, M=a.shape[0], N=b.shape[0], K=a.shape[1])
    return out


def _fused_multiply_add_loop(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """c + a @ b.T as a float32 loop of fused multiply-adds: each exact product added in
    turn along K, one rounding to float32 per step."""
    result = c.float()
    for index in range(a.shape[1]):
        result = (result.double() + a[:, index, None].double() * b[None, :, index].double()).float()
    return result


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    out = torch.empty(a.shape, dtype=torch.float32)
    _dot_kernel[(1,)](a, b, out, SIZE=a.shape[0])
    return out


def _cast(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, SIZE=x.numel())
    return out


def _special_float32_values() -> torch.Tensor:
    """Values whose bfloat16 rounding is easy to get wrong, 256 of them."""
    bits = torch.tensor([
        0x3F808000,  # a tie between two bf16 numbers with an even lower one: rounds down
        0x3F818000,  # a tie with an odd lower one: rounds up
        0x3F808001,  # just past a tie: rounds up
        0x3F807FFF,  # just below a tie: rounds down
        0x7F7FFFFF,  # float32's largest: rounds to infinity
        0x7F7F7FFF,  # just below the tie with infinity: bf16's largest
        0xFF7FFFFF,  # its negative: minus infinity
        0x00000001,  # the smallest subnormal
        0x00018000,  # a subnormal tie
        0x80000000,  # -0.0
        0x7F800000, 0xFF800000,  # infinities
        0xBF818000,  # a negative tie rounding away from zero
    ], dtype=torch.int64).to(torch.int32)
    random = torch.randn(256 - bits.numel(), generator=torch.Generator().manual_seed(0)) \
        * torch.logspace(-30, 30, 256 - bits.numel())
    return torch.cat([bits.view(torch.float32), random])


def test_float32_to_bfloat16_rounds_as_pytorch_does():
    values = _special_float32_values()
    assert torch.equal(_cast(values).view(torch.int16), values.to(torch.bfloat16).view(torch.int16))


def test_nan_stays_nan():
    values = torch.tensor([float("nan"), -float("nan"), 1.0, 2.0] * 4)
    cast = _cast(values)
    assert torch.equal(cast.isnan(), values.isnan())
    assert torch.equal(cast[2:4], values[2:4].to(torch.bfloat16))


@pytest.mark.parametrize("size", [16, 32])
def test_bfloat16_dot_is_exact_products_accumulated_in_float32(size):
    generator = torch.Generator().manual_seed(size)
    a = torch.randn(size, size, generator=generator).bfloat16()
    b = torch.randn(size, size, generator=generator).bfloat16()
    expected = a.double() @ b.double()
    # Exact products, float32 sums: within a few float32 roundings of the exact result.
    assert (_dot(a, b).double() - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_the_interpreter_alone_gets_both_wrong():
    """What the patch is for: the interpreter's own dot multiplies bf16 bit patterns, and
    its cast truncates normal numbers toward zero (and gets subnormals wrong)."""
    from triton.runtime.interpreter import InterpreterBuilder

    patched = (InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl)
    originals = tuple(function.__wrapped__ for function in patched)
    a = torch.randn(16, 16, generator=torch.Generator().manual_seed(1)).bfloat16()
    values = _special_float32_values()
    try:
        InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = originals
        wrong_dot, wrong_cast = _dot(a, a), _cast(values)
    finally:
        InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = patched
    assert (wrong_dot - a.float() @ a.float()).abs().max() > 1e3
    truncated = (values.view(torch.int32) >> 16).to(torch.int16)
    normal = values.isfinite() & (values.abs() >= torch.finfo(torch.float32).tiny)
    assert torch.equal(wrong_cast.view(torch.int16)[normal], truncated[normal])
    assert not torch.equal(wrong_cast, values.to(torch.bfloat16))


def test_install_is_idempotent():
    from triton.runtime.interpreter import InterpreterBuilder

    before = (InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl)
    interpreter_like_gpu.install()
    assert (InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl) == before


def test_rounding_helper_on_its_own():
    values = _special_float32_values().numpy()
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    assert np.array_equal(interpreter_like_gpu._rounded_to_bfloat16(values).view(np.int16),
                          expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dot_is_a_fused_multiply_add_loop(dtype):
    """Bit for bit; NumPy's BLAS (the interpreter's own dot) blocks and vectorizes the
    sums, which gives other roundings."""
    generator = torch.Generator().manual_seed(3)
    a, b = (torch.randn(shape, generator=generator).to(dtype) for shape in ((16, 64), (32, 64)))
    c = torch.randn(16, 32, generator=generator) * 10
    assert torch.equal(_dot_with_accumulator(a, b, c), _fused_multiply_add_loop(a, b, c))


def test_dot_adds_in_one_order_whichever_operand_holds_a_row():
    """What the attention backward and the contrastive loss's ties rely on: q @ k.T equals
    (k @ q.T).T, and equal rows of an operand give equal rows of the product."""
    generator = torch.Generator().manual_seed(4)
    q, k = torch.randn(16, 128, generator=generator), torch.randn(32, 128, generator=generator)
    q[2::4] = q[0::4]
    scores = _dot_with_accumulator(q, k, torch.zeros(16, 32))
    assert torch.equal(scores, _dot_with_accumulator(k, q, torch.zeros(32, 16)).T)
    assert torch.equal(scores[2::4], scores[0::4])


def test_torch_matmuls_like_gpu_add_as_the_interpreters_dot():
    """PyTorch's float32 products inside ``torch_matmuls_like_gpu`` (mm, bmm, an einsum and
    its gradient) are the fused multiply-add loop the interpreter's dot is (above), bit
    for bit, at a shape where this CPU's BLAS is not (at some shapes it is: an Intel Xeon's
    BLAS adds 64 x 256 products as the loop does, not 64 x 1000); other dtypes are left
    alone, and matmuls PyTorch runs another way refused rather than left in BLAS's order
    unnoticed."""
    zeros = torch.zeros(64, 64)
    for inner in (256, 1000, 1537):
        generator = torch.Generator().manual_seed(6)
        q, k = (torch.randn(64, inner, generator=generator) for _ in range(2))
        if not torch.equal(q @ k.T, _fused_multiply_add_loop(q, k, zeros)):
            break  # BLAS rounds otherwise here: the check checks
    else:
        raise AssertionError("BLAS adds as the loop does at every shape tried: add one")
    with interpreter_like_gpu.torch_matmuls_like_gpu():
        scores = q @ k.T
        batched = torch.bmm(q[None].expand(2, 64, inner), k.T[None].expand(2, inner, 64))
        leaf = q.clone().requires_grad_()
        via_einsum = torch.einsum("qd,kd->qk", leaf, k)
        grad_q = torch.autograd.grad(via_einsum, leaf, torch.eye(64))[0]
        half = q.half() @ k.half().T
        with pytest.raises(NotImplementedError, match="addmm"):
            torch.addmm(zeros, q, k.T)
    expected = _fused_multiply_add_loop(q, k, zeros)
    assert torch.equal(scores, expected) and torch.equal(via_einsum, expected)
    assert torch.equal(batched[0], expected) and torch.equal(batched[1], expected)
    assert not torch.equal(q @ k.T, expected)  # BLAS rounds otherwise: the check checks
    assert torch.equal(grad_q, _fused_multiply_add_loop(torch.eye(64), k.T,
                                                        torch.zeros(64, inner)))
    assert torch.equal(half, q.half() @ k.half().T)
