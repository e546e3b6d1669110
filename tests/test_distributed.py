"""blipfast.distributed on 2 and 3 CPU processes (gloo), with uneven local batch sizes.

One spawn per world size runs every check (spawning processes that import torch is the
slow part); the ranks return what they computed and the assertions run here, against
expectations rebuilt from the same seeds.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist

import blipfast.distributed
from blipfast.distributed import (gather_no_grad, gather_with_grad, resolve_group,
                                  this_process_group)
from distributed_harness import run_on_ranks

# name: (group members as global ranks, None = world; rows per group rank; trailing shape;
# dtype). Integer cases go through gather_no_grad only.
CASES = {
    2: {
        "rows_f32": (None, [3, 5], (4,), torch.float32),
        "rows_q_f32": (None, [3, 5], (2, 4), torch.float32),  # (B, Q, D)
        "even_f64": (None, [4, 4], (3,), torch.float64),
        "ids_i64": (None, [3, 5], (), torch.int64),
    },
    3: {
        "rows_f32": (None, [2, 4, 1], (4,), torch.float32),
        "rows_q_f32": (None, [2, 4, 1], (3, 4), torch.float32),  # (B, Q, D)
        "empty_rank_f32": (None, [2, 0, 3], (4,), torch.float32),
        "rows_bf16": (None, [2, 4, 1], (4,), torch.bfloat16),
        "ids_i64": (None, [2, 4, 1], (), torch.int64),
        "subgroup_f32": ((1, 2), [3, 1], (4,), torch.float32),  # group rank != global rank
        "subgroup_ids_i64": ((1, 2), [0, 2], (), torch.int64),
    },
}

# The communication paths of blipfast.distributed, each forced on gloo (which supports all
# of them) so that NCCL's path is checked without a GPU too.
PATHS = {
    "gloo": {},
    "nccl": {"_REDUCE_SCATTER_BACKENDS": ("nccl", "gloo")},  # backward: reduce-scatter
    "list_all_gather": {"_SINGLE_TENSOR_GATHER_BACKENDS": ()},  # backends without it
}


def _rows(case_index, group_rank, size, trailing, dtype):
    """The local rows of one rank (deterministic, so the test rebuilds every rank's)."""
    if not dtype.is_floating_point:
        return torch.arange(size, dtype=dtype) + 1000 * group_rank + 100 * case_index
    generator = torch.Generator().manual_seed(1000 * case_index + group_rank)
    return torch.randn(size, *trailing, generator=generator, dtype=dtype)


def _loss_weights(case_index, group_rank, total, trailing, dtype):
    """Weights of one rank's loss over the gathered rows: different on every rank.

    Multiples of 1/8 in [-4, 4]: their sums over ranks are exact even in bfloat16, so the
    expected gradient does not depend on the order of the summation."""
    generator = torch.Generator().manual_seed(5000 + 1000 * case_index + group_rank)
    return (torch.randint(-32, 33, (total, *trailing), generator=generator) / 8).to(dtype)


def _checks(rank, world_size, cases):
    """Runs on every rank: every case on every path, plus the error and no-op cases."""
    groups = {None: None}
    for members, *_ in cases.values():  # new_group is collective: every rank, same order
        if members not in groups:
            groups[members] = dist.new_group(list(members))
    singletons = [dist.new_group([r]) for r in range(world_size)]

    out = {}
    for path, overrides in PATHS.items():
        saved = {key: getattr(blipfast.distributed, key) for key in overrides}
        vars(blipfast.distributed).update(overrides)
        try:
            for name, result in _run_cases(rank, cases, groups).items():
                out[path, name] = result
        finally:
            vars(blipfast.distributed).update(saved)

    try:  # every rank sees every shape, so every rank raises
        gather_with_grad(torch.zeros(2, 3 + rank), None)
        out["mismatch"] = None
    except ValueError as error:
        out["mismatch"] = str(error)

    out["bad_sizes"] = []
    for sizes in ([2] * (world_size + 1), [3] * world_size, [2] * (world_size - 1) + [-1],
                  [2.0] * world_size):
        try:  # checked before any communication, so every rank raises
            gather_no_grad(torch.zeros(2, 3), None, sizes=sizes)
            out["bad_sizes"].append(None)
        except ValueError as error:
            out["bad_sizes"].append(str(error))

    own = singletons[rank]
    local = torch.ones(2, 3, requires_grad=True)
    gathered, offset, sizes = gather_with_grad(local, own)
    out["singleton"] = (resolve_group(own) is None, gathered is local, offset, sizes)
    out["world_resolved"] = resolve_group(None) is dist.group.WORLD

    out["not_a_member"] = []  # the groups this rank is not in: resolving them raises
    for members, group in groups.items():
        if members is not None and rank not in members:
            try:
                resolve_group(group)
                out["not_a_member"].append(None)
            except ValueError as error:
                out["not_a_member"].append(str(error))

    # A second derivative through the gather raises on every rank (its backward's
    # collectives are not recorded by autograd: differentiated, it was taken as identity).
    leaf = torch.ones(2, 3, requires_grad=True)
    gathered = gather_with_grad(leaf, None)[0]
    (gradient,) = torch.autograd.grad((gathered.square() * (rank + 1)).sum(), leaf,
                                      create_graph=True)
    try:
        torch.autograd.grad(gradient.square().sum(), leaf)
        out["second_derivative"] = None
    except RuntimeError as error:
        out["second_derivative"] = str(error)

    first, second = this_process_group(), this_process_group()
    out["this_process"] = (first is second, dist.get_world_size(first), resolve_group(first))
    return out


@contextlib.contextmanager
def _no_count_exchange():
    """Fail if the row counts are exchanged (they were given)."""
    def exchange(*args):
        raise AssertionError("the row counts were exchanged although sizes was given")

    saved = blipfast.distributed._gather_sizes
    blipfast.distributed._gather_sizes = exchange
    try:
        yield
    finally:
        blipfast.distributed._gather_sizes = saved


def _run_cases(rank, cases, groups):
    """One rank's gathers (values, offsets, sizes) and input gradients, case by case."""
    out = {}
    for case_index, (name, (members, sizes, trailing, dtype)) in enumerate(cases.items()):
        if members is not None and rank not in members:
            continue
        group = groups[members]
        group_rank = rank if members is None else members.index(rank)
        x = _rows(case_index, group_rank, sizes[group_rank], trailing, dtype)
        result = {}
        ids, result["no_grad_offset"], result["no_grad_sizes"] = gather_no_grad(x, group)
        result["no_grad"] = ids
        with _no_count_exchange():
            result["known_sizes"] = gather_no_grad(x, group, sizes=result["no_grad_sizes"])
        if dtype.is_floating_point:
            leaf = x.clone().requires_grad_()
            local = torch.stack([leaf, leaf], dim=-1)[..., 0]  # a non-contiguous input
            # Even cases pass the counts the first gather returned (no exchange).
            known = result["no_grad_sizes"] if case_index % 2 == 0 else None
            with _no_count_exchange() if known else contextlib.nullcontext():
                gathered, result["offset"], result["sizes"] = gather_with_grad(local, group,
                                                                               sizes=known)
            weights = _loss_weights(case_index, group_rank, gathered.shape[0], trailing, dtype)
            loss = (gathered * weights).sum() + 0.5 * (leaf * leaf).sum()
            loss.backward()
            result["gathered"] = gathered.detach()
            result["grad"] = leaf.grad
            result["no_grad_requires_grad"] = gather_no_grad(leaf, group)[0].requires_grad
            # The gathered gradient reaching the backward is also another input's gradient
            # (an addition passes one tensor to both): the backward must not change it,
            # and the gradient it returns must not keep the gathered rows' buffer alive.
            direct = x.clone().requires_grad_()
            gathered = gather_with_grad(direct, group)[0]
            shared = torch.zeros_like(gathered, requires_grad=True)
            grad_direct, result["shared_grad"] = torch.autograd.grad(
                ((gathered + shared) * weights).sum(), (direct, shared))
            result["direct_grad"] = grad_direct
            result["direct_grad_storage_bytes"] = grad_direct.untyped_storage().nbytes()
        out[name] = result
    return out


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda n: f"world{n}")
def world(request):
    """(world_size, per-rank results) of one spawn that ran every check of that world."""
    return request.param, run_on_ranks(request.param, _checks, CASES[request.param])


