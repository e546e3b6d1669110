"""Functional fused ops: validate arguments, then run the Triton kernels (or the PyTorch
reference where the kernels cannot run). Every op is traceable by torch.compile.

Each op's module imports its kernels' module, so importing this package registers the
kernels' torch.library custom ops (``torch.ops.blipfast.*``): a program exported with
them in its graph (``torch.export.save``, an AOTInductor package) loads in a fresh
process after ``import blipfast``."""

from blipfast.ops.attention import attention
from blipfast.ops.bias_gelu import bias_gelu, bias_gelu_linear
from blipfast.ops.contrastive import (
    ContrastiveLossOutput,
    contrastive_loss,
    contrastive_loss_with_hard_negatives,
    contrastive_loss_with_queue,
)
from blipfast.ops.cross_entropy import cross_entropy
from blipfast.ops.layer_norm import add_layer_norm, layer_norm
from blipfast.ops.recompute import mark_recomputable, recompute_in_backward

__all__ = [
    "attention",
    "add_layer_norm",
    "bias_gelu",
    "bias_gelu_linear",
    "layer_norm",
    "recompute_in_backward",
    "mark_recomputable",
    "cross_entropy",
    "contrastive_loss",
    "contrastive_loss_with_hard_negatives",
    "contrastive_loss_with_queue",
    "ContrastiveLossOutput",
]
