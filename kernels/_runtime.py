"""Facts about where kernels run, shared by the launchers and ``blipfast.ops``."""

from __future__ import annotations

import os


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU interpreter.

    Triton reads the variable when it is first imported, so set it before that.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
