"""Building blocks shared by BLIP's vision and text transformers.

Parameters live in ordinary ``nn.Linear`` / ``nn.LayerNorm`` modules, named as in
transformers, so state dicts are interchangeable; the forward passes call the fused ops in
:mod:`blipfast.ops` instead of the modules' own forwards.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from blipfast import ops

EXACT_GELU_NAMES = ("gelu",)


def layer_norm(module: nn.LayerNorm, x: torch.Tensor,
               residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``module(x + residual)`` with the fused kernel; output in x's dtype."""
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    return ops.layer_norm(x, module.weight, module.bias, residual=residual, eps=module.eps)


def add_layer_norm(module: nn.LayerNorm, x: torch.Tensor,
                   residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(module(x + residual), x + residual)`` with the fused kernel (pre-norm blocks)."""
    if residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    return ops.add_layer_norm(x, residual, module.weight, module.bias, eps=module.eps)


def linear(module: nn.Linear, x: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
    """``module(x)``, optionally without the bias (to fuse it into what follows). Under
    autocast the product runs in the autocast dtype, as ``nn.Linear`` would."""
    return F.linear(x, module.weight, module.bias if bias else None)


def linear_activation(module: nn.Linear, x: torch.Tensor, activation: str) -> torch.Tensor:
    """``activation(module(x))``: for exact GELU the bias add is fused into the activation
    kernel; other activations use PyTorch's."""
    if activation in EXACT_GELU_NAMES:
        return ops.bias_gelu(linear(module, x, bias=False), module.bias)
    from transformers.activations import ACT2FN

    return ACT2FN[activation](linear(module, x))


def feed_forward(first: nn.Linear, second: nn.Linear, x: torch.Tensor,
                 activation: str) -> torch.Tensor:
    """``second(activation(first(x)))``. For exact GELU the first bias is fused into the
    activation and the activation is not kept for the backward (recomputed there:
    :func:`blipfast.ops.bias_gelu_linear`); other activations use PyTorch's."""
    if activation in EXACT_GELU_NAMES:
        return ops.bias_gelu_linear(linear(first, x, bias=False), first.bias, second.weight,
                                    second.bias)
    return linear(second, linear_activation(first, x, activation))


def key_padding_mask(attention_mask: Optional[torch.Tensor], name: str) -> Optional[torch.Tensor]:
    """A (batch, length) 0/1 or bool mask (1 = attend) as the bool mask the attention op
    takes. Masks of other ranks are not supported (no (B, 1, L, L) masks are built)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(f"{name} must be a (batch, length) mask with 1 for tokens to attend "
                         f"to, got shape {tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point():
        return attention_mask > 0.5
    return attention_mask != 0


def check_attention_dropout(module: nn.Module, probability: float) -> None:
    """Attention-probability dropout is not implemented in the fused kernel; refuse to train
    with it rather than silently skip it."""
    if module.training and probability > 0:
        raise NotImplementedError(
            f"attention dropout ({probability}) is not supported by blipfast's fused attention; "
            "set the config's attention dropout to 0.0 (BLIP's released configs use 0.0)")


def reject_unsupported_arguments(kwargs: dict, allowed: tuple[str, ...] = ()) -> None:
    """Refuse what a forward cannot honour instead of ignoring it: ``output_attentions``
    (the fused kernels never form attention probabilities) and unknown keyword arguments
    (``allowed`` names extra ones the caller handles)."""
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True is not supported: blipfast's fused attention "
                         "never materializes attention probabilities (use the transformers model "
                         "to inspect them)")
    unknown = set(kwargs) - {"output_attentions", *allowed}
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
