"""Run the GPU model tests (the ``tests-models`` stage of ``gpu_session.sh``) on CPU, for
``precompile_for_gpu.py``: what they launch, with the values they would compute.

The kernel tests can be replayed with unwritten outputs: each case launches what it
launches whatever its values. A model test cannot: its later launches depend on earlier
outputs (hard negatives index the batch; greedy decoding stops at the end token), and
garbage there stops it early. So here every blipfast op that launches kernels runs
twice: its Triton path, whose launches the capture records and whose outputs are
discarded, and its PyTorch reference path, whose values the model goes on with, in the
Triton outputs' dtypes and strides (what the ops after it see on the GPU). In the
backward, the gradients that reach those outputs also go through the Triton path's
backward (recorded as well), with the same gradient tensors, strides included.

The tests themselves run through pytest (their fixtures build the models), with
stand-ins for what they ask of CUDA: ``.cuda()`` and ``.to("cuda")`` stay on the CPU,
their ``torch.autocast("cuda")``, ``torch.Generator("cuda")`` and
``torch.amp.GradScaler("cuda")`` are the CPU ones, and their ``skipif(not
torch.cuda.is_available())`` sees a CUDA device.

The float32 and autocast references the tests compare against launch no kernel, and
running one at BLIP-base size on CPU costs as much as the model itself, several times per
test. A reference named in ``REFERENCES_WITHOUT_KERNELS`` is not run: calling it ends its
test there (counted as "ended at a reference"), after what the test launched before it
was recorded. Only references that a test calls after its last blipfast op belong there.
"""

from __future__ import annotations

import contextlib
import io
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterator
from unittest import mock

import pytest
import torch
from torch.utils import _pytree as pytree

from launch_interception import ops_path
from precompile_for_gpu import cpu_for_cuda

# The blipfast.ops functions that launch kernels, as the models call them
# (``ops.attention(...)``).
OPS_WITH_KERNELS = ("attention", "layer_norm", "add_layer_norm", "bias_gelu",
                    "bias_gelu_linear", "cross_entropy", "contrastive_loss",
                    "contrastive_loss_with_hard_negatives", "contrastive_loss_with_queue")


# Reference implementations (module name, class name) that the GPU model tests call only
# after their blipfast ops, launching no kernel themselves: ``ReferencePreTraining``, the
# pre-training step on transformers' modules, run in float32 and under autocast.
REFERENCES_WITHOUT_KERNELS = (("pretraining_reference", "ReferencePreTraining"),)


class ReferenceNotRun(Exception):
    """Raised by a reference of ``REFERENCES_WITHOUT_KERNELS`` called in the replay."""


# --------------------------------------------------------------------------------------
# Both paths of each op
# --------------------------------------------------------------------------------------


def _like_kernel_output(value: Any, kernel_value: Any) -> Any:
    """A reference output's values in the dtype and strides of the Triton path's output
    (what the ops after it see on the GPU); anything else as it is."""
    if not (isinstance(value, torch.Tensor) and isinstance(kernel_value, torch.Tensor)
            and value.is_floating_point()):
        return value
    if value.shape != kernel_value.shape:
        raise RuntimeError(f"the reference path returned shape {tuple(value.shape)} where "
                           f"the Triton path returns {tuple(kernel_value.shape)}")
    copy = torch.empty_strided(kernel_value.shape, kernel_value.stride(),
                               dtype=kernel_value.dtype, device=value.device)
    return copy.copy_(value)


