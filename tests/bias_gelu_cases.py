"""Bias + GELU test cases shared by the CPU (interpreter) and GPU test modules: each case
draws fresh inputs, runs the public op forward and backward and compares the output and
the gradients of x and bias with the float64 reference within the tolerance table."""


from __future__ import annotations

from dataclasses import dataclass

import torch

from blipfast import reference
from blipfast.ops.bias_gelu import bias_gelu
from tolerances import assert_close_to_reference


@dataclass(frozen=True)
class BiasGeluCase:
    name: str
    leading: tuple[int, ...]  # x is (*leading, n)
    n: int
    bias: str = "same"  # "same" (x's dtype), "float32", or "none"
    layout: str = "contiguous"  # or "row_strided", "gappy", "transposed"
    values: str = "normal"  # or "saturated" (|z| ~ 10 and beyond), "near_zero"

    def __str__(self) -> str:
        return self.name


CASES = [
    BiasGeluCase("one_row_n64", (1,), 64),
    BiasGeluCase("seven_rows_n88", (7,), 88),
    BiasGeluCase("text_3x35_n100", (3, 35), 100),
    BiasGeluCase("wide_n3072", (7,), 3072),
    BiasGeluCase("no_bias", (3, 35), 64, bias="none"),
    BiasGeluCase("float32_bias", (3, 35), 88, bias="float32"),
    BiasGeluCase("saturated_erf", (7,), 100, values="saturated"),
    BiasGeluCase("near_zero", (7,), 64, values="near_zero"),
    # A column slice of a wider (3, 35, n + 24) tensor: row stride n + 24, read in place.
    BiasGeluCase("row_strided_slice", (3, 35), 100, layout="row_strided"),
    # (3, 5, n) taken from (3, 7, n): leading dims do not collapse, so it is copied.
    BiasGeluCase("gappy_leading_dims", (3, 5), 64, bias="float32", layout="gappy"),
    # The transpose of an (n, 35) tensor: column stride 35, so it is copied.
    BiasGeluCase("transposed", (35,), 88, layout="transposed"),
]


def _values(case: BiasGeluCase, shape, generator: torch.Generator) -> torch.Tensor:
    """x's values in float32."""
    x = torch.randn(*shape, generator=generator)
    if case.values == "saturated":
        # z around +-10, where erf is +-1 in float32, and a few at +-30.
        signs = torch.randint(0, 2, shape, generator=generator) * 2.0 - 1.0
        magnitude = 10.0 + 0.5 * x
        magnitude.view(-1)[::7] = 30.0
        return signs * magnitude
    if case.values == "near_zero":
        x = 1e-3 * x
        x.view(-1)[::5] = 0.0
    return x


def _layout(case: BiasGeluCase, values: torch.Tensor) -> torch.Tensor:
    """``values`` (*leading, n) stored in the case's layout."""
    if case.layout == "row_strided":
        base = torch.zeros(*values.shape[:-1], values.shape[-1] + 24, dtype=values.dtype,
                           device=values.device)
        base[..., 5:5 + case.n] = values
        return base[..., 5:5 + case.n]
    if case.layout == "gappy":
        base = torch.zeros(values.shape[0], values.shape[1] + 2, values.shape[2],
                           dtype=values.dtype, device=values.device)
        base[:, :values.shape[1]] = values
        return base[:, :values.shape[1]]
    if case.layout == "transposed":
        return values.t().contiguous().t()
    return values


def make_inputs(case: BiasGeluCase, dtype: torch.dtype, device: str,
                generator: torch.Generator):
    """(x, bias, grad_out) for a case; x and grad_out in the case's layout."""
    shape = (*case.leading, case.n)
    x = _layout(case, _values(case, shape, generator).to(device, dtype))
    bias = None
    if case.bias != "none":
        scale = 0.1 if case.values == "saturated" else 1e-3 if case.values == "near_zero" else 0.5
        bias_dtype = torch.float32 if case.bias == "float32" else dtype
        bias = (scale * torch.randn(case.n, generator=generator)).to(device, bias_dtype)
        if case.layout == "row_strided":  # the bias too: every other element of a buffer
            bias = torch.stack([bias, -bias], 1)[:, 0]
    grad_out = _layout(case, torch.randn(*shape, generator=generator).to(device, dtype))
    return x, bias, grad_out


