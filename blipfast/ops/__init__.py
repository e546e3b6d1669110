"""Functional fused ops: validate arguments, then run the Triton kernels (or the PyTorch
reference where the kernels cannot run). Every op is traceable by torch.compile."""

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

# The kernels' torch.library custom ops (torch.ops.blipfast.*) are registered on import,
# not at their first call: a program exported with them in its graph (torch.export.save,
# an AOTInductor package) then loads in a fresh process after `import blipfast`.
from blipfast.kernels import attention as _attention_kernels  # noqa: E402, F401
from blipfast.kernels import bias_gelu as _bias_gelu_kernels  # noqa: E402, F401
from blipfast.kernels import contrastive as _contrastive_kernels  # noqa: E402, F401
from blipfast.kernels import cross_entropy as _cross_entropy_kernels  # noqa: E402, F401
from blipfast.kernels import layer_norm as _layer_norm_kernels  # noqa: E402, F401

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
