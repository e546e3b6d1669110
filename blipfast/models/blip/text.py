"""BLIP's text transformer (the BERT-style "MED" model) on blipfast's fused ops.

One layer stack, three modes (see the BLIP paper):
- unimodal encoder: bidirectional self-attention only (``encoder_hidden_states=None``);
- image-grounded encoder: bidirectional self-attention + cross-attention to the image;
- image-grounded decoder: causal self-attention + cross-attention (``is_decoder=True``).

Module and parameter names are transformers' (``embeddings.word_embeddings``,
``encoder.layer.N.attention.self.query``, ``crossattention``, ``intermediate.dense``,
``cls.predictions``...), so transformers BLIP text state dicts load unchanged.

Post-norm layers: every ``LayerNorm(dense(x) + residual)`` is one fused kernel call, and the
first FFN projection's bias is fused into the exact-GELU kernel. Attention masks are
(batch, length) key-padding masks (1 = attend), applied inside the attention kernel; no
(B, 1, L, L) mask is built. ``encoder_batch_index`` lets several texts cross-attend one
image's keys and values without repeating them (image-text matching with hard negatives).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn
from transformers import BlipTextConfig, GenerationMixin
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPastAndCrossAttentions,
    BaseModelOutputWithPoolingAndCrossAttentions,
    CausalLMOutputWithCrossAttentions,
)

from blipfast.models.blip import layers
from blipfast.models.blip.pretrained import BlipPreTrainedModel
from blipfast.ops._checks import check_index_vector
from blipfast.ops.recompute import saved_tensor_hooks_active

#: The decoding cache's name in the installed transformers: ``"cache"`` from 5.24 on, where
#: it replaced ``"past_key_values"`` (still accepted there, deprecated, until 5.40) in
#: forward arguments, output fields and generation. blipfast's text models accept either
#: name as an argument and return the cache under this one, as transformers' models do.
CACHE_NAME = ("cache" if "cache" in CausalLMOutputWithCrossAttentions.__dataclass_fields__
              else "past_key_values")


def _one_cache(past_key_values: Optional[Cache], cache: Optional[Cache]) -> Optional[Cache]:
    """The decoding cache passed under either name."""
    if past_key_values is not None and cache is not None:
        raise ValueError("pass the decoding cache as cache or as past_key_values, not both")
    return cache if cache is not None else past_key_values


class _SharedKeysValues(threading.local):
    """Cross-attention keys and values projected while sharing is on, by (attention module,
    encoder states): a weak reference to the states, the state they were projected in
    (:func:`_projection_state`), and (key, value). An entry is dropped when its states are
    freed, which happens before the context ends only for keys projected without
    gradients: with gradients, the keys' autograd graph holds the states."""

    def __init__(self) -> None:
        self.active = False
        self.entries: dict[tuple[int, int], tuple[weakref.ref, tuple, torch.Tensor,
                                                  torch.Tensor]] = {}

    # Inference tensors (made under torch.inference_mode) have no version counter to tell
    # an in-place change by: their keys and values are not shared.
    def lookup(self, module: BlipTextSelfAttention, source: torch.Tensor):
        entry = (self.entries.get((id(module), id(source)))
                 if self.active and not source.is_inference() else None)
        if entry is None or entry[0]() is not source \
                or entry[1] != _projection_state(module, source):
            return None
        return entry[2], entry[3]

    def store(self, module: BlipTextSelfAttention, source: torch.Tensor,
              key: torch.Tensor, value: torch.Tensor) -> None:
        if not self.active or source.is_inference():
            return
        entries, entry_key = self.entries, (id(module), id(source))

        def drop(reference: weakref.ref) -> None:  # the states were freed
            if entries.get(entry_key, (None,))[0] is reference:
                entries.pop(entry_key, None)

        entries[entry_key] = (weakref.ref(source, drop), _projection_state(module, source),
                              key, value)


def _projection_state(module: BlipTextSelfAttention, source: torch.Tensor) -> tuple:
    """What projected keys and values depend on besides the module and the states' identity:
    the states' and the projection weights' versions (in-place changes), whether autograd
    records (keys projected under ``no_grad`` carry no gradient), and the autocast dtype."""
    try:
        device = source.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    except RuntimeError:  # a device type autocast does not know (meta)
        autocast = None
    weights = tuple(parameter._version for projection in (module.key, module.value)
                    for parameter in (projection.weight, projection.bias) if parameter is not None)
    return source._version, weights, torch.is_grad_enabled(), autocast


