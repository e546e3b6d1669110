"""Facts about where kernels run, and layout helpers, shared by the launchers (and
``blipfast.ops``)."""

from __future__ import annotations

import functools
import os
from typing import Callable

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


def savable(*tensors):
    """``tensors`` (None entries kept) as ``ctx.save_for_backward`` can take them: a tensor
    made under ``torch.inference_mode`` is cloned (autograd refuses to save one), so an
    inference-mode mask, bias, index or label tensor works in training as it does with
    the PyTorch ops these kernels replace (SDPA's mask, ``gelu(x + bias)``), which do not
    save it. Any other tensor is passed as it is."""
    return tuple(tensor.clone() if tensor is not None and tensor.is_inference() else tensor
                 for tensor in tensors)


class _SecondDerivativeRefused(torch.autograd.Function):
    """First-order gradients passed through unchanged (as copies), tied in the graph to
    what they were computed from; differentiating them raises."""

    @staticmethod
    def forward(ctx, message: str, count: int, *tensors: torch.Tensor):
        ctx.message = message
        return tuple(tensor.clone() for tensor in tensors[:count])

    @staticmethod
    def backward(ctx, *gradients):
        raise RuntimeError(ctx.message)


KERNEL_REMEDY = ("Run the op on its PyTorch reference for that (blipfast.reference, or CPU "
                 "tensors without TRITON_INTERPRET).")


class _SavedOnce:
    """An autograd context whose ``saved_tensors`` were already unpacked: ``saved`` is
    returned for them; every other attribute is the context's."""

    def __init__(self, ctx, saved: tuple) -> None:
        self._ctx, self.saved_tensors = ctx, saved

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)


def first_derivative_only(op: str, why: str = "the Triton path's backward is not "
                          "differentiable", remedy: str = KERNEL_REMEDY) -> Callable:
    """Decorator for an ``autograd.Function.backward`` computed by kernels that autograd
    cannot differentiate. Under ``create_graph=True`` the gradients it returns are tied to
    the backward's inputs (incoming gradients, saved tensors) through a node that raises
    when differentiated, so a second derivative raises however it is asked for.
    (``torch.autograd.function.once_differentiable`` ties them to nothing: a
    ``torch.autograd.grad(penalty, inputs)`` that also reaches the inputs another way
    silently returned gradients without the second-order terms through the op.) Without
    ``create_graph`` it costs one check. The error names ``op``, ``why`` and ``remedy``."""
    message = (f"{op}: cannot differentiate twice: {why} (a gradient penalty or a "
               f"meta-gradient through it needs its second derivative). {remedy}").rstrip()

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if not torch.is_grad_enabled():
                return backward(ctx, *grad_outputs)
            # create_graph=True: the saved tensors are unpacked once (saved-tensor hooks,
            # activation checkpointing's among them, may allow only one unpacking) and
            # handed to the backward through a view of ctx.
            saved = ctx.saved_tensors
            with torch.no_grad():
                gradients = backward(_SavedOnce(ctx, saved), *grad_outputs)
            sources = [tensor for tensor in (*grad_outputs, *saved)
                       if isinstance(tensor, torch.Tensor) and tensor.requires_grad]
            computed = [index for index, gradient in enumerate(gradients)
                        if isinstance(gradient, torch.Tensor)]
            if not sources or not computed:
                return gradients
            tied = _SecondDerivativeRefused.apply(
                message, len(computed), *(gradients[index] for index in computed), *sources)
            result = list(gradients)
            for index, gradient in zip(computed, tied):
                result[index] = gradient
            return tuple(result)

        return wrapper

    return decorate
