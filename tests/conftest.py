"""Test set-up: on a machine without CUDA, Triton kernels run through the CPU interpreter.

``TRITON_INTERPRET`` must be set before triton is first imported, so it is set here, at
conftest import, before any test module imports blipfast.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "triton" in sys.modules and os.environ["TRITON_INTERPRET"] == "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set "
                           "TRITON_INTERPRET=1; CPU kernel tests would not run")
