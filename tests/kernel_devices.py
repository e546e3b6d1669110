"""Where a test of the Triton kernels themselves runs: on CPU through the interpreter
(``interpreter``: CPU tensors without it would run the PyTorch reference instead), and
compiled on CUDA where there is one (``gpu``). See conftest.py for the skips."""

import pytest
import torch

KERNEL_DEVICES = [pytest.param("cpu", marks=pytest.mark.interpreter)] + (
    [pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
