"""Building blocks shared by BLIP's vision and text transformers.

Parameters live in ordinary ``nn.Linear`` / ``nn.LayerNorm`` modules, named as in
transformers, so state dicts are interchangeable. Where an op is fused across modules
(residual add + LayerNorm, bias + GELU, GELU + the next projection) the forward passes use
the modules' parameters in the fused ops of :mod:`blipfast.ops` instead of calling them;
that happens only for plain ``nn.Linear`` / ``nn.LayerNorm`` modules without forward hooks
or a ``forward`` set on the instance (:func:`runs_as_plain`). Anything else (a LoRA layer
put in a projection's place, a hooked module, a module under accelerate's offloading
hooks) is called as it is, so it behaves as it would in transformers. Linear layers with
nothing to fuse are always called. Where the kernels do not take a model's dtype
(float64) or attention head dim, the same helpers run the PyTorch references
(:mod:`blipfast.reference`) or the modules themselves, with a warning, so such a model
still computes what transformers' would.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Optional, Sequence, TypeGuard, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import ModelOutput, TransformersKwargs

from blipfast import ops, reference
from blipfast.ops._checks import SUPPORTED_DTYPE_NAMES, SUPPORTED_DTYPES
from blipfast.ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM, check_attention_arguments
from blipfast.patching import (ModuleT, PatchedMethod, check_runs_blipfast_forward,
                               runs_transformers_forward)

EXACT_GELU_NAMES = ("gelu",)


def is_wrapped(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its class's ``forward``: it has forward
    hooks or pre-hooks, or a ``forward`` of its own on the instance other than
    :func:`blipfast.patch`'s (as accelerate's hooks set: they load offloaded weights or
    move inputs to the module's device). Such a module must be called, not bypassed."""
    forward = module.__dict__.get("forward")
    return (bool(module._forward_hooks or module._forward_pre_hooks)
            or (forward is not None and not isinstance(forward, PatchedMethod)))


def runs_as_plain(module: nn.Module, kind: type[ModuleT]) -> TypeGuard[ModuleT]:
    """Whether ``module`` is exactly a ``kind`` (not a subclass or a wrapper, such as a
    LoRA layer in its place) and not wrapped (:func:`is_wrapped`): only then may a fused op
    use its parameters directly instead of calling it, with the same result."""
    return type(module) is kind and not is_wrapped(module)


def checkpoint_function(encoder: nn.Module, layer: nn.Module, options: dict) -> Optional[Callable]:
    """The function to run ``layer`` of ``encoder`` under activation checkpointing, or None
    to run it as is.

    transformers' ``activation_checkpointing_enable`` (``gradient_checkpointing_enable``
    before 5.2x) sets ``gradient_checkpointing`` on the encoder and on each layer (on every
    ``every_n_layers``-th layer only) and stores the checkpoint function, with the caller's
    options (``use_reentrant``, ``offload``), as ``_gradient_checkpointing_func``. The
    layer's flag decides where the layer has one, the encoder's otherwise. As in
    transformers, nothing is checkpointed outside training or without autograd, nor (here)
    a layer given a decoding cache, which a recomputation would write twice."""
    if not (encoder.training and torch.is_grad_enabled()) or options.get("cache") is not None:
        return None
    if not getattr(layer, "gradient_checkpointing", encoder.gradient_checkpointing):
        return None
    return (getattr(layer, "_gradient_checkpointing_func", None)
            or getattr(encoder, "_gradient_checkpointing_func", None)
            or functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False))