def _members(world_size, members):
    return list(range(world_size)) if members is None else list(members)


def _expected(case_index, sizes, trailing, dtype):
    """The gathered rows: every group rank's rows, in group-rank order."""
    return torch.cat([_rows(case_index, g, size, trailing, dtype) for g, size in enumerate(sizes)])


def _cases(world_size):
    """(path, case index, name, case) for every case on every path."""
    for path in PATHS:
        for case_index, (name, case) in enumerate(CASES[world_size].items()):
            yield path, case_index, name, case


def test_gather_values_offsets_and_sizes(world):
    world_size, results = world
    for path, case_index, name, (members, sizes, trailing, dtype) in _cases(world_size):
        expected = _expected(case_index, sizes, trailing, dtype)
        name = (path, name)
        for group_rank, rank in enumerate(_members(world_size, members)):
            result = results[rank][name]
            offset = sum(sizes[:group_rank])
            assert result["no_grad"].dtype == dtype, name
            assert torch.equal(result["no_grad"], expected), name
            assert (result["no_grad_offset"], result["no_grad_sizes"]) == (offset, sizes), name
            known_sizes = result["known_sizes"]
            assert torch.equal(known_sizes[0], expected) and known_sizes[1:] == (offset, sizes), name
            if dtype.is_floating_point:
                assert torch.equal(result["gathered"], expected), name
                assert (result["offset"], result["sizes"]) == (offset, sizes), name
                assert not result["no_grad_requires_grad"], name