_SHARED_KEYS_VALUES = _SharedKeysValues()


@contextlib.contextmanager
def shared_cross_attention_keys_values() -> Iterator[None]:
    """Inside, a cross-attention layer called again on the same encoder states (the same
    tensor object, not modified in place) reuses the keys and values it projected the
    first time instead of projecting them again (in the same grad mode and autocast dtype,
    with the projection weights not modified in place since). In BLIP pre-training the image-grounded
    encoder (ITM) and the decoder (LM) share their cross-attention layers and attend the
    same image states: one projection per layer instead of two, and one copy of the keys
    and values kept for the backward (their gradients add up as they would). Only plain
    ``nn.Linear`` key and value projections are shared (a projection with dropout, e.g. a
    LoRA layer, is called each time), and nothing is shared under saved-tensor hooks
    (activation checkpointing) or while torch.compile traces; keys and values are held
    until the context ends."""
    if _SHARED_KEYS_VALUES.active:
        yield
        return
    _SHARED_KEYS_VALUES.active = True
    try:
        yield
    finally:
        _SHARED_KEYS_VALUES.active = False
        _SHARED_KEYS_VALUES.entries.clear()


class BlipTextEmbeddings(nn.Module):
    """Word + learned position embeddings, then LayerNorm (the add is fused into it)."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.position_ids = nn.Buffer(torch.arange(config.max_position_embeddings).expand((1, -1)),
                                      persistent=False)
        self.config = config

    def forward(self, input_ids: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                inputs_embeds: Optional[torch.Tensor] = None,
                cache_length: int = 0) -> torch.Tensor:
        """(B, L) ``input_ids`` or (B, L, hidden) ``inputs_embeds`` -> (B, L, hidden):
        LayerNorm(word + position embeddings), then dropout. Positions default to
        ``cache_length`` onward (cached tokens come first); raises when positions would
        exceed ``max_position_embeddings`` (given ``position_ids``, e.g. restarting ones
        of packed texts, may belong to a longer text: they are then read on the host and
        checked) or neither ``input_ids`` nor ``inputs_embeds`` is given."""
        if input_ids is not None:
            length = input_ids.shape[1]
        elif inputs_embeds is not None:
            length = inputs_embeds.shape[1]
        else:
            raise ValueError("BlipTextEmbeddings: pass input_ids or inputs_embeds")
        positions = self.position_embeddings.num_embeddings
        if cache_length + length > positions:
            # Beyond the table's length, default positions are out of range, and given ones
            # (generate passes them at every step) are read on the host to tell: packed
            # texts restart theirs.
            largest = None if position_ids is None else int(position_ids.max())
            if largest is None or largest >= positions:
                reach = "" if largest is None else f": position_ids reach {largest}"
                raise ValueError(f"text of {cache_length + length} tokens exceeds "
                                 f"max_position_embeddings={positions}{reach}")
        if position_ids is None:
            position_ids = self.position_ids[:, cache_length: cache_length + length]
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        positions = self.position_embeddings(position_ids).expand_as(inputs_embeds)
        embeddings = layers.layer_norm(self.LayerNorm, inputs_embeds, positions)
        return self.dropout(embeddings)


class BlipTextSelfAttention(nn.Module):
    """Multi-head self- or cross-attention (the projections; the output block is
    :class:`BlipTextSelfOutput`)."""

    def __init__(self, config: BlipTextConfig, is_cross_attention: bool, layer_idx: Optional[int] = None) -> None:
        super().__init__()
        self.config = config
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(f"hidden_size {config.hidden_size} is not divisible by "
                             f"num_attention_heads {config.num_attention_heads}")
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.is_cross_attention = is_cross_attention
        self.layer_idx = layer_idx
        source_size = config.encoder_hidden_size if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(source_size, self.all_head_size)
        self.value = nn.Linear(source_size, self.all_head_size)
        self.attention_dropout = config.attention_probs_dropout_prob

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_batch_index: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
    ) -> tuple[torch.Tensor, None]:
        """(B, L, hidden) -> ``(context, None)``, context (B, L, all_head_size): a pair, as
        transformers' ``(context, attention_probs)``, but the fused kernel never forms the
        probabilities. ``key_padding_mask`` is over the keys: the text (self-attention,
        including cached tokens) or the encoder states. ``cache``: the decoding cache, an
        ``EncoderDecoderCache`` or a self-attention ``Cache``."""
        layers.check_attention_dropout(self)
        query = _split_heads(self, self.query(hidden_states))
        source = encoder_hidden_states if self.is_cross_attention else hidden_states
        if source is None:
            raise ValueError("BlipTextSelfAttention: a cross-attention layer needs "
                             "encoder_hidden_states")
        layer_cache, reuse_cached = None, False
        if cache is not None:
            if isinstance(cache, EncoderDecoderCache):
                reuse_cached = self.is_cross_attention and cache.is_updated.get(self.layer_idx, False)
                layer_cache = cache.cross_attention_cache if self.is_cross_attention \
                    else cache.self_attention_cache
            else:
                layer_cache = cache
        if reuse_cached and layer_cache is not None:
            # Cached as (B, H, L, D), as transformers stores them; viewed back without copies.
            key = layer_cache.layers[self.layer_idx].keys.transpose(1, 2)
            value = layer_cache.layers[self.layer_idx].values.transpose(1, 2)
        elif (shared := _shared_keys_values(self, source, layer_cache)) is not None:
            key, value = shared
        else:
            key = _split_heads(self, self.key(source))
            value = _split_heads(self, self.value(source))
            if self.is_cross_attention and layer_cache is None and _sharing_keys_values():
                _SHARED_KEYS_VALUES.store(self, source, key, value)
            if layer_cache is not None:
                key, value = layer_cache.update(key.transpose(1, 2), value.transpose(1, 2),
                                                self.layer_idx)
                key, value = key.transpose(1, 2), value.transpose(1, 2)
                if self.is_cross_attention and isinstance(cache, EncoderDecoderCache):
                    cache.is_updated[self.layer_idx] = True
        kv_index = encoder_batch_index if self.is_cross_attention else None
        context = layers.attention(query, key, value, causal=causal,
                                   key_padding_mask=key_padding_mask, kv_index=kv_index)
        return context.reshape(*context.shape[:2], self.all_head_size), None


def _shared_keys_values(attention: BlipTextSelfAttention, source: torch.Tensor, cache):
    """(key, value) this cross-attention already projected from ``source`` inside
    :func:`shared_cross_attention_keys_values`, or None."""
    if (not attention.is_cross_attention or cache is not None
            or not layers.runs_as_plain(attention.key, nn.Linear)
            or not layers.runs_as_plain(attention.value, nn.Linear)
            or not _sharing_keys_values()):
        return None
    return _SHARED_KEYS_VALUES.lookup(attention, source)


def _sharing_keys_values() -> bool:
    """Whether cross-attention keys and values are shared now: inside
    :func:`shared_cross_attention_keys_values`, but not while torch.compile traces (the
    store is Python state keyed by tensor identity, which a graph cannot hold; a compiled
    graph can reuse a repeated product itself) and not under saved-tensor hooks (under
    activation checkpointing a layer must save the same tensors when the backward
    recomputes it, outside the sharing, as in the forward)."""
    if torch.compiler.is_compiling() or not _SHARED_KEYS_VALUES.active:
        return False
    return not saved_tensor_hooks_active()


def _split_heads(attention: BlipTextSelfAttention, projected: torch.Tensor) -> torch.Tensor:
    """(..., all_head_size) -> (..., heads, head_size), a view."""
    return projected.view(*projected.shape[:-1], attention.num_attention_heads,
                          attention.attention_head_size)


class _DenseResidualLayerNorm(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual), the add fused into the LayerNorm: the end of
    every attention block and of the FFN."""

    def __init__(self, config: BlipTextConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.dense(hidden_states))
        return layers.layer_norm(self.LayerNorm, hidden_states, input_tensor)