def call_layer(encoder: nn.Module, layer: nn.Module, *inputs, **options):
    """``layer(*inputs, **options)``, activation-checkpointed where
    :func:`checkpoint_function` says so.

    The layer is entered through ``nn.Module.__call__``: its hooks run, but a transformers
    ``GradientCheckpointingLayer`` (a patched model's layer) does not checkpoint itself a
    second time inside. Tensor options reach the checkpoint function as positional inputs,
    so that a reentrant checkpoint (``use_reentrant=True``), which gives gradients to
    positional inputs only, gives them to the image features of cross-attention too."""
    function = checkpoint_function(encoder, layer, options)
    if function is None:
        return nn.Module.__call__(layer, *inputs, **options)
    tensor_names = [name for name, value in options.items() if isinstance(value, torch.Tensor)]
    other_options = {name: value for name, value in options.items() if name not in tensor_names}
    count = len(inputs)

    def run(*values):
        tensor_options = dict(zip(tensor_names, values[count:]))
        return nn.Module.__call__(layer, *values[:count], **other_options, **tensor_options)

    return function(run, *inputs, *(options[name] for name in tensor_names))


def kernels_take_dtype(tensor: torch.Tensor) -> bool:
    """Whether blipfast's kernels take ``tensor``'s dtype (float16, bfloat16, float32). If
    not (float64), warns that the model runs the PyTorch references instead."""
    if tensor.dtype in SUPPORTED_DTYPES:
        return True
    warnings.warn(f"blipfast: the kernels take {SUPPORTED_DTYPE_NAMES}, not {tensor.dtype}; "
                  "this model runs the PyTorch references (blipfast.reference) instead",
                  stacklevel=3)
    return False