def test_gather_with_grad_sums_every_ranks_gradient(world):
    world_size, results = world
    for path, case_index, name, (members, sizes, trailing, dtype) in _cases(world_size):
        if not dtype.is_floating_point:
            continue
        name = (path, name)
        group_size, total = len(sizes), sum(sizes)
        weights = [_loss_weights(case_index, g, total, trailing, dtype) for g in range(group_size)]
        weight_sum = torch.stack(weights).sum(0)
        for group_rank, rank in enumerate(_members(world_size, members)):
            offset, size = sum(sizes[:group_rank]), sizes[group_rank]
            x = _rows(case_index, group_rank, size, trailing, dtype)
            expected = weight_sum[offset:offset + size] + x  # + x: the local 0.5 * x^2 term
            result = results[rank][name]
            torch.testing.assert_close(result["grad"], expected, msg=str(name))
            torch.testing.assert_close(result["direct_grad"], weight_sum[offset:offset + size],
                                       msg=str(name))
            assert torch.equal(result["shared_grad"], weights[group_rank]), name
            row_bytes = math.prod(trailing) * x.element_size()
            assert result["direct_grad_storage_bytes"] <= max(sizes) * row_bytes, name


def test_trailing_shape_mismatch_raises_on_every_rank(world):
    world_size, results = world
    for rank in range(world_size):
        message = results[rank]["mismatch"]
        assert message is not None and "tensor must have the same trailing shape" in message


def test_bad_sizes_raise_on_every_rank(world):
    world_size, results = world
    for rank in range(world_size):
        wrong_length, wrong_count, negative, not_ints = results[rank]["bad_sizes"]
        assert wrong_length is not None and f"sizes must hold {world_size}" in wrong_length
        assert wrong_count is not None and f"sizes[{rank}]" in wrong_count
        assert negative is not None and "non-negative" in negative
        assert not_ints is not None and "non-negative ints" in not_ints


