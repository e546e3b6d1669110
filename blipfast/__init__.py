"""blipfast: Triton kernels and models for BLIP and BLIP-2.

- ``blipfast.ops``: functional fused ops (attention, ...).
- ``blipfast.reference``: the pure-PyTorch reference of every op.
"""

from blipfast import ops, reference

__version__ = "0.1.0"
__all__ = ["ops", "reference", "__version__"]
