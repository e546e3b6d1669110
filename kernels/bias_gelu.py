"""Fused bias-add + exact GELU in Triton: forward and backward.

The first FFN projection of a BERT / ViT layer is ``gelu(x @ W.T + b)``. With the matmul
run without its bias, this op applies the bias and the GELU in one pass over ``x``:

    z = x + bias                                  (bias optional: a plain GELU)
    y = gelu(z) = 0.5 * z * (1 + erf(z / sqrt(2)))                 (exact, erf form)
    dx = dy * gelu'(z),  gelu'(z) = Phi(z) + z * phi(z)
    dbias = sum of dx over all rows

with ``Phi`` the standard normal CDF (``0.5 * (1 + erf(z / sqrt(2)))``) and ``phi`` its
density (``exp(-z^2 / 2) / sqrt(2 pi)``). All arithmetic is float32; ``y`` and ``dx`` are
stored in x's dtype, ``dbias`` in bias's dtype (bias may be float32 with bf16/fp16 x).

Layout: ``x`` (..., N) is handled as a (rows, N) matrix whose last dimension has unit
stride and whose rows may have any stride (a row-strided slice runs without a copy); a
tensor that cannot be viewed that way (a transposed one, or leading dims that do not
collapse) is copied first. Outputs are contiguous.

Kernels (2D tiles of BLOCK_ROWS x BLOCK_N elements, so that the bias is loaded once per
program and the backward can sum its tile's rows for dbias in registers):
- ``_bias_gelu_forward_kernel``: one program per (row block, column block).
- ``_bias_gelu_backward_kernel``: one program per (row chunk, column block); it walks its
  chunk (``rows_per_program`` rows, BLOCK_ROWS at a time), recomputes z from the saved x
  (neither z nor y is saved by the forward), stores dx, and accumulates the float32 dx of
  its rows. Each program writes its column sums to one row of a (chunks, N) float32
  buffer, which a torch sum reduces to dbias. The sum is of the float32 dx, before its
  rounding to x's dtype, so dbias carries only float32 summation error (no atomics, so
  the result is deterministic). With ``STORE_ACTIVATION`` it also stores gelu(z), computed
  as the forward computes it.

``linear(gelu(x + bias), weight, out_bias)`` (the FFN after its first matmul) has its own
autograd here: the forward keeps x only, and the backward gets the activation for the
weight gradient from the ``STORE_ACTIVATION`` pass instead of a saved copy. The matmuls
are PyTorch's.

This file knows nothing of models. Launchers take validated tensors; argument checking
lives in ``blipfast.ops``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from blipfast.kernels._runtime import (
    as_rows, cdiv, first_derivative_only, interpreter_enabled, needs_autograd,
    next_power_of_2, savable)

# Module-level constants read inside kernels must be constexpr.
INV_SQRT2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


# --------------------------------------------------------------------------------------
# Tile configurations
# --------------------------------------------------------------------------------------


def _tile(num_rows: int, num_cols: int, elements: int, max_block_n: int) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_N) covering about ``elements`` elements, no taller than needed."""
    block_n = min(next_power_of_2(max(num_cols, 1)), max_block_n)
    block_rows = max(1, elements // block_n)
    block_rows = min(block_rows, next_power_of_2(max(num_rows, 1)))
    return block_rows, block_n


def _forward_config(num_rows: int, num_cols: int) -> dict:
    """Tile sizes for the forward kernel: (BLOCK_ROWS, BLOCK_N, num_warps)."""
    if interpreter_enabled():
        # Small tiles so that the CPU tests cross row and column block edges.
        return dict(BLOCK_ROWS=4, BLOCK_N=64, num_warps=4)
    # 4096 elements per program, 16 per thread with 8 warps. Untimed on a GPU so far.
    block_rows, block_n = _tile(num_rows, num_cols, 4096, 1024)
    return dict(BLOCK_ROWS=block_rows, BLOCK_N=block_n,
                num_warps=8 if block_rows * block_n >= 4096 else 4)


def _backward_config(num_rows: int, num_cols: int) -> dict:
    """Tile sizes for the backward kernel: (BLOCK_ROWS, BLOCK_N, num_warps) and
    ``rows_per_program`` (a multiple of BLOCK_ROWS; a runtime argument)."""
    if interpreter_enabled():
        # Two row blocks per program and several programs per column, so the CPU tests
        # exercise both the in-program loop and the cross-program dbias sum.
        return dict(BLOCK_ROWS=4, BLOCK_N=64, num_warps=4, rows_per_program=8)
    # 2048-element tiles (16 per thread with 4 warps; the dbias accumulator is another
    # tile of registers). Untimed on a GPU so far.
    block_rows, block_n = _tile(num_rows, num_cols, 2048, 256)
    # Enough row chunks for ~1024 programs, but at most 16 row blocks per program; at
    # 64*577 rows x 3072 that is 289 chunks (a 3.5 MB partial-sum buffer, against the
    # 227 MB of bf16 dx).
    column_blocks = cdiv(num_cols, block_n)
    row_blocks = cdiv(num_rows, block_rows)
    wanted_chunks = max(1, 1024 // column_blocks)
    steps = min(16, max(1, cdiv(row_blocks, wanted_chunks)))
    return dict(BLOCK_ROWS=block_rows, BLOCK_N=block_n, num_warps=4,
                rows_per_program=block_rows * steps)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _normal_cdf(z):
    """Phi(z), the standard normal CDF of float32 z."""
    return 0.5 * (1.0 + tl.math.erf(z * INV_SQRT2))


@triton.jit
def _gelu(z):
    """Exact GELU of float32 z: z * Phi(z)."""
    return z * _normal_cdf(z)


@triton.jit
def _gelu_grad(z, cdf):
    """d gelu / dz of float32 z, given cdf = Phi(z): Phi(z) + z * phi(z)."""
    density = tl.exp(-0.5 * z * z) * INV_SQRT_2PI
    return cdf + z * density


@triton.jit
def _column_block(BLOCK_N: tl.constexpr, num_cols):
    """This program's column indices and which of them are below ``num_cols``."""
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return cols, cols < num_cols


@triton.jit
def _load_bias(Bias, cols, col_in, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The bias of these columns in float32, as a [1, BLOCK_N] row (zeros without bias)."""
    if HAS_BIAS:
        bias = tl.load(Bias + cols, mask=col_in, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    return bias[None, :]


@triton.jit
def _tile_offsets(rows, cols, stride_row):
    """Element offsets of the [rows, cols] tile of a matrix with unit column stride."""
    return rows.to(tl.int64)[:, None] * stride_row + cols[None, :]


@triton.jit
def _bias_gelu_forward_kernel(
    X, Bias, Y,
    num_rows, num_cols, stride_x_row, stride_y_row,
    HAS_BIAS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols, col_in = _column_block(BLOCK_N, num_cols)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    tile_in = (rows < num_rows)[:, None] & col_in[None, :]
    bias = _load_bias(Bias, cols, col_in, HAS_BIAS, BLOCK_N)
    x = tl.load(X + _tile_offsets(rows, cols, stride_x_row), mask=tile_in, other=0.0)
    y = _gelu(x.to(tl.float32) + bias)
    tl.store(Y + _tile_offsets(rows, cols, stride_y_row), y.to(Y.dtype.element_ty), mask=tile_in)


@triton.jit
def _bias_gelu_backward_kernel(
    GradOut, X, Bias, GradX, PartialGradBias, Activation,
    num_rows, num_cols, rows_per_program,
    stride_go_row, stride_x_row, stride_gx_row, stride_a_row,
    HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, STORE_ACTIVATION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    chunk = tl.program_id(0)
    cols, col_in = _column_block(BLOCK_N, num_cols)
    bias = _load_bias(Bias, cols, col_in, HAS_BIAS, BLOCK_N)
    grad_bias = tl.zeros([BLOCK_ROWS, BLOCK_N], dtype=tl.float32)
    chunk_start = chunk * rows_per_program
    for offset in range(0, rows_per_program, BLOCK_ROWS):
        rows = chunk_start + offset + tl.arange(0, BLOCK_ROWS)
        tile_in = (rows < num_rows)[:, None] & col_in[None, :]
        # Masked elements load dy = 0, so their dx is 0 and adds nothing to dbias.
        grad_out = tl.load(GradOut + _tile_offsets(rows, cols, stride_go_row),
                           mask=tile_in, other=0.0).to(tl.float32)
        x = tl.load(X + _tile_offsets(rows, cols, stride_x_row), mask=tile_in, other=0.0)
        z = x.to(tl.float32) + bias
        cdf = _normal_cdf(z)
        grad_x = grad_out * _gelu_grad(z, cdf)
        tl.store(GradX + _tile_offsets(rows, cols, stride_gx_row),
                 grad_x.to(GradX.dtype.element_ty), mask=tile_in)
        if STORE_ACTIVATION:
            # gelu(z) again, for a following projection's weight gradient (so that the
            # forward need not keep it): the forward's value, computed the same way.
            tl.store(Activation + _tile_offsets(rows, cols, stride_a_row),
                     (z * cdf).to(Activation.dtype.element_ty), mask=tile_in)
        if BIAS_GRAD:
            grad_bias += grad_x
    if BIAS_GRAD:
        tl.store(PartialGradBias + chunk.to(tl.int64) * num_cols + cols,
                 tl.sum(grad_bias, 0), mask=col_in)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def bias_gelu_forward(x: torch.Tensor, bias: Optional[torch.Tensor],
                      config: Optional[dict] = None) -> torch.Tensor:
    """Launch the forward kernel. Returns gelu(x + bias), contiguous, shaped and typed
    like x. ``config`` overrides the tile sizes (BLOCK_ROWS, BLOCK_N, num_warps)."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    x_rows = as_rows(x)
    bias = bias.contiguous() if bias is not None else None
    out_rows = out.view(-1, x.shape[-1])
    num_rows, num_cols = x_rows.shape
    config = config or _forward_config(num_rows, num_cols)
    grid = (cdiv(num_rows, config["BLOCK_ROWS"]), cdiv(num_cols, config["BLOCK_N"]))
    _bias_gelu_forward_kernel[grid](
        x_rows, bias if bias is not None else x_rows, out_rows,
        num_rows, num_cols, x_rows.stride(0), out_rows.stride(0),
        HAS_BIAS=bias is not None, **config,
    )
    return out


def bias_gelu_backward(grad_out: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor],
                       bias_grad: bool, store_activation: bool = False,
                       config: Optional[dict] = None,
                       ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel. Returns (grad_x shaped and typed like x, grad_bias (N,)
    in bias's dtype, or None unless ``bias_grad`` and a bias is given, and with
    ``store_activation`` gelu(x + bias) as the forward computes it, else None).
    ``config`` overrides the tile sizes (BLOCK_ROWS, BLOCK_N, num_warps,
    rows_per_program)."""
    bias_grad = bias_grad and bias is not None
    num_cols = x.shape[-1]
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    activation = torch.empty(x.shape, dtype=x.dtype, device=x.device) \
        if store_activation else None
    if grad_x.numel() == 0:
        grad_bias = (torch.zeros(num_cols, dtype=bias.dtype, device=x.device)
                     if bias_grad and bias is not None else None)
        return grad_x, grad_bias, activation
    x_rows = as_rows(x)
    grad_out_rows = as_rows(grad_out)
    bias = bias.contiguous() if bias is not None else None
    grad_x_rows = grad_x.view(-1, num_cols)
    activation_rows = activation.view(-1, num_cols) if activation is not None else grad_x_rows
    num_rows = x_rows.shape[0]
    config = dict(config or _backward_config(num_rows, num_cols))
    rows_per_program = config.pop("rows_per_program")
    assert rows_per_program % config["BLOCK_ROWS"] == 0
    chunks = cdiv(num_rows, rows_per_program)
    partial = (torch.empty((chunks, num_cols), dtype=torch.float32, device=x.device)
               if bias_grad else x_rows)  # never written without BIAS_GRAD
    grid = (chunks, cdiv(num_cols, config["BLOCK_N"]))
    _bias_gelu_backward_kernel[grid](
        grad_out_rows, x_rows, bias if bias is not None else x_rows, grad_x_rows, partial,
        activation_rows, num_rows, num_cols, rows_per_program,
        grad_out_rows.stride(0), x_rows.stride(0), grad_x_rows.stride(0),
        activation_rows.stride(0),
        HAS_BIAS=bias is not None, BIAS_GRAD=bias_grad, STORE_ACTIVATION=store_activation,
        **config,
    )
    if not bias_grad or bias is None:
        return grad_x, None, activation
    # float32 sum over the chunks (a few hundred at most), then one rounding.
    grad_bias = partial[0] if chunks == 1 else partial.sum(0)
    return grad_x, grad_bias.to(bias.dtype), activation


# --------------------------------------------------------------------------------------
# Autograd and torch.library registration
# --------------------------------------------------------------------------------------
# As for attention: a plain autograd.Function for eager mode (less per-call overhead), and
# a torch.library custom op that torch.compile traces as one opaque node. Both save x and
# bias only; the backward recomputes z.


class BiasGeluFunction(torch.autograd.Function):
    """Eager-mode autograd for the fused bias + GELU kernels."""

    @staticmethod
    def forward(ctx, x, bias):
        ctx.save_for_backward(*savable(x, bias))
        return bias_gelu_forward(x, bias)

    @staticmethod
    @first_derivative_only("blipfast.ops.bias_gelu")  # a second derivative raises
    def backward(ctx, grad_out):
        x, bias = ctx.saved_tensors
        grad_x, grad_bias, _ = bias_gelu_backward(grad_out, x, bias, ctx.needs_input_grad[1])
        return grad_x, grad_bias


@torch.library.custom_op("blipfast::bias_gelu_forward", mutates_args=())
def bias_gelu_forward_op(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """torch.library op: gelu(x + bias), exact erf form, in x's dtype."""
    return bias_gelu_forward(x, bias)


@bias_gelu_forward_op.register_fake
def _bias_gelu_forward_fake(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("blipfast::bias_gelu_backward", mutates_args=())
def bias_gelu_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], bias_grad: bool,
    store_activation: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.library op: (grad_x, grad_bias, gelu(x + bias)). grad_bias is (N,) in bias's
    dtype when ``bias_grad`` and a bias is given, the activation shaped like x when
    ``store_activation``; each is an empty (0,) tensor otherwise (an op cannot return
    None)."""
    grad_x, grad_bias, activation = bias_gelu_backward(grad_out, x, bias, bias_grad,
                                                       store_activation)
    return (grad_x, grad_bias if grad_bias is not None else x.new_empty(0),
            activation if activation is not None else x.new_empty(0))


@bias_gelu_backward_op.register_fake
def _bias_gelu_backward_fake(grad_out, x, bias, bias_grad, store_activation):
    grad_bias = bias.new_empty(x.shape[-1]) if bias_grad and bias is not None \
        else x.new_empty(0)
    return (x.new_empty(x.shape), grad_bias,
            x.new_empty(x.shape) if store_activation else x.new_empty(0))


def _op_setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(*savable(x, bias))


def _op_backward(ctx, grad_out):
    x, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[1]
    grad_x, grad_bias, _ = bias_gelu_backward_op(grad_out, x, bias, bias_grad, False)
    return grad_x, grad_bias if bias_grad else None


bias_gelu_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def fused_bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Run the fused kernels with autograd: the custom op under torch.compile, the
    autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        return bias_gelu_forward_op(x, bias)
    if not needs_autograd(x, bias):
        return bias_gelu_forward(x, bias)
    return BiasGeluFunction.apply(x, bias)


# --------------------------------------------------------------------------------------
# bias + GELU followed by a linear layer, keeping only x for the backward
# --------------------------------------------------------------------------------------
# ``linear(gelu(x + gelu_bias), weight, bias)``: the FFN of a transformer layer after its
# first matmul. Run as bias_gelu then F.linear, autograd keeps both x (for GELU's
# gradient) and the activation gelu(x + gelu_bias) (for the weight gradient): two
# (rows, N) tensors, N the FFN width. Here the backward recomputes the activation in the
# same kernel pass that computes x's gradient (one extra store), so only x is kept. The
# matmuls are PyTorch's (cuBLAS); weight and bias must have x's dtype (the caller casts
# under autocast).


def _linear_backward(ctx, forward, backward, grad_out):
    """Gradients (x, gelu_bias, weight, bias) of linear(gelu(x + gelu_bias), weight,
    bias), with ``forward`` and ``backward`` the bias-GELU launchers or their custom ops
    (``backward`` returns (grad_x, grad_gelu_bias, activation), with None or empty
    tensors for what was not asked)."""
    x, gelu_bias, weight = ctx.saved_tensors
    need_x, need_gelu_bias, need_weight, need_bias = ctx.needs_input_grad[:4]
    need_gelu_bias = need_gelu_bias and gelu_bias is not None
    # (rows, M) spelled out: reshape(-1, M) cannot infer the rows when M is 0.
    grad_out_rows = grad_out.reshape(math.prod(grad_out.shape[:-1]), grad_out.shape[-1])
    grad_x = grad_gelu_bias = grad_weight = grad_bias = None
    if need_x or need_gelu_bias:
        grad_activation = torch.matmul(grad_out, weight)
        grad_x, grad_gelu_bias, activation = backward(
            grad_activation, x, gelu_bias, need_gelu_bias, need_weight)
    elif need_weight:
        activation = forward(x, gelu_bias)
    if need_weight:
        grad_weight = grad_out_rows.t() @ activation.reshape(-1, activation.shape[-1])
    if need_bias and ctx.has_bias:
        grad_bias = grad_out_rows.sum(0, dtype=torch.float32).to(grad_out.dtype)
    return (grad_x if need_x else None, grad_gelu_bias if need_gelu_bias else None,
            grad_weight, grad_bias)


def bias_gelu_linear_forward(x: torch.Tensor, gelu_bias: Optional[torch.Tensor],
                             weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear(gelu(x + gelu_bias), weight, bias)``: the bias-GELU kernel, then PyTorch's
    matmul; what every door of the op computes forward."""
    return torch.nn.functional.linear(bias_gelu_forward(x, gelu_bias), weight, bias)


class BiasGeluLinearFunction(torch.autograd.Function):
    """Eager-mode autograd for ``linear(gelu(x + gelu_bias), weight, bias)`` that saves
    x (and the parameters) only."""

    @staticmethod
    def forward(ctx, x, gelu_bias, weight, bias):
        output = bias_gelu_linear_forward(x, gelu_bias, weight, bias)
        ctx.save_for_backward(*savable(x, gelu_bias, weight))
        ctx.has_bias = bias is not None
        return output

    @staticmethod
    @first_derivative_only("blipfast.ops.bias_gelu_linear")  # a second derivative raises
    def backward(ctx, grad_out):
        return _linear_backward(ctx, bias_gelu_forward, bias_gelu_backward, grad_out)


@torch.library.custom_op("blipfast::bias_gelu_linear", mutates_args=())
def bias_gelu_linear_op(x: torch.Tensor, gelu_bias: Optional[torch.Tensor],
                        weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """torch.library op: linear(gelu(x + gelu_bias), weight, bias), weight and bias in
    x's dtype. Its autograd formula saves x only and recomputes the activation."""
    return bias_gelu_linear_forward(x, gelu_bias, weight, bias)


@bias_gelu_linear_op.register_fake
def _bias_gelu_linear_fake(x, gelu_bias, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_op_setup_context(ctx, inputs, output):
    x, gelu_bias, weight, bias = inputs
    ctx.save_for_backward(*savable(x, gelu_bias, weight))
    ctx.has_bias = bias is not None


def _linear_op_backward(ctx, grad_out):
    return _linear_backward(ctx, bias_gelu_forward_op, bias_gelu_backward_op, grad_out)


bias_gelu_linear_op.register_autograd(_linear_op_backward,
                                      setup_context=_linear_op_setup_context)


def fused_bias_gelu_linear(x: torch.Tensor, gelu_bias: Optional[torch.Tensor],
                           weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear(gelu(x + gelu_bias), weight, bias)`` with autograd, saving only x: the
    custom op under torch.compile, the autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        return bias_gelu_linear_op(x, gelu_bias, weight, bias)
    if not needs_autograd(x, gelu_bias, weight, bias):
        return bias_gelu_linear_forward(x, gelu_bias, weight, bias)
    return BiasGeluLinearFunction.apply(x, gelu_bias, weight, bias)
