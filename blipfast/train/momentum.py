"""Momentum (exponential moving average) encoders and the distillation-weight ramp of
ALBEF / BLIP pre-training."""

from __future__ import annotations

import numbers
import warnings
from typing import Sequence, Union, cast

import torch

from blipfast.ops._checks import is_finite

__all__ = ["momentum_update_", "ramped_alpha"]

HALF_PRECISION_DTYPES = (torch.float16, torch.bfloat16)
"""Floating-point types too coarse to hold a slow exponential moving average: with
momentum 0.995 each update moves a weight by 0.5 % of its distance to the online weight,
while half a unit in the last place is up to 0.39 % of the weight in bfloat16 and up to
0.05 % in float16."""


def is_integer(value: object) -> bool:
    """Whether ``value`` is an integer: a Python or NumPy integer, not a bool. (A plain
    bool, not a type guard: narrowing ``int`` to ``numbers.Integral`` would make mypy take
    the code after the check as unreachable.)"""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real_number(value: object) -> bool:
    """Whether ``value`` is a real number: a Python or NumPy integer or float, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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

    An update in float16 or bfloat16 (a model cast whole, e.g. ``model.bfloat16()``)
    rounds away: it moves each copy by ``(1 - momentum) * (p - m)``, which with BLIP's
    momentum 0.995 is below half a unit in the last place of ``m`` unless ``p`` and ``m``
    differ by 40 to 80 % (bfloat16) or 5 to 10 % (float16), so the copies barely move. A
    momentum strictly between 0 and 1 on such tensors warns (UserWarning, once per dtype
    under Python's default warning filter; not under ``torch.compile``, which cannot trace
    ``warnings.warn``): keep float32 weights and train under ``torch.autocast`` instead.

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
    if not torch.compiler.is_compiling() and 0.0 < momentum < 1.0:
        _warn_if_half_precision(momentum_parameters, float(momentum))
    if momentum_parameters:
        torch._foreach_lerp_(momentum_parameters, parameters, 1.0 - float(momentum))


def _warn_if_half_precision(momentum_parameters: list[torch.Tensor], momentum: float) -> None:
    """Warn that an exponential moving average in float16 or bfloat16 stalls (see
    :func:`momentum_update_`). The warning's location is :func:`momentum_update_` and its
    message depends on the dtype and the momentum only, so Python's default filter shows it
    once per dtype (and momentum), not once per step."""
    half_dtypes = {tensor.dtype for tensor in momentum_parameters
                   if tensor.dtype in HALF_PRECISION_DTYPES}
    for dtype in sorted(half_dtypes, key=str):
        # half a unit in the last place, relative to the weight: from this to half of it
        largest_half_unit = torch.finfo(dtype).eps / 2
        warnings.warn(
            f"momentum_update_: the momentum copies are {dtype}. An exponential moving "
            f"average with momentum {momentum:g} moves each weight by {1.0 - momentum:.3g} * "
            f"(online weight - copy), which rounds away in {dtype} (half a unit in the last "
            f"place is {largest_half_unit / 2:.2g} to {largest_half_unit:.2g} of the weight) "
            f"unless the two differ by more than {largest_half_unit / 2 / (1.0 - momentum):.2g} "
            f"to {largest_half_unit / (1.0 - momentum):.2g} of the weight, so the momentum "
            "copies (encoders) barely move. Keep float32 weights and train under "
            "torch.autocast instead of casting the model to half precision.",
            UserWarning, stacklevel=2)


def ramped_alpha(step: Union[int, torch.Tensor], ramp_steps: Union[int, torch.Tensor],
                 alpha: float = 0.4) -> float:
    """The distillation weight of BLIP pre-training at ``step``: ramped linearly from 0 to
    ``alpha`` over the first ``ramp_steps`` steps, then constant.

    BLIP ramps over its first two epochs: ``step`` is the global step, counted across
    epochs, and ``ramp_steps = 2 * steps_per_epoch`` (salesforce BLIP's ``pretrain.py``:
    ``alpha * min(1, (epoch * len(data_loader) + i) / (2 * len(data_loader)))``); the step
    within an epoch would restart the ramp every epoch::

        for epoch in range(epochs):
            for step, batch in enumerate(loader):
                alpha = ramped_alpha(epoch * len(loader) + step, 2 * len(loader))

    Args:
        step, ramp_steps: integers (Python or NumPy integers, or 0-dim integer tensors,
            read on the host); not bools.
        alpha: the final weight, a real number in [0, 1].

    Raises:
        TypeError naming the argument: step or ramp_steps not an integer, alpha not a
            real number.
        ValueError naming the argument: negative step, ramp_steps below 1, alpha outside
            [0, 1] or not finite.
    """
    step = _as_integer("step", step)
    ramp_steps = _as_integer("ramp_steps", ramp_steps)
    if step < 0:
        raise ValueError(f"ramped_alpha: step must be a non-negative int, got {step!r}")
    if ramp_steps < 1:
        raise ValueError(f"ramped_alpha: ramp_steps must be a positive int, got {ramp_steps!r}")
    if not is_real_number(alpha):
        raise TypeError(f"ramped_alpha: alpha must be a real number, got "
                        f"{type(alpha).__name__}")
    if not is_finite(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"ramped_alpha: alpha must lie in [0, 1], got {alpha!r}")
    return float(alpha) * min(1.0, step / ramp_steps)


def _as_integer(name: str, value: object) -> int:
    """``value`` as a Python int: a Python or NumPy integer (not a bool) or a 0-dim integer
    tensor; a TypeError naming ``name`` and the type got otherwise."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 \
            and not value.is_floating_point() and not value.is_complex() \
            and value.dtype != torch.bool:
        return int(value)
    if not is_integer(value):
        described = (f"a tensor of {value.dtype} and shape {tuple(value.shape)}"
                     if isinstance(value, torch.Tensor) else type(value).__name__)
        raise TypeError(f"ramped_alpha: {name} must be an int (or a 0-dim integer tensor), "
                        f"got {described}")
    return int(cast(numbers.Integral, value))
