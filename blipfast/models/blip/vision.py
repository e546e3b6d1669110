"""BLIP's vision transformer (ViT-B/16, ViT-L/16) on blipfast's fused ops.

Module and parameter names are transformers' (``embeddings``, ``encoder.layers.N.self_attn
.qkv``, ``layer_norm1``, ``mlp.fc1``, ``post_layernorm``, ...), so a transformers
``BlipVisionModel`` state dict loads unchanged.

Inside a layer (pre-norm):  h = x + proj(attn(LN1(x)));  out = h + fc2(gelu(fc1(LN2(h)))).
The residual adds are fused into the following LayerNorm: a layer hands its MLP output and
its residual stream to the next one unsummed, and the next layer's LN1 adds them.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipVisionConfig
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from blipfast import ops
from blipfast.models.blip import layers
from blipfast.models.blip.pretrained import BlipPreTrainedModel


class BlipVisionEmbeddings(nn.Module):
    """Patch embedding, class token and learned positions (interpolated bicubically when
    the image size differs from the configured one and ``interpolate_pos_encoding``)."""

    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(3, self.embed_dim, kernel_size=self.patch_size,
                                         stride=self.patch_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.num_positions = self.num_patches + 1
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_positions, self.embed_dim))

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings for an image of ``height`` x ``width`` pixels: the patch grid
        of the configured size resized bicubically to the new grid (class position kept)."""
        grid_height, grid_width = height // self.patch_size, width // self.patch_size
        num_positions = self.position_embedding.shape[1] - 1
        if grid_height * grid_width == num_positions and grid_height == grid_width:
            return self.position_embedding
        side = int(round(num_positions ** 0.5))
        class_position = self.position_embedding[:, :1]
        grid = self.position_embedding[:, 1:].reshape(1, side, side, self.embed_dim)
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(grid_height, grid_width),
                             mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, self.embed_dim)
        return torch.cat((class_position, grid), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, 1 + num_patches, embed_dim): class token then patch
        tokens, plus position embeddings (interpolated if ``interpolate_pos_encoding``; else
        more patches than configured positions raise ValueError)."""
        batch, _, height, width = pixel_values.shape
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        class_tokens = self.class_embedding.expand(batch, 1, -1).to(patches.dtype)
        embeddings = torch.cat([class_tokens, patches], dim=1)
        if interpolate_pos_encoding:
            positions = self.interpolate_pos_encoding(height, width)
        else:
            positions = self.position_embedding
            if embeddings.shape[1] > positions.shape[1]:
                raise ValueError(
                    f"pixel_values of {height}x{width} give {embeddings.shape[1] - 1} patches but "
                    f"the model has {positions.shape[1] - 1} positions; pass "
                    "interpolate_pos_encoding=True")
            grid = self.image_size // self.patch_size
            patch_grid = (height // self.patch_size, width // self.patch_size)
            if patch_grid != (grid, grid) and not torch.compiler.is_compiling():
                warnings.warn(
                    f"pixel_values of {height}x{width} give a {patch_grid[0]}x{patch_grid[1]} "
                    f"patch grid, but the position embeddings are for {grid}x{grid}: the first "
                    f"{embeddings.shape[1] - 1} positions are used as they are (as transformers "
                    "does), which places the patches wrongly; pass "
                    "interpolate_pos_encoding=True to resize them", stacklevel=3)
        return embeddings + positions[:, : embeddings.shape[1]].to(embeddings.dtype)


class BlipAttention(nn.Module):
    """Bidirectional multi-head self-attention with a fused QKV projection."""

    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"hidden_size {self.embed_dim} is not divisible by "
                             f"num_attention_heads {self.num_heads}")
        self.scale = self.head_dim ** -0.5
        self.attention_dropout = config.attention_dropout
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim)
        self.projection = nn.Linear(self.embed_dim, self.embed_dim)
        # Recompute the QKV projection in the backward (see recompute_projection_outputs).
        self.recompute_projection_output = False

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(B, L, embed_dim) -> ``(output, None)``: one QKV projection, attention (no mask,
        not causal) on strided views of it, then the output projection. A pair, as
        transformers' ``(output, attention_probs)``, but the fused kernel never forms the
        probabilities. Raises if training with attention dropout > 0."""
        layers.check_attention_dropout(self)
        batch, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        if self.recompute_projection_output:
            # The view is marked: it stays alive while the attention saves q, k and v.
            layers.mark_projection_recomputable(self.qkv, hidden_states, qkv)
        # q, k, v are strided views of the projection output: no copies.
        context = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                   softmax_scale=self.scale)
        return self.projection(context.reshape(batch, length, self.embed_dim)), None


