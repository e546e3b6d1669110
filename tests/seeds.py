"""The seeds of the kernel tests' random inputs, and a way to draw other inputs.

Every kernel case draws its inputs from a seed derived from its name
(:func:`case_seed`), so a run is reproducible and a failure names what to rerun. Set
``BLIPFAST_TEST_SEED`` to any text to draw other inputs for every case at once, and other
option combinations where the cases themselves are drawn at random (:func:`draw_seed`).
The other tests (models, training, the statistical ones) seed through torch itself;
set, the variable also salts every ``torch.manual_seed`` and ``torch.Generator`` seed
(:func:`salt_every_torch_seed`, which conftest and each distributed test process call).
Unset (as CI runs), the seeds are the ones the tolerances were first checked with. A run
under another seed that fails is a tolerance, a test's premise or a kernel to look at, not
noise to rerun away::

    BLIPFAST_TEST_SEED=7 pytest -n logical tests/test_attention.py
"""

from __future__ import annotations

import os
import zlib

import torch

SEED_VARIABLE = "BLIPFAST_TEST_SEED"


def _salt() -> str:
    """``BLIPFAST_TEST_SEED``, or "" when unset."""
    return os.environ.get(SEED_VARIABLE, "")


def case_seed(name: str) -> int:
    """A 32-bit seed for the case called ``name``: the CRC-32 of the name, prefixed by
    ``BLIPFAST_TEST_SEED`` and a slash when that is set and not empty."""
    salt = _salt()
    return zlib.crc32((f"{salt}/{name}" if salt else name).encode())


def draw_seed(seed: int) -> int:
    """The seed that draws a list of random cases: ``seed`` itself, or, when
    ``BLIPFAST_TEST_SEED`` is set, :func:`case_seed` of it (other cases under each salt)."""
    return case_seed(f"draw/{seed}") if _salt() else seed


def salt_every_torch_seed() -> None:
    """When ``BLIPFAST_TEST_SEED`` is set, make ``torch.manual_seed(n)`` and
    ``torch.Generator().manual_seed(n)`` in this process seed with :func:`case_seed` of
    ``"torch/n"`` instead (``torch.Generator`` becomes a subclass that does so, of which
    every generator counts as an instance, ``torch.default_generator`` too, so that
    ``isinstance(x, torch.Generator)`` checks answer as before); unset, do nothing.
    Affects only code that looks these up after the call (``torch.manual_seed(...)``, not
    an earlier ``from torch import manual_seed``)."""
    if not _salt() or getattr(torch.Generator, "salted", False):
        return
    plain_manual_seed, plain_generator = torch.manual_seed, torch.Generator

    def salted_manual_seed(seed):
        return plain_manual_seed(case_seed(f"torch/{int(seed)}"))

    class AnyGeneratorIsInstance(type(plain_generator)):
        def __instancecheck__(cls, instance):
            return isinstance(instance, plain_generator)

    class SaltedGenerator(plain_generator, metaclass=AnyGeneratorIsInstance):
        salted = True

        def manual_seed(self, seed):
            return super().manual_seed(case_seed(f"torch/{int(seed)}"))

    torch.manual_seed = salted_manual_seed
    torch.random.manual_seed = salted_manual_seed
    torch.Generator = SaltedGenerator
