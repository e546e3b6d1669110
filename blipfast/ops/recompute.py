"""Recomputing activations in the backward instead of keeping them.

Inside :func:`recompute_in_backward`, a tensor marked with :func:`mark_recomputable` is not
kept by the ops that save it for their backward (a matmul saving its input, say): they
keep the function that recomputes it, and the backward calls it. blipfast's LayerNorm ops
mark their outputs themselves; models mark what else is worth recomputing (a projection's
output, from its recomputable input and its weight).

It works through ``torch.autograd.graph.saved_tensors_hooks``: every tensor an op saves
passes the pack hook, which swaps a marked one (or a view of one, found by its storage)
for its recomputation.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator, Optional

import torch

from blipfast.ops._dispatch import under_torch_func_transform

# Whether the saved-tensor hooks outside are a measurement tool's (bench/activation_census.py):
# recomputation then takes effect under them, passing them every saved tensor but the
# recomputed ones, and saved_tensor_hooks_active() disregards them. Not for training:
# under an outer activation checkpoint, the recomputation would keep its inputs alive.
CHAIN_TO_OUTER_HOOKS = False


def _check_version(tensor: torch.Tensor, saved_version: int) -> None:
    """Raise as autograd does when a tensor saved for the backward was modified in place
    since (autograd skips that check for tensors that pass saved-tensor hooks, so the
    hooks here make it)."""
    if tensor._version != saved_version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: a {tuple(tensor.shape)} {tensor.dtype} tensor saved at "
            f"version {saved_version} is now at version {tensor._version} (checked by "
            "blipfast.ops.recompute_in_backward, as autograd checks it without saved-tensor "
            "hooks)")


class _VersionChecked:
    """A saved tensor that is not recomputed, with its version when saved. Kept detached
    (the same data and version counter), as torch.utils.checkpoint keeps it: autograd
    gives the unpacked tensor its own autograd data back, and an op's saved output held
    with its ``grad_fn`` would make a cycle through that very node (node, saved tensor,
    its grad_fn) that Python's garbage collector cannot see, so a graph dropped without
    a backward (an evaluation loss under gradients, ``retain_graph=True``, an exception
    mid-forward) would never be freed."""

    __slots__ = ("value", "version")

    def __init__(self, value: torch.Tensor) -> None:
        self.value, self.version = value.detach(), value._version

    def tensor(self) -> torch.Tensor:
        _check_version(self.value, self.version)
        return self.value


class _Recomputed:
    """What an op's backward holds in place of a marked tensor (or a view of it): the
    function that recomputes the tensor, the view's geometry, and the marked tensor (a weak
    reference) with its version when saved: modified in place since, the recomputation
    (from the inputs as they were) would not be what was saved, so that raises."""

    __slots__ = ("recompute", "size", "stride", "offset", "marked", "version")

    def __init__(self, recompute: Callable[[], torch.Tensor], view: torch.Tensor,
                 marked: "weakref.ref[torch.Tensor]") -> None:
        self.recompute = recompute
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()
        self.marked, self.version = marked, view._version

    def tensor(self) -> torch.Tensor:
        marked = self.marked()
        if marked is not None:  # gone, nothing can modify it any more
            _check_version(marked, self.version)
        return self.recompute().as_strided(self.size, self.stride, self.offset)


class _PackedByOuterHooks:
    """A saved tensor as the saved-tensor hooks outside the recomputation packed it, and
    their unpack hook."""

    __slots__ = ("value", "unpack")

    def __init__(self, value, unpack: Callable) -> None:
        self.value, self.unpack = value, unpack

    def tensor(self) -> torch.Tensor:
        return self.unpack(self.value)


class _Registry(threading.local):
    """Marked tensors while recomputation is on, by storage address: a weak reference to
    the tensor and the function recomputing it. Per thread, as saved-tensor hooks are."""

    def __init__(self) -> None:
        self.active = False
        self.outer_hooks: Optional[tuple[Callable, Callable]] = None
        self._marked: dict[int, tuple[weakref.ref, Callable[[], torch.Tensor]]] = {}

    def recomputation_of(self, tensor: torch.Tensor) -> Optional[Callable[[], torch.Tensor]]:
        """The function recomputing ``tensor`` (marked, or a view of a marked tensor with
        its dtype), or None."""
        entry = self._marked.get(tensor.untyped_storage().data_ptr())
        if entry is None:
            return None
        marked = entry[0]()
        if marked is None or marked.dtype != tensor.dtype:
            return None
        if marked.shape == tensor.shape and marked.stride() == tensor.stride() \
                and marked.storage_offset() == tensor.storage_offset():
            return entry[1]
        view = _Recomputed(entry[1], tensor, entry[0])
        return view.tensor

    def mark(self, tensor: torch.Tensor, recompute: Callable[[], torch.Tensor]) -> None:
        address = tensor.untyped_storage().data_ptr()
        marked = self._marked
        # The entry goes when the tensor does, before its storage can be reused.
        reference = weakref.ref(tensor, lambda _: marked.pop(address, None))
        marked[address] = (reference, _computed_once(recompute))

    def pack(self, saved: torch.Tensor):
        entry = self._marked.get(saved.untyped_storage().data_ptr())
        if entry is not None:
            marked = entry[0]()
            if marked is not None and marked.dtype == saved.dtype:
                return _Recomputed(entry[1], saved, entry[0])
        if self.outer_hooks is not None:
            outer_pack, outer_unpack = self.outer_hooks
            return _PackedByOuterHooks(outer_pack(saved), outer_unpack)
        return _VersionChecked(saved)

    @staticmethod
    def unpack(packed):
        # Self-contained: the backward may run after the context has ended, on another
        # thread.
        return packed.tensor()

    def clear(self) -> None:
        self.active = False
        self.outer_hooks = None
        self._marked.clear()


_REGISTRY = _Registry()


def _computed_once(recompute: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``recompute``, computing once and returning the same result on later calls. The
    result lives as long as this function does: as long as the backward nodes that saved
    the marked tensor (or something recomputed from it) keep their saved tensors, which
    autograd releases once such a node has run. So an op that saved several views of one
    tensor (attention's q, k and v of one projection) recomputes it once, and so does a
    tensor saved by two ops."""
    result: list[Optional[torch.Tensor]] = [None]

    def recompute_once() -> torch.Tensor:
        value = result[0]
        if value is None:
            value = result[0] = recompute()
        return value

    return recompute_once