class BlipMLP(nn.Module):
    """fc2(activation(fc1(x))); with exact GELU, fc1's bias is fused into the activation
    kernel and the activation is recomputed in the backward instead of kept."""

    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.activation = layers.weightless_activation(config.hidden_act, "vision_config")
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        # Recompute fc1's output in the backward (see recompute_projection_outputs).
        self.recompute_projection_output = False

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, intermediate) -> (B, L, hidden)."""
        activation = layers.activation_in_use(self.activation, getattr(self, "activation_fn", None))
        return layers.feed_forward(self.fc1, self.fc2, hidden_states, activation,
                                   self.recompute_projection_output)


class BlipEncoderLayer(nn.Module):
    """One pre-norm ViT block. Called as transformers' layer, it maps hidden states to
    hidden states; the encoder instead passes and takes them as unsummed pairs
    (``forward(update, residual, unsummed=True)``), so every residual add is fused into a
    LayerNorm."""

    gradient_checkpointing = False
    """Whether the encoder runs this layer under activation checkpointing (set by
    ``activation_checkpointing_enable``; see :func:`layers.checkpoint_function`)."""

    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.self_attn = BlipAttention(config)
        self.layer_norm1 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.mlp = BlipMLP(config)
        self.layer_norm2 = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor, residual: Optional[torch.Tensor] = None,
                *, unsummed: bool = False):
        """(B, L, embed_dim) -> (B, L, embed_dim), as transformers' layer.

        The encoder passes the input as the pair ``hidden_states + residual`` (LN1 adds
        them; ``residual=None``: ``hidden_states`` is the input) and, with ``unsummed``,
        takes the output as the pair ``(mlp_output, residual)``, so that every residual add
        is fused into the next LayerNorm. LN2 adds the attention output to the residual
        stream."""
        if residual is None:
            residual = hidden_states
            normed = layers.layer_norm(self.layer_norm1, hidden_states)
        else:
            normed, residual = layers.add_layer_norm(self.layer_norm1, hidden_states, residual)
        attention_output = self.self_attn(normed)[0]
        normed, residual = layers.add_layer_norm(self.layer_norm2, attention_output, residual)
        update = self.mlp(normed)
        return (update, residual) if unsummed else update + residual


class BlipEncoder(nn.Module):
    """The stack of :class:`BlipEncoderLayer` (optionally activation-checkpointed).

    ``recompute_layer_norm_outputs`` (default True): the QKV and first FFN projections do
    not keep their LayerNorm'd inputs for the backward, which recomputes them from the
    residual stream (:func:`blipfast.ops.recompute_in_backward`): two (B, L, D)
    tensors less per layer, for one LayerNorm forward each in the backward."""

    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([BlipEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.recompute_layer_norm_outputs = True

    def forward(self, inputs_embeds: torch.Tensor,
                output_hidden_states: layers.HiddenStateSelection = False, *,
                unsummed: bool = False):
        """(B, L, embed_dim) -> ``BaseModelOutput``: ``last_hidden_state`` and, if asked,
        ``hidden_states`` (every layer's input and the output; with indices given, only
        those, the others None), as transformers' encoder.
        With ``unsummed`` (the vision model's call): ``(update, residual, hidden_states)``,
        the output as an unsummed pair, whose add the post-LayerNorm fuses.

        A layer with hooks (a user's, accelerate's, FSDP's) or a ``forward`` of its own is
        called as transformers calls its layers, on and to summed hidden states (one add
        more), so that what its hooks see is what they would see there; so is a
        transformers layer that runs transformers' forward (not patched: put into a
        patched model later, a subclass, or one FSDP's ``fully_shard`` gave its class)."""
        update, residual = inputs_embeds, None
        selected = layers.selected_hidden_states(output_hidden_states, len(self.layers) + 1)
        all_hidden: Optional[list[Optional[torch.Tensor]]] = [] if selected is not None else None
        keep = selected or frozenset()
        recompute = self.recompute_layer_norm_outputs and not torch.compiler.is_compiling()
        with ops.recompute_in_backward() if recompute else contextlib.nullcontext():
            for index, layer in enumerate(self.layers):
                if all_hidden is not None:
                    all_hidden.append(_summed(update, residual) if index in keep else None)
                if layers.is_wrapped(layer) or layers.runs_transformers_forward(layer):
                    update = layers.call_layer(self, layer, _summed(update, residual))
                    residual = None
                else:
                    update, residual = layers.call_layer(self, layer, update, residual,
                                                         unsummed=True)
        if all_hidden is not None:
            all_hidden.append(_summed(update, residual) if len(self.layers) in keep
                              else None)
        hidden_states = tuple(all_hidden) if all_hidden is not None else None
        if unsummed:
            return update, residual, hidden_states
        return BaseModelOutput(last_hidden_state=_summed(update, residual),
                               hidden_states=hidden_states)


def _summed(update: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """The hidden states a layer's output pair stands for."""
    return update if residual is None else update + residual


def recompute_projection_outputs(encoder: nn.Module, enabled: bool = True) -> None:
    """Let the backward of every layer of a ViT encoder (blipfast's ``BlipEncoder`` or a
    patched transformers one) recompute the QKV projection's output and the first FFN
    projection's output instead of keeping them: 3·D + 4·D per token and layer less
    (4.4 GiB for ViT-B at batch 64, 384 px, bf16) for two more matmuls per layer in the
    backward (about a third more of the layer's forward matmul work). Takes effect while
    the encoder's ``recompute_layer_norm_outputs`` is on (the default), which recomputes
    the projections' inputs.

    ``enabled`` (default True) turns it on for every layer; False turns it off again
    (each layer's attention and MLP keep their projection outputs, the default). Raises
    TypeError if ``encoder`` has no ``layers`` ModuleList."""
    encoder_layers = getattr(encoder, "layers", None)
    if not isinstance(encoder_layers, nn.ModuleList):
        raise TypeError(f"recompute_projection_outputs: encoder must be a ViT encoder with a "
                        f"ModuleList named layers, got {type(encoder).__name__}")
    for layer in encoder_layers:
        for name in ("self_attn", "mlp"):
            # (setattr: nn.Module's __setattr__ is typed for tensors and modules only)
            setattr(layer.get_submodule(name), "recompute_projection_output", enabled)


class BlipVisionModel(BlipPreTrainedModel):
    """BLIP's ViT: ``forward(pixel_values)`` returns ``last_hidden_state`` (post-LayerNorm
    patch and class tokens) and ``pooler_output`` (the class token, LayerNorm applied again,
    as transformers does). Same signature and outputs as transformers' ``BlipVisionModel``.

    ``config``: a :class:`BlipVisionConfig` (hidden size, layers, heads, image and patch
    size, ...); the weights are initialized as transformers does (``post_init``), or load
    them with ``from_pretrained``."""

    config_class = BlipVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: BlipVisionConfig) -> None:
        super().__init__(config)
        self.config = config
        self.embeddings = BlipVisionEmbeddings(config)
        self.encoder = BlipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The patch, class-token and position embeddings (:class:`BlipVisionEmbeddings`)."""
        return self.embeddings

    def forward(
        self,
        pixel_values: Optional[torch.Tensor] = None,
        interpolate_pos_encoding: bool = False,
        output_hidden_states: layers.HiddenStateSelection = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """``pixel_values`` (B, 3, H, W) -> ``BaseModelOutputWithPooling``: ``last_hidden_state``
        (B, 1 + num_patches, hidden), ``pooler_output`` (B, hidden), ``hidden_states`` if
        ``output_hidden_states``; a tuple if ``return_dict=False``. Not given, both default to
        the config's, as in transformers. ``interpolate_pos_encoding``: resize the learned
        position embeddings bicubically to the image's patch grid (images of another size
        than ``config.image_size``); without it, an image with more patches than the
        configured positions raises ValueError. ``output_attentions`` (as an argument or,
        not given, in the config), a ``head_mask`` and unknown kwargs raise; the other
        keyword arguments transformers takes (``use_cache``, ``num_items_in_batch``, ...:
        :data:`layers.TRANSFORMERS_KEYWORD_ARGUMENTS`, :data:`layers.IGNORED_BERT_ARGUMENTS`)
        are ignored, as there."""
        if pixel_values is None:
            raise ValueError("pixel_values is required")
        layers.reject_unsupported_arguments(kwargs, self.config)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        embeddings = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        layers.check_runs_blipfast_forward(self.encoder, self)
        if layers.is_wrapped(self.encoder):  # hooks see transformers' encoder output
            encoded = self.encoder(embeddings, output_hidden_states)
            update, residual, hidden_states = encoded.last_hidden_state, None, encoded.hidden_states
        else:
            update, residual, hidden_states = self.encoder(embeddings, output_hidden_states,
                                                           unsummed=True)
        last_hidden_state = layers.layer_norm(self.post_layernorm, update, residual)
        pooled_output = layers.layer_norm(self.post_layernorm, last_hidden_state[:, 0, :])
        output = BaseModelOutputWithPooling(last_hidden_state=last_hidden_state,
                                            pooler_output=pooled_output,
                                            hidden_states=hidden_states)
        return layers.model_output(output, return_dict, self.config)

