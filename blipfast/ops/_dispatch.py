"""Where the Triton kernels run."""

from __future__ import annotations

import torch

from blipfast.kernels._runtime import interpreter_enabled


def use_triton(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on CPU tensors through the interpreter."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreter_enabled()
