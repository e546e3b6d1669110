"""``blipfast.patch(model)``: blipfast's fused kernels inside an existing transformers model.

Table-driven: for every module of the model whose class is in the model family's table,
the instance gets blipfast's forward for that module (the forward of blipfast's module of
the same name, which reads the same parameters under the same names), plus the few plain
attributes that forward reads. Classes, parameters, state dicts, ``forward``/``generate``
signatures and outputs are untouched, so a training loop keeps working as it is;
``blipfast.unpatch(model)`` removes every instance override and attribute again. The
overrides are :class:`PatchedMethod` objects, so a patched model pickles
(``torch.save(model)``) and loads patched.

What changes inside: attention runs in the fused Triton kernel with (batch, length)
key-padding masks (no (B, 1, L, L) masks), every residual add is fused into its LayerNorm,
and exact GELU is fused with its bias. Training keeps less for the backward: the FFNs'
GELU outputs and the vision LayerNorm outputs are recomputed in the backward
(``encoder.recompute_layer_norm_outputs = False`` on the vision model keeps the latter).
Not available while patched: ``output_attentions``
(the kernel never forms attention probabilities; asked for as an argument or in a config,
it raises), a ``head_mask``, and attention-probability dropout (the attention modules'
``dropout.p``, read at every call, must be 0 in training). ``token_type_ids`` (a BERT
tokenizer's) are accepted and ignored, as there: BLIP has no token types.
Output dtypes: under ``torch.autocast`` the fused LayerNorms return the autocast dtype
(transformers' return float32 there), and a bfloat16 or float16 model's losses are float32.
A transformers text module put into a patched model must be patched too (``patch(model)``
again; until then it raises, as does a subclass of one, which patching leaves alone); a
ViT layer that runs transformers' forward is called as transformers calls it. Modules
whose blipfast forward takes other arguments than transformers passes them (text encoder,
layer, attention; ViT layer, attention) cannot be patched on their own.
Inner modules keep transformers' outputs where hooks may read them: a ViT layer or encoder
with hooks (or a ``forward`` of its own) is called on summed hidden states and returns
them, a hooked or replaced activation module is called, and attention blocks return
``(output, None)`` for transformers' ``(output, attention_probs)``.
Two intended differences: in transformers 5 the text model's cross-attention ignores
``encoder_attention_mask`` (it only matters for VQA with padded questions); patched models
apply it, as Salesforce BLIP does. And a text whose attention mask is all zeros gets no
self-attention output (the attention op's rule for rows without keys), where transformers
attends uniformly to its padding.
"""

from __future__ import annotations

import inspect
import os
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

from torch import nn

_PATCHED_ATTRIBUTES = "_blipfast_patched_attributes"

# patch() and unpatch() run one at a time in a process: a patch checks a module's marker,
# then sets it, and undoes its own modules on failure; two patches interleaved could both
# patch one module (the second's record replacing the first's) or one's undo could take
# back modules the other skipped as patched.
_PATCHING_LOCK = threading.RLock()


def _new_patching_lock() -> None:
    """A fresh lock in a forked child: one held by another thread of the parent at the
    fork would never be released there."""
    global _PATCHING_LOCK
    _PATCHING_LOCK = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_patching_lock)
ModuleT = TypeVar("ModuleT", bound=nn.Module)  # functions that return the module they take


@dataclass(frozen=True)
class ModulePatch:
    """blipfast's forward for one transformers module class, the attributes it needs
    (``attributes(module, config, path)`` returns {name: value} to set on the instance;
    ``path``: the module's name in the model), and other blipfast methods that replace the
    instance's (``methods``: names looked up on ``forward``'s class)."""

    forward: Callable
    attributes: Optional[Callable[[nn.Module, object, str], dict]] = None
    methods: tuple[str, ...] = ()
    # False where blipfast's forward takes other arguments than transformers' (key-padding
    # masks, a causal flag, or none of the keyword arguments transformers passes on): it
    # works only when the module calling it is patched too, so patch() refuses it as the
    # model it is given.
    alone: bool = True


# What a bound method passes on from its function (besides those PatchedMethod copies).
_FUNCTION_ATTRIBUTES = frozenset({"__code__", "__defaults__", "__kwdefaults__",
                                  "__annotations__", "__globals__", "__closure__",
                                  "__wrapped__", "__type_params__"})


