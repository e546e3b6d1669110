"""Momentum (exponential moving average) encoders and the distillation-weight ramp of
ALBEF / BLIP pre-training."""

from __future__ import annotations

from typing import Sequence

import torch

from blipfast.ops._checks import is_finite

__all__ = ["momentum_update_", "ramped_alpha"]


@torch.no_grad()
def momentum_update_(momentum_parameters: Sequence[torch.Tensor],
                     parameters: Sequence[torch.Tensor], momentum: float) -> None:
    """``m = momentum * m + (1 - momentum) * p`` for every pair, in place, as one fused
    multi-tensor operation (``torch._foreach_lerp_``: one kernel launch per group of
    tensors of the same device and dtype, not one per tensor).

    Args:
        momentum_parameters: the momentum copies, updated in place.
        parameters: the online tensors, same length, shapes, devices and dtypes.
        momentum: in [0, 1]; 1 keeps the momentum copies, 0 copies the online tensors.

    Raises:
        TypeError naming the argument: not a sequence (list, tuple, generator) of tensors.
        ValueError naming the argument: lengths, shapes, dtypes or devices differ, momentum
            outside [0, 1] or not a number.
    """
    for name, tensors in (("momentum_parameters", momentum_parameters), ("parameters", parameters)):
        if isinstance(tensors, (torch.Tensor, str)) or not hasattr(tensors, "__iter__"):
            raise TypeError(f"momentum_update_: {name} must be a sequence of tensors (e.g. "
                            f"list(module.parameters())), got {type(tensors).__name__}")
    momentum_parameters, parameters = list(momentum_parameters), list(parameters)
    for name, tensors in (("momentum_parameters", momentum_parameters), ("parameters", parameters)):
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"momentum_update_: {name}[{index}] must be a tensor, got "
                                f"{type(tensor).__name__}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
            or not is_finite(momentum) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum_update_: momentum must be a float in [0, 1], got {momentum!r}")
    if len(momentum_parameters) != len(parameters):
        raise ValueError(f"momentum_update_: momentum_parameters has {len(momentum_parameters)} "
                         f"tensors but parameters has {len(parameters)}")
    for index, (target, source) in enumerate(zip(momentum_parameters, parameters)):
        for what, target_value, source_value in (("shape", tuple(target.shape), tuple(source.shape)),
                                                 ("dtype", target.dtype, source.dtype),
                                                 ("device", target.device, source.device)):
            if target_value != source_value:
                raise ValueError(f"momentum_update_: momentum_parameters[{index}] has {what} "
                                 f"{target_value} but parameters[{index}] has {source_value}")
    if momentum_parameters:
        torch._foreach_lerp_(momentum_parameters, parameters, 1.0 - float(momentum))


def ramped_alpha(step: int, ramp_steps: int, alpha: float = 0.4) -> float:
    """The distillation weight of BLIP pre-training at ``step``: ramped linearly from 0 to
    ``alpha`` over the first ``ramp_steps`` steps, then constant (BLIP ramps over its first
    two epochs: ``ramp_steps = 2 * steps_per_epoch``).

    Raises:
        ValueError naming the argument: negative step, ramp_steps below 1, alpha outside
            [0, 1].
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"ramped_alpha: step must be a non-negative int, got {step!r}")
    if not isinstance(ramp_steps, int) or ramp_steps < 1:
        raise ValueError(f"ramped_alpha: ramp_steps must be a positive int, got {ramp_steps!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ramped_alpha: alpha must lie in [0, 1], got {alpha!r}")
    return alpha * min(1.0, step / ramp_steps)
