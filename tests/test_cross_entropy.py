"""Fused cross-entropy against the reference on CPU (Triton interpreter), and the op's
contract: what it keeps for the backward, ignored and out-of-range labels, argument
errors, torch.compile tracing, torch.library checks, the reference path.

float32, float16 and bfloat16 here (the interpreter's bf16 made a GPU's:
``interpreter_like_gpu.py``); the cases run compiled on CUDA in
``test_cross_entropy_gpu.py``. ``CASES`` and ``run_case`` (in ``cross_entropy_cases.py``)
are shared with it.
"""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from blipfast import reference
from blipfast.ops import cross_entropy
from seeds import case_seed
from cross_entropy_cases import CASES, check_confident_rows, run_case
from compile_checks import assert_compiles_like_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.interpreter
def test_cross_entropy_matches_reference_cpu(case, dtype):
    run_case(case, dtype, "cpu", seed=case_seed(f"{case}/{dtype}"))


@pytest.mark.interpreter
def test_confident_rows_are_as_exact_as_pytorch():
    check_confident_rows("cpu")


@pytest.mark.interpreter
def test_keeps_the_logits_and_a_log_sum_exp_per_row():
    """No float32 copy of the logits or of the log-softmax is kept for the backward: the
    logits, and per row two float32 numbers (its log-sum-exp, as the largest logit and the
    log of the sum of exponentials less it)."""
    logits = torch.randn(3, 9, 100, dtype=torch.float16, requires_grad=True)
    labels = torch.randint(0, 100, (3, 9))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = cross_entropy(logits, labels)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()
    assert sum(t.numel() * t.element_size() for t in saved if t.dtype == torch.float32) \
        <= 2 * 4 * 27
    loss.backward()


def test_every_row_ignored():
    """As PyTorch: the mean over no rows is NaN, the sum 0, every gradient 0."""
    logits = torch.randn(4, 30, requires_grad=True)
    labels = torch.full((4,), -100)
    assert math.isnan(cross_entropy(logits, labels).item())
    assert math.isnan(torch.nn.functional.cross_entropy(logits, labels).item())
    total = cross_entropy(logits, labels, reduction="sum", label_smoothing=0.1)
    assert total.item() == 0.0
    total.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.interpreter
def test_labels_outside_the_vocabulary_raise_naming_them():
    """As PyTorch raises; the message names the argument, the range and what was found.
    Where values go unchecked (torch.compile, CUDA graphs) the kernels give such rows NaN,
    without reading outside the logits."""
    from blipfast.kernels.cross_entropy import fused_cross_entropy

    logits = torch.randn(4, 20)
    labels = torch.tensor([1, 20, -3, -100])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 20\) \(the last dimension "
                                         r"of logits\) or equal ignore_index \(-100\), got -3, 20"):
        cross_entropy(logits, labels)
    with pytest.raises(ValueError, match="or equal ignore_index \\(1\\), got -100"):
        cross_entropy(logits, torch.tensor([1, 2, 1, -100]), ignore_index=1)
    with pytest.raises(IndexError):  # PyTorch's own error, for comparison
        torch.nn.functional.cross_entropy(logits, labels)
    losses = fused_cross_entropy(logits, labels, -100, 0.0)
    assert torch.isfinite(losses[0]) and losses[1:3].isnan().all() and losses[3] == 0


def test_a_custom_ignore_index_and_int32_labels():
    logits = torch.randn(6, 25, requires_grad=True)
    labels = torch.tensor([3, 7, 0, 7, 24, 1], dtype=torch.int32)
    got = cross_entropy(logits, labels, ignore_index=7, label_smoothing=0.05)
    expected = torch.nn.functional.cross_entropy(logits.double(), labels.long(),
                                                 ignore_index=7, label_smoothing=0.05)
    assert abs(got.item() - expected.item()) < 1e-5



