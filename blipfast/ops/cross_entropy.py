"""The public fused cross-entropy op: argument checking and dispatch."""

from __future__ import annotations

import torch

from blipfast import reference
from blipfast.kernels import cross_entropy as cross_entropy_kernels
from blipfast.ops._checks import check_supported_tensor, check_values, type_name
from blipfast.ops._dispatch import savable_by_autograd, use_triton

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of integer labels under logits over the last dimension, with label
    smoothing, in one Triton pass forward and one backward: the language-model loss.

    Equals ``F.cross_entropy(logits.reshape(-1, V).float(), labels.reshape(-1),
    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)``
    (reshaped back to ``labels.shape`` for ``"none"``), computed in float32 without
    copying bf16/fp16 logits to float32 and without keeping a float32 log-softmax for the
    backward: it keeps the logits and one float32 log-sum-exp per row, and recomputes the
    softmax in the backward (on the Triton path; the PyTorch reference path, CPU without
    ``TRITON_INTERPRET=1``, is ``F.cross_entropy`` on float32 logits, with its memory).

    Shapes and layouts:
        logits: (..., V) with at least 2 dimensions, e.g. (N, V) or (B, T, V). For (N, V)
            and (B, T, V) any strides over the leading dimensions are read in place (the
            shifted ``logits[:, :-1]`` of a language model, for one); a last dimension whose
            stride is not 1, or more leading dimensions that do not collapse, are copied.
        labels: ``logits.shape[:-1]``, int64 or int32, any strides. Entries equal to
            ``ignore_index`` contribute nothing (loss and gradient 0).

    Returns:
        float32: a scalar for ``"mean"`` (the sum over rows not ignored divided by their
        count, NaN when every row is ignored, as PyTorch) and ``"sum"``, or the per-row
        losses shaped like ``labels`` for ``"none"``.

    A logit of -inf (a masked class) is left out of the softmax, as in
    ``F.cross_entropy`` (with label smoothing its log-probability -inf enters the
    smoothing term: an infinite loss, as PyTorch's); +inf or NaN logits give a non-finite
    loss. A label outside [0, V) other than
    ``ignore_index`` raises (on CUDA: fails a device-side assertion, as PyTorch's does, so
    that the check needs no host synchronisation). Where values are not checked (while
    torch.compile traces or a CUDA graph is captured) such a row's loss is NaN; the
    kernels never read outside the logits.

    Dtypes: logits float16, bfloat16 or float32; the gradient has the logits' dtype.

    Where it runs: CUDA tensors run the Triton kernels; CPU tensors run them through the
    Triton interpreter when ``TRITON_INTERPRET=1``, and the PyTorch reference
    (:func:`blipfast.reference.cross_entropy`) otherwise. Traceable by torch.compile (a
    custom op).

    Raises:
        TypeError: logits not a tensor of a supported float dtype; labels not an int64 or
            int32 tensor; ignore_index not an int; label_smoothing not a number.
        ValueError: logits with fewer than 2 dimensions or an empty last dimension; labels
            not shaped ``logits.shape[:-1]`` or on another device; label values outside
            [0, V) other than ignore_index (CPU); label_smoothing outside [0, 1]; an
            unknown reduction.
    """
    _check_arguments(logits, labels, ignore_index, label_smoothing, reduction)
    int32 = torch.iinfo(torch.int32)
    if labels.dtype == torch.int32 and not int32.min <= ignore_index <= int32.max:
        # Comparing int32 labels with it would wrap it into int32's range (2**32 + 5 -> 5).
        labels = labels.long()
    _check_label_values(labels, logits.shape[-1], ignore_index)
    label_smoothing = float(label_smoothing)
    if not use_triton(logits.device, logits, op="cross_entropy"):
        return reference.cross_entropy(logits, savable_by_autograd(labels),
                                       ignore_index=ignore_index,
                                       label_smoothing=label_smoothing, reduction=reduction)
    labels_shape = labels.shape
    if logits.stride(-1) != 1 and logits.shape[-1] > 1:
        logits = logits.contiguous()
    if logits.dim() > 3:
        logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    losses = cross_entropy_kernels.fused_cross_entropy(logits, labels, int(ignore_index),
                                                       label_smoothing)
    if reduction == "none":
        return losses.reshape(labels_shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (labels != ignore_index).sum()


def _check_arguments(logits, labels, ignore_index, label_smoothing, reduction) -> None:
    op = "cross_entropy"
    check_supported_tensor(op, "logits", logits)
    if logits.dim() < 2 or logits.shape[-1] == 0:
        raise ValueError(f"{op}: logits must have shape (..., V) with at least 2 dimensions "
                         f"and V > 0, got {tuple(logits.shape)}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{op}: labels must be a torch.Tensor, got {type_name(labels)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: labels must have dtype int64 or int32, got {labels.dtype}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"{op}: labels must have shape logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels are on {labels.device} but logits on {logits.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{op}: ignore_index must be an int, got {type_name(ignore_index)}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"{op}: label_smoothing must be a float, got "
                        f"{type_name(label_smoothing)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must lie in [0, 1], got {label_smoothing}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_label_values(labels: torch.Tensor, vocabulary: int, ignore_index: int) -> None:
    """Every label lies in [0, vocabulary) or equals ``ignore_index`` (see
    :func:`~blipfast.ops._checks.check_values` for where and how this is checked)."""
    def outside(labels: torch.Tensor) -> torch.Tensor:
        return ((labels < 0) | (labels >= vocabulary)) & (labels != ignore_index)

    def found(labels: torch.Tensor) -> str:
        values = labels[outside(labels)].unique()[:5].tolist()
        return "got " + ", ".join(str(value) for value in values)

    check_values(labels, lambda labels: ~outside(labels),
                 lambda: f"cross_entropy: labels must lie in [0, {vocabulary}) (the last "
                         f"dimension of logits) or equal ignore_index ({ignore_index})",
                 found=found)
