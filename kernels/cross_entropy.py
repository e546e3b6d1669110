"""Cross-entropy over a vocabulary in Triton, with label smoothing: forward and backward.

The problem is a batch of rows of logits over V classes, each row with one integer
label, as ``torch.nn.functional.cross_entropy`` computes it:

    lse = log(sum_j exp(x_j))
    loss = (1 - eps) * (lse - x_label) + eps * (lse - mean_j x_j)      (label smoothing eps)
    d loss / d x_j = softmax(x)_j - (1 - eps) * [j == label] - eps / V

The log-sum-exp is kept as two numbers, the row's largest logit m and log(sum_j exp(x_j -
m)), so that m cancels exactly in ``x - lse`` and ``lse - x_label`` (as in PyTorch's
log_softmax): one stored log-sum-exp of the logits' size would carry |m| * 6e-8 of
rounding into every probability, and into the loss and gradient of a confident row,
tens of times PyTorch's own float32 error.

Rows whose label is ``ignore_index`` have loss 0 and gradient 0. A label outside [0, V)
that is not ``ignore_index`` gives a NaN loss (PyTorch raises; a kernel cannot, and a
wrong finite loss would go unnoticed). All arithmetic is float32 whatever the logits'
dtype, so bf16 logits are read as they are, never copied to float32.

Memory: the forward keeps the logits (which the LM head produced anyway) and two float32
numbers per row (its log-sum-exp); PyTorch's float32 path keeps a float32 copy of the
log-softmax, twice the size of bf16 logits. The backward reads the logits again and writes the gradient.

Layout: logits (B, T, V) with any strides for B and T and unit stride over V (e.g. the
shifted ``logits[:, :-1]`` of a language model, read in place), labels (B, T) with any
strides. A 2-D problem is passed as (1, N, V).

Kernels:
- ``_cross_entropy_forward_kernel``: one program per row, walking the vocabulary BLOCK_V
  classes at a time with an online log-sum-exp; stores the row's loss and log-sum-exp
  (its two parts).
- ``_cross_entropy_backward_kernel``: one program per (row, block of BLOCK_V classes),
  storing that block of the gradient, scaled by the row's gradient of the loss.

This file knows nothing of models. Launchers take validated tensors; argument checking
lives in ``blipfast.ops``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from blipfast.kernels._alignment import known_multiple, stride_multiple
from blipfast.kernels._runtime import (
    cdiv, first_derivative_only, interpreter_enabled, needs_autograd, next_power_of_2,
    savable)


def _block_v(vocabulary: int) -> int:
    """Classes per step: small on the interpreter (so that the CPU tests cross several
    blocks), 4096 on a GPU (not yet tuned by timing)."""
    limit = 64 if interpreter_enabled() else 4096
    return min(limit, max(16, next_power_of_2(vocabulary)))


def _warps(block_v: int) -> int:
    return 1 if interpreter_enabled() else max(1, min(8, block_v // 512))


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


@triton.jit
def _row_pointers(Logits, Labels, row, rows_per_batch, stride_lb, stride_lt, stride_yb,
                  stride_yt, STRIDE_MULTIPLE: tl.constexpr):
    """The start of a row's logits, its label, and its (batch, time) position. The logits'
    strides are multiples of STRIDE_MULTIPLE, which the compiler is shown so that the
    row's loads are vectors (``blipfast.kernels._alignment``)."""
    batch = row // rows_per_batch
    step = row - batch * rows_per_batch
    label = tl.load(Labels + batch * stride_yb + step * stride_yt)
    logits = Logits + batch * known_multiple(stride_lb, STRIDE_MULTIPLE) \
        + step * known_multiple(stride_lt, STRIDE_MULTIPLE)
    return logits, label, batch, step


