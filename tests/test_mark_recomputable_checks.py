"""blipfast.ops.mark_recomputable checks its function: a non-callable is refused when
marking, and a recomputation that does not match the marked tensor (shape, dtype, device,
layout) raises in the backward instead of being cut down to the marked tensor's geometry
(silently wrong gradients)."""

import pytest
import torch

from blipfast.ops import mark_recomputable, recompute_in_backward


def _backward_with(function):
    """Mark ``y = x * 2`` (saved by ``y * y``) with ``function`` and run the backward:
    returns x's gradient (expected 8 * x)."""
    x = torch.randn(3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with recompute_in_backward():
        y = x * 2
        assert mark_recomputable(y, function, x)
        loss = (y * y).sum()
    loss.backward()
    return x, x.grad


@pytest.mark.parametrize("function", [5, None, "torch.mul"], ids=repr)
def test_a_function_that_is_not_callable_is_refused_when_marking(function):
    x = torch.randn(3, requires_grad=True)
    for context in (recompute_in_backward, torch.enable_grad):  # in or out of the context
        with context():
            y = x * 2
            with pytest.raises(TypeError, match=r"mark_recomputable: function must be callable"):
                mark_recomputable(y, function, x)


def test_an_output_that_is_not_a_tensor_is_refused():
    with recompute_in_backward(), pytest.raises(TypeError, match="output must be a torch.Tensor"):
        mark_recomputable([1.0], torch.mul, 2)


@pytest.mark.parametrize("function, problem", [
    (lambda t: torch.zeros(5), r"another shape.*expected shape \(3,\).*got shape \(5,\)"),
    (lambda t: torch.zeros(2), r"another shape.*expected shape \(3,\).*got shape \(2,\)"),
    (lambda t: torch.zeros(2, 3), r"another shape.*got shape \(2, 3\)"),
    (lambda t: (t * 2).double(), r"another dtype or device.*torch.float32.*got.*torch.float64"),
    (lambda t: torch.zeros(6)[::2], r"another layout.*stride \(1,\).*got.*stride \(2,\)"),
    (lambda t: torch.zeros(4)[1:], r"another layout.*storage offset 0.*got.*storage offset 1"),
], ids=["longer", "shorter", "other_shape", "dtype", "strided", "offset"])
def test_a_recomputation_that_does_not_match_raises_in_the_backward(function, problem):
    """(Before, a longer result was cut down to the output's geometry: all-zero gradients,
    no error; another dtype went through.)"""
    with pytest.raises(RuntimeError, match="blipfast.ops.mark_recomputable: .*" + problem):
        _backward_with(function)


def test_a_recomputation_that_is_not_a_tensor_raises_in_the_backward():
    with pytest.raises(TypeError, match="mark_recomputable: .* returned int, not a tensor"):
        _backward_with(lambda t: 3)


def test_another_device_raises_in_the_backward():
    meta = torch.empty(3, device="meta")
    with pytest.raises(RuntimeError, match=r"another dtype or device.*on cpu.*got.*on meta"):
        _backward_with(lambda t: meta)


def test_a_matching_recomputation_gives_the_gradients():
    x, grad = _backward_with(lambda t: t * 2)
    assert torch.equal(grad, 8 * x.detach())


def test_a_marked_view_may_be_recomputed_as_the_tensor_it_views():
    """As models mark a QKV projection split into heads: the recomputation returns the
    whole projection, the view's geometry is cut from it."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=generator, requires_grad=True)
    weight = torch.randn(12, 6, generator=generator)
    grads = []
    for recompute in (True, False):
        x.grad = None
        with recompute_in_backward():
            heads = torch.nn.functional.linear(x, weight).view(4, 2, 6)
            if recompute:
                assert mark_recomputable(
                    heads, lambda inputs: torch.nn.functional.linear(inputs, weight), x)
            loss = (heads[:, 0] * heads[:, 1]).sum()  # saves views of the projection
        loss.backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_a_graph_dropped_without_a_backward_is_freed():
    """Inside recompute_in_backward every saved tensor passes its hooks: an op's saved
    output (exp saves its result) held with its grad_fn made a cycle through the op's own
    node that Python's garbage collector cannot see, so a graph dropped without a backward
    (an evaluation loss under gradients, retain_graph=True, an exception mid-forward) was
    never freed, nor the tensors it held."""
    import gc
    import weakref

    x = torch.randn(5, requires_grad=True)
    with recompute_in_backward() as active:
        assert active
        y = x.exp()
        z = y.sin()  # saves y as its input too
    dropped = weakref.ref(y)
    del y, z
    gc.collect()
    assert dropped() is None


def test_a_saved_output_modified_in_place_still_raises():
    """The saved tensors are kept detached (sharing the version counter): an in-place
    change after saving is still caught, and an unchanged one gives the gradient."""
    x = torch.randn(5, requires_grad=True)
    with recompute_in_backward():
        y = x.exp()
    y.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    with recompute_in_backward():
        y = x.exp()
    (gradient,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(gradient, x.detach().exp())


def test_recomputation_steps_aside_under_function_transforms():
    """torch.func refuses saved-tensor hooks ("don't yet support saved tensor hooks"):
    under a transform the context does not take effect, and the transform runs."""
    def loss(x):
        with recompute_in_backward() as active:
            assert active is False
            return (x.exp() * x).sum()

    x = torch.randn(4, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(torch.func.grad(loss)(x), x.exp() * (x + 1))
    # forward-mode AD alone takes saved-tensor hooks: recomputation stays on there
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level(), recompute_in_backward() as active:
        assert active is True
