"""Fused bias + GELU against the reference on CPU (Triton interpreter), and the op's
contract: argument errors, torch.compile tracing, torch.library checks, the reference path.

float32, float16 and bfloat16 here (bf16 with the interpreter's float32 -> bfloat16
conversion made a GPU's, rounding to nearest even, and its bf16 dot widened exactly:
``interpreter_like_gpu.py``); the cases run compiled on CUDA in ``test_bias_gelu_gpu.py``.

Each case draws fresh inputs, runs ``blipfast.ops.bias_gelu`` forward and backward, and
compares the output and the gradients of x and bias with the float64 reference using the
tolerance table in ``tolerances.py``. PyTorch's own error is ``F.gelu(x + bias)`` computed
natively (``x + bias`` in the dtypes' promotion), cast to x's dtype. ``CASES`` and
``run_case`` are shared with ``test_bias_gelu_gpu.py``.
"""

from __future__ import annotations


import pytest
import torch

from blipfast import reference
from blipfast.ops._dispatch import use_triton
from blipfast.ops.bias_gelu import bias_gelu, bias_gelu_linear
from seeds import case_seed
from bias_gelu_cases import CASES, LINEAR_CASES, run_case, run_linear_case
from compile_checks import assert_compiles_like_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.interpreter
def test_bias_gelu_matches_reference_cpu(case, dtype):
    assert use_triton(torch.device("cpu")), "the CPU tests must run the Triton interpreter"
    run_case(case, dtype, "cpu", seed=case_seed(f"{case}/{dtype}"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
@pytest.mark.interpreter
def test_bias_gelu_linear_matches_reference_cpu(case, dtype):
    run_linear_case(case, dtype, "cpu", seed=case_seed(f"{case}/{dtype}/linear"))


# --------------------------------------------------------------------------------------
# Kernel details
# --------------------------------------------------------------------------------------


def test_row_strided_input_is_read_in_place_and_others_copied():
    from blipfast.kernels._runtime import as_rows as _as_rows

    base = torch.randn(3, 35, 124)
    sliced = base[..., 5:105]
    assert _as_rows(sliced).data_ptr() == sliced.data_ptr()
    assert _as_rows(sliced).stride() == (124, 1)
    gappy = torch.randn(3, 7, 64)[:, :5]
    assert _as_rows(gappy).is_contiguous() and _as_rows(gappy).shape == (15, 64)
    transposed = torch.randn(88, 35).t()
    assert _as_rows(transposed).stride() == (88, 1)


@pytest.mark.interpreter
def test_backward_saves_only_x_and_bias():
    x = torch.randn(5, 64, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = bias_gelu(x, bias)
    assert len(saved) == 2
    assert saved[0] is x and saved[1] is bias
    out.backward(torch.ones_like(out))


def test_backward_tiles_for_the_vit_ffn_shape(monkeypatch):
    """64 images x 577 tokens x 3072: hundreds of row chunks, each a whole number of
    row blocks, so the partial-dbias buffer stays small."""
    from blipfast.kernels import bias_gelu as kernels

    monkeypatch.setattr(kernels, "interpreter_enabled", lambda: False)
    config = kernels._backward_config(64 * 577, 3072)
    assert config["rows_per_program"] % config["BLOCK_ROWS"] == 0
    chunks = -(-64 * 577 // config["rows_per_program"])
    assert 100 <= chunks <= 1024
    forward = kernels._forward_config(1, 64)
    assert forward["BLOCK_ROWS"] == 1  # no 64-row tile for a single row


# --------------------------------------------------------------------------------------
# Autograd edge cases
# --------------------------------------------------------------------------------------


def test_sum_loss_gives_broadcast_grad_out():
    """``out.sum().backward()`` hands the backward an expanded (all-zero-stride) grad."""
    x = torch.randn(2, 9, 64, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    bias_gelu(x, bias).sum().backward()
    x64, bias64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    reference.bias_gelu(x64, bias64).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=2e-5, rtol=0)
    torch.testing.assert_close(bias.grad.double(), bias64.grad, atol=2e-5, rtol=0)


def test_gradient_only_where_asked():
    x = torch.randn(4, 64)
    bias = torch.randn(64, requires_grad=True)
    (grad_bias,) = torch.autograd.grad(bias_gelu(x, bias).sum(), (bias,))
    assert grad_bias.shape == (64,)
    x.requires_grad_()
    frozen = torch.randn(64)
    (grad_x,) = torch.autograd.grad(bias_gelu(x, frozen).sum(), (x,))
    assert grad_x.shape == x.shape


def test_empty_rows():
    x = torch.randn(0, 64, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    out = bias_gelu(x, bias)
    assert out.shape == (0, 64)
    out.sum().backward()
    assert torch.equal(bias.grad, torch.zeros(64))


@pytest.mark.parametrize("shape", [(2, 3, 24), (0, 24)], ids=["no_outputs", "no_rows"])
def test_bias_gelu_linear_empty_sizes(shape):
    """No output features (weight (0, N)) or no rows: gradients as F.linear's (zeros where
    there is nothing to sum), not a reshape error from the backward."""
    generator = torch.Generator().manual_seed(4)
    outputs = 0 if shape[0] == 2 else 5
    x = torch.randn(shape, generator=generator, requires_grad=True)
    gelu_bias = torch.randn(24, generator=generator, requires_grad=True)
    weight = torch.randn(outputs, 24, generator=generator, requires_grad=True)
    bias = torch.randn(outputs, generator=generator, requires_grad=True)
    leaves = (x, gelu_bias, weight, bias)
    got = torch.autograd.grad(bias_gelu_linear(*leaves).sum(), leaves)
    expected = torch.autograd.grad(torch.nn.functional.linear(
        torch.nn.functional.gelu(x + gelu_bias), weight, bias).sum(), leaves)
    for name, actual, wanted in zip(("x", "gelu_bias", "weight", "bias"), got, expected):
        torch.testing.assert_close(actual, wanted, msg=name)


# --------------------------------------------------------------------------------------
# Arguments, torch.compile, torch.library
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, error, words", [
    (lambda x, b: (x.numpy(), b), TypeError, "x must be a torch.Tensor"),
    (lambda x, b: (x.double(), b), TypeError, "x has dtype torch.float64"),
    (lambda x, b: (x.int(), b), TypeError, "x has dtype torch.int32"),
    (lambda x, b: (x[0, 0], b), ValueError, "x must have at least 1 dimension"),
    (lambda x, b: (x, b.tolist()), TypeError, "bias must be a torch.Tensor or None"),
    (lambda x, b: (x, b.double()), TypeError, "bias has dtype torch.float64"),
    (lambda x, b: (x, b[:10]), ValueError, "bias must have shape (N,) = (16,)"),
    (lambda x, b: (x, b[None]), ValueError, "bias must have shape"),
    (lambda x, b: (x, b.to("meta")), ValueError, "bias is on meta but x is on cpu"),
])
def test_bad_arguments_raise_clear_errors(change, error, words):
    x, bias = change(torch.randn(3, 16), torch.randn(16))
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        bias_gelu(x, bias)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_torch_compile_traces_the_custom_op(with_bias):
    x = torch.randn(2, 5, 64)
    bias = torch.randn(64) if with_bias else None

    def step(x, *bias):
        return bias_gelu(x, *bias or (None,)).square().sum()

    def expected_step(x, *bias):
        return reference.bias_gelu(x, *bias or (None,)).square().sum()

    tensors = (x, bias) if with_bias else (x,)
    assert_compiles_like_reference(step, expected_step, tensors)


@pytest.mark.parametrize("bias_kind", ["float32", "half", "none"])
@pytest.mark.interpreter
def test_custom_ops_pass_torch_library_checks(bias_kind):
    from blipfast.kernels.bias_gelu import bias_gelu_backward_op, bias_gelu_forward_op

    x = torch.randn(3, 7, 40, dtype=torch.float16)
    bias = {"float32": torch.randn(40), "half": torch.randn(40).half(), "none": None}[bias_kind]
    grad_out = torch.randn(3, 7, 40, dtype=torch.float16)
    forward_arguments = (x.clone().requires_grad_(),
                         bias.clone().requires_grad_() if bias is not None else None)
    torch.library.opcheck(bias_gelu_forward_op, forward_arguments,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
    for bias_grad in (True, False):
        for store_activation in (True, False):
            torch.library.opcheck(bias_gelu_backward_op,
                                  (grad_out, x, bias, bias_grad, store_activation),
                                  test_utils=("test_schema", "test_faketensor"))


def test_cpu_without_interpreter_uses_the_reference(reference_path):
    x = torch.randn(4, 64, requires_grad=True)
    bias = torch.randn(64, requires_grad=True)
    out = bias_gelu(x, bias)
    assert torch.equal(out, reference.bias_gelu(x, bias))
    out.sum().backward()
    assert bias.grad is not None and torch.isfinite(bias.grad).all()


def test_reference_is_torch_gelu():
    x = torch.randn(6, 32, dtype=torch.bfloat16)
    bias = torch.randn(32)
    expected = torch.nn.functional.gelu(x.float() + bias, approximate="none").bfloat16()
    assert torch.equal(reference.bias_gelu(x, bias), expected)
    assert reference.bias_gelu(x.double(), None).dtype == torch.float64


# --------------------------------------------------------------------------------------
# bias_gelu_linear: what it saves, partial gradients, autocast, arguments, compile
# --------------------------------------------------------------------------------------


def _linear_inputs(dtype=torch.float32):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, 40, generator=generator).to(dtype)
    gelu_bias = torch.randn(40, generator=generator).to(dtype)
    weight = (torch.randn(24, 40, generator=generator) / 40 ** 0.5).to(dtype)
    bias = torch.randn(24, generator=generator).to(dtype)
    return x, gelu_bias, weight, bias


@pytest.mark.parametrize("door", ["autograd_function", "custom_op"])
@pytest.mark.interpreter
def test_bias_gelu_linear_saves_x_not_the_activation(door):
    """The point of the op: of the activations, only x is kept for the backward (the
    unfused bias_gelu + F.linear also keeps gelu(x + gelu_bias), a tensor of x's size).
    Both doors to the kernels are checked; the gradients still match the reference."""
    from blipfast.kernels.bias_gelu import BiasGeluLinearFunction, bias_gelu_linear_op

    function = BiasGeluLinearFunction.apply if door == "autograd_function" \
        else bias_gelu_linear_op
    leaves = [t.requires_grad_() for t in _linear_inputs()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = function(*leaves)
    assert {t.data_ptr() for t in saved if t is not None} == \
        {leaves[0].data_ptr(), leaves[1].data_ptr(), leaves[2].data_ptr()}
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_leaves = [t.detach().double().requires_grad_() for t in leaves]
    expected = reference.bias_gelu_linear(*expected_leaves)
    expected_grads = torch.autograd.grad(expected, expected_leaves, grad_out.double())
    for got, want in zip((out, *grads), (expected, *expected_grads)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("wanted", [("x",), ("gelu_bias",), ("weight",), ("bias",),
                                    ("weight", "bias"), ("x", "weight")], ids="+".join)
def test_bias_gelu_linear_gradients_only_where_asked(wanted):
    """Each subset of gradients, including the weight alone (the backward then recomputes
    the activation with the forward kernel instead of the backward's pass)."""
    names = ("x", "gelu_bias", "weight", "bias")
    inputs = [t.requires_grad_(name in wanted) for name, t in zip(names, _linear_inputs())]
    out = bias_gelu_linear(*inputs)
    grads = torch.autograd.grad(out.square().sum(), [t for t in inputs if t.requires_grad])
    expected_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    expected_out = reference.bias_gelu_linear(*expected_inputs)
    expected = torch.autograd.grad(expected_out.square().sum(),
                                   [t for t in expected_inputs if t.requires_grad])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_bias_gelu_linear_under_autocast_casts_like_linear():
    """Under autocast x, weight and bias run in the autocast dtype (as F.linear would) and
    float32 parameters get float32 gradients; the result matches bias_gelu then F.linear
    under the same autocast."""
    x, gelu_bias, weight, bias = _linear_inputs()
    x = x.half()
    leaves = [t.clone().requires_grad_() for t in (x, gelu_bias, weight, bias)]
    expected_leaves = [t.clone().requires_grad_() for t in (x, gelu_bias, weight, bias)]
    with torch.autocast("cpu", dtype=torch.float16):
        out = bias_gelu_linear(*leaves)
        expected = torch.nn.functional.linear(
            bias_gelu(expected_leaves[0], expected_leaves[1]), expected_leaves[2],
            expected_leaves[3])
    assert out.dtype == expected.dtype == torch.float16
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, expected_leaves, grad_out)
    assert [g.dtype for g in grads] == [torch.float16] + [torch.float32] * 3
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=1e-3)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("change, error, words", [
    (lambda x, g, w, b: (x.double(), g, w, b), TypeError, "x has dtype torch.float64"),
    (lambda x, g, w, b: (x, g[:5], w, b), ValueError, "gelu_bias must have shape (N,) = (40,)"),
    (lambda x, g, w, b: (x, g, w.tolist(), b), TypeError, "weight must be a torch.Tensor"),
    (lambda x, g, w, b: (x, g, w.t(), b), ValueError, "weight must have shape (M, N) with N = 40"),
    (lambda x, g, w, b: (x, g, w[0], b), ValueError, "weight must have shape (M, N)"),
    (lambda x, g, w, b: (x, g, w, b[:3]), ValueError, "bias must have shape (M,) = (24,)"),
    (lambda x, g, w, b: (x, g, w.half(), b), TypeError,
     "weight has dtype torch.float16 but x has torch.float32"),
    (lambda x, g, w, b: (x, g, w, b.half()), TypeError,
     "bias has dtype torch.float16 but x has torch.float32"),
    (lambda x, g, w, b: (x, g, w.to("meta"), b), ValueError, "weight is on meta but x is on cpu"),
])
def test_bias_gelu_linear_bad_arguments_raise_clear_errors(change, error, words):
    arguments = change(*_linear_inputs())
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        bias_gelu_linear(*arguments)


def test_bias_gelu_linear_torch_compile_traces_the_custom_op():
    inputs = _linear_inputs()

    def step(x, gelu_bias, weight, bias):
        return bias_gelu_linear(x, gelu_bias, weight, bias).square().sum()

    def expected_step(x, gelu_bias, weight, bias):
        return reference.bias_gelu_linear(x, gelu_bias, weight, bias).square().sum()

    assert_compiles_like_reference(step, expected_step, inputs)


@pytest.mark.parametrize("with_biases", [True, False], ids=["biases", "no_biases"])
@pytest.mark.interpreter
def test_bias_gelu_linear_custom_op_passes_torch_library_checks(with_biases):
    from blipfast.kernels.bias_gelu import bias_gelu_linear_op

    x, gelu_bias, weight, bias = _linear_inputs(torch.float16)
    arguments = (x.requires_grad_(), gelu_bias.float().requires_grad_() if with_biases else None,
                 weight.requires_grad_(), bias.requires_grad_() if with_biases else None)
    torch.library.opcheck(bias_gelu_linear_op, arguments,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
