"""Where the Triton kernels run."""

from __future__ import annotations

from typing import Optional, TypeVar

import torch
import torch.autograd.forward_ad as forward_ad

from blipfast.kernels._runtime import interpreter_enabled, savable

_interpreter_bfloat16_checked = False

MaybeTensor = TypeVar("MaybeTensor", torch.Tensor, Optional[torch.Tensor])


def use_triton(device: torch.device, *inputs: Optional[torch.Tensor], op: str = "") -> bool:
    """Triton kernels run on CUDA devices, and on CPU tensors through the interpreter,
    except under a function transform (:func:`under_function_transform`) and while
    ``torch.jit.trace`` records, where the ops run their PyTorch reference (a Triton
    launch is not an operation TorchScript can record: the trace failed inside the
    launcher, whose sizes the tracer had turned into tensors).

    ``inputs`` (None entries skipped) and ``op`` (the public op's name, for the message):
    on the interpreter, a bfloat16 input raises unless the interpreter computes bf16 as
    a GPU does (:func:`blipfast.kernels._interpreter.bfloat16_is_exact`); Triton's own
    does not, and its answers would be silently wrong."""
    if torch.jit.is_tracing():
        return False
    if device.type == "cuda":
        return not under_function_transform()
    if device.type != "cpu" or not interpreter_enabled() or under_function_transform():
        return False
    if any(tensor is not None and tensor.dtype == torch.bfloat16 for tensor in inputs):
        check_interpreter_bfloat16(op)
    return True


def savable_by_autograd(tensor: MaybeTensor) -> MaybeTensor:
    """``tensor``, or a copy of it when it was made under ``torch.inference_mode`` while
    autograd records: the reference path saves some inputs that take no gradient (an
    index, labels) for its backward, and autograd refuses to save an inference tensor
    (:func:`blipfast.kernels._runtime.savable`, which the kernels' autograd applies
    itself)."""
    if tensor is None or torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return tensor
    return savable(tensor)[0]


def under_function_transform() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jacrev, jvp, jacfwd, vmap,
    functionalize) or forward-mode AD (``torch.autograd.forward_ad.dual_level``) is
    active, outside torch.compile's tracing. The kernels' autograd has no batching rule
    and no forward-mode derivative: under transforms it failed with PyTorch's internal
    errors or, worse, gave tangents of zero or none. The ops then run their PyTorch
    reference, which the transforms handle as any PyTorch code. (Inside torch.compile'd
    code the custom ops run, and a transform applied within the compiled function gets
    their missing rules: compile the transformed function's callers, not the transform.)"""
    return under_torch_func_transform() or (forward_ad._current_level >= 0
                                            and not torch.compiler.is_compiling())


def under_torch_func_transform() -> bool:
    """Whether a ``torch.func`` transform is active (outside torch.compile's tracing):
    they refuse saved-tensor hooks, which forward-mode AD alone does not."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None)


def check_interpreter_bfloat16(op: str) -> None:
    """Raise RuntimeError when the Triton interpreter would compute bfloat16 wrong (the
    probe runs until it first passes, then never again)."""
    global _interpreter_bfloat16_checked
    if _interpreter_bfloat16_checked:
        return
    if not _interpreter_computes_bfloat16_exactly():
        raise RuntimeError(
            f"{op or 'blipfast.ops'}: bfloat16 inputs on the Triton interpreter "
            "(TRITON_INTERPRET=1) would give wrong results: it multiplies bf16 bit patterns "
            "in tl.dot and truncates float32 to bf16 (Triton calls bf16 unsupported there). "
            "Use float16 or float32 on the interpreter, run on a GPU, or unset "
            "TRITON_INTERPRET to run the PyTorch reference.")
    _interpreter_bfloat16_checked = True


@torch.compiler.assume_constant_result
def _interpreter_computes_bfloat16_exactly() -> bool:
    """The probe's verdict (:func:`blipfast.kernels._interpreter.bfloat16_is_exact`). Under
    torch.compile the probe runs when the graph is traced, as plain Python, and its verdict
    is a constant of the graph (it cannot change within a process but by patching the
    interpreter), instead of being traced into it."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    from blipfast.kernels._interpreter import bfloat16_is_exact

    with unset_fake_temporarily():  # real tensors, also while a graph is traced
        return torch.compiler.disable(bfloat16_is_exact)()