def test_a_second_derivative_through_the_gather_raises(world):
    _, results = world
    for result in results:
        assert "cannot differentiate twice" in (result["second_derivative"] or ""), result


def test_single_process_group_is_not_gathered(world):
    world_size, results = world
    for rank in range(world_size):
        assert results[rank]["singleton"] == (True, True, 0, [2])
        assert results[rank]["world_resolved"]
        # this_process_group: created once, one process, nothing to gather over
        assert results[rank]["this_process"] == (True, 1, None)


def test_a_group_this_rank_is_not_in_raises(world):
    world_size, results = world
    for rank in range(world_size):
        not_members = [members for members, *_ in CASES[world_size].values()
                       if members is not None and rank not in members]
        messages = results[rank]["not_a_member"]
        assert len(messages) == len(set(not_members))
        for message in messages:
            assert message is not None and "not a member of group" in message
    assert world_size == 2 or results[0]["not_a_member"]  # world 3: rank 0 is outside (1, 2)


def test_resolve_group_without_init_is_none():
    assert not dist.is_initialized()
    assert resolve_group(None) is None
    x = torch.randn(3, 4, requires_grad=True)
    gathered, offset, sizes = gather_with_grad(x, None)
    assert gathered is x and offset == 0 and sizes == [3]
    assert not gather_no_grad(x, None)[0].requires_grad
    assert this_process_group() is None
    ids, offset, sizes = gather_no_grad(torch.arange(5), None)
    assert torch.equal(ids, torch.arange(5)) and offset == 0 and sizes == [5]
    assert gather_with_grad(x, None, sizes=[3])[0] is x
    with pytest.raises(ValueError, match=r"sizes\[0\]"):
        gather_no_grad(torch.arange(5), None, sizes=[4])
    with pytest.raises(ValueError, match=r"sizes\[0\]"):
        gather_with_grad(x, None, sizes=[2])


def test_group_without_init_raises_naming_group():
    with pytest.raises(ValueError, match="group was given but torch.distributed is not"):
        resolve_group(object())
    with pytest.raises(ValueError, match="group was given"):
        gather_with_grad(torch.zeros(2, 3), object())


def test_bad_tensor_raises_naming_tensor():
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor"):
        gather_with_grad([1.0, 2.0], None)
    with pytest.raises(ValueError, match="tensor must have at least 1 dimension"):
        gather_no_grad(torch.tensor(1.0), None)


@pytest.mark.parametrize("config, expected", [
    ("cpu:gloo,cuda:nccl", True), ("cpu:gloo", True), ("gloo", True), ("nccl", False),
    ("cuda:nccl", False), ("cpu:gloo, cuda:nccl", True)])
def test_row_counts_go_through_a_cpu_backend_when_there_is_one(monkeypatch, config, expected):
    # Only gloo runs here; the NCCL configurations are checked on their description.
    monkeypatch.setattr(dist, "get_backend_config", lambda group: config)
    assert blipfast.distributed._has_cpu_backend(object()) is expected


@pytest.mark.parametrize("config, cpu, cuda", [
    ("cpu:gloo,cuda:nccl", "gloo", "nccl"), ("cpu:gloo, cuda:nccl", "gloo", "nccl"),
    ("gloo", "gloo", "gloo"), ("nccl", "nccl", "nccl")])
def test_each_device_gets_its_own_backend(monkeypatch, config, cpu, cuda):
    """The collective and its path (e.g. reduce-scatter on NCCL) follow the tensor's device."""
    monkeypatch.setattr(dist, "get_backend_config", lambda group: config)
    assert blipfast.distributed._backend_name(object(), torch.device("cpu")) == cpu
    assert blipfast.distributed._backend_name(object(), torch.device("cuda")) == cuda