class BlipTextSelfOutput(_DenseResidualLayerNorm):
    """The attention block's output projection + residual LayerNorm."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__(config, config.hidden_size)


class BlipTextAttention(nn.Module):
    """Attention block: :class:`BlipTextSelfAttention` then :class:`BlipTextSelfOutput`."""

    def __init__(self, config: BlipTextConfig, is_cross_attention: bool = False,
                 layer_idx: Optional[int] = None) -> None:
        super().__init__()
        self.self = BlipTextSelfAttention(config, is_cross_attention, layer_idx=layer_idx)
        self.output = BlipTextSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor,
                **attention_arguments) -> tuple[torch.Tensor, None]:
        """(B, L, hidden) -> ``(output, None)`` (as transformers' ``(output,
        attention_probs)``): :class:`BlipTextSelfAttention` (arguments as its ``forward``),
        then the output projection and LayerNorm with ``hidden_states`` as the residual."""
        layers.check_runs_blipfast_forward(self.self, self)
        context = self.self(hidden_states, **attention_arguments)[0]
        return self.output(context, hidden_states), None


class BlipTextIntermediate(nn.Module):
    """activation(dense(x)); exact GELU fuses the bias into the activation kernel."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = layers.weightless_activation(config.hidden_act, "text_config")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, intermediate_size)."""
        return layers.linear_activation(self.dense, hidden_states,
                                        _intermediate_activation(self))


