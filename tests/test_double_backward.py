"""Second derivatives through the fused ops: their backward kernels are not differentiable,
so a gradient penalty (``autograd.grad(..., create_graph=True)`` and a backward through
its result) must raise, never return gradients that silently miss the second-order terms.

On CPU through the Triton interpreter, the kernels' own autograd (the eager
``autograd.Function`` of each op, and the contrastive loss's custom op). The PyTorch
reference path (no interpreter) differentiates twice as PyTorch does; that is PyTorch's
business, not checked here.
"""

from __future__ import annotations

import pytest
import torch

from blipfast import ops, reference
from blipfast.ops._dispatch import use_triton


def _attention(generator):
    q, k, v = (torch.randn(2, 5, 1, 16, generator=generator) for _ in range(3))
    return ops.attention, (q, k, v), {"causal": True}


def _layer_norm(generator):
    x, weight, bias = (torch.randn(shape, generator=generator) for shape in ((3, 32), 32, 32))
    return ops.layer_norm, (x, weight, bias), {}


def _add_layer_norm(generator):
    x, residual, weight, bias = (torch.randn(shape, generator=generator)
                                 for shape in ((3, 32), (3, 32), 32, 32))
    return (lambda *inputs: ops.add_layer_norm(*inputs)[0]), (x, residual, weight, bias), {}


def _bias_gelu(generator):
    x, bias = torch.randn(3, 32, generator=generator), torch.randn(32, generator=generator)
    return ops.bias_gelu, (x, bias), {}


def _bias_gelu_linear(generator):
    x, gelu_bias = torch.randn(3, 32, generator=generator), torch.randn(32, generator=generator)
    weight, bias = torch.randn(5, 32, generator=generator), torch.randn(5, generator=generator)
    return ops.bias_gelu_linear, (x, gelu_bias, weight, bias), {}


def _cross_entropy(generator):
    logits = torch.randn(3, 32, generator=generator)
    labels = torch.randint(0, 32, (3,), generator=generator)
    return (lambda inputs: ops.cross_entropy(inputs, labels, reduction="none")), (logits,), {}


def _contrastive_loss(generator):
    image, text = torch.randn(3, 16, generator=generator), torch.randn(3, 16, generator=generator)
    return ops.contrastive_loss, (image, text, torch.tensor(3.0)), {}


OPS = {"attention": _attention, "layer_norm": _layer_norm, "add_layer_norm": _add_layer_norm,
       "bias_gelu": _bias_gelu, "bias_gelu_linear": _bias_gelu_linear,
       "cross_entropy": _cross_entropy, "contrastive_loss": _contrastive_loss}


@pytest.mark.parametrize("name", OPS)
@pytest.mark.interpreter
def test_second_derivative_raises(name):
    assert use_triton(torch.device("cpu")), "the CPU tests must run the Triton interpreter"
    operation, inputs, options = OPS[name](torch.Generator().manual_seed(7))
    inputs = tuple(tensor.requires_grad_() for tensor in inputs)
    output = operation(*inputs, **options)
    # The first derivative is the kernels' and fine; a graph of it is what cannot be had.
    (gradient,) = torch.autograd.grad(output.square().sum(), inputs[0], create_graph=True)
    penalty = gradient.square().sum() + output.sum()
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula"):
        penalty.backward()


@pytest.mark.interpreter
def test_first_derivatives_unchanged_under_create_graph():
    """``create_graph=True`` alone (e.g. a higher-order optimizer that never goes on to a
    second backward) still gives the first derivatives, equal to a plain backward's."""
    operation, inputs, options = _layer_norm(torch.Generator().manual_seed(3))
    inputs = tuple(tensor.requires_grad_() for tensor in inputs)
    plain = torch.autograd.grad(operation(*inputs, **options).square().sum(), inputs)
    graphed = torch.autograd.grad(operation(*inputs, **options).square().sum(), inputs,
                                  create_graph=True)
    for expected, actual in zip(plain, graphed):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.interpreter
def test_second_derivative_through_autograd_grad_raises(name):
    """``torch.autograd.grad(penalty, chosen_inputs)`` where the chosen input also reaches
    the penalty outside the op's backward (here a scale applied before the op): with
    ``once_differentiable`` nothing raised and the result silently lacked every term
    through the op's backward (d/da of a gradient penalty: 85.75 where it is 93.50)."""
    operation, inputs, options = OPS[name](torch.Generator().manual_seed(11))
    inputs = tuple(tensor.requires_grad_() for tensor in inputs)
    scale = torch.tensor(1.3, requires_grad=True)
    output = operation(inputs[0] * scale, *inputs[1:], **options)
    (gradient,) = torch.autograd.grad(output.square().sum(), inputs[0], create_graph=True)
    penalty = gradient.square().sum()
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula"):
        torch.autograd.grad(penalty, scale)


def _scalar(value: torch.Tensor) -> torch.Tensor:
    return value if value.dim() == 0 else (value * torch.linspace(0.5, 1.5, value.numel()).view(
        value.shape)).sum()