@triton.jit
def _cross_entropy_forward_kernel(
    Logits, Labels, Loss, RowStatistics,
    num_rows, rows_per_batch, vocabulary, stride_lb, stride_lt, stride_yb, stride_yt,
    ignore_index, label_smoothing,
    BLOCK_V: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr,
):
    # The vocabulary as the multiple it is: the masks of the row's vector loads.
    vocabulary = known_multiple(vocabulary, STRIDE_MULTIPLE)
    row = tl.program_id(0).to(tl.int64)
    logits, label, _, _ = _row_pointers(Logits, Labels, row, rows_per_batch, stride_lb,
                                        stride_lt, stride_yb, stride_yt, STRIDE_MULTIPLE)
    # Online log-sum-exp: running maximum and sum of exp(x - maximum), per lane.
    maximum = tl.full([BLOCK_V], float("-inf"), dtype=tl.float32)
    exp_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    logit_sum = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in range(0, vocabulary, BLOCK_V):
        classes = start + tl.arange(0, BLOCK_V)
        in_range = classes < vocabulary
        x = tl.load(logits + classes, mask=in_range, other=float("-inf")).to(tl.float32)
        new_maximum = tl.maximum(maximum, x)
        # Lanes still at -inf (no class seen yet) shift by 0 instead: exp(-inf) = 0, where
        # exp(-inf - -inf) would be NaN.
        shift = tl.where(new_maximum == float("-inf"), 0.0, new_maximum)
        exp_sum = exp_sum * tl.exp(maximum - shift) + tl.exp(x - shift)
        maximum = new_maximum
        logit_sum += tl.where(in_range, x, 0.0)
    row_maximum = tl.max(maximum, 0)
    row_shift = tl.where(row_maximum == float("-inf"), 0.0, row_maximum)
    # log(sum_j exp(x_j - row maximum)): the log-sum-exp less the row's maximum
    log_sum = tl.log(tl.sum(exp_sum * tl.exp(maximum - row_shift), 0))

    ignored = label == ignore_index
    in_vocabulary = (label >= 0) & (label < vocabulary)
    safe_label = tl.where(in_vocabulary, label, 0).to(tl.int64)
    target = tl.load(logits + safe_label).to(tl.float32)
    loss = (1.0 - label_smoothing) * ((row_shift - target) + log_sum)
    # Without smoothing the logits' mean takes no part: a masked (-inf) class would make
    # it 0 * inf = NaN, where F.cross_entropy leaves that class out.
    smoothing = label_smoothing * ((row_shift - tl.sum(logit_sum, 0) / vocabulary) + log_sum)
    loss += tl.where(label_smoothing != 0.0, smoothing, 0.0)
    loss = tl.where(in_vocabulary, loss, float("nan"))
    tl.store(Loss + row, tl.where(ignored, 0.0, loss))
    tl.store(RowStatistics + row, row_shift)
    tl.store(RowStatistics + num_rows + row, log_sum)


@triton.jit
def _cross_entropy_backward_kernel(
    Logits, Labels, RowStatistics, RowScale, GradLogits,
    num_rows, rows_per_batch, vocabulary, stride_lb, stride_lt, stride_yb, stride_yt,
    stride_gb, stride_gt, ignore_index, label_smoothing,
    BLOCK_V: tl.constexpr, STRIDE_MULTIPLE: tl.constexpr,
):
    vocabulary = known_multiple(vocabulary, STRIDE_MULTIPLE)
    row = tl.program_id(0).to(tl.int64)
    logits, label, batch, step = _row_pointers(Logits, Labels, row, rows_per_batch, stride_lb,
                                               stride_lt, stride_yb, stride_yt, STRIDE_MULTIPLE)
    grad = GradLogits + batch * known_multiple(stride_gb, STRIDE_MULTIPLE) \
        + step * known_multiple(stride_gt, STRIDE_MULTIPLE)
    classes = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_range = classes < vocabulary
    x = tl.load(logits + classes, mask=in_range, other=0.0).to(tl.float32)
    maximum, log_sum = tl.load(RowStatistics + row), tl.load(RowStatistics + num_rows + row)
    probability = tl.exp((x - maximum) - log_sum)
    target = tl.where(classes == label, 1.0 - label_smoothing, 0.0)
    scale = tl.load(RowScale + row)
    scale = tl.where(label == ignore_index, 0.0, scale)
    grad_x = scale * (probability - target - label_smoothing / vocabulary)
    tl.store(grad + classes, grad_x.to(GradLogits.dtype.element_ty), mask=in_range)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------


def _as_three_dimensional(logits: torch.Tensor, labels: torch.Tensor):
    """(B, T, V) logits and (B, T) labels from (N, V) / (N,) or (B, T, V) / (B, T)."""
    if logits.dim() == 2:
        return logits.unsqueeze(0), labels.unsqueeze(0)
    return logits, labels


