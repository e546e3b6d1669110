"""Fused residual add + LayerNorm in Triton: forward and backward.

The problem is (rows, N): every dimension of the input but the last is flattened into rows,
and each row is normalized over its N features:

    s = x + residual                      (residual optional)
    y = (s - mean(s)) * rstd * weight + bias,   rstd = 1 / sqrt(var(s) + eps)

with the biased variance, as ``torch.nn.functional.layer_norm``. The sum, mean and
variance are computed in float32 for every input dtype (the variance from the centered
values held in registers, so a mean far from 0 loses nothing to cancellation). ``weight``
and ``bias`` are optional and may have another float dtype than x (float32 parameters with
bf16 activations); they are read as float32. y is stored in x's dtype. The per-row mean and
rstd are stored in float32 for the backward.

With ``store_sum`` the sum s is stored too, in x's dtype (the next residual stream of a
pre-norm transformer), and it is that stored, rounded s that is normalized, as PyTorch's
``LayerNorm(x + residual)`` does in x's dtype. The backward then reads s alone: one saved
activation per LayerNorm instead of two (x and residual). Without ``store_sum`` the float32
sum is normalized, and the backward recomputes it from the saved x and residual. Either
way x_hat = (s - mean) * rstd in the backward is exactly the forward's. With
g = dy * weight:

    ds = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) + d_sum

which is the gradient of both x and residual (``d_sum``, the gradient flowing into the
stored sum, is optional). The weight and bias gradients, sum(dy * x_hat) and sum(dy) over
rows, are accumulated in float32 per program into a (programs, N) buffer that torch sums
at the end (deterministic, no atomics).

Kernels:
- ``_layer_norm_forward_kernel``: one program per block of BLOCK_M rows; the whole row
  (BLOCK_N = next power of 2 of N) is held in registers.
- ``_layer_norm_backward_kernel``: a fixed number of programs (a few per SM on a GPU),
  each walking a contiguous range of rows BLOCK_M at a time.

Rows may have any row stride; the last dimension must have unit stride, and the launchers
copy a tensor whose last dimension does not. This file knows nothing of models. Launchers
take validated tensors; argument checking lives in ``blipfast.ops``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from blipfast.kernels._runtime import (
    as_rows, cdiv, first_derivative_only, interpreter_enabled, needs_autograd,
    next_power_of_2, savable)

# The kernels hold a whole row in registers. Rows wider than this are left to PyTorch by
# ``blipfast.ops`` (at 64K features a row no longer fits in registers even at 16 warps).
MAX_FEATURES = 65536


# --------------------------------------------------------------------------------------
# Launch configurations
# --------------------------------------------------------------------------------------


def _warps(tile_elements: int, per_thread: int) -> int:
    """Warps for a tile so that each thread holds about ``per_thread`` elements (1 to 16)."""
    return max(1, min(16, tile_elements // (32 * per_thread)))


def _block_n(num_features: int) -> int:
    """The row tile: all N features, padded to a power of 2 (at least 16)."""
    return max(16, next_power_of_2(num_features))


def _forward_config(num_rows: int, num_features: int) -> dict:
    """BLOCK_M rows of BLOCK_N features per program, and the warps for that tile."""
    block_n = _block_n(num_features)
    if interpreter_enabled():
        # The interpreter's cost is per tile operation: few, large tiles.
        block_m = min(next_power_of_2(num_rows), max(1, 16384 // block_n))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=1)
    # Small rows are packed several to a program so that each moves ~2K elements. Not
    # yet tuned by timing on a GPU.
    block_m = min(next_power_of_2(num_rows), max(1, 2048 // block_n))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_warps(block_m * block_n, 16))


def _backward_config(num_rows: int, num_features: int, device: torch.device) -> dict:
    """Tile (BLOCK_M, BLOCK_N, num_warps) and program count for the backward kernel."""
    block_n = _block_n(num_features)
    if interpreter_enabled():
        # Small row blocks and two programs, so that the row loop and the cross-program
        # reduction of the weight gradients both run in the CPU tests.
        block_m = min(next_power_of_2(num_rows), max(1, min(16, 4096 // block_n)))
        return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=1, programs=2)
    # The backward holds more per row (s, dy, x_hat, two accumulators): smaller tiles.
    # A few programs per SM; each writes one row of weight-gradient partial sums. Not yet
    # tuned by timing on a GPU.
    block_m = min(next_power_of_2(num_rows), max(1, 1024 // block_n))
    warps = _warps(block_m * block_n, 8)
    programs = _multiprocessors(device) * max(1, min(4, 16 // warps))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, programs=programs)


@functools.lru_cache(maxsize=None)
def _multiprocessors_of(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _multiprocessors_of(index)


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _row_range(first_row, row_end, BLOCK_M: tl.constexpr):
    """Row indices (int64) ``first_row + [0, BLOCK_M)`` and which are below ``row_end``."""
    rows = first_row + tl.arange(0, BLOCK_M).to(tl.int64)
    return rows, rows < row_end


@triton.jit
def _load_rows(T, rows, cols, stride_row, mask):
    """The [rows, cols] tile of a (rows, N) tensor with unit feature stride, as float32
    (0 where masked)."""
    return tl.load(T + rows[:, None] * stride_row + cols[None, :], mask=mask,
                   other=0.0).to(tl.float32)


@triton.jit
def _store_rows(T, rows, cols, stride_row, value, mask):
    """Store ``value``, cast to T's dtype, into the [rows, cols] tile of T."""
    tl.store(T + rows[:, None] * stride_row + cols[None, :], value.to(T.dtype.element_ty),
             mask=mask)