def _intermediate_activation(intermediate: nn.Module):
    """The activation an FFN's intermediate block applies (:func:`layers.activation_in_use`:
    a patched transformers block's ``intermediate_act_fn`` where it is hooked or replaced)."""
    name: str = getattr(intermediate, "activation")
    return layers.activation_in_use(name, getattr(intermediate, "intermediate_act_fn", None))


class BlipTextOutput(_DenseResidualLayerNorm):
    """The FFN's second projection + residual LayerNorm."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__(config, config.intermediate_size)


class BlipTextLayer(nn.Module):
    """Self-attention, then cross-attention when encoder states are given (the layer has it
    when ``config.is_decoder``, as in transformers), then the FFN."""

    gradient_checkpointing = False
    """Whether the encoder runs this layer under activation checkpointing (set by
    ``activation_checkpointing_enable``; see :func:`layers.checkpoint_function`)."""

    def __init__(self, config: BlipTextConfig, layer_num: int) -> None:
        super().__init__()
        self.config = config
        self.layer_num = layer_num
        self.attention = BlipTextAttention(config, layer_idx=layer_num)
        if config.is_decoder:
            self.crossattention = BlipTextAttention(config, is_cross_attention=True, layer_idx=layer_num)
        self.intermediate = BlipTextIntermediate(config)
        self.output = BlipTextOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        causal: bool = False,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        encoder_batch_index: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
    ) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, hidden). ``attention_mask`` (bool key padding over cached
        plus new tokens) and ``causal`` go to the self-attention; with ``encoder_hidden_states``,
        cross-attention follows (``encoder_attention_mask``, ``encoder_batch_index``). Both
        cache their keys and values in ``cache`` when given."""
        layers.check_runs_blipfast_forward(self.attention, self)
        hidden_states = self.attention(hidden_states, key_padding_mask=attention_mask, causal=causal,
                                       cache=cache)[0]
        if encoder_hidden_states is not None:
            if not hasattr(self, "crossattention"):
                raise ValueError("encoder_hidden_states given but the text config has "
                                 "is_decoder=False, so its layers have no cross-attention")
            layers.check_runs_blipfast_forward(self.crossattention, self)
            hidden_states = self.crossattention(
                hidden_states, key_padding_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_batch_index=encoder_batch_index, cache=cache)[0]
        return _feed_forward(self, hidden_states)


def _feed_forward(layer: BlipTextLayer, hidden_states: torch.Tensor) -> torch.Tensor:
    """``layer.output(layer.intermediate(hidden_states), hidden_states)``: the FFN and its
    residual LayerNorm. With exact GELU between plain linear layers the two projections
    run as :func:`blipfast.ops.bias_gelu_linear` (the GELU output is not kept for the
    backward); a wrapped intermediate or output module (forward hooks, a ``forward`` set
    on the instance: :func:`layers.is_wrapped`) is called as it is.
    (A function, not a method: patched transformers layers run this file's forward.)"""
    intermediate, output = layer.intermediate, layer.output
    if layers.is_wrapped(intermediate) or layers.is_wrapped(output):
        return output(intermediate(hidden_states), hidden_states)
    projected = layers.feed_forward(intermediate.dense, output.dense, hidden_states,
                                    _intermediate_activation(intermediate))
    return layers.layer_norm(output.LayerNorm, output.dropout(projected), hidden_states)