class _KernelBackward(torch.autograd.Function):
    """The reference outputs, in the Triton outputs' dtypes and strides; in the backward,
    the gradients that reached them also run the Triton path's backward (``kernel_branch``:
    its outputs, one per reference output, and the detached inputs it was called with)."""

    @staticmethod
    def forward(ctx, kernel_branch, *outputs):
        ctx.kernel_branch = kernel_branch
        ctx.dtypes = [output.dtype for output in outputs]
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, as it
        kernel_outputs = kernel_branch[0]  # would reach the kernels
        return tuple(_like_kernel_output(output, kernel_output)
                     for output, kernel_output in zip(outputs, kernel_outputs))

    @staticmethod
    def backward(ctx, *gradients):
        kernel_outputs, kernel_inputs = ctx.kernel_branch
        pairs = [(output, gradient) for output, gradient in zip(kernel_outputs, gradients)
                 if gradient is not None and output.requires_grad]
        if pairs:
            torch.autograd.grad([output for output, _ in pairs], kernel_inputs,
                                [gradient for _, gradient in pairs], allow_unused=True)
        return (None, *(None if gradient is None else gradient.to(dtype)
                        for gradient, dtype in zip(gradients, ctx.dtypes)))


def _differentiable(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.requires_grad


def run_both_paths(op: Callable) -> Callable:
    """``op`` run on its Triton path (launches for the capture) and its reference path
    (the values returned), with the Triton path's backward run beside the reference's."""

    def call(*args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        kernel_inputs = []

        def detached(value):
            if _differentiable(value) and torch.is_grad_enabled():
                kernel_inputs.append(value.detach().requires_grad_())  # same strides
                return kernel_inputs[-1]
            return value

        kernel_args, kernel_kwargs = pytree.tree_unflatten([detached(v) for v in leaves], spec)
        with ops_path(triton=True):
            kernel_result = op(*kernel_args, **kernel_kwargs)
        with ops_path(triton=False):
            result = op(*args, **kwargs)
        outputs, result_spec = pytree.tree_flatten(result)
        kernel_outputs = pytree.tree_leaves(kernel_result)
        if len(kernel_outputs) != len(outputs):
            raise RuntimeError(f"{op.__name__}: the Triton and reference paths return "
                               "different structures")
        tied = [index for index, output in enumerate(outputs)
                if _differentiable(output) and kernel_inputs]
        returned = [output if index in tied else _like_kernel_output(output, kernel_output)
                    for index, (output, kernel_output) in enumerate(zip(outputs,
                                                                        kernel_outputs))]
        if tied:
            kernel_branch = ([kernel_outputs[index] for index in tied], kernel_inputs)
            replaced = _KernelBackward.apply(kernel_branch, *[outputs[index] for index in tied])
            for index, output in zip(tied, replaced):
                returned[index] = output
        return pytree.tree_unflatten(returned, result_spec)

    call.__name__ = getattr(op, "__name__", "op")
    return call


@contextlib.contextmanager
def both_paths() -> Iterator[None]:
    """Within it, each op of ``OPS_WITH_KERNELS``, called as ``blipfast.ops.<name>``, runs
    both paths (``run_both_paths``)."""
    import blipfast.ops as ops

    with contextlib.ExitStack() as stack:
        for name in OPS_WITH_KERNELS:
            stack.enter_context(mock.patch.object(ops, name,
                                                  run_both_paths(getattr(ops, name))))
        yield


# --------------------------------------------------------------------------------------
# CUDA stand-ins for the test modules
# --------------------------------------------------------------------------------------


class _TorchForTests(types.ModuleType):
    """The ``torch`` a GPU test module sees: torch, but for the CUDA calls that the module
    doc lists."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.Generator = lambda device="cpu": torch.Generator(cpu_for_cuda(device))
        self.autocast = lambda device_type, *args, **kwargs: torch.autocast(
            cpu_for_cuda(device_type), *args, **kwargs)
        self.cuda = types.SimpleNamespace(
            is_available=lambda: True, synchronize=lambda *args, **kwargs: None,
            set_sync_debug_mode=lambda *args, **kwargs: None,
            get_device_name=lambda *args, **kwargs: "CPU stand-in")
        self.amp = types.SimpleNamespace(
            autocast=self.autocast,
            GradScaler=lambda device="cuda", *args, **kwargs: torch.amp.GradScaler(
                cpu_for_cuda(device), *args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[None]:
    """``Tensor.cuda``, ``Module.cuda`` and ``Tensor.to`` keep tensors on the CPU."""
    original_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        return original_to(self, *map(cpu_for_cuda, args),
                           **{key: cpu_for_cuda(value) for key, value in kwargs.items()})

    with mock.patch.object(torch.Tensor, "to", to), \
            mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self), \
            mock.patch.object(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self):
        yield


class _StandInPlugin:
    """pytest plugin: the test modules see a CUDA device; counts what each test did."""

    def __init__(self, references: tuple[tuple[str, str], ...] = REFERENCES_WITHOUT_KERNELS
                 ) -> None:
        self.counts = {"run": 0, "checks failed": 0, "stopped early": 0, "skipped": 0,
                       "ended at a reference": 0}
        self.stopped: list[str] = []  # what stopped each test early
        self.failed_checks: list[str] = []
        self._modules: set[types.ModuleType] = set()  # whose torch is the stand-in
        self._references = references
        self._replaced: list[tuple[type, Any]] = []  # (reference class, its own forward)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_collection(self, session):  # the modules' skipif runs at their import
        with mock.patch.object(torch.cuda, "is_available", lambda: True):
            yield

    def pytest_collection_modifyitems(self, items):
        stand_in = _TorchForTests()
        self._modules = {item.module for item in items
                         if getattr(getattr(item, "module", None), "torch", None) is torch}
        for module in self._modules:
            module.torch = stand_in
        for module_name, class_name in self._references:
            module = sys.modules.get(module_name)  # imported by the tests that use it
            reference = getattr(module, class_name, None)
            if reference is None:
                continue

            def not_run(self, *args, _name=f"{module_name}.{class_name}", **kwargs):
                raise ReferenceNotRun(f"{_name} launches no kernel: not run in the replay")

            self._replaced.append((reference, reference.__dict__.get("forward")))
            reference.forward = not_run

    def pytest_sessionfinish(self, session):
        for module in self._modules:
            module.torch = torch
        for reference, forward in self._replaced:
            if forward is None:
                del reference.forward
            else:
                reference.forward = forward
        self._replaced.clear()

    def pytest_runtest_makereport(self, item, call):
        if call.when == "teardown" or (call.when == "setup" and call.excinfo is None):
            return
        if call.excinfo is None:
            self.counts["run"] += 1
        elif call.excinfo.errisinstance(AssertionError):
            self.counts["run"] += 1
            self.counts["checks failed"] += 1  # outputs are the reference's: possible
            self.failed_checks.append(f"{item.nodeid}: {str(call.excinfo.value)[:200]}")
        elif call.excinfo.errisinstance(pytest.skip.Exception):
            self.counts["skipped"] += 1
        elif call.excinfo.errisinstance(ReferenceNotRun):
            self.counts["run"] += 1
            self.counts["ended at a reference"] += 1
        else:
            self.counts["stopped early"] += 1
            self.stopped.append(f"{item.nodeid}: {call.excinfo.typename}: "
                                f"{str(call.excinfo.value)[:200]}")


def run_model_tests(pytest_arguments: list[str], repository: Path,
                    references: tuple[tuple[str, str], ...] = REFERENCES_WITHOUT_KERNELS
                    ) -> _StandInPlugin:
    """Run the GPU model tests that ``pytest_arguments`` select on CPU, every op on both
    paths (call within the launch capture), the ``references`` (module name, class name)
    not run. Returns the plugin, with its counts."""
    plugin = _StandInPlugin(references)
    arguments = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "--rootdir",
                 str(repository), *pytest_arguments]
    with cuda_on_cpu(), both_paths(), contextlib.redirect_stdout(io.StringIO()):
        status = pytest.main(arguments, plugins=[plugin])
    if status not in (0, 1):  # 1: tests failed, which the counts report
        raise RuntimeError(f"running the GPU model tests failed (pytest exit {status})")
    return plugin