@pytest.mark.parametrize("label_smoothing", [0.0, 0.1], ids=["plain", "smoothed"])
def test_a_masked_class_is_left_out_as_pytorch_does(label_smoothing):
    """A -inf logit (a class masked out of the vocabulary): without smoothing its term is
    0 * -inf in the smoothing's mean, which once made the loss NaN; F.cross_entropy leaves
    the class out (finite loss) and with smoothing gives an infinite loss."""
    logits = torch.randn(4, 21, generator=torch.Generator().manual_seed(5))
    logits[:, 3] = float("-inf")
    logits.requires_grad_()
    labels = torch.tensor([0, 20, 7, 11])
    got = cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="none")
    expected = torch.nn.functional.cross_entropy(logits.detach().double(), labels,
                                                 label_smoothing=label_smoothing,
                                                 reduction="none")
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    if label_smoothing == 0.0:
        got.sum().backward()
        expected_grad, = torch.autograd.grad(torch.nn.functional.cross_entropy(
            logits.double(), labels, reduction="sum"), logits)
        torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_int32_labels_with_an_ignore_index_beyond_int32():
    """2**32 + 5 as ignore_index matches no int32 label; compared in int32 it wrapped to 5
    and the mean left label 5's row out of its count."""
    logits = torch.randn(4, 37, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([5, 1, 2, 3])
    expected = torch.nn.functional.cross_entropy(logits.double(), labels, ignore_index=2**32 + 5)
    got = cross_entropy(logits, labels.int(), ignore_index=2**32 + 5)
    assert abs(got.item() - expected.item()) < 1e-5


@pytest.mark.parametrize("change, error, words", [
    (lambda x, y: (x.numpy(), y), TypeError, "logits must be a torch.Tensor"),
    (lambda x, y: (x.double(), y), TypeError, "logits has dtype torch.float64"),
    (lambda x, y: (x[0], y[0]), ValueError, "logits must have shape (..., V) with at least 2"),
    (lambda x, y: (x[:, :0], y), ValueError, "V > 0"),
    (lambda x, y: (x, y.float()), TypeError, "labels must have dtype int64 or int32"),
    (lambda x, y: (x, y.tolist()), TypeError, "labels must be a torch.Tensor"),
    (lambda x, y: (x, y[:3]), ValueError, "labels must have shape logits.shape[:-1] = (5,)"),
    (lambda x, y: (x, y.to("meta")), ValueError, "labels are on meta but logits on cpu"),
])
def test_bad_arguments_raise_clear_errors(change, error, words):
    logits, labels = change(torch.randn(5, 12), torch.randint(0, 12, (5,)))
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        cross_entropy(logits, labels)


@pytest.mark.parametrize("keyword, value, error, words", [
    ("ignore_index", 1.5, TypeError, "ignore_index must be an int"),
    ("label_smoothing", 1.5, ValueError, "label_smoothing must lie in [0, 1]"),
    ("label_smoothing", "0.1", TypeError, "label_smoothing must be a float"),
    ("reduction", "average", ValueError, "reduction must be one of"),
    # an array compares elementwise: without the type check numpy's truth-value error
    ("reduction", numpy.array(["mean", "sum"]), ValueError, "reduction must be one of"),
])
def test_bad_options_raise_clear_errors(keyword, value, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        cross_entropy(torch.randn(5, 12), torch.randint(0, 12, (5,)), **{keyword: value})


def test_torch_compile_traces_the_custom_op():
    logits = torch.randn(2, 5, 40)
    labels = torch.randint(0, 40, (2, 5))
    labels[1, 3] = -100

    def step(logits):
        return cross_entropy(logits[:, :-1], labels[:, 1:], label_smoothing=0.1) * 2

    def expected_step(logits):
        return reference.cross_entropy(logits[:, :-1], labels[:, 1:], label_smoothing=0.1) * 2

    assert_compiles_like_reference(step, expected_step, (logits,), atol=1e-5, gradient_atol=1e-6)


@pytest.mark.interpreter
def test_custom_ops_pass_torch_library_checks():
    from blipfast.kernels.cross_entropy import (
        cross_entropy_backward_op,
        cross_entropy_forward_op,
    )

    logits = torch.randn(3, 4, 30, dtype=torch.float16)
    labels = torch.randint(0, 30, (3, 4))
    torch.library.opcheck(cross_entropy_forward_op,
                          (logits.clone().requires_grad_(), labels, -100, 0.1),
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    _, log_sum_exp = cross_entropy_forward_op(logits, labels, -100, 0.1)
    torch.library.opcheck(cross_entropy_backward_op,
                          (torch.randn(3, 4), logits, labels, log_sum_exp, -100, 0.1),
                          test_utils=("test_schema", "test_faketensor"))


def test_cpu_without_interpreter_uses_the_reference(reference_path):
    logits = torch.randn(4, 9, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 8])
    got = cross_entropy(logits, labels, label_smoothing=0.1)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="labels must lie in"):  # as the kernel path
        cross_entropy(logits, torch.tensor([0, 3, 9, 8]))