@pytest.mark.parametrize("name", OPS)
@pytest.mark.interpreter
def test_function_transforms_give_the_kernels_derivatives(name):
    """Under torch.func transforms and forward-mode AD the ops run their PyTorch reference
    (the kernels' autograd has no batching or forward-mode rule: it raised PyTorch's
    internal errors, or gave tangents of zero). Checked against the kernels' own reverse
    mode: grad equals it, and a forward-mode tangent t gives u . (J t) = (J^T u) . t."""
    operation, inputs, options = OPS[name](torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(6)
    tangents = tuple(torch.randn(tensor.shape, generator=generator) for tensor in inputs)

    def scalar_output(*arguments):
        return _scalar(operation(*arguments, **options))

    leaves = tuple(tensor.clone().requires_grad_() for tensor in inputs)
    expected = torch.autograd.grad(scalar_output(*leaves), leaves)  # the kernels' backward
    transformed = torch.func.grad(scalar_output, argnums=tuple(range(len(inputs))))(*inputs)
    for actual, wanted in zip(transformed, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)
    directional = sum((gradient * tangent).sum() for gradient, tangent in zip(expected, tangents))
    _, tangent_out = torch.func.jvp(scalar_output, inputs, tangents)
    torch.testing.assert_close(tangent_out.float(), directional, rtol=1e-4, atol=1e-4)
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():
        duals = tuple(forward_ad.make_dual(tensor, tangent)
                      for tensor, tangent in zip(inputs, tangents))
        dual_tangent = forward_ad.unpack_dual(scalar_output(*duals)).tangent
    assert dual_tangent is not None
    torch.testing.assert_close(dual_tangent.float(), directional, rtol=1e-4, atol=1e-4)


@pytest.mark.interpreter
def test_vmap_over_attention_equals_the_kernels_per_sample():
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(3, 2, 5, 1, 16, generator=generator) for _ in range(3))
    batched = torch.func.vmap(lambda *qkv: ops.attention(*qkv, causal=True))(q, k, v)
    for index in range(3):
        torch.testing.assert_close(batched[index],
                                   ops.attention(q[index], k[index], v[index], causal=True),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
def test_create_graph_inside_activation_checkpointing_unpacks_once():
    """With ``create_graph=True`` the backward's saved tensors are unpacked once: a
    non-reentrant activation checkpoint allows only one unpacking (a second raised
    CheckpointError where the first derivatives are all that is asked for)."""
    from torch.utils.checkpoint import checkpoint

    for build in (_layer_norm, _attention):
        operation, inputs, options = build(torch.Generator().manual_seed(12))
        inputs = tuple(tensor.requires_grad_() for tensor in inputs)
        plain = torch.autograd.grad(operation(*inputs, **options).square().sum(), inputs)
        output = checkpoint(lambda *tensors: operation(*tensors, **options), *inputs,
                            use_reentrant=False)
        graphed = torch.autograd.grad(output.square().sum(), inputs, create_graph=True)
        for expected, actual in zip(plain, graphed):
            torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_vmap_over_labels_and_kv_index():
    """The ops' value checks step aside under torch.func (a batched value cannot decide a
    Python ``if``: vmap over labels or kv_index raised PyTorch's data-dependent error)."""
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 4, 7, generator=generator)
    labels = torch.randint(0, 7, (3, 4), generator=generator)
    batched = torch.func.vmap(ops.cross_entropy)(logits, labels)
    for index in range(3):
        torch.testing.assert_close(batched[index], ops.cross_entropy(logits[index], labels[index]))
    q = torch.randn(2, 2, 3, 1, 16, generator=generator)
    kv_index = torch.tensor([[0, 0], [1, 0]])
    batched = torch.func.vmap(lambda q, index: ops.attention(q, q, q, kv_index=index))(q, kv_index)
    for index in range(2):
        torch.testing.assert_close(batched[index], ops.attention(q[index], q[index], q[index],
                                                                  kv_index=kv_index[index]))


REFERENCES = {
    "attention": lambda q, k, v, **options: reference.attention(q, k, v, **options),
    "layer_norm": lambda x, weight, bias: reference.layer_norm(x, weight, bias),
    "add_layer_norm": lambda *inputs: reference.add_layer_norm(*inputs)[0],
    "bias_gelu": reference.bias_gelu,
    "bias_gelu_linear": reference.bias_gelu_linear,
    "contrastive_loss": reference.contrastive_loss,
}


@pytest.mark.parametrize("name", REFERENCES)
def test_reference_path_differentiates_twice(name, reference_path):
    """On the PyTorch reference path (CPU without the interpreter) a second derivative is
    PyTorch's: the gradient penalty's gradients equal those of the references computed in
    float64 (cross_entropy, whose labels are not differentiated, is the ops' table's only
    op left out)."""
    assert not use_triton(torch.device("cpu"))
    operation, inputs, options = OPS[name](torch.Generator().manual_seed(21))

    def penalty_gradients(function, tensors):
        leaves = tuple(tensor.clone().requires_grad_() for tensor in tensors)
        output = function(*leaves, **options)
        (gradient,) = torch.autograd.grad(output.square().sum(), leaves[0], create_graph=True)
        return torch.autograd.grad(gradient.square().sum() + output.sum(), leaves)

    expected = penalty_gradients(REFERENCES[name], tuple(t.double() for t in inputs))
    for actual, wanted in zip(penalty_gradients(operation, inputs), expected):
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-4, atol=1e-4)
