"""Fused residual-add + LayerNorm against the reference on CPU (Triton interpreter), and the
ops' contract beyond numerics: argument errors, torch.compile tracing, torch.library
checks, the reference path on CPU without the interpreter.

The numeric cases (``CASES`` and ``run_case``) are shared with ``test_layer_norm_gpu.py``,
which runs them on CUDA. Each case draws fresh inputs, runs the public op forward and
backward (a gradient into the normalized output, and with ``add_layer_norm`` one into the
sum too) and compares every output and gradient with the float64 reference, within the
tolerance table in ``tolerances.py`` (PyTorch's own error: ``F.layer_norm`` run natively
in the case's dtypes).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from blipfast import reference
from blipfast.ops.layer_norm import add_layer_norm, layer_norm
from seeds import case_seed
from layer_norm_cases import CASES, run_case
from compile_checks import assert_compiles_like_reference


# --------------------------------------------------------------------------------------
# bf16 runs here with the interpreter's float32 -> bf16 rounding made a GPU's (to nearest
# even; it truncates): interpreter_like_gpu.py. test_layer_norm_gpu.py runs the cases
# compiled on CUDA.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.interpreter
def test_layer_norm_matches_reference_cpu(case, dtype):
    run_case(case, dtype, "cpu", seed=case_seed(f"{case}/{dtype}"))


def test_summed_output_gradient_is_expanded():
    """``y.sum().backward()`` hands the kernel a gradient with stride 0 everywhere."""
    x, residual = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    weight, bias = torch.randn(64), torch.randn(64)
    leaves = [t.requires_grad_() for t in (x, residual, weight, bias)]
    layer_norm(leaves[0], leaves[2], leaves[3], residual=leaves[1]).sum().backward()
    expected_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    reference.layer_norm(expected_leaves[0], expected_leaves[2], expected_leaves[3],
                         residual=expected_leaves[1]).sum().backward()
    for got, want in zip(leaves, expected_leaves):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-5, rtol=1e-5)


def test_gradients_only_where_asked():
    x = torch.randn(4, 32, requires_grad=True)
    weight = torch.randn(32)  # no gradient wanted
    bias = torch.randn(32, requires_grad=True)
    residual = torch.randn(4, 32)
    normed, total = add_layer_norm(x, residual, weight, bias)
    assert total.requires_grad
    (normed.square().sum() + total.sum()).backward()
    assert x.grad is not None and bias.grad is not None and weight.grad is None
    normed = layer_norm(torch.randn(4, 32), weight.requires_grad_(), None)
    normed.square().sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_add_layer_norm_normalizes_the_returned_sum(dtype):
    """add_layer_norm normalizes its sum as returned (rounded to x's dtype), so that the
    backward may read the sum alone: its output equals layer_norm of the returned sum."""
    generator = torch.Generator().manual_seed(7)
    x, residual = (torch.randn(3, 7, 88, generator=generator).to(dtype) for _ in range(2))
    weight, bias = torch.randn(88, generator=generator), torch.randn(88, generator=generator)
    x = x + 100  # a sum far from 0 rounds coarsely: the rounding is visible in the output
    normed, total = add_layer_norm(x, residual, weight.to(dtype), bias.to(dtype))
    torch.testing.assert_close(total, x + residual, atol=0, rtol=0)
    torch.testing.assert_close(normed, layer_norm(total, weight.to(dtype), bias.to(dtype)),
                               atol=0, rtol=0)
    torch.testing.assert_close(normed, reference.add_layer_norm(
        x, residual, weight.to(dtype), bias.to(dtype))[0], atol=2e-3, rtol=0)


def _saved_tensors(function):
    """The tensors autograd saves while ``function()`` runs, and its result."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = function()
    return saved, result


@pytest.mark.parametrize("door", ["autograd_function", "custom_op"])
@pytest.mark.interpreter
def test_add_layer_norm_saves_the_sum_not_its_terms(door):
    """The memory contract of add_layer_norm: the backward keeps the returned sum (one
    activation), never x and residual; layer_norm with a residual keeps x and residual
    (it normalizes the float32 sum, which it does not store). Both doors to the kernels
    (eager autograd.Function and the torch.compile custom op) are checked."""
    from blipfast.kernels.layer_norm import LayerNormFunction, layer_norm_forward_op

    def run(store_sum):
        leaves = [torch.randn(4, 5, 32).requires_grad_() for _ in range(2)] + \
            [torch.randn(32).requires_grad_() for _ in range(2)]
        if door == "autograd_function":
            saved, (normed, total) = _saved_tensors(
                lambda: LayerNormFunction.apply(*leaves, 1e-5, store_sum))
        else:
            saved, (normed, total, _, _) = _saved_tensors(
                lambda: layer_norm_forward_op(*leaves, 1e-5, store_sum))
        pointers = {tensor.data_ptr() for tensor in saved
                    if tensor is not None and tensor.dim() == 3}
        gradients = torch.autograd.grad(
            normed.square().sum() + (total.sum() if store_sum else 0), leaves)
        assert all(torch.isfinite(gradient).all() for gradient in gradients)
        return pointers, leaves, total

    pointers, (x, residual, _, _), total = run(store_sum=True)
    assert pointers == {total.data_ptr()}
    pointers, (x, residual, _, _), _ = run(store_sum=False)
    assert pointers == {x.data_ptr(), residual.data_ptr()}


def test_empty_rows():
    x = torch.randn(0, 3, 16, requires_grad=True)
    weight = torch.randn(16, requires_grad=True)
    normed, total = add_layer_norm(x, torch.randn(0, 3, 16), weight, None)
    assert normed.shape == total.shape == x.shape
    normed.sum().backward()
    assert torch.equal(weight.grad, torch.zeros(16))
    assert x.grad.shape == x.shape


def test_rows_wider_than_the_kernels_use_the_reference():
    x = torch.randn(2, 65537)
    weight, bias = torch.randn(65537), torch.randn(65537)
    assert torch.equal(layer_norm(x, weight, bias), reference.layer_norm(x, weight, bias))


# --------------------------------------------------------------------------------------
# Argument errors
# --------------------------------------------------------------------------------------


def _inputs(dtype=torch.float32):
    return torch.randn(3, 4, 16, dtype=dtype), torch.randn(3, 4, 16, dtype=dtype), \
        torch.randn(16), torch.randn(16)


_BAD_ARGUMENTS = [
    (lambda x, r, w, b: (x.numpy(), r, w, b, {}), TypeError, "x must be a torch.Tensor"),
    (lambda x, r, w, b: (x.int(), r.int(), w, b, {}), TypeError, "x has dtype torch.int32"),
    (lambda x, r, w, b: (x.double(), r.double(), w, b, {}), TypeError, "x has dtype torch.float64"),
    (lambda x, r, w, b: (x[0, 0, 0], r[0, 0, 0], None, None, {}), ValueError,
     "x must have at least 1 dimension"),
    (lambda x, r, w, b: (x[..., :0], r[..., :0], None, None, {}), ValueError,
     "x must have a non-empty last dimension"),
    (lambda x, r, w, b: (x, r.tolist(), w, b, {}), TypeError, "residual must be a torch.Tensor"),
    (lambda x, r, w, b: (x, r.half(), w, b, {}), TypeError, "residual has dtype torch.float16"),
    (lambda x, r, w, b: (x, r[:, :3], w, b, {}), ValueError, "residual must have the shape of x"),
    (lambda x, r, w, b: (x, r.to("meta"), w, b, {}), ValueError, "residual is on meta"),
    (lambda x, r, w, b: (x, r, w.tolist(), b, {}), TypeError, "weight must be a torch.Tensor"),
    (lambda x, r, w, b: (x, r, w.long(), b, {}), TypeError, "weight has dtype torch.int64"),
    (lambda x, r, w, b: (x, r, torch.randn(17), b, {}), ValueError,
     "weight must have shape (N,) = (16,)"),
    (lambda x, r, w, b: (x, r, w, b[None], {}), ValueError, "bias must have shape (N,) = (16,)"),
    (lambda x, r, w, b: (x, r, w, b.to(torch.bool), {}), TypeError, "bias has dtype torch.bool"),
    (lambda x, r, w, b: (x, r, w, b.to("meta"), {}), ValueError, "bias is on meta"),
    (lambda x, r, w, b: (x, r, w, b, {"eps": 0.0}), ValueError, "eps must be a positive"),
    (lambda x, r, w, b: (x, r, w, b, {"eps": -1e-5}), ValueError, "eps must be a positive"),
    (lambda x, r, w, b: (x, r, w, b, {"eps": float("inf")}), ValueError, "eps must be a positive"),
    (lambda x, r, w, b: (x, r, w, b, {"eps": "1e-5"}), TypeError, "eps must be a float"),
    (lambda x, r, w, b: (x, r, w, b, {"eps": True}), TypeError, "eps must be a float"),
    (lambda x, r, w, b: (x, r, w, b, {"eps": torch.tensor(1e-5)}), TypeError,
     "eps must be a float"),
]


def _pattern(words: str) -> str:
    for character in "[]().":
        words = words.replace(character, "\\" + character)
    return words


@pytest.mark.parametrize("change, error, words", _BAD_ARGUMENTS)
def test_layer_norm_bad_arguments_raise_clear_errors(change, error, words):
    x, residual, weight, bias, options = change(*_inputs())
    with pytest.raises(error, match="layer_norm: " + _pattern(words)):
        layer_norm(x, weight, bias, residual=residual, **options)


@pytest.mark.parametrize("change, error, words", _BAD_ARGUMENTS + [
    (lambda x, r, w, b: (x, None, w, b, {}), TypeError, "residual must be a torch.Tensor"),
])
def test_add_layer_norm_bad_arguments_raise_clear_errors(change, error, words):
    x, residual, weight, bias, options = change(*_inputs())
    with pytest.raises(error, match="add_layer_norm: " + _pattern(words)):
        add_layer_norm(x, residual, weight, bias, **options)


def test_residual_may_be_omitted_and_parameters_may_differ_in_dtype():
    x, _, weight, bias = _inputs(torch.float16)
    out = layer_norm(x, weight, bias.to(torch.bfloat16))  # fp32 weight, bf16 bias, fp16 x
    expected = reference.layer_norm(x, weight, bias.to(torch.bfloat16))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


# --------------------------------------------------------------------------------------
# torch.compile, torch.library, the reference path
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_traces_the_custom_op(dynamic):
    """One graph, also with dynamic=True, where the float eps is a symbolic input the
    argument checks must trace."""
    x, residual, weight, bias = _inputs()

    def step(x, residual, weight, bias, eps):
        normed, total = add_layer_norm(x, residual, weight, bias, eps=eps)
        again = layer_norm(normed, weight, None, residual=total, eps=1e-6)
        return again.square().sum() + total.sum()

    def expected_step(x, residual, weight, bias, eps):
        normed, total = reference.add_layer_norm(x, residual, weight, bias, eps=eps)
        again = reference.layer_norm(normed, weight, None, residual=total, eps=1e-6)
        return again.square().sum() + total.sum()

    assert_compiles_like_reference(step, expected_step, (x, residual, weight, bias), 1e-5,
                                   dynamic=dynamic)


@pytest.mark.parametrize("store_sum", [False, True])
@pytest.mark.interpreter
def test_custom_ops_pass_torch_library_checks(store_sum):
    from blipfast.kernels.layer_norm import layer_norm_backward_op, layer_norm_forward_op

    x, residual, weight, bias = _inputs()
    arguments = (x.requires_grad_(), residual.requires_grad_(), weight.requires_grad_(),
                 bias.half().requires_grad_(), 1e-5, store_sum)
    torch.library.opcheck(layer_norm_forward_op, arguments,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    _, _, mean, rstd = layer_norm_forward_op(*arguments)
    torch.library.opcheck(
        layer_norm_backward_op,
        (torch.randn_like(x), torch.randn_like(x) if store_sum else None, x.detach(),
         residual.detach(), weight.detach(), bias.detach().half(), mean, rstd, True, store_sum),
        test_utils=("test_schema", "test_faketensor"))


def test_cpu_without_interpreter_uses_the_reference(reference_path):
    x, residual, weight, bias = [t.requires_grad_() for t in _inputs()]
    normed, total = add_layer_norm(x, residual, weight, bias)
    expected = reference.add_layer_norm(x, residual, weight, bias)
    assert torch.equal(normed, expected[0]) and torch.equal(total, expected[1])
    assert torch.equal(layer_norm(x, weight, bias, residual=residual), expected[0])
    normed.sum().backward()
    assert x.grad is not None and weight.grad is not None


# --------------------------------------------------------------------------------------
# Recomputing outputs in the backward (blipfast.ops.recompute_in_backward)
# --------------------------------------------------------------------------------------


def _pre_norm_chain(dtype, recompute):
    """Two pre-norm blocks (add_layer_norm -> linear), the first fed by a plain
    layer_norm: returns (loss, the first add_layer_norm's output, the first linear's
    autograd node, the leaves)."""
    from blipfast.ops import recompute_in_backward

    generator = torch.Generator().manual_seed(3)
    leaves = [(torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_()
              for shape, scale in (((18, 48), 1.0), ((48, 48), 0.15), ((48,), 1.0),
                                   ((48,), 0.5))]
    x, projection, weight, bias = leaves
    with recompute_in_backward() if recompute else contextlib.nullcontext() as active:
        assert active in (None, True)
        hidden = layer_norm(x, weight, bias)
        update = torch.nn.functional.linear(hidden, projection)
        normed, stream = add_layer_norm(update, x, weight, bias)
        node = (update := torch.nn.functional.linear(normed, projection)).grad_fn
        normed_again, stream = add_layer_norm(update, stream, weight, bias)
        loss = (torch.nn.functional.linear(normed_again, projection).square().sum()
                + stream.sum())
    return loss, normed, node, leaves


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.interpreter
def test_recomputed_outputs_give_the_same_gradients_bit_for_bit(dtype):
    """The linears do not keep the LayerNorm outputs (their saved input is recomputed when
    first read, equal to the output, and that recomputation serves later reads), and
    every gradient is bit for bit the one computed with the outputs kept."""
    loss, normed, node, leaves = _pre_norm_chain(dtype, recompute=True)
    assert type(node).__name__ == "MmBackward0"  # saves its input as self
    saved = node._saved_self
    assert saved.untyped_storage().data_ptr() != normed.untyped_storage().data_ptr()
    assert torch.equal(saved, normed)
    again = node._saved_self
    assert again.untyped_storage().data_ptr() == saved.untyped_storage().data_ptr()
    gradients = torch.autograd.grad(loss, leaves)

    expected_loss, expected_normed, expected_node, expected_leaves = _pre_norm_chain(
        dtype, recompute=False)
    kept = expected_node._saved_self
    assert kept.untyped_storage().data_ptr() == expected_normed.untyped_storage().data_ptr()
    expected = torch.autograd.grad(expected_loss, expected_leaves)
    assert torch.equal(loss, expected_loss)
    for got, want in zip(gradients, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("modified", ["input", "output", "output_view", "weight"])
@pytest.mark.interpreter
def test_in_place_changes_before_the_backward_raise_as_autograd_does(modified):
    """Autograd refuses a backward that needs a tensor modified in place since it was
    saved, but skips that check for tensors passing saved-tensor hooks: inside
    recompute_in_backward such a backward gave silently wrong gradients (the output
    recomputed from its inputs as they were, the inputs read as they are). Now it raises,
    with and without the recomputation."""
    from blipfast.ops import layer_norm, recompute_in_backward

    generator = torch.Generator().manual_seed(11)
    x = torch.randn(4, 32, generator=generator, requires_grad=True)
    weight = torch.randn(32, generator=generator, requires_grad=True)
    projection = torch.randn(8, 32, generator=generator, requires_grad=True)
    for recompute in (False, True):
        hidden = x * 1.0
        scale = weight * 1.0
        with recompute_in_backward() if recompute else contextlib.nullcontext():
            normed = layer_norm(hidden, scale, None)
            loss = torch.nn.functional.linear(normed, projection).square().sum() \
                + torch.nn.functional.linear(normed[:, ::2], projection[:, ::2]).sum()
        with torch.no_grad():
            {"input": hidden, "output": normed, "output_view": normed[:, 1],
             "weight": scale}[modified].add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.interpreter
def test_recomputation_steps_aside_for_other_saved_tensor_hooks_and_no_grad():
    from blipfast.ops import recompute_in_backward
    from blipfast.ops.recompute import saved_tensor_hooks_active

    assert not saved_tensor_hooks_active()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert saved_tensor_hooks_active()
        with recompute_in_backward() as active:
            assert active is False
    with torch.no_grad(), recompute_in_backward() as active:
        assert active is False
    with recompute_in_backward() as active:
        with recompute_in_backward() as nested:
            assert active is True and nested is True
        # the inner context leaves the outer one in effect
        x = torch.randn(3, 16, requires_grad=True)
        normed = layer_norm(x, None, None)
        node = (normed * normed).grad_fn
        assert node._saved_self.untyped_storage().data_ptr() != normed.untyped_storage().data_ptr()
    normed = layer_norm(x, None, None)
    node = (normed * normed).grad_fn
    assert node._saved_self.untyped_storage().data_ptr() == normed.untyped_storage().data_ptr()


@pytest.mark.interpreter
def test_recomputation_can_chain_to_outer_hooks_for_measurement(monkeypatch):
    """With CHAIN_TO_OUTER_HOOKS (for tools that record saved tensors), outer hooks see
    every saved tensor except the recomputed LayerNorm outputs, and unpack what they
    packed."""
    import importlib

    from blipfast.ops import recompute_in_backward
    from blipfast.ops.recompute import saved_tensor_hooks_active

    monkeypatch.setattr(importlib.import_module("blipfast.ops.recompute"),
                        "CHAIN_TO_OUTER_HOOKS", True)
    packed, unpacked = [], []

    def pack(tensor):
        packed.append(tensor)
        return ("outer", tensor)

    def unpack(value):
        unpacked.append(value[1])
        return value[1]

    x = torch.randn(6, 16, requires_grad=True)
    weight = torch.randn(16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        # the measurement's hooks do not count as hooks a layer must save the same under
        assert not saved_tensor_hooks_active()
        with recompute_in_backward() as active:
            assert active is True
            normed = layer_norm(x, None, None)
            out = normed @ weight
    pointers = {tensor.untyped_storage().data_ptr() for tensor in packed}
    assert normed.untyped_storage().data_ptr() not in pointers
    assert x.untyped_storage().data_ptr() in pointers  # saved by the LayerNorm
    assert weight.untyped_storage().data_ptr() in pointers  # saved by the matmul
    out.sum().backward()
    assert len(unpacked) == len(packed)
    expected_x = x.detach().clone().requires_grad_()
    expected_weight = weight.detach().clone().requires_grad_()
    (layer_norm(expected_x, None, None) @ expected_weight).sum().backward()
    assert torch.equal(x.grad, expected_x.grad) and torch.equal(weight.grad, expected_weight.grad)


def _assert_recomputation_changes_nothing(build):
    """``build(recompute)`` -> (loss, leaves), run inside recompute_in_backward and outside
    it: the losses and every leaf's gradient are equal, bit for bit and in dtype."""
    from blipfast.ops import recompute_in_backward

    results = []
    for recompute in (True, False):
        with recompute_in_backward() if recompute else contextlib.nullcontext():
            loss, leaves = build(recompute)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    (loss, gradients), (expected_loss, expected) = results
    assert torch.equal(loss, expected_loss)
    for got, want in zip(gradients, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)


def test_recomputed_inputs_that_are_views_are_cut_with_their_own_geometry():
    """An input of mark_recomputable that is a view of a marked tensor (a column slice of
    a LayerNorm output) is recomputed as that view, not as the whole tensor."""
    from blipfast.ops import mark_recomputable

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(6, 32, generator=generator).requires_grad_()
    weight = torch.randn(16, 8, generator=generator).requires_grad_()
    scale = torch.randn(8, generator=generator).requires_grad_()

    def build(recompute):
        part = layer_norm(x, None, None)[:, 8:24]
        projected = part @ weight
        if recompute:
            assert mark_recomputable(projected, lambda view: view @ weight.detach(), part)
        return (projected * scale).sum(), (x, weight, scale)

    _assert_recomputation_changes_nothing(build)


def test_views_of_another_dtype_are_kept_not_recomputed():
    """A saved view that reinterprets a marked tensor's storage as another dtype (here
    float16 bits read as bfloat16) is kept as it is, and as an input of mark_recomputable
    it is held, not swapped for the marked tensor's recomputation."""
    from blipfast.ops import mark_recomputable

    generator = torch.Generator().manual_seed(6)
    x = torch.randn(6, 32, generator=generator).half().requires_grad_()
    weight = torch.randn(32, generator=generator).bfloat16().requires_grad_()
    scale = torch.randn(32, generator=generator).bfloat16().requires_grad_()

    def build(recompute):
        normed = layer_norm(x, None, None)
        reinterpreted = normed.view(torch.bfloat16)  # no gradient flows through a bit cast
        weighted = reinterpreted * weight  # saves the bfloat16 view for weight's gradient
        if recompute:
            assert mark_recomputable(weighted, lambda view: view * weight.detach(),
                                     reinterpreted)
        loss = (weighted * scale).float().sum() + normed.float().square().sum()
        return loss, (x, weight, scale)

    _assert_recomputation_changes_nothing(build)


def test_a_mark_is_forgotten_with_its_tensor_or_the_context():
    """When a marked tensor is freed inside the context, its recomputation and the inputs
    it holds are freed with it, not kept until the context ends; when the context ends,
    the marks of tensors still alive (that no op saved) are dropped too."""
    import gc
    import weakref

    from blipfast.ops import mark_recomputable, recompute_in_backward

    x = torch.randn(4, 16, requires_grad=True)
    with recompute_in_backward():
        normed = layer_norm(x, None, None)
        scale = torch.randn(16)
        scaled = normed * scale
        assert mark_recomputable(scaled, torch.mul, normed, scale)
        held = weakref.ref(scale)
        del scaled, scale
        gc.collect()
        assert held() is None
        scale = torch.randn(16)
        kept = normed + scale  # saves neither term
        assert mark_recomputable(kept, torch.add, normed, scale)
        held = weakref.ref(scale)
        del scale
    gc.collect()
    assert held() is None and kept.requires_grad


@pytest.mark.interpreter
def test_marked_inputs_are_recomputed_not_held():
    """A recomputation whose input is itself marked (a projection of a LayerNorm output)
    holds that input's recomputation, not the tensor: once the caller drops the LayerNorm
    output, nothing keeps it. The recomputation runs without autograd even when an input
    is a parameter, and a tensor without autograd history is not marked."""
    import gc
    import weakref

    from blipfast.ops import mark_recomputable

    generator = torch.Generator().manual_seed(7)
    x = torch.randn(6, 16, generator=generator).requires_grad_()
    weight = torch.randn(16, 16, generator=generator).requires_grad_()
    scale = torch.randn(16, generator=generator).requires_grad_()
    recomputations = []

    def recompute_projection(inputs, matrix):
        recomputations.append(inputs @ matrix)
        return recomputations[-1]

    def build(recompute):
        normed = layer_norm(x, None, None)
        projected = normed @ weight
        if recompute:
            assert mark_recomputable(projected, recompute_projection, normed, weight)
            assert not mark_recomputable(projected.detach() * 2, torch.mul, normed, 2)
        loss = (projected * scale).sum()  # saves projected for scale's gradient
        if recompute:
            released = weakref.ref(normed)
            del normed
            gc.collect()
            assert released() is None
        return loss, (x, weight, scale)

    _assert_recomputation_changes_nothing(build)
    assert len(recomputations) == 1 and not recomputations[0].requires_grad
