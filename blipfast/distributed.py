"""torch.distributed helpers for losses that score local rows against every rank's rows.

- :func:`resolve_group`: the process group to gather over, or None when there is nothing
  to gather (torch.distributed not initialized, or a group of one process).
- :func:`gather_with_grad` ``(tensor, group=None, *, sizes=None)``: differentiable
  all-gather along dim 0 that allows a different local batch size on every rank
  (``sizes`` is keyword-only).
- :func:`gather_no_grad` ``(tensor, group=None, *, sizes=None)``: the same gather without
  autograd (ids, sampling), any dtype.
- :func:`this_process_group`: a group holding only this process, for the ops' ``group``
  argument where a computation must stay local (e.g. BLIP pre-training's ITM negatives).

Every rank of the group must call these functions in the same order with tensors of the
same dtype, number of dimensions and trailing shape (dim 0 may differ), placed on a device
the group's backend serves (CUDA for NCCL, CPU for gloo). Every rank must also run the
backward of :func:`gather_with_grad` (it is a collective too).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch
import torch.distributed as dist

from blipfast.kernels._runtime import first_derivative_only

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["resolve_group", "gather_with_grad", "gather_no_grad", "this_process_group"]

# Backends whose reduce-scatter is a real reduce-scatter (each rank receives only its
# slice). For others (gloo) the backward all-reduces the gradient and slices it, which is
# also what gloo's own reduce_scatter_tensor does internally.
_REDUCE_SCATTER_BACKENDS = ("nccl",)
# Backends with a single-tensor all-gather (NCCL; gloo since torch 2.2). Others use the
# list form of all_gather into views of the same buffer.
_SINGLE_TENSOR_GATHER_BACKENDS = ("nccl", "gloo")


def resolve_group(group: Optional[ProcessGroup] = None) -> Optional[ProcessGroup]:
    """The process group to gather over, or None when there is nothing to gather.

    Args:
        group: a process group, or None for the default (world) group.

    Returns:
        None when torch.distributed is unavailable or not initialized (and ``group`` is
        None), or when the group has a single process; otherwise ``group``, or
        ``torch.distributed.group.WORLD`` when ``group`` is None.

    Raises:
        ValueError: ``group`` is given but torch.distributed is not initialized, or this
            process is not a member of ``group``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("resolve_group: group was given but torch.distributed is not "
                             "initialized; call torch.distributed.init_process_group first "
                             "or pass group=None")
        return None
    if group is None:
        group = dist.group.WORLD
    world_size = dist.get_world_size(group)
    if world_size < 1:
        raise ValueError("resolve_group: this process is not a member of group")
    return None if world_size == 1 else group


# (world group, group of this process): created once per initialized world.
_this_process_group_cache: list = []


