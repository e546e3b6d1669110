"""The check every op's torch.compile test makes: one graph, the reference's loss and
gradients."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch._dynamo


def assert_compiles_like_reference(step: Callable, expected_step: Callable,
                                   tensors: Sequence[torch.Tensor], *constants,
                                   dynamic: bool = False, atol: float = 1e-4,
                                   rtol: float = 1e-5, gradient_atol: float | None = None) -> None:
    """``step(*leaves, *constants)`` compiled with ``fullgraph=True`` (raises on a graph
    break; ``aot_eager`` so the backward is traced too; ``dynamic`` as given: with True,
    shapes and Python floats among ``constants`` are symbolic inputs) returns the scalar
    that ``expected_step`` (the PyTorch reference, eager) returns on copies of the same
    ``tensors``, and the same gradient for each of them."""
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    leaves = [tensor.clone().requires_grad_() for tensor in tensors]
    loss = compiled(*leaves, *constants)
    gradients = torch.autograd.grad(loss, leaves)
    expected_leaves = [tensor.clone().requires_grad_() for tensor in tensors]
    expected = expected_step(*expected_leaves, *constants)
    expected_gradients = torch.autograd.grad(expected, expected_leaves)
    torch.testing.assert_close(loss, expected, atol=atol, rtol=rtol)
    for got, want in zip(gradients, expected_gradients):
        torch.testing.assert_close(got, want, atol=atol if gradient_atol is None else gradient_atol,
                                   rtol=rtol)