def cross_entropy_forward(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                          label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. ``logits`` (N, V) or (B, T, V) with unit stride over V,
    ``labels`` (N,) or (B, T). Returns the loss per row, shaped like ``labels`` (ignored
    rows 0), and the row statistics the backward reads, (2, *labels.shape): each row's
    largest logit and log(sum exp(logits - it)); both float32."""
    loss = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    row_statistics = torch.empty((2, *labels.shape), dtype=torch.float32, device=logits.device)
    if labels.numel() == 0:
        return loss, row_statistics
    logits3, labels3 = _as_three_dimensional(logits, labels)
    block_v = _block_v(logits.shape[-1])
    _cross_entropy_forward_kernel[(labels.numel(),)](
        logits3, labels3, loss, row_statistics,
        labels.numel(), labels3.shape[1], logits.shape[-1], logits3.stride(0), logits3.stride(1),
        labels3.stride(0), labels3.stride(1), ignore_index, float(label_smoothing),
        BLOCK_V=block_v, num_warps=_warps(block_v),
        STRIDE_MULTIPLE=stride_multiple(logits3, sizes=(logits.shape[-1],)),
    )
    return loss, row_statistics


def cross_entropy_backward(grad_loss: torch.Tensor, logits: torch.Tensor,
                           labels: torch.Tensor, row_statistics: torch.Tensor,
                           ignore_index: int, label_smoothing: float) -> torch.Tensor:
    """Launch the backward kernel. ``grad_loss``: the gradient of each row's loss, shaped
    like ``labels`` (any strides, e.g. an expanded scalar). Returns the logits' gradient,
    contiguous, in the logits' dtype."""
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if labels.numel() == 0:
        return grad_logits
    logits3, labels3 = _as_three_dimensional(logits, labels)
    grad3, _ = _as_three_dimensional(grad_logits, labels)
    row_scale = grad_loss.to(torch.float32).expand(labels.shape).contiguous()
    vocabulary = logits.shape[-1]
    block_v = _block_v(vocabulary)
    grid = (labels.numel(), cdiv(vocabulary, block_v))
    _cross_entropy_backward_kernel[grid](
        logits3, labels3, row_statistics, row_scale, grad3,
        labels.numel(), labels3.shape[1], vocabulary, logits3.stride(0), logits3.stride(1),
        labels3.stride(0), labels3.stride(1), grad3.stride(0), grad3.stride(1),
        ignore_index, float(label_smoothing),
        BLOCK_V=block_v, num_warps=_warps(block_v),
        STRIDE_MULTIPLE=stride_multiple(logits3, grad3, sizes=(vocabulary,)),
    )
    return grad_logits


# --------------------------------------------------------------------------------------
# Autograd and torch.library registration
# --------------------------------------------------------------------------------------
# As for the other kernels: a plain autograd.Function in eager mode and torch.library
# custom ops for torch.compile. Both return the per-row losses; the reduction (mean over
# rows that are not ignored, or sum) is done by torch on that small vector.


class CrossEntropyFunction(torch.autograd.Function):
    """Eager-mode autograd for the fused cross-entropy kernels: per-row losses."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing):
        loss, row_statistics = cross_entropy_forward(logits, labels, ignore_index,
                                                     label_smoothing)
        ctx.save_for_backward(*savable(logits, labels, row_statistics))
        ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing
        return loss

    @staticmethod
    @first_derivative_only("blipfast.ops.cross_entropy")  # a second derivative raises
    def backward(ctx, grad_loss):
        logits, labels, row_statistics = ctx.saved_tensors
        grad_logits = cross_entropy_backward(grad_loss, logits, labels, row_statistics,
                                             ctx.ignore_index, ctx.label_smoothing)
        return grad_logits, None, None, None


@torch.library.custom_op("blipfast::cross_entropy_forward", mutates_args=())
def cross_entropy_forward_op(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                             label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.library op: (per-row loss, row statistics (2, *labels.shape)), float32."""
    return cross_entropy_forward(logits, labels, ignore_index, label_smoothing)


@cross_entropy_forward_op.register_fake
def _cross_entropy_forward_fake(logits, labels, ignore_index, label_smoothing):
    return (logits.new_empty(labels.shape, dtype=torch.float32),
            logits.new_empty((2, *labels.shape), dtype=torch.float32))


@torch.library.custom_op("blipfast::cross_entropy_backward", mutates_args=())
def cross_entropy_backward_op(grad_loss: torch.Tensor, logits: torch.Tensor,
                              labels: torch.Tensor, row_statistics: torch.Tensor,
                              ignore_index: int, label_smoothing: float) -> torch.Tensor:
    """torch.library op: the logits' gradient."""
    return cross_entropy_backward(grad_loss, logits, labels, row_statistics, ignore_index,
                                  label_smoothing)


@cross_entropy_backward_op.register_fake
def _cross_entropy_backward_fake(grad_loss, logits, labels, row_statistics, ignore_index,
                                 label_smoothing):
    return logits.new_empty(logits.shape)


def _op_setup_context(ctx, inputs, output):
    logits, labels, ignore_index, label_smoothing = inputs
    _, row_statistics = output
    ctx.mark_non_differentiable(row_statistics)
    ctx.save_for_backward(*savable(logits, labels, row_statistics))
    ctx.ignore_index, ctx.label_smoothing = ignore_index, label_smoothing


def _op_backward(ctx, grad_loss, _grad_row_statistics):
    logits, labels, row_statistics = ctx.saved_tensors
    grad_logits = cross_entropy_backward_op(grad_loss, logits, labels, row_statistics,
                                            ctx.ignore_index, ctx.label_smoothing)
    return grad_logits, None, None, None


cross_entropy_forward_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def fused_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                        label_smoothing: float) -> torch.Tensor:
    """Per-row losses with autograd: the custom op under torch.compile, the
    autograd.Function in eager mode."""
    if torch.compiler.is_compiling():
        return cross_entropy_forward_op(logits, labels, ignore_index, label_smoothing)[0]
    if not needs_autograd(logits):
        return cross_entropy_forward(logits, labels, ignore_index, label_smoothing)[0]
    return CrossEntropyFunction.apply(logits, labels, ignore_index, label_smoothing)