def this_process_group() -> Optional[ProcessGroup]:
    """A process group holding only this process, or None when torch.distributed is not
    initialized.

    Passing it as ``group`` to an op makes the op use this process's rows only
    (:func:`resolve_group` maps a one-process group to "nothing to gather"). The group is
    created on first use with ``use_local_synchronization=True``, so other ranks need not
    call this function at the same time; later calls return the same group (until the
    default process group is destroyed and initialized again).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.group.WORLD
    if not (_this_process_group_cache and _this_process_group_cache[0] is world):
        group = dist.new_group([dist.get_rank()], use_local_synchronization=True)
        _this_process_group_cache[:] = [world, group]
    return _this_process_group_cache[1]


def gather_with_grad(
    tensor: torch.Tensor, group: Optional[ProcessGroup] = None, *,
    sizes: Optional[Sequence[int]] = None,
) -> tuple[torch.Tensor, int, list[int]]:
    """Concatenate ``tensor`` along dim 0 from every rank of ``group``, differentiably:
    ``gather_with_grad(tensor, group=None, *, sizes=None)`` (``sizes`` keyword-only).

    Ranks may hold different numbers of rows (dim 0); all other dims must agree. The
    backward gives each rank the sum, over all ranks, of the gradient of their gathered
    output at this rank's rows (the semantics of
    ``torch.distributed.nn.functional.all_gather``, with uneven sizes).

    Communication: one all-gather of the row counts, skipped when ``sizes`` is given; then
    one all-gather of the rows padded to the largest count. The counts go through the
    group's CPU backend when it has one (a gloo group, or a default group initialized for
    both devices, "cpu:gloo,cuda:nccl", as ``init_process_group()`` without a backend
    makes), which does not wait for this GPU's queued work; on an NCCL-only group they go
    through the GPU and reading them is a host synchronization. Backward: one
    reduce-scatter (NCCL) or one all-reduce (other backends, e.g. gloo) of the gradient.

    Args:
        tensor: (B, ...) local rows, any strides, any dtype the backend supports (float
            for a gradient).
        group: the process group, resolved by :func:`resolve_group` (None: the world
            group, or no communication when torch.distributed is not initialized).
        sizes: keyword-only; every rank's row count, when already known (the ``sizes``
            an earlier gather over the same group returned for tensors of the same batch);
            skips the count exchange. Every rank must pass the same list: only this
            rank's own count is checked (checking the others would take the exchange this
            skips), so ranks that pass different lists get misplaced or dropped rows
            without an error, or hang. Trailing shapes are then not compared across ranks
            either.

    Returns:
        ``(gathered, offset, sizes)``: gathered (sum(sizes), ...) rows in group-rank
        order; offset, the first row of this rank's rows in ``gathered``; sizes, the
        row count of every rank. Without a group to gather over:
        ``(tensor, 0, [tensor.shape[0]])``.

    Raises:
        TypeError: ``tensor`` is not a tensor.
        ValueError: ``tensor`` has no dims, its dtype, number of dims or trailing shape
            differs between ranks (raised on every rank), ``group`` is given without an
            initialized torch.distributed, or ``sizes`` does not have one count per rank
            with this rank's equal to ``tensor.shape[0]``.
    """
    group = _resolve_for(tensor, group, "gather_with_grad")
    if group is None:
        _check_local_sizes(tensor, sizes, 1, 0, "gather_with_grad")
        return tensor, 0, [tensor.shape[0]]
    sizes, rank = _sizes_for(tensor, group, sizes, "gather_with_grad")
    gathered = _GatherWithGrad.apply(tensor, group, sizes, rank)
    return gathered, sum(sizes[:rank]), list(sizes)


def gather_no_grad(
    tensor: torch.Tensor, group: Optional[ProcessGroup] = None, *,
    sizes: Optional[Sequence[int]] = None,
) -> tuple[torch.Tensor, int, list[int]]:
    """Like :func:`gather_with_grad`, without autograd (the result never requires grad):
    ``gather_no_grad(tensor, group=None, *, sizes=None)`` (``sizes`` keyword-only).

    For integer tensors (ids: int64) and for values only used to sample or select. Same
    communication as the forward of :func:`gather_with_grad`.

    Args:
        tensor: (B, ...) local rows, any strides, any dtype the backend supports.
        group: the process group, resolved by :func:`resolve_group`.
        sizes: keyword-only; every rank's row count when already known, as in
            :func:`gather_with_grad`.

    Returns:
        ``(gathered, offset, sizes)``; without a group to gather over,
        ``(tensor.detach(), 0, [tensor.shape[0]])``.

    Raises:
        TypeError, ValueError: as :func:`gather_with_grad`.
    """
    group = _resolve_for(tensor, group, "gather_no_grad")
    if group is None:
        _check_local_sizes(tensor, sizes, 1, 0, "gather_no_grad")
        return tensor.detach(), 0, [tensor.shape[0]]
    sizes, rank = _sizes_for(tensor, group, sizes, "gather_no_grad")
    return _gather_rows(tensor.detach(), group, sizes), sum(sizes[:rank]), list(sizes)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group, sizes, rank):
        ctx.group, ctx.sizes, ctx.rank = group, sizes, rank
        return _gather_rows(tensor, group, sizes)

    @staticmethod
    @first_derivative_only("blipfast.distributed.gather_with_grad",
                           why="its backward's collectives are not recorded by autograd",
                           remedy="")
    def backward(ctx, grad):
        group, sizes, rank = ctx.group, ctx.sizes, ctx.rank
        offset, size, max_size = sum(sizes[:rank]), sizes[rank], max(sizes)
        if max_size == 0:
            return grad.new_zeros(grad.shape), None, None, None
        if _backend_name(group, grad.device) in _REDUCE_SCATTER_BACKENDS:
            padded = _pad_rows(grad.contiguous(), sizes)
            out = grad.new_empty((max_size, *grad.shape[1:]))
            _reduce_scatter_single(out, padded, group)
            return out[:size], None, None, None
        summed = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        # clone: do not keep the whole gathered gradient alive as this rank's .grad
        return summed[offset:offset + size].clone(), None, None, None


def _resolve_for(tensor, group, caller):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{caller}: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0:
        raise ValueError(f"{caller}: tensor must have at least 1 dimension (rows), got a "
                         "0-dim tensor")
    return resolve_group(group)


def _check_local_sizes(tensor, sizes, world_size, rank, caller):
    """Check caller-given ``sizes``: one count per rank, this rank's matching ``tensor``."""
    if sizes is None:
        return
    sizes = list(sizes)
    if len(sizes) != world_size or any(not isinstance(size, int) or size < 0
                                       for size in sizes):
        raise ValueError(f"{caller}: sizes must hold {world_size} non-negative ints (one per "
                         f"rank), got {sizes}")
    if sizes[rank] != tensor.shape[0]:
        raise ValueError(f"{caller}: sizes[{rank}] (this rank's count) is {sizes[rank]} but "
                         f"tensor has {tensor.shape[0]} rows")


