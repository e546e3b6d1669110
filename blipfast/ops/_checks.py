"""Argument checks shared by the public ops. Every message names the op and the argument."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from blipfast.ops._dispatch import under_torch_func_transform

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_DTYPE_NAMES = "float16, bfloat16, float32"


def may_read_values(tensor: torch.Tensor) -> bool:
    """Whether checking a tensor's values is allowed here: not while torch.compile traces,
    not under a ``torch.func`` transform (vmap's batched values cannot decide a Python
    ``if``; the ops run their PyTorch reference there, whose own indexing checks
    remain), and not while a CUDA graph is being captured. CUDA tensors are checked on
    the device (no host synchronisation), CPU tensors on the host."""
    if torch.compiler.is_compiling() or under_torch_func_transform():
        return False
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def check_values(tensor: torch.Tensor, predicate, message: Callable[[], str],
                 found: Optional[Callable[[torch.Tensor], str]] = None) -> None:
    """Raise ``ValueError`` with ``message()`` unless ``predicate(tensor)`` (a bool tensor)
    holds everywhere. CPU tensors are read on the host, and ``found(tensor)``, if given,
    adds what was found to the message ("got values from -1 to 7"); on CUDA the check is a
    device-side assertion (``torch._assert_async``: no host synchronisation; a failure
    stops the program, with ``message()`` alone). Skipped while torch.compile or
    torch.export traces or a CUDA graph is captured. ``message`` is a function so that a
    size it names is not formatted when skipped: formatting a traced symbolic size fixes
    it to the example's value (a dynamic batch could no longer be exported)."""
    if tensor.numel() == 0 or not may_read_values(tensor):
        return
    holds = predicate(tensor).all()
    if tensor.is_cuda:
        torch._assert_async(holds, message())
    elif not holds:
        raise ValueError(message() if found is None else f"{message()}, {found(tensor)}")


@torch.library.custom_op("blipfast::checked_index", mutates_args=())
def checked_index(index: torch.Tensor, upper: int, message: str) -> torch.Tensor:
    """A copy of ``index`` (int, any shape), after checking when it runs that every value
    lies in [0, ``upper``): ``ValueError`` with ``message`` (and the range found) on CPU,
    a device-side assertion on CUDA (skipped while a CUDA graph is captured).

    For traced code, where :func:`check_values` cannot run: a custom op is opaque to
    torch.compile, so its body runs with the compiled graph, before the kernel that
    consumes the copy (its output, so the check cannot be dropped as dead code) reads
    rows by the index."""
    # Run with the graph, not traced: check_values' reads are allowed here.
    check_values(index, lambda values: (values >= 0) & (values < upper),
                 lambda: f"{message}: values must lie in [0, {upper})", found=value_range)
    return index.clone()


@checked_index.register_fake
def _checked_index_fake(index: torch.Tensor, upper: int, message: str) -> torch.Tensor:
    return torch.empty_like(index)


def value_range(tensor: torch.Tensor) -> str:
    """"got values from LOW to HIGH": what :func:`check_values` adds for an index tensor."""
    return f"got values from {int(tensor.min())} to {int(tensor.max())}"


def type_name(value: object) -> str:
    """``value``'s type as an error message names it: ``float``, ``list``, but
    ``numpy.bool`` or ``numpy.float32`` for types from elsewhere (whose bare names, "bool"
    or "float32", would read as the very type the message asks for)."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else \
        f"{kind.__module__.split('.')[0]}.{kind.__qualname__}"


def is_finite(number) -> bool:
    """Whether a Python number is finite (False for NaN and ±inf).

    Comparisons rather than ``math.isfinite``: Dynamo cannot trace ``math.isfinite`` under
    ``torch.compile(dynamic=True)`` (even on a constant), so a check written with it breaks
    the graph there."""
    return -math.inf < number < math.inf


def check_supported_tensor(op: str, name: str, tensor, optional: bool = False) -> None:
    """``tensor`` is a torch.Tensor (or None when ``optional``) of a supported float dtype."""
    if tensor is None and optional:
        return
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor{' or None' if optional else ''}, "
                        f"got {type_name(tensor)}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: {name} has dtype {tensor.dtype}; supported: "
                        f"{SUPPORTED_DTYPE_NAMES}")


def check_rows_input(op: str, x) -> None:
    """``x`` is a supported float tensor of shape (..., N) with at least one dimension."""
    check_supported_tensor(op, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least 1 dimension (..., N), got a 0-dim tensor")


def check_feature_vector(op: str, name: str, vector: Optional[torch.Tensor],
                         x: torch.Tensor) -> None:
    """``vector`` is None or a supported float (N,) tensor on x's device, N = x.shape[-1]."""
    check_supported_tensor(op, name, vector, optional=True)
    if vector is None:
        return
    if tuple(vector.shape) != (x.shape[-1],):
        raise ValueError(f"{op}: {name} must have shape (N,) = ({x.shape[-1]},), N being the "
                         f"last dimension of x {tuple(x.shape)}, got {tuple(vector.shape)}")
    if vector.device != x.device:
        raise ValueError(f"{op}: {name} is on {vector.device} but x is on {x.device}")


def check_index_vector(op: str, name: str, index: Optional[torch.Tensor], rows: int,
                       device: torch.device, device_owner: str,
                       shape_name: str = "") -> None:
    """``index`` is None or an int32/int64 tensor of shape (rows,) on ``device``.

    ``device_owner`` names what lives on ``device`` in the message ("q is", "the features
    are"); ``shape_name`` prefixes the expected shape ("(B,) = ").
    """
    if index is None:
        return
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{op}: {name} must be an integer tensor or None, got "
                        f"{type_name(index)}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: {name} must have dtype int32 or int64, got {index.dtype}")
    if tuple(index.shape) != (rows,):
        raise ValueError(f"{op}: {name} must have shape {shape_name}({rows},), got "
                         f"{tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{op}: {name} is on {index.device} but {device_owner} on {device}")
