"""Functional fused ops: validate arguments, then run the Triton kernels (or the PyTorch
reference where the kernels cannot run). Every op is traceable by torch.compile."""

from blipfast.ops.attention import attention
from blipfast.ops.contrastive import (
    ContrastiveLossOutput,
    contrastive_loss,
    contrastive_loss_with_hard_negatives,
    contrastive_loss_with_queue,
)

__all__ = [
    "attention",
    "contrastive_loss",
    "contrastive_loss_with_hard_negatives",
    "contrastive_loss_with_queue",
    "ContrastiveLossOutput",
]