def _sizes_for(tensor, group, sizes, caller):
    """(sizes, rank): the given ``sizes`` after checks, else exchanged across ranks."""
    if sizes is None:
        return _gather_sizes(tensor, group, caller)
    rank = dist.get_rank(group)
    _check_local_sizes(tensor, sizes, dist.get_world_size(group), rank, caller)
    return list(sizes), rank


# What the size exchange compares across ranks: a fixed-length record per rank (number of
# dims, dtype, shape padded to _MAX_DIMS, then the caller's agreements), so that ranks that
# disagree all raise instead of exchanging buffers of different sizes.
_MAX_DIMS = 8
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
           torch.complex128)


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if 0 <= code < len(_DTYPES) else "another dtype"


def _gather_sizes(tensor, group, caller, agreements: Optional[dict[str, int]] = None):
    """Every rank's row count (one collective), after checking that every rank has the
    same dtype, number of dims and trailing shape, and the same value of each of the
    caller's ``agreements`` (name -> int); each check fails on every rank alike.

    Shapes are known on the host, so when the group has a CPU backend (gloo: a gloo group,
    or a default group initialized for both devices, "cpu:gloo,cuda:nccl") they are
    exchanged as a CPU tensor, which waits for the other ranks but not for this GPU's
    queued work. Otherwise they go through ``tensor``'s device, and reading them back is
    a host synchronization."""
    agreements = dict(agreements or {})
    if tensor.dim() > _MAX_DIMS:
        raise ValueError(f"{caller}: tensor has {tensor.dim()} dims; at most {_MAX_DIMS} "
                         "are gathered")
    record = [tensor.dim(), _dtype_code(tensor.dtype), *tensor.shape,
              *([-1] * (_MAX_DIMS - tensor.dim())), *agreements.values()]
    device = torch.device("cpu") if _has_cpu_backend(group) else tensor.device
    local = torch.tensor(record, dtype=torch.int64, device=device)
    gathered = local.new_empty((dist.get_world_size(group) * len(record),))
    _all_gather_single(gathered, local, group)
    records = gathered.view(-1, len(record)).tolist()  # a host sync when on a GPU
    rank = dist.get_rank(group)
    for other, other_record in enumerate(records):
        dims, dtype_code = other_record[0], other_record[1]
        other_shape = tuple(other_record[2:2 + dims])
        if dims != tensor.dim() or dtype_code != record[1]:
            raise ValueError(f"{caller}: tensor must have the same dtype and number of dims "
                             f"on every rank; rank {rank} has {tensor.dtype} "
                             f"{tuple(tensor.shape)}, rank {other} has "
                             f"{_dtype_name(dtype_code)} {other_shape}")
        if other_shape[1:] != tuple(tensor.shape[1:]):
            raise ValueError(f"{caller}: tensor must have the same trailing shape on every "
                             f"rank; rank {rank} has {tuple(tensor.shape)}, rank {other} has "
                             f"{other_shape}")
        for (name, value), other_value in zip(agreements.items(), other_record[2 + _MAX_DIMS:]):
            if other_value != value:
                raise ValueError(f"{caller}: {name} must be the same on every rank; rank "
                                 f"{rank} has {value}, rank {other} has {other_value}")
    return [other_record[2] for other_record in records], rank


