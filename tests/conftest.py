"""Test set-up: on a machine without CUDA, Triton kernels run through the CPU interpreter.

``TRITON_INTERPRET`` must be set before triton is first imported, so it is set here, at
conftest import, before any test module imports blipfast. It is one mode for the whole
process: tests marked ``interpreter`` (the kernels on CPU tensors) are skipped where it
is off, as on a CUDA machine, whose ``gpu`` tests cover the kernels compiled; and the
``gpu`` tests are skipped where it is on (``TRITON_INTERPRET=1`` on a CUDA machine).

Under the interpreter, bf16 and the order in which a dot product adds are patched to be a
GPU's (``interpreter_like_gpu``), and the interpreter patches ``triton.language`` per
launch instead of at every helper call (``interpreter_patch_once``); the processes
distributed tests spawn do the same (``interpreter_setup``).

Run in parallel (``pytest -n logical``, pytest-xdist), each test process gets an equal
share of the CPUs for PyTorch's threads instead of all of them each.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "triton" in sys.modules and os.environ["TRITON_INTERPRET"] == "1":
        raise RuntimeError("triton was imported before tests/conftest.py could set "
                           "TRITON_INTERPRET=1; CPU kernel tests would not run")

from blipfast.kernels._runtime import interpreter_enabled  # noqa: E402 (after the set-up)
import interpreter_setup  # noqa: E402
from seeds import salt_every_torch_seed  # noqa: E402

salt_every_torch_seed()  # BLIPFAST_TEST_SEED set: other data everywhere (tests/seeds.py)

INTERPRETER = interpreter_enabled()
interpreter_setup.install_when_interpreting()  # its bf16 and dots a GPU's; see that module

_workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
if _workers:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(_workers)))


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's, which warns
def pytest_configure(config):
    """A parallel run (pytest-xdist) disables pytest-benchmark anyway, with a warning per
    process; tests/ holds no benchmarks (bench/ does), so turn it off without one."""
    parallel = config.getoption("dist", "no") != "no" or "PYTEST_XDIST_WORKER" in os.environ
    if parallel and hasattr(config.option, "benchmark_disable"):
        config.option.benchmark_disable = True


def pytest_collection_modifyitems(config, items):
    """Skip the tests that need the other Triton mode than this process runs (see above)."""
    for item in items:
        if "interpreter" in item.keywords and not INTERPRETER:
            item.add_marker(pytest.mark.skip(
                reason="the Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set here "
                       "where CUDA is absent); the gpu tests cover the kernels"))
        elif "gpu" in item.keywords and INTERPRETER and torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(
                reason="TRITON_INTERPRET=1: the gpu tests need the compiled kernels"))


@pytest.fixture
def reference_path(monkeypatch):
    """The ops run their PyTorch reference in this test, not the kernels on the
    interpreter (``TRITON_INTERPRET=0``; the ops read it at every call). For tests of that
    path itself, and of the models' and tools' own logic (arguments passed on, state left
    alone, warnings, errors, clamps), whose checks hold whichever path computes: each
    interpreted kernel launch costs tens of milliseconds, and the kernels' path through
    the models is tested by the parity, convergence and pre-training tests."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