class BlipTextEncoder(nn.Module):
    """The stack of :class:`BlipTextLayer` (optionally activation-checkpointed)."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BlipTextLayer(config, i) for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states: torch.Tensor,
                output_hidden_states: layers.HiddenStateSelection = False,
                **layer_arguments) -> BaseModelOutputWithPastAndCrossAttentions:
        """Runs every layer on (B, L, hidden) ``hidden_states`` (``layer_arguments`` as
        :meth:`BlipTextLayer.forward`). Returns ``last_hidden_state`` and, if
        ``output_hidden_states``, ``hidden_states``: every layer's input and the output
        (with indices given, only those, the others None)."""
        selected = layers.selected_hidden_states(output_hidden_states, len(self.layer) + 1)
        all_hidden: Optional[list[Optional[torch.Tensor]]] = [] if selected is not None else None
        keep = selected or frozenset()
        for index, layer in enumerate(self.layer):
            if all_hidden is not None:
                all_hidden.append(hidden_states if index in keep else None)
            layers.check_runs_blipfast_forward(layer, self)
            hidden_states = layers.call_layer(self, layer, hidden_states, **layer_arguments)
        if all_hidden is not None:
            all_hidden.append(hidden_states if len(self.layer) in keep else None)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None)


class BlipTextPooler(nn.Module):
    """tanh(dense(first token))."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, hidden), from the first token."""
        return self.activation(self.dense(hidden_states[:, 0]))


class BlipTextPredictionHeadTransform(nn.Module):
    """LayerNorm(activation(dense(x))) before the vocabulary projection."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = layers.weightless_activation(config.hidden_act, "text_config")
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, hidden); exact GELU fuses the dense bias into the
        activation kernel."""
        activation = layers.activation_in_use(self.activation,
                                              getattr(self, "transform_act_fn", None))
        hidden_states = layers.linear_activation(self.dense, hidden_states, activation)
        return layers.layer_norm(self.LayerNorm, hidden_states)


class BlipTextLMPredictionHead(nn.Module):
    """Vocabulary logits; the projection is tied to the word embeddings."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.transform = BlipTextPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=True)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, vocab_size) logits: the transform, then the ``decoder``
        projection (its bias tied to ``bias``)."""
        return self.decoder(self.transform(hidden_states))