@triton.jit
def _load_sum(X, Residual, rows, cols, stride_x, stride_r, mask, HAS_RESIDUAL: tl.constexpr):
    """s = x + residual (or x) over the tile, in float32."""
    s = _load_rows(X, rows, cols, stride_x, mask)
    if HAS_RESIDUAL:
        s += _load_rows(Residual, rows, cols, stride_r, mask)
    return s


@triton.jit
def _load_features(T, cols, col_in):
    """A length-N parameter vector (weight or bias), as float32."""
    return tl.load(T + cols, mask=col_in, other=0.0).to(tl.float32)


@triton.jit
def _layer_norm_forward_kernel(
    X, Residual, Weight, Bias, Y, Sum, Mean, Rstd,
    stride_x, stride_r, stride_y, stride_s,
    num_rows, num_features, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    STORE_SUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, row_in = _row_range(tl.program_id(0).to(tl.int64) * BLOCK_M, num_rows, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_in = cols < num_features
    tile_in = row_in[:, None] & col_in[None, :]
    s = _load_sum(X, Residual, rows, cols, stride_x, stride_r, tile_in, HAS_RESIDUAL)
    if STORE_SUM:
        # Normalize the sum as stored (rounded to its dtype): the backward then needs only
        # the stored sum, not x and residual.
        s = s.to(Sum.dtype.element_ty)
        _store_rows(Sum, rows, cols, stride_s, s, tile_in)
        s = s.to(tl.float32)

    mean = tl.sum(s, 1) / num_features
    # Two passes over registers: the variance of the centered values, never E[s^2] - mean^2.
    centered = tl.where(tile_in, s - mean[:, None], 0.0)
    variance = tl.sum(centered * centered, 1) / num_features
    rstd = 1.0 / tl.sqrt(variance + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y = y * _load_features(Weight, cols, col_in)[None, :]
    if HAS_BIAS:
        y = y + _load_features(Bias, cols, col_in)[None, :]
    _store_rows(Y, rows, cols, stride_y, y, tile_in)
    tl.store(Mean + rows, mean, mask=row_in)
    tl.store(Rstd + rows, rstd, mask=row_in)


@triton.jit
def _layer_norm_backward_kernel(
    GradY, GradSumIn, X, Residual, Weight, Mean, Rstd, GradSum, PartialWeight, PartialBias,
    stride_gy, stride_gsi, stride_x, stride_r, stride_gs,
    num_rows, num_features, rows_per_program,
    HAS_GRAD_SUM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    program = tl.program_id(0)
    row_begin = program.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, num_rows)
    cols = tl.arange(0, BLOCK_N)
    col_in = cols < num_features
    if HAS_WEIGHT:
        weight = _load_features(Weight, cols, col_in)
    grad_weight = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    grad_bias = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)

    for first_row in range(row_begin, row_end, BLOCK_M):
        rows, row_in = _row_range(first_row, row_end, BLOCK_M)
        tile_in = row_in[:, None] & col_in[None, :]
        s = _load_sum(X, Residual, rows, cols, stride_x, stride_r, tile_in, HAS_RESIDUAL)
        mean = tl.load(Mean + rows, mask=row_in, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_in, other=0.0)
        x_hat = tl.where(tile_in, (s - mean[:, None]) * rstd[:, None], 0.0)
        grad_y = _load_rows(GradY, rows, cols, stride_gy, tile_in)
        if WEIGHT_GRAD:
            grad_weight += grad_y * x_hat
        if BIAS_GRAD:
            grad_bias += grad_y
        if HAS_WEIGHT:
            grad_x_hat = grad_y * weight[None, :]
        else:
            grad_x_hat = grad_y
        mean_grad = tl.sum(grad_x_hat, 1) / num_features
        mean_grad_x_hat = tl.sum(grad_x_hat * x_hat, 1) / num_features
        grad_s = (grad_x_hat - mean_grad[:, None] - x_hat * mean_grad_x_hat[:, None]) \
            * rstd[:, None]
        if HAS_GRAD_SUM:
            grad_s += _load_rows(GradSumIn, rows, cols, stride_gsi, tile_in)
        _store_rows(GradSum, rows, cols, stride_gs, grad_s, tile_in)

    partial = program.to(tl.int64) * num_features + cols
    if WEIGHT_GRAD:
        tl.store(PartialWeight + partial, tl.sum(grad_weight, 0), mask=col_in)
    if BIAS_GRAD:
        tl.store(PartialBias + partial, tl.sum(grad_bias, 0), mask=col_in)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _as_vector(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if tensor is None else tensor.contiguous()


def layer_norm_forward(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], eps: float, store_sum: bool, config: Optional[dict] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel over the last dimension of x (any leading shape).

    Returns (y, s, mean, rstd): y shaped like x in x's dtype; s = x + residual shaped like
    x in x's dtype when ``store_sum`` (y is then the normalization of this rounded s),
    else an empty tensor (y normalizes the float32 sum); mean and rstd float32, shaped
    ``x.shape[:-1]``. ``config`` overrides BLOCK_M, BLOCK_N and num_warps.
    """
    num_features = x.shape[-1]
    x_rows = as_rows(x)
    num_rows = x_rows.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty(x.shape if store_sum else (0,), dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if num_rows == 0 or num_features == 0:
        return y, s, mean, rstd
    residual_rows = as_rows(residual) if residual is not None else x_rows
    weight, bias = _as_vector(weight), _as_vector(bias)
    y_rows = y.view(num_rows, num_features)
    s_rows = s.view(num_rows, num_features) if store_sum else y_rows
    config = config or _forward_config(num_rows, num_features)
    grid = (cdiv(num_rows, config["BLOCK_M"]),)
    _layer_norm_forward_kernel[grid](
        x_rows, residual_rows, weight if weight is not None else x_rows,
        bias if bias is not None else x_rows, y_rows, s_rows, mean, rstd,
        x_rows.stride(0), residual_rows.stride(0), y_rows.stride(0), s_rows.stride(0),
        num_rows, num_features, float(eps),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, STORE_SUM=store_sum, **config,
    )
    return y, s, mean, rstd


def layer_norm_backward(
    grad_y: torch.Tensor, grad_sum: Optional[torch.Tensor], x: torch.Tensor,
    residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    need_weight_grad: bool, need_bias_grad: bool, config: Optional[dict] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel. Returns (grad_s, grad_weight, grad_bias): grad_s, the
    gradient of both x and residual, shaped like x in x's dtype; grad_weight and
    grad_bias shaped (N,) in the weight's and bias's dtypes, or None where not asked for
    (or where the parameter is None). ``grad_sum`` is the gradient flowing into the stored
    sum, or None. ``config`` overrides BLOCK_M, BLOCK_N, num_warps and programs.
    """
    num_features = x.shape[-1]
    x_rows = as_rows(x)
    num_rows = x_rows.shape[0]
    need_weight_grad = need_weight_grad and weight is not None
    need_bias_grad = need_bias_grad and bias is not None
    grad_s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    grad_weight = grad_bias = None
    if num_rows == 0 or num_features == 0:
        if need_weight_grad and weight is not None:
            grad_weight = torch.zeros_like(weight)
        if need_bias_grad and bias is not None:
            grad_bias = torch.zeros_like(bias)
        return grad_s, grad_weight, grad_bias

    residual_rows = as_rows(residual) if residual is not None else x_rows
    grad_y_rows = as_rows(grad_y)
    grad_sum_rows = as_rows(grad_sum) if grad_sum is not None else grad_y_rows
    grad_s_rows = grad_s.view(num_rows, num_features)
    weight = _as_vector(weight)
    config = dict(config or _backward_config(num_rows, num_features, x.device))
    block_m = config["BLOCK_M"]
    # Contiguous ranges of whole row blocks, one per program.
    programs = max(1, min(config.pop("programs"), cdiv(num_rows, block_m)))
    rows_per_program = cdiv(cdiv(num_rows, programs), block_m) * block_m
    programs = cdiv(num_rows, rows_per_program)
    partial_weight = torch.empty((programs, num_features) if need_weight_grad else (0,),
                                 dtype=torch.float32, device=x.device)
    partial_bias = torch.empty((programs, num_features) if need_bias_grad else (0,),
                               dtype=torch.float32, device=x.device)
    _layer_norm_backward_kernel[(programs,)](
        grad_y_rows, grad_sum_rows, x_rows, residual_rows,
        weight if weight is not None else x_rows, mean, rstd, grad_s_rows,
        partial_weight, partial_bias,
        grad_y_rows.stride(0), grad_sum_rows.stride(0), x_rows.stride(0),
        residual_rows.stride(0), grad_s_rows.stride(0),
        num_rows, num_features, rows_per_program,
        HAS_GRAD_SUM=grad_sum is not None, HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None, WEIGHT_GRAD=need_weight_grad, BIAS_GRAD=need_bias_grad,
        **config,
    )
    if need_weight_grad and weight is not None:
        grad_weight = partial_weight.sum(0).to(weight.dtype)
    if need_bias_grad and bias is not None:
        grad_bias = partial_bias.sum(0).to(bias.dtype)
    return grad_s, grad_weight, grad_bias


# --------------------------------------------------------------------------------------
# Autograd and torch.library registration
# --------------------------------------------------------------------------------------
# Two doors to the same launchers, as for attention: a plain autograd.Function for eager
# mode (least per-call overhead) and torch.library custom ops that torch.compile traces
# as opaque nodes. With ``store_sum`` both save the stored sum (the forward normalized it
# as stored) and the backward runs on it as a residual-free input; otherwise they save x
# and residual, and the backward recomputes the float32 sum.


def _save_for_backward(ctx, x, residual, weight, bias, store_sum, s, mean, rstd) -> None:
    if store_sum:
        ctx.save_for_backward(*savable(s, None, weight, bias, mean, rstd))
    else:
        ctx.save_for_backward(*savable(x, residual, weight, bias, mean, rstd))
    ctx.store_sum = store_sum
    ctx.has_residual = residual is not None


def _backward(ctx, backward, grad_y, grad_sum):
    """Input gradients (x, residual, weight, bias, eps, store_sum) from the saved
    tensors, with ``backward`` the launcher or its custom op."""
    x, residual, weight, bias, mean, rstd = ctx.saved_tensors
    need_x, need_residual, need_weight, need_bias = ctx.needs_input_grad[:4]
    if grad_y is None:
        grad_y = torch.zeros_like(x)
    grad_s, grad_weight, grad_bias = backward(
        grad_y, grad_sum if ctx.store_sum else None, x, residual, weight, bias, mean, rstd,
        need_weight and weight is not None, need_bias and bias is not None)
    # x and residual have the same dtype (checked in blipfast.ops): one gradient for both.
    grad_residual = grad_s if ctx.has_residual and need_residual else None
    return (grad_s if need_x else None, grad_residual,
            grad_weight if need_weight and weight is not None else None,
            grad_bias if need_bias and bias is not None else None, None, None)


class LayerNormFunction(torch.autograd.Function):
    """Eager-mode autograd for the fused add + LayerNorm kernels. Returns (y, s), with s
    empty unless ``store_sum``."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, store_sum):
        y, s, mean, rstd = layer_norm_forward(x, residual, weight, bias, eps, store_sum)
        _save_for_backward(ctx, x, residual, weight, bias, store_sum, s, mean, rstd)
        if not store_sum:
            ctx.mark_non_differentiable(s)
        return y, s

    @staticmethod
    @first_derivative_only("blipfast.ops.layer_norm / add_layer_norm")  # a second derivative raises
    def backward(ctx, grad_y, grad_sum):
        return _backward(ctx, layer_norm_backward, grad_y, grad_sum)


@torch.library.custom_op("blipfast::layer_norm_forward", mutates_args=())
def layer_norm_forward_op(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], eps: float, store_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.library op: fused add + LayerNorm forward, returning (y, s, mean, rstd); s is
    empty unless ``store_sum``. Differentiable in x, residual, weight and bias."""
    return layer_norm_forward(x, residual, weight, bias, eps, store_sum)


@layer_norm_forward_op.register_fake
def _layer_norm_forward_fake(x, residual, weight, bias, eps, store_sum):
    return (x.new_empty(x.shape), x.new_empty(x.shape if store_sum else (0,)),
            x.new_empty(x.shape[:-1], dtype=torch.float32),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.custom_op("blipfast::layer_norm_backward", mutates_args=())
def layer_norm_backward_op(
    grad_y: torch.Tensor, grad_sum: Optional[torch.Tensor], x: torch.Tensor,
    residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    need_weight_grad: bool, need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.library op: (grad_s, grad_weight, grad_bias); a parameter gradient that is
    not needed (or whose parameter is None) comes back empty."""
    grad_s, grad_weight, grad_bias = layer_norm_backward(
        grad_y, grad_sum, x, residual, weight, bias, mean, rstd, need_weight_grad,
        need_bias_grad)
    return (grad_s, grad_weight if grad_weight is not None else x.new_empty(0),
            grad_bias if grad_bias is not None else x.new_empty(0))


@layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(grad_y, grad_sum, x, residual, weight, bias, mean, rstd,
                              need_weight_grad, need_bias_grad):
    return (x.new_empty(x.shape),
            weight.new_empty(weight.shape) if need_weight_grad and weight is not None
            else x.new_empty(0),
            bias.new_empty(bias.shape) if need_bias_grad and bias is not None
            else x.new_empty(0))


def _op_setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, store_sum = inputs
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    if not store_sum:
        ctx.mark_non_differentiable(s)
    _save_for_backward(ctx, x, residual, weight, bias, store_sum, s, mean, rstd)


def _op_backward(ctx, grad_y, grad_sum, _grad_mean, _grad_rstd):
    return _backward(ctx, layer_norm_backward_op, grad_y, grad_sum)


layer_norm_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def fused_layer_norm(x, residual, weight, bias, eps: float,
                     store_sum: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the fused kernels with autograd: the custom op under torch.compile, the
    autograd.Function in eager mode. Returns (y, s), s empty unless ``store_sum``."""
    if torch.compiler.is_compiling():
        y, s, _, _ = layer_norm_forward_op(x, residual, weight, bias, eps, store_sum)
        return y, s
    if not needs_autograd(x, residual, weight, bias):
        y, s, _, _ = layer_norm_forward(x, residual, weight, bias, eps, store_sum)
        return y, s
    return LayerNormFunction.apply(x, residual, weight, bias, eps, store_sum)
