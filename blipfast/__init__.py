"""blipfast: Triton kernels and models for BLIP and BLIP-2.

- ``blipfast.ops``: functional fused ops (attention, ...).
- ``blipfast.reference``: the pure-PyTorch reference of every op.
- ``blipfast.models``: drop-in BLIP models (transformers' class names and checkpoints).
- ``blipfast.patch(model)`` / ``blipfast.unpatch(model)``: the kernels inside an existing
  transformers BLIP model, in place.
- ``blipfast.train``: BLIP's pre-training step; ``blipfast.distributed``: gathers with
  gradient across ranks.

``blipfast.models`` and ``blipfast.train`` are imported when first used (``import
blipfast`` alone does not import the models).
"""

import importlib
import types

from blipfast import ops, reference
from blipfast.patching import is_patched, patch, unpatch

_SUBMODULES_ON_FIRST_USE = ("models", "train")


def __getattr__(name: str) -> types.ModuleType:
    """``blipfast.models`` and ``blipfast.train``, imported on first use."""
    if name in _SUBMODULES_ON_FIRST_USE:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    """The package's names, with the submodules imported on first use."""
    return sorted(set(globals()) | set(_SUBMODULES_ON_FIRST_USE))

__version__ = "0.1.0"
__all__ = ["ops", "reference", "patch", "unpatch", "is_patched", "__version__"]
