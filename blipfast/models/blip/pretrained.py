"""The base class of blipfast's BLIP models: transformers' ``PreTrainedModel`` machinery
(``from_pretrained`` / ``save_pretrained`` of transformers BLIP checkpoints, weight
initialization, generation config) plus conversion to and from live transformers models."""

from __future__ import annotations

import copy
import os
from typing import Any, Callable, Mapping, TypeVar, Union

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import BlipConfig, PreTrainedModel

from blipfast.patching import ModuleT

ModelT = TypeVar("ModelT", bound="BlipPreTrainedModel")


class BlipPreTrainedModel(PreTrainedModel):
    """Shared by every blipfast BLIP model.

    Parameter names equal transformers' for the class of the same name, so:
    ``from_pretrained(directory)`` loads a transformers BLIP checkpoint (config.json +
    safetensors) and ``save_pretrained`` writes one transformers loads;
    :meth:`from_hf` / :meth:`to_hf` convert live models.
    """

    config_class = BlipConfig
    base_model_prefix = "blip"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BlipEncoderLayer", "BlipTextEmbeddings"]
    input_modalities: Any = ("image", "text")  # as transformers' (pipelines read it)
    # The decoding cache stays where it is when accelerate spreads a model over devices
    # (named ``cache`` from transformers 5.24 on, ``past_key_values`` before).
    _skip_keys_device_placement = ["cache", "past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' BLIP initialization: normal linear/embedding weights, unit
        LayerNorms, truncated-normal vision class token and positions."""
        super()._init_weights(module)
        from blipfast.models.blip.text import BlipTextEmbeddings
        from blipfast.models.blip.vision import BlipVisionEmbeddings

        if isinstance(module, BlipVisionEmbeddings):
            config = self.config
            vision_config = config.vision_config if hasattr(config, "vision_config") else config
            std = vision_config.initializer_range
            nn.init.trunc_normal_(module.position_embedding, mean=0.0, std=std)
            nn.init.trunc_normal_(module.class_embedding, mean=0.0, std=std)
        elif isinstance(module, BlipTextEmbeddings):
            module.position_ids.copy_(torch.arange(module.position_ids.shape[-1]).expand((1, -1)))

    def _set_gradient_checkpointing(self, enable: bool = True,
                                    gradient_checkpointing_func: Callable = checkpoint,
                                    every_n_layers: int = 1) -> None:
        """What transformers' ``activation_checkpointing_enable`` /
        ``gradient_checkpointing_enable`` (and ``..._disable``) call: sets
        ``gradient_checkpointing`` and the checkpoint function on every encoder and layer
        that has the flag. As in transformers, only every ``every_n_layers``-th layer is
        checkpointed, counting the ViT and text layers in module order; transformers
        counts only its own layer classes, so it would checkpoint every layer of ours."""
        from blipfast.models.blip.text import BlipTextLayer
        from blipfast.models.blip.vision import BlipEncoderLayer

        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) \
                or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive int, got {every_n_layers!r}")
        layer_index = 0
        found = False
        for module in self.modules():
            if not hasattr(module, "gradient_checkpointing"):
                continue
            found = True
            module._gradient_checkpointing_func = gradient_checkpointing_func
            if enable and isinstance(module, (BlipEncoderLayer, BlipTextLayer)):
                module.gradient_checkpointing = layer_index % every_n_layers == 0
                layer_index += 1
            else:
                module.gradient_checkpointing = enable
        if not found:
            raise ValueError(f"{type(self).__name__} has no layers to checkpoint")

    @classmethod
    def from_hf(cls: type[ModelT], model: nn.Module) -> ModelT:
        """The blipfast model with the weights and config of a live transformers model of
        the same class name (e.g. ``transformers.BlipForConditionalGeneration`` ->
        ``blipfast.models.BlipForConditionalGeneration``), on the same device and dtype."""
        if type(model).__name__ != cls.__name__:
            raise TypeError(f"{cls.__name__}.from_hf: model must be transformers' {cls.__name__}, "
                            f"got {type(model).__name__}")
        return _rebuilt_as(cls, model, f"{cls.__name__}.from_hf")

    salesforce_task: str | None = None
    """The Salesforce BLIP model this class corresponds to (see
    :mod:`blipfast.models.blip.salesforce_checkpoint`); None where there is none."""

    @classmethod
    def from_salesforce(cls: type[ModelT],
                        checkpoint: Union[str, os.PathLike, Mapping[str, object]],
                        *, drop_unused_modules: bool = False, **config_overrides: Any) -> ModelT:
        """Load an original Salesforce BLIP checkpoint (a ``.pth`` path, or its loaded dict
        or state dict), e.g. ``model_base_caption_capfilt_large.pth`` (a fine-tuned
        captioner) for captioning, or a pre-training checkpoint such as
        ``model_base_capfilt_large.pth`` with ``drop_unused_modules=True``.

        The config is inferred from the tensor shapes
        (:func:`~blipfast.models.blip.salesforce_checkpoint.config_from_salesforce`;
        ``config_overrides`` such as ``vision_num_attention_heads`` go there). Momentum
        encoders and queues are dropped; ``drop_unused_modules=True`` also drops the modules
        of other tasks (for pre-training checkpoints that hold every head). Unknown or
        missing keys raise ``ValueError``, as does a file torch cannot read (truncated,
        empty), naming it.
        """
        from blipfast.models.blip import salesforce_checkpoint

        if cls.salesforce_task is None:
            raise TypeError(f"{cls.__name__} has no Salesforce BLIP counterpart")
        loaded = salesforce_checkpoint._load_checkpoint(checkpoint)
        config = salesforce_checkpoint.config_from_salesforce(
            loaded, cls.salesforce_task, drop_unused_modules=drop_unused_modules,
            **config_overrides)
        state_dict = salesforce_checkpoint.salesforce_to_transformers(
            loaded, cls.salesforce_task, drop_unused_modules=drop_unused_modules)
        model = built_for_loading(cls, config)
        _load_exactly(model, state_dict, f"{cls.__name__}.from_salesforce",
                      salesforce_checkpoint._salesforce_names(loaded, cls.salesforce_task))
        return model.eval()

    def to_salesforce(self, *, momentum_encoders: bool = False) -> dict[str, torch.Tensor]:
        """This model's weights as a Salesforce BLIP state dict (Salesforce's key names;
        save it with ``torch.save({"model": state_dict}, path)`` for the original code).

        ``momentum_encoders=True`` (retrieval models only) adds ``BLIP_Retrieval``'s
        momentum encoders (``visual_encoder_m``, ``vision_proj_m``, ``text_encoder_m``,
        ``text_proj_m``) as the online weights, the same tensors. Without them,
        ``BLIP_Retrieval``, which copies its random initial weights into its momentum
        encoders before loading, would fine-tune with random momentum encoders, so with
        distillation targets from them. Its queues and temperature start fresh either way,
        as they do from a ``BLIP_ITM`` checkpoint."""
        from blipfast.models.blip import salesforce_checkpoint

        if self.salesforce_task is None:
            raise TypeError(f"{type(self).__name__} has no Salesforce BLIP counterpart")
        if momentum_encoders and self.salesforce_task != "retrieval":
            raise ValueError(f"{type(self).__name__}.to_salesforce: momentum_encoders=True is "
                             "for retrieval models (BLIP_Retrieval); this is "
                             f"{self.salesforce_task!r}")
        state = salesforce_checkpoint.transformers_to_salesforce(self.state_dict(),
                                                                 self.salesforce_task)
        if momentum_encoders:
            for key in list(state):
                module, _, rest = key.partition(".")
                if module in ("visual_encoder", "vision_proj", "text_encoder", "text_proj"):
                    state[f"{module}_m.{rest}"] = state[key]
        return state

    def to_hf(self) -> PreTrainedModel:
        """The transformers model of the same class name with this model's weights and
        config (on the same device and dtype)."""
        import transformers

        return _rebuilt_as(getattr(transformers, type(self).__name__), self,
                           f"{type(self).__name__}.to_hf")


def built_for_loading(model_class: Callable[..., ModuleT], *arguments: Any,
                      **options: Any) -> ModuleT:
    """``model_class(*arguments, **options)``, a model whose random initial weights are
    about to be replaced by loaded ones, built without moving the global random
    generators (CPU, and the current CUDA device's once CUDA is initialized): a caller's
    seeded draws after a conversion (dropout masks, sampling) stay what they would be
    without it, as after transformers' from_pretrained."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        return model_class(*arguments, **options)


def _rebuilt_as(model_class: type[ModuleT], source: nn.Module, what: str) -> ModuleT:
    """``model_class`` built from ``source``'s config, holding its weights and generation
    configs, on its device and dtype, in its training mode."""
    parameter = next(source.parameters())
    model = built_for_loading(model_class, source.config)
    model.to(device=parameter.device, dtype=parameter.dtype)
    _load_exactly(model, source.state_dict(), what)
    _copy_generation_configs(source, model)
    model.train(source.training)
    return model


def _copy_generation_configs(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` and each of its submodels a copy of the generation config of the
    module of the same name in ``source`` where that has one (the task model's, the text
    decoder's, which ``generate`` reads): a config built from the model config alone
    would drop what was set on them (``max_length``, ``num_beams``, ...)."""
    configs = {name: getattr(module, "generation_config", None)
               for name, module in source.named_modules() if isinstance(module, PreTrainedModel)}
    for name, module in target.named_modules():
        if isinstance(module, PreTrainedModel) and configs.get(name) is not None:
            module.generation_config = copy.deepcopy(configs[name])


def _check_shapes(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str,
                  checkpoint_names: Mapping[str, str] | None = None) -> None:
    """Raise a ValueError listing every entry of ``state_dict`` whose shape differs from
    the model's entry of the same name, before anything is loaded. ``checkpoint_names``
    maps a model key to the name the entry has in the checkpoint the user gave (the
    Salesforce layout), so that the message names what the user can find there."""
    expected = model.state_dict()
    wrong = []
    for key, value in state_dict.items():
        target = expected.get(key)
        if target is None or tuple(value.shape) == tuple(target.shape):
            continue
        name = (checkpoint_names or {}).get(key, key)
        label = key if name == key else f"{name} (loaded as {key})"
        wrong.append(f"{label} has shape {tuple(value.shape)}, the model "
                     f"{tuple(target.shape)}")
    if wrong:
        shown = "; ".join(wrong[:10]) + (f"; ... ({len(wrong) - 10} more)" if len(wrong) > 10
                                         else "")
        raise ValueError(f"{what}: {len(wrong)} tensor(s) of the checkpoint do not fit the "
                         f"model's config (layers of unequal sizes, or a config that does not "
                         f"match the checkpoint): {shown}")


def _load_exactly(model: nn.Module, state_dict: dict, what: str,
                  checkpoint_names: Mapping[str, str] | None = None) -> None:
    """load_state_dict that fails on any missing or unexpected key, and on a shape that
    differs from the model's with a ValueError naming the entry (see
    :func:`_check_shapes`)."""
    _check_shapes(model, state_dict, what, checkpoint_names)
    result = model.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("position_ids")]
    if missing or result.unexpected_keys:
        hint = ""
        if any(".lora_" in key or ".base_layer." in key for key in result.unexpected_keys):
            hint = ("; the model holds PEFT adapter layers: merge them first "
                    "(model.merge_and_unload()) or convert the base model")
        raise ValueError(f"{what}: state dicts differ; missing {missing}, "
                         f"unexpected {result.unexpected_keys}{hint}")