def layer_norm(module: nn.LayerNorm, x: torch.Tensor,
               residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``module(x + residual)`` with the fused kernel; output in x's dtype. A module that is
    not a plain ``nn.LayerNorm`` is called on the sum instead; a dtype the kernel does not
    take (float64) runs the reference."""
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    if not runs_as_plain(module, nn.LayerNorm):
        return module(x if residual is None else x + residual)
    normalize = ops.layer_norm if kernels_take_dtype(x) else reference.layer_norm
    return normalize(x, module.weight, module.bias, residual=residual, eps=module.eps)


def add_layer_norm(module: nn.LayerNorm, x: torch.Tensor,
                   residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(module(x + residual), x + residual)`` with the fused kernel (pre-norm blocks). A
    module that is not a plain ``nn.LayerNorm`` is called on the sum instead; a dtype the
    kernel does not take (float64) runs the reference."""
    if residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    if not runs_as_plain(module, nn.LayerNorm):
        total = x + residual
        return module(total), total
    normalize = ops.add_layer_norm if kernels_take_dtype(x) else reference.add_layer_norm
    return normalize(x, residual, module.weight, module.bias, eps=module.eps)


def _stock_activation_type(name: str) -> Optional[type]:
    """The class of ``ACT2FN[name]``, read without instantiating it (``ACT2FN`` maps a name
    to its class or to (class, kwargs)); None for an unknown name."""
    from transformers.activations import ACT2FN

    content = dict.get(ACT2FN, name)
    return content[0] if isinstance(content, tuple) else content


def activation_in_use(name: str, module: Optional[nn.Module]) -> Union[str, nn.Module]:
    """What a feed-forward applies: the activation ``name`` (a key of transformers'
    ``ACT2FN``), unless ``module``, the activation module a patched transformers layer
    holds (``activation_fn``, ``intermediate_act_fn``, ``transform_act_fn``; None in
    blipfast's own models), is not transformers' own module for that name (a user replaced
    it) or is wrapped (:func:`is_wrapped`: hooks): then that module, to be called as it is."""
    if module is None or (type(module) is _stock_activation_type(name)
                          and not is_wrapped(module) and not _holds_tensors(module)):
        return name
    return module


def _holds_tensors(module: nn.Module) -> bool:
    """Whether an activation module or a submodule has parameters or buffers (PReLU's
    learned slope, xIELU's): then it is called, not rebuilt from its name with default
    values. Read from the modules' own tables, not ``parameters()``: this runs at every
    feed-forward call of a patched model."""
    return bool(module._parameters or module._buffers) or any(
        _holds_tensors(child) for child in module._modules.values() if child is not None)


def weightless_activation(name: str, where: str) -> str:
    """``name``, the ``hidden_act`` of a config, after checking that blipfast's own
    modules can apply it: a key of transformers' ``ACT2FN`` whose module holds no
    parameters or buffers (blipfast's modules keep the name, not a module; ``where``
    names the config in the ValueError)."""
    from transformers.activations import ACT2FN

    if not isinstance(name, str) or name not in ACT2FN:
        raise ValueError(f"{where}.hidden_act must be a name in transformers' ACT2FN, got "
                         f"{name!r}")
    if _holds_tensors(ACT2FN[name]):
        raise ValueError(f"{where}.hidden_act {name!r} has learned weights, which blipfast's "
                         "BLIP models do not hold; patch transformers' model instead "
                         "(blipfast.patch(model)), which calls its activation modules")
    return name


def _is_exact_gelu(activation: Union[str, nn.Module]) -> bool:
    return isinstance(activation, str) and activation in EXACT_GELU_NAMES


def linear_activation(module: nn.Linear, x: torch.Tensor,
                      activation: Union[str, nn.Module]) -> torch.Tensor:
    """``activation(module(x))``, ``activation`` an ``ACT2FN`` name or a module to call
    (:func:`activation_in_use`): for exact GELU after a plain ``nn.Linear`` the bias add is
    fused into the activation kernel (the matmul runs without it, in the autocast dtype
    under autocast, as ``nn.Linear`` would); otherwise the module is called and the
    activation applied (so too for a dtype the kernel does not take, float64)."""
    if _is_exact_gelu(activation) and runs_as_plain(module, nn.Linear) and kernels_take_dtype(x):
        return ops.bias_gelu(F.linear(x, module.weight), module.bias)
    if isinstance(activation, str):
        from transformers.activations import ACT2FN

        return ACT2FN[activation](module(x))
    return activation(module(x))


def feed_forward(first: nn.Linear, second: nn.Linear, x: torch.Tensor,
                 activation: Union[str, nn.Module], recompute_hidden: bool = False) -> torch.Tensor:
    """``second(activation(first(x)))``. For exact GELU between plain ``nn.Linear`` layers,
    the first bias is fused into the activation and the activation is not kept for the
    backward (recomputed there: :func:`blipfast.ops.bias_gelu_linear`); with
    ``recompute_hidden`` the first projection's output is not kept either (see
    :func:`mark_projection_recomputable`). A dtype the kernels do not take (float64) runs
    the modules and PyTorch's activation."""
    if (_is_exact_gelu(activation) and runs_as_plain(first, nn.Linear)
            and runs_as_plain(second, nn.Linear) and kernels_take_dtype(x)):
        hidden = F.linear(x, first.weight)
        if recompute_hidden:
            mark_projection_recomputable(first, x, hidden, with_bias=False)
        return ops.bias_gelu_linear(hidden, first.bias, second.weight, second.bias)
    return second(linear_activation(first, x, activation))


def mark_projection_recomputable(module: nn.Module, x: torch.Tensor, output: torch.Tensor,
                                 with_bias: bool = True) -> bool:
    """Within :func:`blipfast.ops.recompute_in_backward`, let the backward recompute
    ``output`` = ``module(x)`` (without its bias if not ``with_bias``) instead of keeping it:
    one more matmul in the backward for one activation less. Only for a plain
    ``nn.Linear``; x is recomputed too if it is marked (a LayerNorm output), else held.
    The recomputation runs in ``output``'s dtype (the autocast copy of the weight).
    ``output`` may be a view of the projection (e.g. split into heads)."""
    if not runs_as_plain(module, nn.Linear):
        return False
    weight, bias, dtype = module.weight, module.bias if with_bias else None, output.dtype

    def project(inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs.to(dtype), weight.to(dtype),
                        bias.to(dtype) if bias is not None else None)

    return ops.mark_recomputable(output, project, x)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              **options: Any) -> torch.Tensor:
    """:func:`blipfast.ops.attention` (same arguments), or where its kernels do not take
    the head dim (outside 16 to 128, e.g. the head dim 8 of tiny test configs) or the
    dtype (float64) the PyTorch reference :func:`blipfast.reference.attention`: same
    semantics, float32 softmax (float64 for float64), but it builds the (B, H, Lq, Lk)
    scores. A warning says so the first time. Both check the arguments alike (e.g. a
    ``kv_index`` out of range raises rather than wrapping around)."""
    head_dim = query.shape[-1]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        warnings.warn(f"blipfast: attention head dim {head_dim} is outside the kernels' "
                      f"{MIN_HEAD_DIM} to {MAX_HEAD_DIM}; this model's attention runs the "
                      "PyTorch reference (blipfast.reference.attention), which builds the "
                      "score matrix", stacklevel=2)
    elif kernels_take_dtype(query):
        return ops.attention(query, key, value, **options)
    check_attention_arguments(query, key, value, options.get("causal", False),
                              options.get("key_padding_mask"), options.get("kv_index"),
                              options.get("softmax_scale"), kernel_limits=False)
    return reference.attention(query, key, value, **options)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, **options: Any) -> torch.Tensor:
    """:func:`blipfast.ops.cross_entropy` (same arguments; float32 loss), or for a dtype
    its kernel does not take (float64) the reference :func:`blipfast.reference.cross_entropy`
    (a float64 loss)."""
    if kernels_take_dtype(logits):
        return ops.cross_entropy(logits, labels, **options)
    return reference.cross_entropy(logits, labels, **options)