class PatchedMethod:
    """A blipfast function bound to one transformers module: what :func:`patch` sets as
    the instance's ``forward`` (and other methods). It calls and introspects as a bound
    method does (``__func__``, ``__self__``, the signature without ``self``), but pickles
    as the function and the module, so a patched model saved whole (``torch.save(model)``)
    or sent to another process loads patched. A bound method pickles as
    ``getattr(module, name)``, which at load time finds transformers' method on the class
    (or fails where the class has none): the loaded model would silently run unpatched.

    The module is held by a weak reference: the module holds this method (its instance
    ``forward``), and a strong reference back made every patched module a reference cycle,
    so a deleted patched model (its GPU memory too) waited for Python's garbage collector
    instead of going with its last reference. A method kept after its module is gone
    raises ReferenceError when called; so does the forward of a shallow copy
    (``copy.copy``) of a patched module once the original is gone: the copy shares the
    original's instance attributes, this method among them, bound to the original (as it
    always was). ``copy.deepcopy`` binds the copy's methods to the copy."""

    def __init__(self, function: Callable, module: nn.Module) -> None:
        self.__func__ = function
        self._module = weakref.ref(module)
        # as a bound method shows them (help(model.forward) gives blipfast's docstring)
        for name in ("__name__", "__qualname__", "__doc__", "__module__"):
            setattr(self, name, getattr(function, name))

    @property
    def __self__(self) -> nn.Module:
        module = self._module()
        if module is None:
            raise ReferenceError(f"blipfast method {self.__func__.__qualname__}: the module it "
                                 "was bound to has been deleted")
        return module

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_module"] = self.__self__  # pickled (and deep-copied) with the module
        return state

    def __setstate__(self, state: dict) -> None:
        state = dict(state)
        # "__self__": what blipfast before 2026-12-07 pickled (held strongly then)
        module = state.pop("_module") if "_module" in state else state.pop("__self__")
        self.__dict__.update(state)
        self._module = weakref.ref(module)

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __getattr__(self, name: str):
        # The function's own attributes, as a bound method passes them on (torch.export
        # reads forward.__code__); nothing else, so that unpickling (which looks for
        # __setstate__ before __func__ is set) finds no attribute instead of recursing.
        function = self.__dict__.get("__func__")
        if name in _FUNCTION_ATTRIBUTES and function is not None:
            return getattr(function, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(types.MethodType(self.__func__, self.__self__))

    def __repr__(self) -> str:
        return f"<blipfast method {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


def _blip_table() -> dict[str, ModulePatch]:
    from blipfast.models.blip import text, vision

    def vision_attention(module, config, path):
        # no attention_dropout: the forward reads module.dropout.p where the module has one
        # (layers.check_attention_dropout), so a value set after patching counts
        return {"recompute_projection_output": False}

    def vision_feed_forward(module, config, path):
        return {"activation": config.hidden_act, "recompute_projection_output": False}

    def vision_encoder(module, config, path):
        return {"recompute_layer_norm_outputs": True}

    def activation(module, config, path):
        return {"activation": config.hidden_act}

    def text_self_attention(module, config, path):
        return {"is_cross_attention": path.endswith("crossattention.self")}

    return {
        # vision tower
        "BlipVisionModel": ModulePatch(vision.BlipVisionModel.forward),
        "BlipEncoder": ModulePatch(vision.BlipEncoder.forward, vision_encoder),
        "BlipEncoderLayer": ModulePatch(vision.BlipEncoderLayer.forward, alone=False),
        "BlipAttention": ModulePatch(vision.BlipAttention.forward, vision_attention, alone=False),
        "BlipMLP": ModulePatch(vision.BlipMLP.forward, vision_feed_forward),
        # text transformer
        "BlipTextModel": ModulePatch(text.BlipTextModel.forward),
        # Generation keeps one row of image keys and values per image, not per beam.
        "BlipTextLMHeadModel": ModulePatch(text.BlipTextLMHeadModel.forward, methods=(
            "_expand_inputs_for_generation", "_reorder_cache")),
        "BlipTextEmbeddings": ModulePatch(text.BlipTextEmbeddings.forward),
        "BlipTextEncoder": ModulePatch(text.BlipTextEncoder.forward, alone=False),
        "BlipTextLayer": ModulePatch(text.BlipTextLayer.forward, alone=False),
        "BlipTextAttention": ModulePatch(text.BlipTextAttention.forward, alone=False),
        "BlipTextSelfAttention": ModulePatch(text.BlipTextSelfAttention.forward, text_self_attention,
                                             alone=False),
        "BlipTextSelfOutput": ModulePatch(text.BlipTextSelfOutput.forward),
        "BlipTextIntermediate": ModulePatch(text.BlipTextIntermediate.forward, activation),
        "BlipTextOutput": ModulePatch(text.BlipTextOutput.forward),
        "BlipTextPooler": ModulePatch(text.BlipTextPooler.forward),
        "BlipTextPredictionHeadTransform": ModulePatch(text.BlipTextPredictionHeadTransform.forward,
                                                       activation),
        "BlipTextLMPredictionHead": ModulePatch(text.BlipTextLMPredictionHead.forward),
    }


# Model families: the transformers module path prefix and its table (built lazily).
_FAMILIES: dict[str, Callable[[], dict[str, ModulePatch]]] = {
    "transformers.models.blip.": _blip_table,
}


def _in_family(model: nn.Module) -> bool:
    return any(type(model).__module__.startswith(prefix) for prefix in _FAMILIES)


def _model_to_patch(model: nn.Module) -> nn.Module:
    """``model``, or the transformers model a PEFT wrapper (``peft.get_peft_model``: LoRA
    and other adapters) adapts in place: patching that patches the wrapper's model."""
    get_base_model = getattr(model, "get_base_model", None)
    if not _in_family(model) and callable(get_base_model):
        base = get_base_model()
        if isinstance(base, nn.Module) and base is not model and _in_family(base):
            return base
    return model


def _family_table(model: nn.Module) -> dict[str, ModulePatch]:
    module_path = type(model).__module__
    for prefix, table in _FAMILIES.items():
        if module_path.startswith(prefix):
            return table()
    message = (f"blipfast.patch: model must be a transformers BLIP model, got "
               f"{type(model).__module__}.{type(model).__name__}")
    # A wrapper (torch.compile's OptimizedModule, DistributedDataParallel, FSDP's wrapper)
    # keeps the model in _orig_mod or module: point there instead of only refusing.
    inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
    if isinstance(inner, nn.Module) and _in_family(inner):
        message += ("; it wraps one: patch the model before wrapping it (blipfast.patch(model), "
                    "then torch.compile or DistributedDataParallel)")
    raise TypeError(message)


def _owning_config(model: nn.Module, path: str):
    """The config of the nearest enclosing ``PreTrainedModel`` (vision or text config)."""
    config = getattr(model, "config", None)
    current = model
    for part in path.split(".") if path else []:
        current = getattr(current, part)
        config = getattr(current, "config", config)
    return config


def patch(model: ModuleT) -> ModuleT:
    """Swap blipfast's fused kernels into a transformers BLIP model in place and return it.

    Works on any transformers BLIP model (``BlipForConditionalGeneration``,
    ``BlipForImageTextRetrieval``, ``BlipForQuestionAnswering``, ``BlipVisionModel``,
    ``BlipTextModel``, ...). The model keeps its class, its ``forward``/``generate`` API and
    its state dict; outputs match the unpatched model to float rounding (see the module
    docstring for the exceptions). Patching twice is a no-op. Undo with :func:`unpatch`.
    An exception or interrupt (Ctrl-C) during patching leaves every module as it was.

    Patch before other threads use the model: it goes module by module, so a forward
    running in another thread meanwhile (or during :func:`unpatch`) can meet patched and
    unpatched modules together and raise. A patched model serves any number of threads.
    Calls of :func:`patch` and :func:`unpatch` from several threads run one at a time.

    Raises:
        TypeError: ``model`` is not a transformers BLIP model (or a PEFT model of one), or
            is a module that cannot run patched inside an unpatched model (a text encoder,
            layer or attention module, a ViT layer or attention module: blipfast's forward
            takes other arguments than transformers passes them; a module whose config
            only the model holding it has): patch that model instead.
        RuntimeError: a module already has an attribute the patch would set, with another
            value (or as a class attribute), or overrides its forward on the instance (a
            hook wrapper other than accelerate's); the model is then left unpatched.

    A PEFT model (``peft.get_peft_model(model, ...)``, e.g. LoRA) can be patched too: its
    transformers model is patched in place, and the adapter layers are called as they are.
    Models under accelerate's hooks (``from_pretrained(..., device_map=...)``,
    ``accelerate.cpu_offload``) can be patched, before or after the hooks are added: the
    hooks keep running around blipfast's forwards, and layers whose weights a hook loads
    or moves are called rather than fused.
    """
    target = _model_to_patch(model)
    table = _family_table(target)
    _check_patchable_alone(target, table)
    with _PATCHING_LOCK:
        patched_now = []
        try:
            for path, module in target.named_modules():
                entry = table.get(type(module).__name__)
                if entry is None or _PATCHED_ATTRIBUTES in module.__dict__:
                    continue
                config = _owning_config(target, path)
                if config is None and entry.attributes is not None:
                    raise TypeError(_cannot_patch_alone(
                        target, f"its {type(module).__name__} at {path or 'the top'} reads "
                                "the config of the model holding it"))
                _patch_module(module, entry, config, path)
                patched_now.append(module)
        except BaseException:
            for module in patched_now:
                _unpatch_module(module)
            raise
    return model


def _cannot_patch_alone(model: nn.Module, reason: str) -> str:
    return (f"blipfast.patch: a {type(model).__name__} cannot be patched on its own: {reason}; "
            "patch the model that holds it (the task model, or its BlipTextModel / "
            "BlipTextLMHeadModel / BlipVisionModel)")


def _check_patchable_alone(model: nn.Module, table: dict[str, ModulePatch]) -> None:
    """Refuse a module whose blipfast forward takes other arguments than transformers'
    (``ModulePatch.alone`` False), before patching anything: its unpatched caller would
    pass it transformers' arguments."""
    entry = table.get(type(model).__name__)
    if entry is not None and not entry.alone:
        raise TypeError(_cannot_patch_alone(
            model, "blipfast's forward for it takes other arguments than transformers' (a "
                   "(batch, length) key-padding mask, a causal flag), which only a patched "
                   "caller passes"))


def _patch_module(module: nn.Module, entry: ModulePatch, config, path: str) -> None:
    """Patch one module: set the entry's attributes, forward and methods on the instance,
    recording what unpatching removes. An attribute the module has already is left alone
    if it is an instance attribute of the same value, else the patch is refused (it would
    change what transformers' code reads, and unpatching could not restore it)."""
    attributes = entry.attributes(module, config, path) if entry.attributes else {}
    where = f"blipfast.patch: {type(module).__name__} at {path or 'the top'}"
    clashing = [name for name, value in attributes.items() if hasattr(module, name)
                and not (name in module.__dict__ and _same_value(module.__dict__[name], value))]
    if clashing:
        raise RuntimeError(f"{where} already has {clashing} with other values than "
                           f"blipfast's {[attributes[name] for name in clashing]}, which it "
                           "sets: a setting of blipfast's made before patching (set it after "
                           "patch() instead), or a transformers version or model this patch "
                           "does not support")
    # accelerate's hooks (device_map dispatch, CPU offloading) set the instance's forward
    # to one that runs the hook around module._old_forward: patch the latter instead.
    forward_slot = "_old_forward" if _has_accelerate_hook(module) else "forward"
    own = entry.methods if forward_slot == "_old_forward" else ("forward", *entry.methods)
    overridden = [name for name in own if name in module.__dict__]
    if overridden:
        raise RuntimeError(f"{where} has its own {overridden} on the instance (a hook wrapper other "
                           "than accelerate's?), which patching would drop; patch the model before "
                           "wrapping its modules")
    added = [name for name in attributes if not hasattr(module, name)]
    blipfast_class = _defining_class(entry.forward)
    overrides = {forward_slot: PatchedMethod(entry.forward, module)}
    for name in entry.methods:
        overrides[name] = PatchedMethod(getattr(blipfast_class, name), module)
    replaced = {name: module.__dict__[name] for name in overrides if name in module.__dict__}
    # Recorded before anything is set, so that an interruption (Ctrl-C) half-way through
    # this module is undone like the modules patched before it.
    object.__setattr__(module, _PATCHED_ATTRIBUTES, (added, overrides, replaced))
    try:
        for name in added:
            setattr(module, name, attributes[name])
        for name, method in overrides.items():
            setattr(module, name, method)
    except BaseException:
        _unpatch_module(module)
        raise


def _has_accelerate_hook(module: nn.Module) -> bool:
    """Whether accelerate's ``add_hook_to_module`` wraps ``module``: its instance forward
    runs ``module._hf_hook`` around ``module._old_forward``, which it looks up per call."""
    return (getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__
            and "forward" in module.__dict__)


def _same_value(current, value) -> bool:
    return type(current) is type(value) and current == value


def _defining_class(function: Callable) -> type:
    """The blipfast class whose method ``function`` is (from its module and qualified name)."""
    import sys

    owner: object = sys.modules[function.__module__]
    for part in function.__qualname__.split(".")[:-1]:
        owner = getattr(owner, part)
    if not isinstance(owner, type):
        raise TypeError(f"{function.__qualname__} is not a method of a class")
    return owner


def unpatch(model: ModuleT) -> ModuleT:
    """Undo :func:`patch`: every instance override and added attribute is removed, so the
    model runs transformers' own forwards again (an override replaced since, e.g. by a
    hook wrapper, is left to its owner). Returns the model. Calls from several threads
    run one at a time, as do :func:`patch`'s."""
    with _PATCHING_LOCK:
        for module in model.modules():
            _unpatch_module(module)
    return model


def _unpatch_module(module: nn.Module) -> None:
    """Remove what :func:`_patch_module` set: the attributes it added (whatever their value
    now), and the forward and methods where they are still its own (a wrapper put on top
    since is left in place), restoring what they replaced. Under accelerate's hook the
    hook is kept and runs transformers' forward again, whether it was added before or
    after patching; a hook removed since left the patched forward as the instance's."""
    added, overrides, replaced = module.__dict__.pop(_PATCHED_ATTRIBUTES, None) or ((), {}, {})
    for name in added:
        module.__dict__.pop(name, None)
    for name, method in overrides.items():
        if module.__dict__.get(name) is method:
            if name in replaced:
                module.__dict__[name] = replaced[name]
            else:
                del module.__dict__[name]
        elif name == "_old_forward" and module.__dict__.get("forward") is method:
            del module.__dict__["forward"]  # the hook was removed, which restored our forward
        elif name == "forward" and module.__dict__.get("_old_forward") is method:
            # hooked after patching: the hook now wraps the class's forward
            module.__dict__["_old_forward"] = types.MethodType(type(module).forward, module)


_FAMILY_BASES: dict[type, Optional[type]] = {}


def _family_base(module_class: type) -> Optional[type]:
    """The first class of ``module_class``'s MRO from a patched family's transformers
    module (None if none), memoized per class: it is looked up on every layer call."""
    if module_class not in _FAMILY_BASES:
        _FAMILY_BASES[module_class] = next(
            (cls for cls in module_class.__mro__
             if any(cls.__module__.startswith(prefix) for prefix in _FAMILIES)), None)
    return _FAMILY_BASES[module_class]


def runs_transformers_forward(module: nn.Module) -> bool:
    """Whether ``module`` is a module of a patched family's transformers class (or of a
    subclass of one) that runs transformers' forward: not patched by :func:`patch`."""
    return _PATCHED_ATTRIBUTES not in module.__dict__ and _family_base(type(module)) is not None


def check_runs_blipfast_forward(module: nn.Module, caller: nn.Module) -> None:
    """Raise if ``module`` is a transformers module of a patched family that runs
    transformers' own forward, called from blipfast's forward of ``caller`` (a module put
    into a patched model after :func:`patch`, or of a subclass, which :func:`patch` leaves
    alone): blipfast's forwards call their submodules
    with blipfast's arguments (a (batch, length) bool key-padding mask, a causal flag),
    which transformers' forward would take through its ``**kwargs`` and misread."""
    family_class = _family_base(type(module))
    if family_class is None or _PATCHED_ATTRIBUTES in module.__dict__:
        return
    where = (f"blipfast: a {type(caller).__name__} patched by blipfast.patch holds an unpatched "
             f"{type(module).__name__}, which cannot take blipfast's arguments")
    if family_class is type(module):
        raise RuntimeError(f"{where}: a transformers module put in after patching? Call "
                           "blipfast.patch(model) again to patch it")
    raise RuntimeError(f"{where}: its class derives from transformers' {family_class.__name__} "
                       "(a subclass, or the class a wrapper such as FSDP's fully_shard gives "
                       "it), which blipfast.patch leaves alone; patch the model before "
                       "sharding or wrapping its modules, and keep transformers' classes")


def is_patched(model: nn.Module) -> bool:
    """True if any module of ``model`` runs a blipfast forward."""
    return any(_PATCHED_ATTRIBUTES in module.__dict__ for module in model.modules())
