"""The one tolerance table for comparing kernels with the PyTorch reference.

A kernel's error against a float64 reference may be at most ``FACTOR`` times PyTorch's own
error in the same dtype (the reference computed natively in that dtype), plus a small
absolute floor per dtype for outputs where PyTorch happens to be nearly exact.
"""

import torch

FACTOR = 2.0
ABSOLUTE_FLOOR = {
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_close_to_reference(name: str, actual: torch.Tensor, reference_same_dtype: torch.Tensor,
                              reference_float64: torch.Tensor) -> None:
    """Assert ``actual`` is within the table's tolerance of ``reference_float64``."""
    assert actual.shape == reference_float64.shape, f"{name}: shape {tuple(actual.shape)} != " \
                                                    f"{tuple(reference_float64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    exact = reference_float64.double()
    error = (actual.double().cpu() - exact.cpu()).abs().max().item() if actual.numel() else 0.0
    torch_error = (reference_same_dtype.double().cpu() - exact.cpu()).abs().max().item() \
        if actual.numel() else 0.0
    bound = FACTOR * torch_error + ABSOLUTE_FLOOR[actual.dtype]
    assert error <= bound, (f"{name}: max abs error {error:.3e} > bound {bound:.3e} "
                            f"(PyTorch's own {actual.dtype} error {torch_error:.3e})")