HiddenStateSelection = Union[bool, int, Sequence[int], None]
"""``output_hidden_states`` as transformers takes it: a flag, or the index (indices) of the
hidden states to return (every layer's input, then the output; negative from the end)."""


def selected_hidden_states(output_hidden_states: HiddenStateSelection,
                           count: int) -> Optional[frozenset[int]]:
    """Which of ``count`` hidden states ``output_hidden_states`` asks for: None for none
    (a false value), all for True, else the indices given (the others are returned as
    None, as transformers returns them)."""
    if not output_hidden_states:
        return None
    if output_hidden_states is True:
        return frozenset(range(count))
    indices = ([output_hidden_states] if isinstance(output_hidden_states, int)
               else list(output_hidden_states))
    return frozenset(index % count for index in indices if -count <= index < count)


def key_padding_mask(attention_mask: Optional[torch.Tensor], name: str,
                     shape: Optional[tuple[int, ...]] = None,
                     shape_name: str = "(batch, length)") -> Optional[torch.Tensor]:
    """A (batch, length) 0/1 or bool mask (1 = attend) as the bool mask the attention op
    takes, checked against ``shape`` (described as ``shape_name`` in the message) when
    given. Masks of other ranks are not supported (no (B, 1, L, L) masks are built)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        hint = (" (a 4-D mask is what transformers builds for generate with a fixed-length "
                "cache, cache_implementation='static' or 'sliding_window', which blipfast does "
                "not support: use the default dynamic cache)" if attention_mask.dim() == 4
                else "")
        raise ValueError(f"{name} must be a (batch, length) mask with 1 for tokens to attend "
                         f"to, got shape {tuple(attention_mask.shape)}{hint}")
    if shape is not None and tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape_name} = {tuple(shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point():
        return attention_mask > 0.5
    return attention_mask != 0


def check_attention_dropout(module: nn.Module) -> None:
    """Attention-probability dropout is not implemented in the fused kernel; refuse to train
    with it rather than silently skip it. The probability is that of a patched transformers
    module's own ``dropout`` module, read at every call (so that one set after patching
    counts), or blipfast's module's ``attention_dropout``."""
    if not module.training:
        return
    dropout = module._modules.get("dropout")
    if dropout is not None:  # a patched module's (nn.Identity, say, has no probability)
        probability = float(getattr(dropout, "p", 0.0))
    else:
        probability = float(getattr(module, "attention_dropout", 0.0))
    if probability > 0:
        raise NotImplementedError(
            f"attention dropout ({probability}) is not supported by blipfast's fused attention; "
            "set it to 0.0: in the config before the model is built or patched, or on a "
            "patched transformers model as each attention module's dropout.p (as "
            "transformers' BLIP configs, its "
            "defaults and the released checkpoints', have it; Salesforce BLIP's own text "
            "config trains with attention_probs_dropout_prob 0.1)")


TRANSFORMERS_KEYWORD_ARGUMENTS = frozenset(TransformersKwargs.__annotations__) | {
    "use_cache", "shift_labels"}
"""What transformers' BLIP forwards take through ``**kwargs: Unpack[TransformersKwargs]``
(the installed version's keys), plus ``use_cache`` and ``shift_labels``, which its task
models pass on to every submodel too. Every forward accepts them, and ignores those it
does not use, as transformers' BLIP (eager attention) ignores them: ``num_items_in_batch``
(which ``transformers.Trainer`` passes), ``output_router_logits``, the packed-sequence
arguments (``cu_seq_lens_q``, ...), ``use_cache`` where there is no cache to return,
``shift_labels`` outside the LM head."""


TRAINER_ARGUMENTS = frozenset({"labels", "return_loss"})
"""What ``transformers.Trainer`` may pass to a model whose forward takes no such argument
(a dataset's labels column on the retrieval model; ``return_loss``), and transformers'
task models pass on to their submodels: ignored, as transformers ignores them there (the
forwards that take ``labels`` have it as a parameter of their own)."""

IGNORED_BERT_ARGUMENTS = frozenset({"token_type_ids", "head_mask"})
"""Arguments of BERT's forward that transformers' BLIP forwards take through ``**kwargs``
and ignore, so that ``model(**tokenizer(texts))`` with a BERT tokenizer runs:
``token_type_ids`` (BLIP's text embeddings have no token types, in transformers and in
Salesforce BLIP alike, so ignoring them is exact) and ``head_mask`` when it is None (a
head mask given raises: nothing would apply it)."""


def reject_unsupported_arguments(kwargs: dict, config: Optional[PretrainedConfig] = None) -> None:
    """Refuse what a forward cannot honour instead of ignoring it: ``output_attentions``,
    as an argument or, not given, as ``config``'s setting (the fused kernels never form
    attention probabilities), a ``head_mask``, and unknown keyword arguments, such as a
    misspelt one. The keyword arguments transformers' forwards take
    (:data:`TRANSFORMERS_KEYWORD_ARGUMENTS`, :data:`IGNORED_BERT_ARGUMENTS`,
    :data:`TRAINER_ARGUMENTS`) are accepted."""
    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        output_attentions = getattr(config, "output_attentions", False)
    if output_attentions:
        raise ValueError("output_attentions=True (as an argument or in the model's config) is "
                         "not supported: blipfast's fused attention never materializes "
                         "attention probabilities (use the transformers model to inspect them)")
    if kwargs.get("head_mask") is not None:
        raise ValueError("head_mask is not supported: blipfast's fused attention has no "
                         "per-head mask (transformers 5's BLIP ignores it too)")
    unknown = (set(kwargs) - TRANSFORMERS_KEYWORD_ARGUMENTS - IGNORED_BERT_ARGUMENTS
               - TRAINER_ARGUMENTS)
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")


def model_output(output: ModelOutput, return_dict: Optional[bool],
                 config: PretrainedConfig) -> Union[ModelOutput, tuple]:
    """``output``, or its tuple (``to_tuple``: the fields that are not None) where
    ``return_dict`` is False or, not given, the model config's ``return_dict`` is, as
    transformers' models return it."""
    if return_dict is None:
        return_dict = config.return_dict
    return output if return_dict else output.to_tuple()
