"""The Triton interpreter as every test process runs it: the pytest processes
(``conftest.py``) and the processes tests spawn (``distributed_harness.py``), so that the
ranks of a distributed test compute as the process that checks them does.

Where ``TRITON_INTERPRET`` is on, :func:`install_when_interpreting` patches the
interpreter's bf16 and the order in which its dots add to be a GPU's
(``interpreter_like_gpu``), makes it patch ``triton.language`` per launch, not at every
helper call (``interpreter_patch_once``: the same computation, faster), and turns off its
integer-overflow checks, which check nothing there (:func:`without_overflow_checks`).
"""

from __future__ import annotations

import dataclasses


def install_when_interpreting() -> None:
    """Install the interpreter patches and options above when kernels run on the
    interpreter (idempotent)."""
    from blipfast.kernels._runtime import interpreter_enabled

    if not interpreter_enabled():
        return
    import interpreter_like_gpu
    import interpreter_patch_once

    interpreter_like_gpu.install()
    interpreter_patch_once.install()
    without_overflow_checks()


def without_overflow_checks() -> None:
    """Stop the interpreter from building an overflow check at every 32-bit integer add,
    subtract and multiply of a kernel (``sanitize_overflow``, on by default): it redoes
    the operation in int64 and compares, then hands the result to ``device_assert``,
    which drops it unless the kernel runs with ``debug=True`` (Triton's semantics; the
    interpreter's default is off, and an int32 overflow in a kernel wraps silently with
    or without the check, seen on Triton 3.6 and 3.9). Work that checks nothing: 23% of
    the time of a BLIP model test's kernels (three steps of the retrieval convergence
    test: 8.7 s with it, 6.7 s without, Triton 3.9, one thread). Raises if the
    interpreter's builder has no such option any more (written against Triton 3.6 to
    3.9)."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if options is None or not hasattr(options, "sanitize_overflow"):
        raise RuntimeError("tests/interpreter_setup.py: the Triton interpreter's builder has "
                           "no options.sanitize_overflow any more; update this function")
    builder.options = dataclasses.replace(options, sanitize_overflow=False)