class BlipTextOnlyMLMHead(nn.Module):
    """Holds :class:`BlipTextLMPredictionHead` under transformers' name ``predictions``."""

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__()
        self.predictions = BlipTextLMPredictionHead(config)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, vocab_size) logits from ``predictions``."""
        return self.predictions(sequence_output)


class BlipTextPreTrainedModel(BlipPreTrainedModel):
    """Base of the text models (config: ``BlipTextConfig``)."""

    config_class = BlipTextConfig
    base_model_prefix = "bert"
    _no_split_modules = ["BlipTextEmbeddings", "BlipTextLayer"]  # as transformers'
    input_modalities = "text"


class BlipTextModel(BlipTextPreTrainedModel):
    """The MED text transformer in any of its three modes; transformers' ``BlipTextModel``
    signature, plus ``encoder_batch_index``.

    ``config``: a :class:`BlipTextConfig`. ``add_pooling_layer`` (default True): build the
    pooler (``tanh(dense(first token))``, the output's ``pooler_output``); False leaves it
    out (``pooler = None``, ``pooler_output`` None), as the LM head model and the
    retrieval and question-answering models' text encoders do."""

    def __init__(self, config: BlipTextConfig, add_pooling_layer: bool = True) -> None:
        super().__init__(config)
        self.config = config
        self.embeddings = BlipTextEmbeddings(config)
        self.encoder = BlipTextEncoder(config)
        self.pooler = BlipTextPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embedding table, ``embeddings.word_embeddings``."""
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the word embedding table, ``embeddings.word_embeddings``, with ``value``."""
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        encoder_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        use_cache: Optional[bool] = None,
        is_decoder: Optional[bool] = False,
        output_hidden_states: layers.HiddenStateSelection = None,
        return_dict: Optional[bool] = None,
        encoder_batch_index: Optional[torch.Tensor] = None,
        cache_position: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions:
        """Run the text transformer.

        Args:
            input_ids / inputs_embeds: (B, L) token ids or (B, L, hidden) embeddings (one of
                them), or ``encoder_embeds`` to skip the embedding layer.
            attention_mask: (B, L_total) 1 = real token, over cached plus new tokens.
            encoder_hidden_states: (B_image, L_image, encoder_hidden) image states for the
                cross-attention (image-grounded modes). ``encoder_attention_mask``: their
                (B_image, L_image) padding mask ((1, L_image): the same for all).
            encoder_batch_index: (B,) integer, optional: text row b cross-attends
                ``encoder_hidden_states[encoder_batch_index[b]]`` (B_image may then be
                smaller than B; nothing is repeated in memory). blipfast extension. Not
                given, one set of encoder states (B_image = 1) is attended by every text,
                as transformers broadcasts it, without repeating it; and unless a cache
                is passed (generate), one text (B = 1) attends every set of encoder states,
                likewise.
            is_decoder: causal self-attention (captioning / LM) instead of bidirectional
                (``is_causal=False`` makes a decoder's bidirectional, as in transformers).
            cache / use_cache: a transformers ``Cache`` for decoding (``past_key_values``,
                the name before transformers 5.24, is accepted too); returned in the
                output field of the installed transformers' name (:data:`CACHE_NAME`).
                ``use_cache`` not given: the config's (True by default; False while
                training with activation checkpointing), as in transformers.
            output_hidden_states / return_dict: not given, the config's.
            Other keyword arguments transformers takes (``num_items_in_batch``, ...:
                :data:`layers.TRANSFORMERS_KEYWORD_ARGUMENTS`; ``token_type_ids`` and
                ``head_mask=None``: :data:`layers.IGNORED_BERT_ARGUMENTS`) are ignored, as
                there; ``output_attentions=True`` (as an argument or, not given, in the
                config), a ``head_mask`` and unknown ones raise.
        """
        layers.reject_unsupported_arguments(kwargs, self.config)
        cache = _one_cache(past_key_values, cache)
        caller_cache = cache is not None  # generate passes its own, from the first step
        if use_cache is None:
            use_cache = self.config.use_cache and not (self.encoder.gradient_checkpointing
                                                       and self.training)
        if not is_decoder:
            use_cache = False
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass input_ids or inputs_embeds, not both")
        if use_cache:
            if isinstance(cache, DynamicCache):
                cache = EncoderDecoderCache(cache, DynamicCache(config=self.config))
            elif cache is None:
                cache = EncoderDecoderCache(DynamicCache(config=self.config),
                                            DynamicCache(config=self.config))
        cache_length = cache.get_seq_length() if cache is not None else 0
        if encoder_embeds is None:
            hidden_states = self.embeddings(input_ids=input_ids, position_ids=position_ids,
                                            inputs_embeds=inputs_embeds,
                                            cache_length=cache_length)
        else:
            hidden_states = encoder_embeds
        if encoder_batch_index is None and encoder_hidden_states is not None \
                and not caller_cache and hidden_states.shape[0] == 1 < encoder_hidden_states.shape[0]:
            # One text for several images (re-ranking candidate images for a query): as
            # transformers broadcasts it, every image gets the text (views, not copies; a
            # cache started here holds a row per image). Not in generate, whose next steps
            # would pass one row again: the batches that do not go together raise below.
            hidden_states = hidden_states.expand(encoder_hidden_states.shape[0], -1, -1)
            if attention_mask is not None:
                attention_mask = attention_mask.expand(encoder_hidden_states.shape[0], -1)
        if encoder_attention_mask is not None and encoder_hidden_states is not None \
                and encoder_attention_mask.shape[0] == 1 < encoder_hidden_states.shape[0]:
            # One mask for every set of encoder states, as transformers broadcasts it (VQA's
            # answer decoder gets one question's mask over that question's states per image).
            encoder_attention_mask = encoder_attention_mask.expand(
                encoder_hidden_states.shape[0], -1)
        batch, length = hidden_states.shape[:2]
        if encoder_batch_index is None:
            encoder_batch_index = broadcast_index(encoder_hidden_states, batch,
                                                  "encoder_hidden_states", "the text",
                                                  "encoder_batch_index")
        else:
            check_index_vector("BlipTextModel", "encoder_batch_index", encoder_batch_index,
                               batch, hidden_states.device, "the text is",
                               shape_name="(B,) = ")
        mask = layers.key_padding_mask(
            attention_mask, "attention_mask", (batch, cache_length + length),
            "(batch, cached + new tokens)" if cache_length else "(batch, length)")
        encoder_mask = layers.key_padding_mask(
            encoder_attention_mask, "encoder_attention_mask",
            None if encoder_hidden_states is None else encoder_hidden_states.shape[:2],
            "encoder_hidden_states.shape[:2]")
        layers.check_runs_blipfast_forward(self.encoder, self)
        encoded = self.encoder(
            hidden_states,
            output_hidden_states=output_hidden_states,
            attention_mask=mask,
            causal=bool(is_decoder) and kwargs.get("is_causal") is not False,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_mask,
            encoder_batch_index=encoder_batch_index,
            cache=cache,
        )
        hidden_states, all_hidden = encoded.last_hidden_state, encoded.hidden_states
        pooled = self.pooler(hidden_states) if self.pooler is not None else None
        output = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=hidden_states, pooler_output=pooled,
            hidden_states=all_hidden, **{CACHE_NAME: cache if use_cache else None})
        return layers.model_output(output, return_dict, self.config)


