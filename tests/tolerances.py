"""The one tolerance table for comparing kernels with the PyTorch reference.

A kernel's error against a float64 reference may be at most ``FACTOR`` times PyTorch's own
error in the same dtype (the reference computed natively in that dtype), plus a floor per
dtype: an absolute part for outputs where PyTorch happens to be nearly exact (and outputs
that are exactly zero, where the kernel's rounding follows its inputs' magnitude, not the
output's), and a relative part, ``RELATIVE_FLOOR`` times the output's largest magnitude
(one ulp there), for the rounding of the output itself.

PyTorch's own error is a sample of its rounding, and one sample is sometimes far below
its usual size (the contrastive loss's float32 gradients at logit_scale 1000: from 3e-6 to
3e-4 over 60 seeds, median 1e-5; where it is 3e-6, a kernel whose error is of the usual
size fails). A harness may pass several same-dtype results computed in other orders
(rows and features reversed, say): the yardstick is the largest of their errors.

PyTorch's own error counts up to ``MAX_RELATIVE_ERROR`` times the output's largest
magnitude: where PyTorch's dtype result is off by the order of the output (a near tie in
a max decided the other way, a sum that overflows), twice its error would pass any
answer, zeros included. An output that is exactly 0 everywhere has no magnitude of its
own: it is terms of the inputs' magnitude that cancel (attention's grad_q where every
query row's softmax is one key), and PyTorch's rounding of that cancellation, in the
order a kernel computes it, is what a kernel's is measured by; there PyTorch's error
counts up to ``MAX_RELATIVE_ERROR`` times ``input_scale``.

A PyTorch result that is not finite is no yardstick at all: the test must compare against
one that is (for example the float32 computation autocast runs).
"""

from collections.abc import Sequence

import torch

FACTOR = 2.0
ABSOLUTE_FLOOR = {
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}
RELATIVE_FLOOR = {dtype: torch.finfo(dtype).eps for dtype in ABSOLUTE_FLOOR}
MAX_RELATIVE_ERROR = {
    torch.float32: 1e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 0.25,
}


def tolerance(actual_dtype: torch.dtype, torch_error: float, scale: float,
              input_scale: float = 1.0) -> float:
    """The largest max-abs error allowed for an output of ``actual_dtype`` whose exact
    values reach ``scale`` in magnitude, where PyTorch's own error is ``torch_error``
    (``input_scale``: see :func:`assert_close_to_reference`, which refuses a non-finite
    yardstick before asking)."""
    largest_counted = MAX_RELATIVE_ERROR[actual_dtype] * (scale if scale > 0 else input_scale)
    return (min(FACTOR * torch_error, largest_counted)
            + ABSOLUTE_FLOOR[actual_dtype] * input_scale + RELATIVE_FLOOR[actual_dtype] * scale)


def assert_close_to_reference(name: str, actual: torch.Tensor,
                              reference_same_dtype: torch.Tensor | Sequence[torch.Tensor],
                              reference_float64: torch.Tensor, input_scale: float = 1.0,
                              compute_dtype: torch.dtype | None = None) -> None:
    """Assert ``actual`` is within the table's tolerance of ``reference_float64``.

    ``reference_same_dtype``: PyTorch's result in the dtype under test, or several such
    results computed in different orders (PyTorch's error is then the largest of theirs).

    ``input_scale``: the magnitude of the inputs the output is computed from, where it is
    far from the usual order 1; the absolute floor (the rounding of intermediate values)
    scales with it, so that tiny outputs of tiny inputs are not within the floor whatever
    they are.

    ``compute_dtype``: the dtype whose row of the table applies, where it is not
    ``actual``'s: the float32 gradient of a float32 parameter applied to bf16 activations
    is computed from bf16 values, and PyTorch's own error there is of bf16's order, which
    float32's cap (a thousandth of the output's magnitude) would cut short."""
    assert actual.shape == reference_float64.shape, f"{name}: shape {tuple(actual.shape)} != " \
                                                    f"{tuple(reference_float64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if not actual.numel():
        return
    exact = reference_float64.double().cpu()
    error = (actual.double().cpu() - exact).abs().max().item()
    same_dtype = ([reference_same_dtype] if isinstance(reference_same_dtype, torch.Tensor)
                  else list(reference_same_dtype))
    for result in same_dtype:
        assert torch.isfinite(result).all(), (
            f"{name}: PyTorch's own {result.dtype} result is not finite, so it is no "
            "yardstick: compare against a finite one")
    torch_error = max((result.double().cpu() - exact).abs().max().item() for result in same_dtype)
    scale = exact.abs().max().item()
    table_dtype = compute_dtype or actual.dtype
    bound = tolerance(table_dtype, torch_error, scale, input_scale)
    assert error <= bound, (f"{name}: max abs error {error:.3e} > bound {bound:.3e} "
                            f"(PyTorch's own error {torch_error:.3e} computing in "
                            f"{table_dtype}, "
                            f"largest exact magnitude {scale:.3e})")
