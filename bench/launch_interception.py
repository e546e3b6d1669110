"""Kernel launches that run nothing: for measuring what blipfast does on the host around
its kernels (host time per call in ``host_overhead.py``, allocations in
``tests/test_memory_footprint.py``) on a machine without a GPU; and the switch of every
op between its Triton path and its reference whatever the device (``ops_path``, also
used by ``precompile_for_gpu.py`` and ``model_test_replay.py``).

Importing this module changes nothing (no environment variables, no patches); the
interception lasts as long as the ``with`` block.
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Iterator
from unittest import mock

# The modules of blipfast.ops that choose between the Triton kernels and the reference.
OPS_MODULES = ("attention", "contrastive", "cross_entropy", "layer_norm", "bias_gelu")


@contextlib.contextmanager
def ops_path(triton: bool, reference_modules: tuple[str, ...] = ()) -> Iterator[None]:
    """Within the block, every blipfast op takes its Triton path (``triton``) or its
    PyTorch reference, whatever the tensors' device; the ops of ``reference_modules``
    (names in ``OPS_MODULES``) take their reference either way."""
    unknown = set(reference_modules) - set(OPS_MODULES)
    if unknown:
        raise ValueError(f"reference_modules: unknown ops modules {sorted(unknown)}; "
                         f"known: {OPS_MODULES}")
    with contextlib.ExitStack() as stack:
        for module in OPS_MODULES:
            use_kernels = triton and module not in reference_modules
            # The module object, not the dotted name: Python 3.10's mock.patch resolves
            # "blipfast.ops.attention" to the function blipfast.ops re-exports
            stack.enter_context(mock.patch.object(
                importlib.import_module(f"blipfast.ops.{module}"), "use_triton",
                _constant_dispatch(use_kernels)))
        yield


def _constant_dispatch(use_kernels: bool):
    """A stand-in for ``blipfast.ops._dispatch.use_triton`` (same arguments) that answers
    ``use_kernels`` whatever it is asked."""
    def use_triton(device, *inputs, op: str = "") -> bool:
        return use_kernels

    return use_triton


@contextlib.contextmanager
def kernel_launches_intercepted(reference_modules: tuple[str, ...] = ()) -> Iterator[None]:
    """Within the block, Triton launches return at once and run nothing, compiled or
    through the interpreter (their outputs keep whatever the launcher allocated), and the
    ops take their kernel path for CPU tensors too; the ops of ``reference_modules``
    (names in ``OPS_MODULES``) run their PyTorch reference instead."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def launch(kernel, *args, grid, warmup, **kwargs):
        return None

    with contextlib.ExitStack() as stack:
        stack.enter_context(ops_path(triton=True, reference_modules=reference_modules))
        for kernel_class in (InterpretedFunction, JITFunction):
            stack.enter_context(mock.patch.object(kernel_class, "run", launch))
        yield