def broadcast_index(encoder_states: Optional[torch.Tensor], text_batch: int, encoder_name: str,
                    text_name: str, index_name: Optional[str] = None) -> Optional[torch.Tensor]:
    """The ``encoder_batch_index`` for a text batch of ``text_batch`` rows that attends
    ``encoder_states`` (or the images they come from) without being given one: None where
    the batches are equal (row b attends row b); zeros where there is one image for
    several texts (one image, several captions or questions: what
    ``BlipProcessor(images=image, text=[...])`` returns), which transformers broadcasts:
    every text then reads the one image's keys and values, which are not repeated. Other
    batch pairs raise ``ValueError`` naming the caller's arguments (``encoder_name``,
    ``text_name``, and ``index_name``, its index argument, if it has one), as
    transformers fails on them too."""
    if encoder_states is None or encoder_states.shape[0] == text_batch:
        return None
    if encoder_states.shape[0] == 1:
        return torch.zeros(text_batch, dtype=torch.long, device=encoder_states.device)
    alternative = f", or {index_name} to pick each text's image" if index_name else ""
    raise ValueError(f"{encoder_name} has batch {encoder_states.shape[0]} but {text_name} has "
                     f"batch {text_batch}: pass one image per text, or one image for all "
                     f"texts{alternative}")