def agree_on_sizes(tensor: torch.Tensor, group: ProcessGroup, caller: str,
                   agreements: Optional[dict[str, int]] = None) -> list[int]:
    """Every rank's row count of ``tensor`` (one collective over ``group``, a resolved
    group), checking across ranks what :func:`gather_with_grad` checks and that every
    rank has the same value of each of ``agreements`` (name -> int: e.g. whether an
    optional argument was given). A mismatch raises ValueError on every rank alike. For
    the ops, which pass the result as ``sizes`` to the gathers that follow."""
    return _gather_sizes(tensor, group, caller, agreements)[0]


def _gather_rows(tensor, group, sizes):
    """All-gather rows padded to the largest count, then drop the padding."""
    max_size = max(sizes)
    trailing = tensor.shape[1:]
    if max_size == 0:
        return tensor.new_empty((0, *trailing))
    local = tensor.contiguous()
    if local.shape[0] < max_size:
        local = torch.cat([local, local.new_zeros((max_size - local.shape[0], *trailing))])
    padded = tensor.new_empty((len(sizes) * max_size, *trailing))
    _all_gather_single(padded, local, group)
    if all(size == max_size for size in sizes):
        return padded
    return torch.cat([padded[r * max_size:r * max_size + size] for r, size in enumerate(sizes)])


def _pad_rows(rows, sizes):
    """(sum(sizes), ...) -> (len(sizes) * max(sizes), ...): each rank's rows in its slot."""
    max_size = max(sizes)
    if all(size == max_size for size in sizes):
        return rows
    padded = rows.new_zeros((len(sizes) * max_size, *rows.shape[1:]))
    offset = 0
    for r, size in enumerate(sizes):
        padded[r * max_size:r * max_size + size] = rows[offset:offset + size]
        offset += size
    return padded


def _device_backends(group) -> dict[str, str]:
    """``group``'s backend per device type, from its config ("cpu:gloo,cuda:nccl" ->
    {"cpu": "gloo", "cuda": "nccl"}); a backend named without a device ("nccl") is
    under ""."""
    backends = {}
    for entry in str(dist.get_backend_config(group)).split(","):
        device_type, separator, name = entry.partition(":")
        if separator:
            backends[device_type.strip()] = name.strip()
        else:
            backends[""] = entry.strip()
    return backends


def _has_cpu_backend(group) -> bool:
    """Whether ``group`` can communicate CPU tensors (it has a gloo or MPI backend)."""
    backends = _device_backends(group)
    return "cpu" in backends or backends.get("") in ("gloo", "mpi")


def _backend_name(group, device):
    """The backend serving ``device`` in ``group`` ("nccl", "gloo", ...)."""
    backends = _device_backends(group)
    return backends.get(device.type) or backends.get("") or str(dist.get_backend(group))


def _all_gather_single(output, tensor, group):
    if _backend_name(group, tensor.device) in _SINGLE_TENSOR_GATHER_BACKENDS:
        # all_gather_single is the torch >= 2.13 name of all_gather_into_tensor.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(output, tensor, group=group)
    else:
        slots = output.view(dist.get_world_size(group), *tensor.shape).unbind(0)
        dist.all_gather(list(slots), tensor, group=group)


def _reduce_scatter_single(output, tensor, group):
    # reduce_scatter_single is the torch >= 2.13 name of reduce_scatter_tensor.
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(output, tensor, op=dist.ReduceOp.SUM, group=group)
