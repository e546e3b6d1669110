"""The seeds of the kernel tests' random inputs, and a way to draw other inputs.

Every kernel case draws its inputs from a seed derived from its name
(:func:`case_seed`), so a run is reproducible and a failure names what to rerun. Set
``BLIPFAST_TEST_SEED`` to any text to draw other inputs for every case at once, and other
option combinations where the cases themselves are drawn at random (:func:`draw_seed`).
Unset (as CI runs), the seeds are the ones the tolerances were first checked with. A run
under another seed that fails is a tolerance or a kernel to look at, not noise to rerun
away::

    BLIPFAST_TEST_SEED=7 pytest -n logical tests/test_attention.py
"""

from __future__ import annotations

import os
import zlib

SEED_VARIABLE = "BLIPFAST_TEST_SEED"


def case_seed(name: str) -> int:
    """A 32-bit seed for the case called ``name``: the CRC-32 of the name, prefixed by
    ``BLIPFAST_TEST_SEED`` and a slash when that is set and not empty."""
    salt = os.environ.get(SEED_VARIABLE, "")
    return zlib.crc32((f"{salt}/{name}" if salt else name).encode())


def draw_seed(seed: int) -> int:
    """The seed that draws a list of random cases: ``seed`` itself, or, when
    ``BLIPFAST_TEST_SEED`` is set, :func:`case_seed` of it (other cases under each salt)."""
    return case_seed(f"draw/{seed}") if os.environ.get(SEED_VARIABLE, "") else seed
