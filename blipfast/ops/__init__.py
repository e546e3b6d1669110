"""Functional fused ops: validate arguments, then run the Triton kernels (or the PyTorch
reference where the kernels cannot run). Every op is traceable by torch.compile."""

from blipfast.ops.attention import attention

__all__ = ["attention"]
