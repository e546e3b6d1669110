"""The Triton interpreter as every test process runs it: the pytest processes
(``conftest.py``) and the processes tests spawn (``distributed_harness.py``), so that the
ranks of a distributed test compute as the process that checks them does.

Where ``TRITON_INTERPRET`` is on, :func:`install_when_interpreting` patches the
interpreter's bf16 and the order in which its dots add to be a GPU's
(``interpreter_like_gpu``), and makes it patch ``triton.language`` per launch, not at every
helper call (``interpreter_patch_once``: the same computation, faster).
"""

from __future__ import annotations


def install_when_interpreting() -> None:
    """Install both interpreter patches when kernels run on the interpreter (idempotent)."""
    from blipfast.kernels._runtime import interpreter_enabled

    if not interpreter_enabled():
        return
    import interpreter_like_gpu
    import interpreter_patch_once

    interpreter_like_gpu.install()
    interpreter_patch_once.install()
