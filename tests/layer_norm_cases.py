"""LayerNorm test cases shared by the CPU (interpreter) and GPU test modules: each case
draws fresh inputs, runs the public op forward and backward and compares every output and
gradient with the float64 reference within the tolerance table."""


from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from blipfast import reference
from blipfast.ops.layer_norm import add_layer_norm, layer_norm
from tolerances import assert_close_to_reference


@dataclass(frozen=True)
class LayerNormCase:
    name: str
    shape: tuple[int, ...]  # x's shape; the last dimension is normalized
    residual: bool = True
    weight: bool = True
    bias: bool = True
    param_dtype: Optional[torch.dtype] = None  # weight and bias dtype; None: x's dtype
    layout: str = "contiguous"  # or "row_strided" (slice of wider rows; weight and bias
    # stride-2 views), "transposed"
    offset: float = 0.0  # added to x: a mean far from 0
    with_sum: bool = False  # add_layer_norm, with a gradient flowing into the sum too
    eps: float = 1e-5

    def __str__(self) -> str:
        return self.name


CASES = [
    LayerNormCase("one_row", (1, 64)),
    LayerNormCase("seven_rows_n88", (7, 88)),
    LayerNormCase("text_3x35_n768_add", (3, 35, 768), with_sum=True),
    LayerNormCase("n100_no_residual", (3, 35, 100), residual=False),
    LayerNormCase("no_weight_no_bias", (7, 64), weight=False, bias=False),
    LayerNormCase("weight_only_n100", (7, 100), bias=False),
    LayerNormCase("bias_only_add", (7, 88), weight=False, with_sum=True),
    LayerNormCase("fp32_params_add", (3, 35, 88), param_dtype=torch.float32, with_sum=True),
    LayerNormCase("fp32_params_no_residual", (7, 100), residual=False,
                  param_dtype=torch.float32),
    LayerNormCase("row_strided_views", (3, 35, 100), layout="row_strided"),
    LayerNormCase("row_strided_views_add", (7, 64), layout="row_strided", with_sum=True),
    LayerNormCase("transposed_views", (2, 9, 88), layout="transposed"),
    LayerNormCase("transposed_views_add", (35, 64), layout="transposed", with_sum=True),
    LayerNormCase("mean_far_from_zero", (3, 35, 88), offset=100.0),
    LayerNormCase("mean_far_from_zero_add", (7, 100), offset=100.0, with_sum=True),
    LayerNormCase("mean_far_no_residual_eps_1e-6", (7, 64), residual=False, offset=100.0,
                  eps=1e-6),
    LayerNormCase("single_feature", (5, 1)),
    LayerNormCase("one_dimensional_x_add", (64,), with_sum=True),
]


def _random(shape, layout, generator, device, dtype, offset=0.0):
    """Standard normal values (+ offset) of ``shape``, stored in the case's layout."""
    if layout == "row_strided":
        # Rows of a wider tensor, starting 5 features in: row stride N + 24.
        wide = torch.randn(*shape[:-1], shape[-1] + 24, generator=generator)
        values = wide[..., 5:5 + shape[-1]]
    elif layout == "transposed":
        # Stored feature-major: the last dimension has stride = number of rows.
        values = torch.randn(*reversed(shape), generator=generator).permute(
            *reversed(range(len(shape))))
    else:
        values = torch.randn(*shape, generator=generator)
    values = values + offset if offset else values
    placed = torch.empty_strided(values.shape, values.stride(), dtype=dtype, device=device)
    return placed.copy_(values)


def _check_layout(tensor, layout):
    if layout == "row_strided":
        assert tensor.stride(-1) == 1 and tensor.stride(-2) == tensor.shape[-1] + 24
    elif layout == "transposed":
        assert tensor.stride(-1) != 1


def run_case(case: LayerNormCase, dtype: torch.dtype, device: str, seed: int) -> None:
    """Compare the outputs and all input gradients with the reference on fresh inputs."""
    generator = torch.Generator().manual_seed(seed)
    num_features = case.shape[-1]
    param_dtype = case.param_dtype or dtype
    x = _random(case.shape, case.layout, generator, device, dtype, case.offset)
    _check_layout(x, case.layout)
    residual = _random(case.shape, case.layout, generator, device, dtype) \
        if case.residual or case.with_sum else None
    weight = (1 + 0.5 * torch.randn(num_features, generator=generator)).to(device, param_dtype) \
        if case.weight else None
    bias = (0.5 * torch.randn(num_features, generator=generator)).to(device, param_dtype) \
        if case.bias else None
    if case.layout == "row_strided":  # the parameters too: every other element of a buffer
        weight, bias = (None if vector is None else torch.stack([vector, -vector], 1)[:, 0]
                        for vector in (weight, bias))
    grad_y = _random(case.shape, case.layout, generator, device, dtype)
    grad_sum = _random(case.shape, case.layout, generator, device, dtype) \
        if case.with_sum else None

    names = [name for name, tensor in (("x", x), ("residual", residual), ("weight", weight),
                                       ("bias", bias)) if tensor is not None]
    tensors = [tensor for tensor in (x, residual, weight, bias) if tensor is not None]

    def unpack(leaves):
        by_name = dict(zip(names, leaves))
        return (by_name["x"], by_name.get("residual"), by_name.get("weight"),
                by_name.get("bias"))

    def differentiate(outputs, leaves, cast=None):
        cast = cast or (lambda t: t)
        grads = [cast(grad_y)] + ([cast(grad_sum)] if case.with_sum else [])
        return list(outputs) + list(torch.autograd.grad(outputs, leaves, grads))

    leaves = [t.detach().requires_grad_() for t in tensors]
    x_, residual_, weight_, bias_ = unpack(leaves)
    if case.with_sum:
        outputs = add_layer_norm(x_, residual_, weight_, bias_, eps=case.eps)
        assert outputs[1].dtype == dtype and outputs[1].shape == x.shape
    else:
        outputs = (layer_norm(x_, weight_, bias_, residual=residual_, eps=case.eps),)
    assert outputs[0].dtype == dtype and outputs[0].shape == x.shape
    actual = differentiate(outputs, leaves)

    def reference_run(upcast):
        if upcast:
            leaves = [t.detach().double().requires_grad_() for t in tensors]
        else:
            leaves = [t.detach().requires_grad_() for t in tensors]
        x_, residual_, weight_, bias_ = unpack(leaves)
        result = reference.add_layer_norm(x_, residual_, weight_, bias_, eps=case.eps,
                                          upcast=upcast)
        outputs = result if case.with_sum else result[:1]
        return differentiate(outputs, leaves, (lambda t: t.double()) if upcast else None)

    exact = reference_run(True)
    same_dtype = reference_run(False)
    output_names = ["y", "sum"] if case.with_sum else ["y"]
    for index, name in enumerate(output_names + [f"grad_{n}" for n in names]):
        assert actual[index].dtype == same_dtype[index].dtype, name
        # float32 parameters' gradients are reduced from x's dtype: its row of the table.
        assert_close_to_reference(f"{case}/{name}", actual[index], same_dtype[index],
                                  exact[index], compute_dtype=dtype)


# --------------------------------------------------------------------------------------
# Numerics on CPU, through the Triton interpreter