@contextlib.contextmanager
def recompute_in_backward() -> Iterator[bool]:
    """Inside this context, tensors marked with :func:`mark_recomputable` (among them the
    outputs of :func:`blipfast.ops.layer_norm` and :func:`blipfast.ops.add_layer_norm`)
    are not kept by the ops that consume them: their backward recomputes them.

    In a pre-norm transformer block the LayerNorm outputs feed the QKV projection and the
    first FFN projection, whose weight gradients need them: two (B, L, D) tensors per
    layer (1.27 GiB for ViT-B at batch 64, 384 px, bf16), recomputed by one LayerNorm
    forward each from what the LayerNorm's own backward keeps anyway (bit for bit the
    same output). (In a post-norm stack a LayerNorm output is the next residual stream,
    kept by the next LayerNorm's backward anyway: nothing to gain.)

    Yields whether it took effect (nested inside itself, the outer context applies). It
    does not take effect in torch.compile'd code, when gradients are disabled, under a
    ``torch.func`` transform (which refuses saved-tensor hooks), or when
    other saved-tensor hooks are active (activation checkpointing, CPU offloading: they
    must see every saved tensor); inside activation checkpointing started within it, the
    checkpoint's hooks apply. LayerNorm outputs are marked only on the Triton path (not
    the CPU reference path), and outputs consumed through a dtype cast (e.g. an fp32
    output under bf16 autocast) are kept as usual.
    """
    if _REGISTRY.active:
        yield True
        return
    has_outer_hooks, outer_hooks = _outer_saved_tensor_hooks()
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or under_torch_func_transform()  # torch.func refuses saved-tensor hooks
            or (has_outer_hooks and not (CHAIN_TO_OUTER_HOOKS and outer_hooks))):
        yield False
        return
    _REGISTRY.active = True
    _REGISTRY.outer_hooks = outer_hooks
    try:
        with torch.autograd.graph.saved_tensors_hooks(_REGISTRY.pack, _REGISTRY.unpack):
            yield True
    finally:
        _REGISTRY.clear()