class BlipTextLMHeadModel(BlipTextPreTrainedModel, GenerationMixin):
    """The decoder with its language-model head; transformers' ``BlipTextLMHeadModel``
    signature and outputs (loss with the config's label smoothing)."""

    _tied_weights_keys = {
        "cls.predictions.decoder.bias": "cls.predictions.bias",
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    }

    def __init__(self, config: BlipTextConfig) -> None:
        super().__init__(config)
        self.bert = BlipTextModel(config, add_pooling_layer=False)
        self.cls = BlipTextOnlyMLMHead(config)
        self.label_smoothing = config.label_smoothing
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The word embedding table, ``bert.embeddings.word_embeddings``."""
        return self.bert.get_input_embeddings()

    def set_input_embeddings(self, new_embeddings: nn.Embedding) -> None:
        """Replace the word embedding table, ``bert.embeddings.word_embeddings``, with
        ``new_embeddings``."""
        self.bert.set_input_embeddings(new_embeddings)

    def get_output_embeddings(self) -> nn.Linear:
        """The vocabulary projection, ``cls.predictions.decoder`` (tied to the word embeddings)."""
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        """Replace ``cls.predictions.decoder`` with ``new_embeddings`` and point
        ``cls.predictions.bias`` at its bias."""
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        past_key_values: Optional[Cache] = None,
        use_cache: Optional[bool] = None,
        return_logits: Optional[bool] = False,
        is_decoder: Optional[bool] = True,
        reduction: Optional[str] = "mean",
        logits_to_keep: Union[int, torch.Tensor] = 0,
        output_hidden_states: layers.HiddenStateSelection = None,
        return_dict: Optional[bool] = None,
        encoder_batch_index: Optional[torch.Tensor] = None,
        cache_position: Optional[torch.Tensor] = None,
        cache: Optional[Cache] = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithCrossAttentions:
        """Logits over the vocabulary and, with ``labels`` (B, L; -100 = ignored), the
        next-token loss (labels shifted by one here, unless ``shift_labels``, targets already
        aligned with the logits, are given instead, as transformers takes them;
        ``reduction="none"`` gives the summed loss per sequence).

        ``logits_to_keep``: 0 (default) computes logits at every position; an int n > 0
        only at the last n positions (what ``generate`` asks for: 1); a tensor, at the
        sequence positions it indexes. ``return_logits=True`` returns only a tensor, the
        logits without the last position's, ``logits[:, :-1]`` (contiguous; the positions
        that predict a next token), instead of the output object, and computes no loss.
        ``is_decoder`` defaults to True here (causal self-attention). Other arguments as
        :meth:`BlipTextModel.forward`."""
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is not None:
            use_cache = False
        outputs = self.bert(
            input_ids, attention_mask=attention_mask, position_ids=position_ids,
            inputs_embeds=inputs_embeds, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, cache=_one_cache(past_key_values, cache),
            use_cache=use_cache, is_decoder=is_decoder, output_hidden_states=output_hidden_states,
            encoder_batch_index=encoder_batch_index, return_dict=True, **kwargs)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:]
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        prediction_scores = self.cls(hidden_states)
        if return_logits:
            return prediction_scores[:, :-1, :].contiguous()
        loss = None
        if labels is not None:
            if shift_labels is None:
                shifted, targets = prediction_scores[:, :-1, :], labels[:, 1:]
            else:
                shifted, targets = prediction_scores, shift_labels
            targets = targets.to(shifted.device)
            # Fused: reads the shifted bf16/fp16 logits in place, keeps no float32 copy.
            loss = layers.cross_entropy(shifted, targets, reduction=reduction,
                                        label_smoothing=self.label_smoothing)
            if reduction == "none":
                loss = loss.sum(1)
        output = CausalLMOutputWithCrossAttentions(
            loss=loss, logits=prediction_scores, hidden_states=outputs.hidden_states,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)})
        return layers.model_output(output, return_dict, self.config)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor,
                                      past_key_values: Optional[Cache] = None,
                                      attention_mask: Optional[torch.Tensor] = None,
                                      cache: Optional[Cache] = None,
                                      **model_kwargs: Any) -> dict[str, Any]:
        """One decoding step's inputs as transformers' ``GenerationMixin`` builds them
        (``model_kwargs`` such as ``encoder_hidden_states`` passed through), plus
        ``is_decoder=True`` so the self-attention is causal.

        Raises:
            NotImplementedError: the cache holds fixed-length layers (``generate(...,
                cache_implementation="static")``), whose unused slots only a 4-D mask
                hides; the fused attention takes a (batch, length) key mask.
        """
        decoding_cache = _one_cache(past_key_values, cache)
        self_attention_cache = decoding_cache.self_attention_cache \
            if isinstance(decoding_cache, EncoderDecoderCache) else decoding_cache
        if self_attention_cache is not None and any(
                getattr(layer, "is_compileable", False) for layer in self_attention_cache.layers):
            raise NotImplementedError(
                "generate with a fixed-length cache (cache_implementation='static' or "
                "'sliding_window') is not supported by blipfast's BLIP text decoder; use the "
                "default dynamic cache")
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, attention_mask=attention_mask,
            **{CACHE_NAME: decoding_cache}, **model_kwargs)
        model_inputs["is_decoder"] = True
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: Optional[torch.Tensor] = None, **model_kwargs):
        """transformers' expansion of the inputs to one row per beam or returned sequence,
        except the encoder states: they keep one row per image, and ``encoder_batch_index``
        maps every expanded row to its image. So the cross-attention projects and caches
        each image's keys and values once, not once per beam, and beam reordering
        (:meth:`_reorder_cache`) never copies them."""
        encoder_states = model_kwargs.get("encoder_hidden_states")
        if expand_size == 1 or encoder_states is None:
            return _transformers_expand_inputs(self)(
                expand_size=expand_size, is_encoder_decoder=is_encoder_decoder,
                input_ids=input_ids, **model_kwargs)
        shared = {name: model_kwargs.pop(name, None) for name in
                  ("encoder_hidden_states", "encoder_attention_mask", "encoder_batch_index")}
        index = shared["encoder_batch_index"]
        if index is None and input_ids is not None:  # one image for several prompts
            index = broadcast_index(encoder_states, input_ids.shape[0], "encoder_hidden_states",
                                    "input_ids")
        if index is None:
            index = torch.arange(encoder_states.shape[0], device=encoder_states.device)
        input_ids, model_kwargs = _transformers_expand_inputs(self)(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids,
            **model_kwargs)
        shared["encoder_batch_index"] = index.repeat_interleave(expand_size)
        model_kwargs.update(shared)
        return input_ids, model_kwargs

    def _reorder_cache(self, cache: Cache, beam_idx: torch.Tensor) -> Cache:
        """Beam search's reordering: the self-attention cache follows ``beam_idx``; the
        cross-attention cache holds one row per image (see
        :meth:`_expand_inputs_for_generation`), and a beam never leaves its image, so it
        stays as it is."""
        if isinstance(cache, EncoderDecoderCache):
            cache.self_attention_cache.reorder_cache(beam_idx)
        else:
            cache.reorder_cache(beam_idx)
        return cache


def _transformers_expand_inputs(model: nn.Module):
    """``GenerationMixin._expand_inputs_for_generation`` bound to ``model``, without
    ``super()``, since :func:`blipfast.patch` binds the blipfast method to instances of
    transformers' own class. It is a staticmethod in transformers 5.17, a method later."""
    method = inspect.getattr_static(GenerationMixin, "_expand_inputs_for_generation")
    return method.__get__(model, type(model))