def run_case(case: BiasGeluCase, dtype: torch.dtype, device: str, seed: int) -> None:
    """Compare the output and the gradients of x and bias with the reference."""
    generator = torch.Generator().manual_seed(seed)
    x, bias, grad_out = make_inputs(case, dtype, device, generator)
    leaves = [t.detach().requires_grad_() for t in (x, bias) if t is not None]
    out = bias_gelu(leaves[0], leaves[1] if bias is not None else None)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    grads = torch.autograd.grad(out, leaves, grad_out)

    def reference_run(upcast: bool, cast):
        inputs = [cast(t).detach().requires_grad_() for t in (x, bias) if t is not None]
        result = reference.bias_gelu(inputs[0], inputs[1] if bias is not None else None,
                                     upcast=upcast)
        return (result, *torch.autograd.grad(result, inputs, cast(grad_out)))

    exact = reference_run(True, lambda t: t.double())
    same_dtype = reference_run(False, lambda t: t)
    names = ("out", "grad_x", "grad_bias")
    # Near zero the output (about z / 2) is as small as z, of order 1e-3: below fp16's
    # absolute floor, which would pass zeros. The gradients (about grad_out / 2) are not.
    input_scales = (1e-3 if case.values == "near_zero" else 1.0, 1.0, 1.0)
    for index, actual in enumerate((out, *grads)):
        assert actual.dtype == same_dtype[index].dtype, names[index]
        # A float32 bias's gradient is reduced from x's dtype: its row of the table.
        assert_close_to_reference(f"{case}/{names[index]}", actual, same_dtype[index],
                                  exact[index], input_scale=input_scales[index],
                                  compute_dtype=dtype)


# --------------------------------------------------------------------------------------
# bias + GELU followed by a linear layer (blipfast.ops.bias_gelu_linear)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BiasGeluLinearCase:
    name: str
    activation: BiasGeluCase  # x and gelu_bias, as for bias_gelu
    out_features: int
    bias: bool = True  # the linear layer's bias

    def __str__(self) -> str:
        return self.name


LINEAR_CASES = [
    BiasGeluLinearCase("seven_rows_n88_m40", BiasGeluCase("x", (7,), 88), 40),
    BiasGeluLinearCase("text_3x35_n100_m64_float32_gelu_bias",
                       BiasGeluCase("x", (3, 35), 100, bias="float32"), 64),
    BiasGeluLinearCase("no_biases", BiasGeluCase("x", (7,), 64, bias="none"), 24, bias=False),
    BiasGeluLinearCase("row_strided_x",
                       BiasGeluCase("x", (3, 35), 100, layout="row_strided"), 40),
    BiasGeluLinearCase("transposed_x", BiasGeluCase("x", (35,), 88, layout="transposed"), 16),
]


def run_linear_case(case: BiasGeluLinearCase, dtype: torch.dtype, device: str,
                    seed: int) -> None:
    """Compare the output and the gradients of x, gelu_bias, weight and bias of
    ``bias_gelu_linear`` with the reference."""
    from blipfast.ops.bias_gelu import bias_gelu_linear

    generator = torch.Generator().manual_seed(seed)
    x, gelu_bias, _ = make_inputs(case.activation, dtype, device, generator)
    n, m = case.activation.n, case.out_features
    weight = (torch.randn(m, n, generator=generator) / n ** 0.5).to(device, dtype)
    bias = (0.5 * torch.randn(m, generator=generator)).to(device, dtype) if case.bias else None
    grad_out = torch.randn(*x.shape[:-1], m, generator=generator).to(device, dtype)
    tensors = {"x": x, "gelu_bias": gelu_bias, "weight": weight, "bias": bias}
    names = [name for name, tensor in tensors.items() if tensor is not None]

    def run(function, cast):
        leaves = {name: cast(tensors[name]).detach().requires_grad_() for name in names}
        out = function(leaves["x"], leaves.get("gelu_bias"), leaves["weight"],
                       leaves.get("bias"))
        return (out, *torch.autograd.grad(out, [leaves[name] for name in names],
                                          cast(grad_out)))

    actual = run(bias_gelu_linear, lambda t: t)
    assert actual[0].dtype == dtype and actual[0].shape == (*x.shape[:-1], m)
    exact = run(reference.bias_gelu_linear, lambda t: t.double())
    same_dtype = run(lambda *inputs: reference.bias_gelu_linear(*inputs, upcast=False),
                     lambda t: t)
    for index, name in enumerate(["out"] + [f"grad_{name}" for name in names]):
        assert actual[index].dtype == same_dtype[index].dtype, name
        # A float32 gelu_bias's gradient is reduced from x's dtype: its row of the table.
        assert_close_to_reference(f"{case}/{name}", actual[index], same_dtype[index],
                                  exact[index], compute_dtype=dtype)
