"""blipfast: Triton kernels and models for BLIP and BLIP-2.

- ``blipfast.ops``: functional fused ops (attention, ...).
- ``blipfast.reference``: the pure-PyTorch reference of every op.
- ``blipfast.models``: drop-in BLIP models (transformers' class names and checkpoints).
- ``blipfast.patch(model)`` / ``blipfast.unpatch(model)``: the kernels inside an existing
  transformers BLIP model, in place.
"""

from blipfast import ops, reference
from blipfast.patching import is_patched, patch, unpatch

__version__ = "0.1.0"
__all__ = ["ops", "reference", "patch", "unpatch", "is_patched", "__version__"]