def mark_recomputable(output: torch.Tensor, function: Callable[..., torch.Tensor],
                      *inputs: Any) -> bool:
    """Within :func:`recompute_in_backward`, let ops that save ``output`` for their
    backward keep ``function(*inputs)`` in its place, called in the backward to make the
    tensor again. Returns whether it was marked (only inside the context, with an output
    that requires grad, and not under torch.compile).

    ``function(*inputs)`` must return a tensor with ``output``'s dtype and values, laid out
    as ``output``'s storage is (``output`` may be a view of it: saved views are cut from the
    result with their own geometry), without autograd (the backward calls it with
    gradients disabled). Mark a tensor object that stays referenced until the ops that
    save it have run (the one passed to them, or a view they are cut from): the mark is
    forgotten with the object, so that a freed storage's address cannot be mistaken. An
    input that is itself marked (or a view of one) is recomputed too, not held; any other input is held
    until the backward, so pass tensors that are kept anyway (parameters, what the
    producing op saves), or the memory is not saved but moved. Example, a projection whose
    input is a LayerNorm output::

        hidden = F.linear(normed, fc1.weight)
        ops.mark_recomputable(hidden, lambda x: F.linear(x, fc1.weight.to(x.dtype)), normed)

    (under autocast the forward ran on the autocast copy of the weight, which the
    recomputation makes again).

    Raises TypeError if ``output`` is not a tensor or ``function`` is not callable. The
    backward raises RuntimeError if the recomputed tensor does not match ``output``: another
    dtype or device, or another layout (with ``output``'s shape but other strides or storage
    offset; with another shape, not exactly filling a storage of ``output``'s storage's
    size), rather than cutting ``output`` out of a tensor it does not fit.
    """
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"mark_recomputable: output must be a torch.Tensor, got "
                        f"{type(output).__name__}")
    if not callable(function):
        raise TypeError(f"mark_recomputable: function must be callable (it recomputes "
                        f"output from inputs), got {type(function).__name__}")
    if (not _REGISTRY.active or not output.requires_grad
            or torch.compiler.is_compiling()):
        return False
    resolved = [(_REGISTRY.recomputation_of(value), value)
                if isinstance(value, torch.Tensor) else (None, value) for value in inputs]
    # Recomputed inputs are held as their functions, not as tensors.
    held = [(recompute, None if recompute is not None else value)
            for recompute, value in resolved]

    # The held tensors' versions now: modified in place before the backward, they would
    # recompute something else than was marked (autograd raises in that case; so does this).
    held_versions = [(value, value._version) for make, value in held
                     if make is None and isinstance(value, torch.Tensor)]

    expected = _Layout(output)  # not output itself: the mark must not keep it alive

    def recompute() -> torch.Tensor:
        for value, version in held_versions:
            _check_version(value, version)
        with torch.no_grad():
            result = function(*[make() if make is not None else value
                                for make, value in held])
        expected.check(result, function)
        return result

    _REGISTRY.mark(output, recompute)
    return True


class _Layout:
    """A marked tensor's dtype, device and geometry, and its storage's size: what its
    recomputation must match, as saved tensors (the marked one, views of it) are cut from
    the recomputed tensor's storage with their own geometry."""

    __slots__ = ("shape", "stride", "offset", "dtype", "device", "storage_bytes")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape, self.stride = tensor.shape, tensor.stride()
        self.offset, self.dtype, self.device = tensor.storage_offset(), tensor.dtype, tensor.device
        self.storage_bytes = tensor.untyped_storage().nbytes()

    def describe(self) -> str:
        return (f"shape {tuple(self.shape)}, stride {tuple(self.stride)}, storage offset "
                f"{self.offset}, {self.dtype} on {self.device}, storage of "
                f"{self.storage_bytes} bytes")

    def check(self, result: object, function: Callable) -> None:
        """Raise unless ``result`` can stand for the marked tensor (see
        :func:`mark_recomputable`)."""
        name = getattr(function, "__qualname__", type(function).__name__)
        if not isinstance(result, torch.Tensor):
            raise TypeError(f"blipfast.ops.mark_recomputable: the recomputation {name} "
                            f"returned {type(result).__name__}, not a tensor")
        problem = None
        if result.dtype != self.dtype or result.device != self.device:
            problem = "another dtype or device"
        elif result.shape == self.shape:
            # Saved tensors are cut from the result's storage with their own geometry: the
            # same shape must lie there as the marked tensor did (strides of size-1
            # dimensions never move an element).
            if result.numel() and (result.storage_offset() != self.offset or any(
                    size > 1 and got != want
                    for size, got, want in zip(self.shape, result.stride(), self.stride))):
                problem = "another layout (strides or storage offset)"
        elif (result.numel() * result.element_size() != self.storage_bytes
                or result.untyped_storage().nbytes() != self.storage_bytes):
            # Another shape: the tensor the marked one is a view of, filling its storage.
            problem = "another shape, and it does not fill a storage of the marked tensor's size"
        if problem is not None:
            raise RuntimeError(
                f"blipfast.ops.mark_recomputable: the recomputation {name} returned a tensor "
                f"with {problem}: expected {self.describe()} (the marked output), got "
                f"{_Layout(result).describe()}. The function must return the marked tensor "
                "again, laid out as it was (or the tensor it is a view of)")


def _outer_saved_tensor_hooks() -> tuple[bool, Optional[tuple[Callable, Callable]]]:
    """(whether saved-tensor hooks are in effect on this thread, their (pack, unpack) or
    None). Where this torch cannot tell, hooks are assumed, unknown."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top_hooks is None:
        return True, None
    hooks = top_hooks(False)
    return hooks is not None, hooks


def saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are in effect on this thread (activation checkpointing,
    CPU offloading, this module's recomputation): code that would save different tensors
    when run again (as a checkpoint's recomputation runs it) must not vary then. Hooks of
    a measurement tool that set ``CHAIN_TO_OUTER_HOOKS`` do not count."""
    return _outer_saved_tensor_hooks()[0] and not CHAIN_TO_OUTER_HOOKS
