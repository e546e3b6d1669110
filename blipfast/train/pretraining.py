"""BLIP's pre-training step: image-text contrastive (ITC), image-text matching (ITM) and
language-modeling (LM) losses on one image pass, as salesforce BLIP's ``blip_pretrain.py``
computes them, on blipfast's kernels."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig
from transformers.utils import ModelOutput

from blipfast import ops
from blipfast.ops._checks import is_finite
from blipfast.distributed import this_process_group
from blipfast.models.blip.modeling import BlipForConditionalGeneration, BlipForImageTextRetrieval
from blipfast.models.blip.text import (
    BlipTextLMHeadModel,
    BlipTextModel,
    shared_cross_attention_keys_values,
)
from blipfast.models.blip.vision import BlipVisionModel
from blipfast.models.blip.pretrained import _check_shapes, _load_exactly, built_for_loading
from blipfast.train.feature_queue import NO_ID, FeatureQueue, check_image_ids
from blipfast.train.momentum import is_integer, is_real_number, momentum_update_

__all__ = ["BlipForPreTraining", "BlipForPreTrainingOutput"]

TEMPERATURE_RANGE = (0.001, 0.5)
"""BLIP clamps its learnable contrastive temperature to this range before every step."""

MATCHING_NEGATIVES = ("blip_retrieval", "blip_pretrain")
"""The ways :class:`BlipForPreTraining` can draw its ITM negatives (``matching_negatives``)."""
PRETRAIN_NEGATIVE_WEIGHT_FLOOR = 1e-4
"""What ``blip_pretrain.py`` adds to every softmax weight before drawing an ITM negative."""

# The online modules and their momentum copies, by attribute name.
_MOMENTUM_PAIRS = (("vision_model", "vision_model_momentum"),
                   ("vision_proj", "vision_proj_momentum"),
                   ("text_encoder", "text_encoder_momentum"),
                   ("text_proj", "text_proj_momentum"))
# Salesforce BLIP_Pretrain training state every pre-training checkpoint holds.
_SALESFORCE_STATE = ("image_queue", "text_queue", "temp")
_RETRIEVAL_PREFIXES = ("vision_model.", "text_encoder.", "vision_proj.", "text_proj.", "itm_head.")
_CAPTIONING_PREFIXES = ("vision_model.", "text_decoder.")
_LM_HEAD_WEIGHT = "text_decoder.cls.predictions.decoder.weight"
# BLIP's tokenizer (blip.py init_tokenizer): bert-base-uncased's 30522 tokens, then [DEC]
# (its bos token) and [ENC] (the token ITM texts start with).
_BLIP_TOKENIZER_VOCABULARY = 30524
_BLIP_ENCODER_TOKEN_ID = 30523
_DECODER_WORD_EMBEDDINGS = "text_decoder.bert.embeddings.word_embeddings.weight"


@dataclass
class BlipForPreTrainingOutput(ModelOutput):
    """Losses of one pre-training step (scalars: float32 for float32, float16 or
    bfloat16 models; on a float64 model ``loss_lm`` and ``loss`` are float64, the
    contrastive and matching losses float32) and the ITM negatives drawn. A batch with no
    caption token to predict (every caption one token long) has a NaN ``loss_lm``, as
    ``F.cross_entropy``'s mean over no targets (finding that out up front would cost a
    host synchronisation).

    Attributes:
        loss: ``loss_itc + loss_itm + loss_lm``, what BLIP back-propagates.
        loss_itc: contrastive loss with momentum distillation and the feature queue.
        loss_itm: image-text matching cross-entropy over the positive pairs and the two
            sets of hard negatives.
        loss_lm: the decoder's next-token loss with label smoothing.
        negative_text_index: int64 (B,): the text paired with each image as its ITM
            negative, -1 where none exists (every text of the batch is a positive).
        negative_image_index: int64 (B,): the image paired with each text, likewise.
    """

    loss: Optional[torch.Tensor] = None
    loss_itc: Optional[torch.Tensor] = None
    loss_itm: Optional[torch.Tensor] = None
    loss_lm: Optional[torch.Tensor] = None
    negative_text_index: Optional[torch.Tensor] = None
    negative_image_index: Optional[torch.Tensor] = None


class BlipForPreTraining(nn.Module):
    """BLIP pre-training (Li et al. 2022, salesforce BLIP ``blip_pretrain.py``) on one image
    pass: ViT, the MED text transformer as unimodal encoder (ITC), image-grounded encoder
    (ITM) and image-grounded decoder (LM), momentum encoders and a feature queue.

    Submodules, named as transformers' task models name them so their weights move
    between the models (:meth:`to_retrieval_model`, :meth:`to_captioning_model`,
    :meth:`from_task_models`):

    - ``vision_model``, ``text_encoder`` (no pooler), ``vision_proj``, ``text_proj``,
      ``itm_head``: as in ``BlipForImageTextRetrieval``;
    - ``text_decoder``: as in ``BlipForConditionalGeneration``. It shares every parameter
      except its self-attention layers and its LM head with ``text_encoder``: the
      embeddings and each layer's cross-attention and feed-forward modules are the same
      module objects. Each shared parameter appears once in ``parameters()`` and gets the
      gradient of all three objectives. The LM head's output projection is a matrix of its
      own, as in ``BLIP_Pretrain``: there the head was tied to the decoder's word
      embeddings before ``tie_encoder_decoder_weights`` replaced them by the encoder's, and
      the pre-training checkpoints hold the two apart. The captioning model, which ties
      them, gets the head's matrix for both (:meth:`to_captioning_model`, as Salesforce's
      ``BLIP_Decoder`` does when it loads a pre-training checkpoint);
    - ``*_momentum`` copies of the first four (``requires_grad=False``), ``queue``
      (:class:`~blipfast.train.feature_queue.FeatureQueue`) and ``temp`` (the learnable
      contrastive temperature, 0.07 at start, clamped to [0.001, 0.5] before each step).

    One step (``forward`` in training mode), as BLIP:

    1. encode images and texts with the online modules; clamp the temperature and update
       the momentum encoders (one fused multi-tensor lerp; :meth:`prepare_step`); encode
       with the momentum encoders (BLIP updates them first: the online pass does not read
       them, so the order changes nothing but that a failing online pass leaves them
       alone);
    2. ITC: :func:`blipfast.ops.contrastive_loss_with_queue` over the local batch plus the
       queue, with distilled soft targets weighted by ``alpha``;
    3. ITM: for each image one negative text and for each text one negative image, drawn
       within this process's batch with positives (same pair or same ``image_ids``)
       excluded, as ``matching_negatives`` says (below). The 3B texts (positives, texts
       with their negative images, negative texts with the images) run through the
       image-grounded encoder in one pass; texts index the B images' cross-attention keys
       and values (``encoder_batch_index``), which are never repeated in memory. A row with
       no possible negative (e.g. a batch of one) gets zero weight in the ITM mean;
    4. LM: the decoder's label-smoothed next-token loss on the captions, with the first
       token replaced by ``bos_token_id`` of the text config and padding ignored;
    5. enqueue the momentum features of every rank (after the losses, which read the queue
       as it was, as BLIP's do).

    In eval mode the losses are computed the same way but the momentum encoders and the
    queue are left unchanged.

    Distributed: wrap in ``DistributedDataParallel`` as usual (``broadcast_buffers=False``
    saves broadcasting the queue, which every rank updates identically anyway). The queue
    gathers the momentum features of every rank of ``group``; the ITC loss and ITM
    sampling use the local batch, as BLIP's pre-training does. The in-place parameter
    changes of a step (:meth:`prepare_step`) happen inside ``forward`` by default; with a
    wrapper that gathers parameters for ``forward`` and drops them after (FSDP's
    ``fully_shard``), changes made inside ``forward`` would be lost: call
    :meth:`prepare_step` on the sharded module before each ``forward`` and pass
    ``prepare=False`` (``prepare=True`` raises there). Shard the whole model with
    ``fully_shard``, and if you like each ViT layer too (``vision_model.encoder.layers``
    and ``vision_model_momentum``'s); the text encoder and decoder share every module but
    self-attention, so the text side cannot be sharded per layer (nor the text encoder
    alone). FSDP1's ``FullyShardedDataParallel`` is not supported: its flat parameters mix
    the frozen momentum copies with trained weights. Under DDP, activation checkpointing
    must be non-reentrant (transformers' default): the shared text layers run in three
    passes a step, which a reentrant checkpoint reports to DDP as gradients ready twice.

    Args:
        config: a transformers ``BlipConfig`` (``image_text_hidden_size`` is the
            contrastive embedding size, 256 in BLIP).
        queue_size: number of queued momentum features (BLIP: 57600).
        momentum: momentum of the encoder copies (BLIP: 0.995).
        lm_label_smoothing: label smoothing of the LM loss (BLIP: 0.1).
        encoder_token_id: the token put first in ITM texts (BLIP's tokenizer: the id of
            ``[ENC]``); None keeps the captions' own first token.
        group: process group the queue gathers over (default: the world group when
            torch.distributed is initialized).
        matching_negatives: how the ITM negatives are drawn (both: one per image and one
            per text, from this process's batch, positives never, with ``forward``'s
            ``generator``):

            - ``"blip_retrieval"`` (default): as BLIP's retrieval fine-tuning
              (``blip_retrieval.py``) draws, from the softmax of the online features'
              similarities at the contrastive temperature, by the contrastive kernel
              (:func:`blipfast.ops.contrastive_loss_with_hard_negatives`, Gumbel-max in
              its tiled pass);
            - ``"blip_pretrain"``: exactly as ``blip_pretrain.py`` draws: a text for an
              image with weight ``softmax(online image . momentum texts / temp) + 1e-4``,
              an image for a text with ``softmax(online text . momentum images / temp) +
              1e-4``, positives at weight 0. The floor matters once the model is
              confident: a row whose positive holds probability P draws uniformly (over
              its n non-positives) with probability ``n * 1e-4 / (1 - P + n * 1e-4)``,
              over half the draws at B = 128 once P > 0.987. Drawn in PyTorch from the
              B x B weights (B = this process's batch; BLIP builds the same matrix).
    """

    def __init__(self, config: BlipConfig, *, queue_size: int = 57600, momentum: float = 0.995,
                 lm_label_smoothing: float = 0.1, encoder_token_id: Optional[int] = None,
                 group: Optional[torch.distributed.ProcessGroup] = None,
                 matching_negatives: Literal["blip_retrieval", "blip_pretrain"] = "blip_retrieval",
                 ) -> None:
        super().__init__()
        if not isinstance(matching_negatives, str):
            raise TypeError("BlipForPreTraining: matching_negatives must be a str, one of "
                            f"{MATCHING_NEGATIVES}, got {type(matching_negatives).__name__}")
        if matching_negatives not in MATCHING_NEGATIVES:
            raise ValueError(f"BlipForPreTraining: matching_negatives must be one of "
                             f"{MATCHING_NEGATIVES}, got {matching_negatives!r}")
        if not isinstance(config, BlipConfig):
            raise TypeError(f"BlipForPreTraining: config must be a transformers BlipConfig, "
                            f"got {type(config).__name__}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BlipForPreTraining: momentum must lie in [0, 1], got {momentum!r}")
        if not is_integer(queue_size) or queue_size < 1:
            raise ValueError(f"BlipForPreTraining: queue_size must be a positive int, got "
                             f"{queue_size!r}")
        if not is_real_number(lm_label_smoothing):
            raise TypeError("BlipForPreTraining: lm_label_smoothing must be a real number in "
                            f"[0, 1), got {type(lm_label_smoothing).__name__}")
        if not 0.0 <= lm_label_smoothing < 1.0:  # False for NaN
            raise ValueError("BlipForPreTraining: lm_label_smoothing must lie in [0, 1), got "
                             f"{lm_label_smoothing!r}")
        text_config = config.text_config
        if encoder_token_id is not None and not is_integer(encoder_token_id):
            raise TypeError("BlipForPreTraining: encoder_token_id must be an int or None, got "
                            f"{encoder_token_id!r} ({type(encoder_token_id).__name__})")
        if encoder_token_id is not None and not 0 <= encoder_token_id < text_config.vocab_size:
            raise ValueError(f"BlipForPreTraining: encoder_token_id {encoder_token_id} is outside "
                             f"the vocabulary (size {text_config.vocab_size})")
        if not text_config.is_decoder:
            raise ValueError("BlipForPreTraining: config.text_config.is_decoder must be True "
                             "(the text layers need their cross-attention)")
        self.config = config
        self.momentum = float(momentum)
        self.encoder_token_id = None if encoder_token_id is None else int(encoder_token_id)
        self.group = group
        self.matching_negatives = matching_negatives

        embed_dim = config.image_text_hidden_size
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text_config)
        self.text_decoder.label_smoothing = float(lm_label_smoothing)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, embed_dim)
        self.text_proj = nn.Linear(text_config.hidden_size, embed_dim)
        self.itm_head = nn.Linear(text_config.hidden_size, 2)
        # shape (1,), not (): FSDP cannot shard 0-dim parameters
        self.temp = nn.Parameter(torch.full((1,), 0.07))
        _share_all_but_self_attention(self.text_encoder, self.text_decoder)

        for online, momentum_name in _MOMENTUM_PAIRS:
            setattr(self, momentum_name, copy.deepcopy(getattr(self, online)).requires_grad_(False))
        self.queue = FeatureQueue(int(queue_size), embed_dim)
        self.register_load_state_dict_pre_hook(_refuse_differing_shared_copies)

    # ----------------------------------------------------------------------------------
    # Training step
    # ----------------------------------------------------------------------------------

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        alpha: float = 0.4,
        image_ids: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
        prepare: bool = True,
        interpolate_pos_encoding: bool = False,
    ) -> BlipForPreTrainingOutput:
        """The three losses of one step.

        Args:
            pixel_values: (B, 3, H, W) images.
            input_ids: (B, L) caption tokens as BLIP's tokenizer gives them (``[CLS]``
                first, right padding with the text config's ``pad_token_id``).
            attention_mask: (B, L) 1 for tokens, 0 for padding (default: all tokens).
            alpha: weight of the momentum-distilled ITC targets (see
                :func:`blipfast.train.ramped_alpha`).
            image_ids: (B,) non-negative integer ids, optional: captions of the same image
                are positives of each other in ITC (also against queued entries) and never
                drawn as ITM negatives.
            generator: random generator for the ITM negatives (default: the global one of
                the inputs' device).
            prepare: in training mode, call :meth:`prepare_step` (clamp the temperature,
                update the momentum encoders) before the momentum encoders' pass, as BLIP
                does; pass False when calling it yourself (FSDP), before ``forward``. Under
                FSDP's ``fully_shard`` (of the model or any of its modules), True raises
                RuntimeError in training mode: the changes would be lost.
            interpolate_pos_encoding: images of another size than the config's.

        Raises:
            TypeError or ValueError naming the argument, before the step changes anything:
                ``pixel_values``, ``input_ids``, ``attention_mask`` or ``image_ids`` of the
                wrong type or shape (``pixel_values``' channel count included),
                ``input_ids`` or ``image_ids`` of the wrong dtype, ``image_ids`` on another
                device or negative (CPU), ``alpha`` not a finite real number in [0, 1],
                ``generator`` not a ``torch.Generator``, the ``matching_negatives``
                attribute set to an unknown way, the text config's ``bos_token_id`` or
                ``pad_token_id`` not a token id (None in a config inferred from a checkpoint
                whose vocabulary lacks transformers' defaults). What only the online encoders' pass
                finds (a token id outside the vocabulary, which an up-front check would have
                to read on the host; inputs on another device than the model) raises before
                the temperature clamp, the momentum update and the enqueueing as well. A
                step that fails after that pass (e.g. out of memory in the ITM or LM pass)
                has clamped the temperature and updated the momentum encoders, but not
                written the queue.
        """
        alpha = self._check_inputs(pixel_values, input_ids, attention_mask, image_ids, alpha,
                                   generator)
        if self.training and prepare and _sharded_by_fully_shard(self):
            raise RuntimeError(
                "BlipForPreTraining: under FSDP's fully_shard the parameters gathered for "
                "forward are dropped after it, so the step's in-place changes (temperature "
                "clamp, momentum update) made inside forward would be lost: call "
                "model.prepare_step() before each forward and pass prepare=False")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = (pixel_values, input_ids, attention_mask, interpolate_pos_encoding)
        # The online pass first: it reads neither the temperature nor the momentum
        # encoders, and whatever it raises (a token id outside the vocabulary) then leaves
        # the model's state as it was.
        image_embeds, image_feat, text_feat = self._encode("", *inputs)
        if self.training and prepare:
            self.prepare_step()
        # BLIP clamps temp in place (prepare_step), then divides by temp. Clamped here too,
        # so that eval mode and unprepared steps stay in range, but with temp's own gradient
        # (straight through): a clamp passes no gradient at its bounds from torch 2.14 on
        # (all of it before), which would freeze a temperature once it reached 0.5.
        temperature = (self.temp.detach().clamp(*TEMPERATURE_RANGE)
                       + (self.temp - self.temp.detach()))
        logit_scale = 1.0 / temperature

        with torch.no_grad():
            _, image_feat_momentum, text_feat_momentum = self._encode("_momentum", *inputs)
        # The features are float32; the queue too unless the model was cast (model.bfloat16()
        # casts buffers): then it is read in float32 (a no-op otherwise).
        loss_itc = ops.contrastive_loss_with_queue(
            image_feat, text_feat, logit_scale,
            image_feat_momentum=image_feat_momentum, text_feat_momentum=text_feat_momentum,
            image_queue=self.queue.image_features.to(image_feat.dtype),
            text_queue=self.queue.text_features.to(text_feat.dtype),
            image_ids=image_ids,
            queue_image_ids=self.queue.image_ids if image_ids is not None else None,
            alpha=alpha)

        # The ITM encoder and the LM decoder share their cross-attention layers and attend
        # the same image states: each layer projects the image keys and values once
        # (under torch.compile, which cannot trace the sharing, the graph does it or not).
        with (contextlib.nullcontext() if torch.compiler.is_compiling()
              else shared_cross_attention_keys_values()):
            loss_itm, negative_texts, negative_images = self._matching_loss(
                input_ids, attention_mask, image_embeds, image_feat, text_feat,
                image_feat_momentum, text_feat_momentum, logit_scale, image_ids, generator)

            decoder_input_ids = input_ids.clone()
            decoder_input_ids[:, 0] = self.config.text_config.bos_token_id
            labels = decoder_input_ids.masked_fill(
                decoder_input_ids == self.config.text_config.pad_token_id, -100)
            loss_lm = self.text_decoder(
                input_ids=decoder_input_ids, attention_mask=attention_mask,
                encoder_hidden_states=image_embeds, labels=labels, reduction="mean").loss
        if self.training:
            self.queue.enqueue(image_feat_momentum, text_feat_momentum, image_ids, self.group)
        return BlipForPreTrainingOutput(
            loss=loss_itc + loss_itm + loss_lm, loss_itc=loss_itc, loss_itm=loss_itm,
            loss_lm=loss_lm, negative_text_index=negative_texts,
            negative_image_index=negative_images)

    def _encode(self, suffix, pixel_values, input_ids, attention_mask, interpolate_pos_encoding):
        """(image states, image features, text features) from the online modules
        (``suffix=""``) or their momentum copies (``"_momentum"``); text in unimodal mode."""
        image_embeds = getattr(self, "vision_model" + suffix)(
            pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding
        ).last_hidden_state
        text_embeds = getattr(self, "text_encoder" + suffix)(
            input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return (image_embeds,
                _normalized_projection(getattr(self, "vision_proj" + suffix), image_embeds[:, 0]),
                _normalized_projection(getattr(self, "text_proj" + suffix), text_embeds[:, 0]))

    def _matching_loss(self, input_ids, attention_mask, image_embeds, image_feat, text_feat,
                       image_feat_momentum, text_feat_momentum, logit_scale, image_ids,
                       generator):
        """ITM over positives and hard negatives drawn within this process's batch."""
        with torch.no_grad():
            if self.matching_negatives == "blip_pretrain":
                negative_text_index, negative_image_index = _blip_pretrain_negatives(
                    image_feat, text_feat, image_feat_momentum, text_feat_momentum,
                    logit_scale, image_ids, generator)
            elif self.matching_negatives == "blip_retrieval":
                sampled = ops.contrastive_loss_with_hard_negatives(
                    image_feat.detach(), text_feat.detach(), logit_scale.detach(),
                    image_ids=image_ids, group=this_process_group(), generator=generator)
                negative_text_index = sampled.negative_text_index
                negative_image_index = sampled.negative_image_index
            else:  # checked by _check_inputs
                raise AssertionError(self.matching_negatives)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        has_negative_text = negative_text_index >= 0
        has_negative_image = negative_image_index >= 0
        negative_texts = torch.where(has_negative_text, negative_text_index, rows)
        negative_images = torch.where(has_negative_image, negative_image_index, rows)

        matching_ids = input_ids.clone()
        if self.encoder_token_id is not None:
            matching_ids[:, 0] = self.encoder_token_id
        # Rows: (text b, image b), (text b, its negative image), (image b's negative text, image b).
        texts = torch.cat([matching_ids, matching_ids, matching_ids[negative_texts]])
        masks = torch.cat([attention_mask, attention_mask, attention_mask[negative_texts]])
        image_index = torch.cat([rows, negative_images, rows])
        states = self.text_encoder(input_ids=texts, attention_mask=masks,
                                   encoder_hidden_states=image_embeds,
                                   encoder_batch_index=image_index).last_hidden_state
        logits = self.itm_head(states[:, 0]).float()
        labels = torch.cat([torch.ones_like(rows), torch.zeros_like(rows), torch.zeros_like(rows)])
        weights = torch.cat([torch.ones_like(has_negative_image), has_negative_image,
                             has_negative_text]).float()
        per_row = F.cross_entropy(logits, labels, reduction="none")
        loss = (per_row * weights).sum() / weights.sum()
        return (loss, negative_text_index, negative_image_index)

    @torch.no_grad()
    def prepare_step(self) -> None:
        """What BLIP does to the parameters at the start of each step, in place: clamp the
        temperature to [0.001, 0.5], then :meth:`momentum_update`. ``forward`` calls it in
        training mode unless given ``prepare=False``."""
        self.temp.clamp_(*TEMPERATURE_RANGE)
        self.momentum_update()

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Move every momentum copy towards its online module: ``m = momentum * m +
        (1 - momentum) * p``, one fused multi-tensor operation. On a model cast to bfloat16
        or float16 the update rounds away (the step ``(1 - momentum) * (p - m)`` is below
        half a unit in the last place of ``m``), so the momentum encoders barely move:
        :func:`~blipfast.train.momentum_update_` warns; keep float32 weights and train
        under ``torch.autocast`` instead."""
        momentum_parameters, parameters = self._momentum_parameter_lists()
        momentum_update_(momentum_parameters, parameters, self.momentum)

    @torch.no_grad()
    def reset_momentum_encoders(self) -> None:
        """Copy the online modules into their momentum copies (after loading weights)."""
        momentum_parameters, parameters = self._momentum_parameter_lists()
        momentum_update_(momentum_parameters, parameters, 0.0)

    def _momentum_parameter_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        momentum_parameters, parameters = [], []
        for online, momentum_name in _MOMENTUM_PAIRS:
            parameters.extend(getattr(self, online).parameters())
            momentum_parameters.extend(getattr(self, momentum_name).parameters())
        return momentum_parameters, parameters

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters that receive gradients (every parameter but the momentum
        copies), each once: what to give the optimizer."""
        return (parameter for parameter in self.parameters() if parameter.requires_grad)

    def activation_checkpointing_enable(self, **options: Any) -> None:
        """Recompute the activations of the ViT and text layers in the backward pass
        instead of storing them (the momentum encoders run without gradient anyway).
        ``options`` go to each model's ``activation_checkpointing_enable`` (transformers'
        ``gradient_checkpointing_enable`` before 5.2x), e.g. ``every_n_layers=2`` (counted
        per model) where this transformers takes them."""
        for module in (self.vision_model, self.text_encoder, self.text_decoder):
            # transformers 5.2x renamed gradient_checkpointing_enable
            enable = getattr(module, "activation_checkpointing_enable", None) \
                or module.gradient_checkpointing_enable
            enable(**options)

    # ----------------------------------------------------------------------------------
    # Weights in and out
    # ----------------------------------------------------------------------------------

    def to_retrieval_model(self) -> BlipForImageTextRetrieval:
        """A :class:`blipfast.models.BlipForImageTextRetrieval` (ITM and ITC heads) with a
        copy of this model's ViT, text encoder, projections and ITM head; on the same
        device and dtype. ``.to_hf()`` / ``save_pretrained`` give transformers' model."""
        return self._export(BlipForImageTextRetrieval, _RETRIEVAL_PREFIXES)

    def to_captioning_model(self) -> BlipForConditionalGeneration:
        """A :class:`blipfast.models.BlipForConditionalGeneration` with a copy of this
        model's ViT and text decoder (its shared modules included). The captioning model
        ties its word embeddings to its LM head: both get the head's matrix, as
        Salesforce's ``BLIP_Decoder`` holds them after loading a pre-training checkpoint.
        Its config's ``text_config.label_smoothing`` is this model's LM label smoothing
        (``lm_label_smoothing``), so that fine-tuning it keeps the LM loss it was trained
        with (BLIP's captioner fine-tunes with 0.1 too)."""
        config = copy.deepcopy(self.config)
        config.text_config.label_smoothing = self.text_decoder.label_smoothing
        return self._export(BlipForConditionalGeneration, _CAPTIONING_PREFIXES, config)

    def _export(self, model_class, prefixes, config=None):
        state = {key: value for key, value in self.state_dict().items() if key.startswith(prefixes)}
        if _DECODER_WORD_EMBEDDINGS in state:
            state[_DECODER_WORD_EMBEDDINGS] = state[_LM_HEAD_WEIGHT]
        model = built_for_loading(model_class, config if config is not None else self.config)
        model.load_state_dict(state, strict=True)
        reference = next(self.parameters())
        return model.to(device=reference.device, dtype=reference.dtype)

    @classmethod
    def from_task_models(cls, retrieval_model: nn.Module,
                         captioning_model: Optional[nn.Module] = None,
                         **options: Any) -> "BlipForPreTraining":
        """Start pre-training from trained task models (blipfast's or transformers').

        ``retrieval_model`` (a ``BlipForImageTextRetrieval``) gives the config, the ViT,
        the text encoder, the projections and the ITM head. ``captioning_model`` (a
        ``BlipForConditionalGeneration``), if given, gives the decoder's self-attention
        layers and LM head (its other text modules are the encoder's, shared); without it
        the LM head's matrix starts as a copy of the encoder's word embeddings (BLIP starts
        both from BERT's). The momentum encoders start as copies; the queue starts random.
        ``options`` go to the constructor.
        """
        model = built_for_loading(cls, retrieval_model.config, **options)
        retrieval_state = retrieval_model.state_dict()
        state = {key: value for key, value in retrieval_state.items()
                 if key.startswith(_RETRIEVAL_PREFIXES)}
        missing = [key for key in model.state_dict() if key.startswith(_RETRIEVAL_PREFIXES)
                   and key not in state]
        if missing:
            raise ValueError(f"BlipForPreTraining.from_task_models: retrieval_model lacks "
                             f"{len(missing)} weights, e.g. {missing[:3]}")
        if captioning_model is not None:
            own = model.text_decoder.state_dict()
            shared = {tensor.data_ptr() for tensor in model.text_encoder.state_dict().values()}
            for key, value in captioning_model.state_dict().items():
                name = key[len("text_decoder."):]
                if not key.startswith("text_decoder.") or own.get(name) is None \
                        or own[name].data_ptr() in shared:
                    continue  # not the decoder's, or the encoder's (shared) weights
                state[key] = value
            missing = [name for name, tensor in own.items()
                       if tensor.data_ptr() not in shared and f"text_decoder.{name}" not in state]
            if missing:
                raise ValueError(f"BlipForPreTraining.from_task_models: captioning_model lacks "
                                 f"{len(missing)} decoder weights, e.g. {missing[:3]}")
        else:
            state[_LM_HEAD_WEIGHT] = state["text_encoder.embeddings.word_embeddings.weight"]
        model.load_state_dict(state, strict=False)
        reference = next(retrieval_model.parameters())
        model = model.to(device=reference.device, dtype=reference.dtype)
        model.reset_momentum_encoders()
        return model

    @classmethod
    def from_salesforce(cls, checkpoint: Union[str, os.PathLike, Mapping[str, object]], *,
                        vision_num_attention_heads: Optional[int] = None,
                        text_num_attention_heads: Optional[int] = None,
                        **options: Any) -> "BlipForPreTraining":
        """Resume from a Salesforce BLIP pre-training checkpoint (``BLIP_Pretrain``'s state,
        e.g. ``model_base.pth``: a path, the loaded object or its state dict): online
        modules, momentum encoders, queues (their size sets ``queue_size``) and
        temperature. The config is inferred from the tensor shapes (head size 64 unless
        the ``*_num_attention_heads`` are given, see
        :func:`~blipfast.models.blip.salesforce_checkpoint.config_from_salesforce`);
        ``options`` go to the constructor, with ``blip_pretrain.py``'s behaviour as the
        default where the constructor's differs: ``matching_negatives="blip_pretrain"``,
        and ``encoder_token_id=30523`` (``[ENC]`` of BLIP's tokenizer, bert-base-uncased
        with ``[DEC]`` and ``[ENC]`` added) when the vocabulary has that tokenizer's 30524
        entries.

        Raises:
            ValueError: unknown or missing keys, shared encoder/decoder weights whose
                two copies in the checkpoint differ, a ``queue_size`` option (the
                checkpoint's queues set it), or a file torch cannot read (named).
        """
        from blipfast.models.blip import salesforce_checkpoint as salesforce

        if "queue_size" in options:
            raise ValueError("BlipForPreTraining.from_salesforce: queue_size is the size of "
                             "the checkpoint's queues; it cannot be passed")
        loaded = salesforce._load_checkpoint(checkpoint)
        state = salesforce._check_tensors(salesforce._unwrap(loaded))
        missing = [key for key in _SALESFORCE_STATE if key not in state]
        if "queue_ptr" not in state and "ptr_queue" not in state:
            missing.append("queue_ptr")
        if missing or not any(key.startswith("visual_encoder_m.") for key in state):
            raise ValueError("BlipForPreTraining.from_salesforce: not a pre-training "
                             f"checkpoint; missing {missing or 'the momentum encoders'}")
        config = salesforce.config_from_salesforce(
            state, "retrieval", drop_unused_modules=True,
            vision_num_attention_heads=vision_num_attention_heads,
            text_num_attention_heads=text_num_attention_heads)
        converted = salesforce.salesforce_to_transformers(state, "retrieval",
                                                          drop_unused_modules=True)
        decoder = salesforce.salesforce_to_transformers(state, "captioning",
                                                        drop_unused_modules=True)
        # The captioning conversion ties the decoder's word embeddings to the LM head, as a
        # captioning model holds them; here the two stay apart, as in the checkpoint.
        decoder[_DECODER_WORD_EMBEDDINGS] = state.get(
            _DECODER_WORD_EMBEDDINGS, state["text_encoder.embeddings.word_embeddings.weight"])
        decoder[_LM_HEAD_WEIGHT] = state.get(_LM_HEAD_WEIGHT, decoder[_DECODER_WORD_EMBEDDINGS])
        momentum_source = {}  # visual_encoder_m.* -> visual_encoder.*, ...
        for key, value in state.items():
            module, _, rest = key.partition(".")
            if module.endswith("_m"):
                momentum_source[f"{module[:-2]}.{rest}"] = value
        momentum_source.update({key: state[key] for key in ("itm_head.weight", "itm_head.bias")})
        for key, value in salesforce.salesforce_to_transformers(momentum_source,
                                                                "retrieval").items():
            module, rest = key.split(".", 1)
            if module != "itm_head":  # borrowed above: the conversion expects the heads
                converted[f"{module}_momentum.{rest}"] = value
        queue_size = state["image_queue"].shape[1]
        converted["queue.image_features"] = state["image_queue"].t().float()
        converted["queue.text_features"] = state["text_queue"].t().float()
        converted["queue.image_ids"] = (state["idx_queue"].reshape(-1).long()
                                        if "idx_queue" in state
                                        else torch.full((queue_size,), NO_ID, dtype=torch.long))
        pointer = state["queue_ptr"] if "queue_ptr" in state else state["ptr_queue"]
        converted["queue.pointer"] = pointer.reshape(()).long()
        converted["temp"] = state["temp"].reshape(1).float()
        options.setdefault("matching_negatives", "blip_pretrain")
        if config.text_config.vocab_size == _BLIP_TOKENIZER_VOCABULARY:
            options.setdefault("encoder_token_id", _BLIP_ENCODER_TOKEN_ID)
        model = built_for_loading(cls, config, queue_size=queue_size, **options)
        own = model.state_dict()
        for key, value in decoder.items():  # the ViT keys of both conversions are one tensor
            converted.setdefault(key, value)
        names = _salesforce_pretraining_names(state)
        what = "BlipForPreTraining.from_salesforce"
        _check_shapes(model, converted, what, names)  # before the comparison of shared ones
        shared: dict[int, tuple[str, torch.Tensor]] = {}
        for key, value in converted.items():
            if key in own:
                first = shared.setdefault(own[key].data_ptr(), (key, value))
                if first[0] != key and not torch.equal(first[1], value):
                    raise ValueError(f"BlipForPreTraining.from_salesforce: {key} and "
                                     f"{first[0]} are one tensor here but differ in the "
                                     "checkpoint")
        _load_exactly(model, converted, what, names)
        return model

    def to_salesforce(self, *, queue_image_ids: bool = False) -> dict[str, torch.Tensor]:
        """This model's full training state as a Salesforce BLIP_Pretrain state dict, what
        :meth:`from_salesforce` reads (save it with ``torch.save({"model": state_dict},
        path)``).

        Holds exactly the keys of ``BLIP_Pretrain``'s state dict, so that its strict
        ``load_state_dict`` (``pretrain.py``'s resume) takes it: the online modules (the
        decoder's shared weights under both the encoder's and the decoder's names, as
        BLIP's tied modules write them; one tensor for both, so ``torch.save`` stores it
        once), the LM head's own matrix, the momentum encoders (``*_m``), ``image_queue`` /
        ``text_queue`` (D, K) float32, ``queue_ptr`` (1,) and ``temp`` (a 0-dim tensor).
        With ``queue_image_ids=True`` it also holds ``idx_queue`` (1, K), the queue's image
        ids (-1 where none), which ``BLIP_Retrieval`` has and ``BLIP_Pretrain`` does not;
        without it, a queue that holds image ids (training with ``image_ids``) warns, as
        :meth:`from_salesforce` would then resume with none. The constructor's options
        (``momentum``, ``matching_negatives``, ...) are not in the state dict: pass them
        to :meth:`from_salesforce` again.
        The tensors are detached copies on this model's device.
        """
        from blipfast.models.blip.salesforce_checkpoint import transformers_to_salesforce

        own = self.state_dict()
        state = {}
        for task, prefixes in (("retrieval", _RETRIEVAL_PREFIXES),
                               ("captioning", _CAPTIONING_PREFIXES)):
            task_state = {key: value for key, value in own.items() if key.startswith(prefixes)}
            if task == "captioning":  # converted as a tied captioning model, head put back
                head = task_state[_LM_HEAD_WEIGHT]
                task_state[_LM_HEAD_WEIGHT] = task_state[_DECODER_WORD_EMBEDDINGS]
            state.update(transformers_to_salesforce(task_state, task))
        state[_LM_HEAD_WEIGHT] = head
        # The momentum copies converted under their online names (the conversion expects a
        # whole retrieval model, so the online ITM head stands in and is dropped after).
        momentum = {f"{online}.{key[len(copy_name) + 1:]}": value
                    for online, copy_name in _MOMENTUM_PAIRS
                    for key, value in own.items() if key.startswith(f"{copy_name}.")}
        momentum.update({key: value for key, value in own.items() if key.startswith("itm_head.")})
        for key, value in transformers_to_salesforce(momentum, "retrieval").items():
            module, rest = key.split(".", 1)
            if module != "itm_head":
                state[f"{module}_m.{rest}"] = value
        queue = self.queue
        state["image_queue"] = queue.image_features.t()
        state["text_queue"] = queue.text_features.t()
        if queue_image_ids:
            state["idx_queue"] = queue.image_ids.view(1, -1)
        elif bool((queue.image_ids != NO_ID).any()):  # a host read: this is a save
            warnings.warn("BlipForPreTraining.to_salesforce: the queue holds image ids, which "
                          "this state dict leaves out (BLIP_Pretrain has no idx_queue): "
                          "from_salesforce would resume without them. Pass "
                          "queue_image_ids=True to keep them.", stacklevel=2)
        state["queue_ptr"] = queue.pointer.view(1)
        state["temp"] = self.temp.view(())
        copies: dict[tuple[object, ...], torch.Tensor] = {}
        for key, value in state.items():  # one copy per tensor, however many names it has
            identity = (value.untyped_storage().data_ptr(), value.storage_offset(),
                        tuple(value.shape), tuple(value.stride()))
            if identity not in copies:
                copies[identity] = value.detach().clone()
            state[key] = copies[identity]
        return state

    # ----------------------------------------------------------------------------------

    def _check_inputs(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], image_ids: Optional[torch.Tensor],
                      alpha: float, generator: Optional[torch.Generator]) -> float:
        """Every check of ``forward``'s arguments that needs no host read of a tensor, run
        before the step changes anything; returns ``alpha`` as a Python float."""
        # The patch embedding's, 3 (transformers' BlipVisionConfig has no num_channels).
        channels = self.vision_model.embeddings.patch_embedding.in_channels
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"BlipForPreTraining: pixel_values must be a (B, {channels}, H, W) "
                             "tensor, got "
                             f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}")
        if pixel_values.shape[1] != channels:
            raise ValueError(f"BlipForPreTraining: pixel_values must have {channels} channels, "
                             f"got shape {tuple(pixel_values.shape)}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 \
                or input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError("BlipForPreTraining: input_ids must be a (B, L) integer tensor, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        batch = pixel_values.shape[0]
        if input_ids.shape[0] != batch or batch == 0:
            raise ValueError(f"BlipForPreTraining: input_ids has {input_ids.shape[0]} rows but "
                             f"pixel_values has {batch} images (one caption per image, B >= 1)")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"BlipForPreTraining: attention_mask must be a tensor or None, got "
                            f"{type(attention_mask).__name__}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"BlipForPreTraining: attention_mask must have the shape of "
                             f"input_ids {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        check_image_ids("BlipForPreTraining", image_ids, batch, pixel_values.device,
                        "pixel_values is", shape_name="(B,) = ")
        if not is_real_number(alpha):
            raise TypeError(f"BlipForPreTraining: alpha must be a real number in [0, 1], got "
                            f"{type(alpha).__name__}")
        if not is_finite(alpha) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"BlipForPreTraining: alpha must lie in [0, 1], got {alpha!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"BlipForPreTraining: generator must be a torch.Generator or None, "
                            f"got {type(generator).__name__}")
        if self.matching_negatives not in MATCHING_NEGATIVES:  # set after construction
            raise ValueError(f"BlipForPreTraining: matching_negatives must be one of "
                             f"{MATCHING_NEGATIVES}, got {self.matching_negatives!r}")
        text_config = self.config.text_config
        for name in ("bos_token_id", "pad_token_id"):  # the LM pass's first token, its padding
            token_id = getattr(text_config, name, None)
            if token_id is None or not is_integer(token_id) \
                    or not 0 <= token_id < text_config.vocab_size:
                raise ValueError(
                    f"BlipForPreTraining: config.text_config.{name} must be a token id in "
                    f"[0, {text_config.vocab_size}) (the LM pass needs it), got {token_id!r}")
        return float(alpha)


def _refuse_differing_shared_copies(module: nn.Module, state_dict: Mapping[str, Any],
                                    prefix: str, local_metadata: Any, strict: bool,
                                    missing_keys: list, unexpected_keys: list,
                                    error_msgs: list) -> None:
    """``load_state_dict`` pre-hook: the text encoder and decoder share every module but
    the decoder's self-attention, so each shared tensor has two names in the state dict.
    Two different values under them (one copy edited) would load one of them silently;
    that raises RuntimeError instead, strict or not, before anything is loaded."""
    problems = []
    names_by_tensor: dict[int, list[str]] = {}
    dtypes: dict[int, torch.dtype] = {}
    for name, tensor in (*module.named_parameters(remove_duplicate=False),
                         *module.named_buffers(remove_duplicate=False)):
        names_by_tensor.setdefault(id(tensor), []).append(prefix + name)
        dtypes[id(tensor)] = tensor.dtype
    for identity, names in names_by_tensor.items():
        given = [name for name in names if name in state_dict]
        if not given:
            continue
        first = given[0]
        for other in given[1:]:
            if _different_values(state_dict[first], state_dict[other], dtypes[identity]):
                problems.append(f"{other} and {first}")
    if problems:
        raise RuntimeError(
            f"BlipForPreTraining.load_state_dict: {'; '.join(problems[:5])}"
            f"{f' (and {len(problems) - 5} more pairs)' if len(problems) > 5 else ''} are one "
            "tensor each in the model (modules the text encoder and decoder share) but differ "
            "in the state dict: give both names the same value. Nothing was loaded.")


def _different_values(a: Any, b: Any, dtype: torch.dtype) -> bool:
    """Whether two state-dict values under the names of one shared tensor would load
    differently: compared as values cast to the tensor's ``dtype``, NaN equal to NaN.
    Views of one storage are equal without reading them; values that cannot be compared
    here (not plain tensors, e.g. DTensors, whose comparison is a collective, or without
    data: meta tensors) count as equal."""
    plain = (torch.Tensor, nn.Parameter)
    if a is b or type(a) not in plain or type(b) not in plain or a.is_meta or b.is_meta:
        return False
    if a.shape != b.shape:
        return True
    if (a.dtype == b.dtype and a.device == b.device
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.stride() == b.stride()):
        return False
    a, b = a.to(dtype), b.to(device=a.device, dtype=dtype)
    if a.is_floating_point() or a.is_complex():
        return not torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)
    return not torch.equal(a, b)


def _sharded_by_fully_shard(model: nn.Module) -> bool:
    """Whether FSDP's ``fully_shard`` manages ``model`` or one of its modules (their
    parameters are gathered for each forward and dropped after it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without torch.distributed
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


def _salesforce_pretraining_names(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The Salesforce name of each key :meth:`BlipForPreTraining.from_salesforce` loads
    (for error messages): the two task conversions' names, and the momentum encoders'
    (``vision_model_momentum.*`` is ``visual_encoder_m.*``, and so on)."""
    from blipfast.models.blip.salesforce_checkpoint import _salesforce_names

    names = {**_salesforce_names(state, "captioning"), **_salesforce_names(state, "retrieval")}
    for online, momentum in _MOMENTUM_PAIRS:
        for key, name in list(names.items()):
            if key.startswith(online + "."):
                module, _, rest = name.partition(".")
                names[momentum + key[len(online):]] = f"{module}_m.{rest}"
    return names  # queue and temp entries keep blipfast's names (the queues are transposed)


def _blip_pretrain_negatives(image_feat: torch.Tensor, text_feat: torch.Tensor,
                             image_feat_momentum: torch.Tensor, text_feat_momentum: torch.Tensor,
                             logit_scale: torch.Tensor, image_ids: Optional[torch.Tensor],
                             generator: Optional[torch.Generator]
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM negatives as ``blip_pretrain.py`` draws them: (a text per image from the online
    image against the momentum texts, an image per text from the online text against the
    momentum images), each from its row's softmax + 1e-4 with positives at weight 0; -1
    where a row has no negative. In float32, outside autocast."""
    batch = image_feat.shape[0]
    if image_ids is None:
        positive = torch.eye(batch, dtype=torch.bool, device=image_feat.device)
    else:
        positive = image_ids[:, None] == image_ids[None, :]
    scale = logit_scale.detach().float()
    with torch.autocast(image_feat.device.type, enabled=False):
        image_to_text = scale * image_feat.detach().float() @ text_feat_momentum.float().T
        text_to_image = scale * text_feat.detach().float() @ image_feat_momentum.float().T
    return (_draw_with_weight_floor(image_to_text, positive, generator),
            _draw_with_weight_floor(text_to_image, positive, generator))


def _draw_with_weight_floor(logits: torch.Tensor, excluded: torch.Tensor,
                           generator: Optional[torch.Generator] = None,
                           floor: float = PRETRAIN_NEGATIVE_WEIGHT_FLOOR) -> torch.Tensor:
    """For each row of ``logits`` (R, K), one column drawn with probability proportional to
    ``softmax(logits[r])[k] + floor``, over the columns where ``excluded`` (bool, (R, K)) is
    False: ``blip_pretrain.py``'s ITM negative weights (the softmax includes the excluded
    columns, as BLIP's does before it zeroes them). Returns int64 (R,), -1 for a row with
    every column excluded (or a non-finite row).

    Inverse-CDF sampling on one uniform per row from ``generator`` (on its own device, so a
    CPU generator serves CUDA tensors; default: the global generator of the logits' device).
    """
    weights = torch.softmax(logits.float(), dim=1).add_(floor).masked_fill_(excluded, 0.0)
    cumulative = weights.cumsum(dim=1)
    total = cumulative[:, -1:]
    uniform_device = generator.device if generator is not None else logits.device
    uniform = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float32,
                         device=uniform_device).to(logits.device)
    # Strictly below the total, so the search lands on a column of positive weight even
    # when uniform * total rounds up to it.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    drawn = torch.searchsorted(cumulative, target, right=True).squeeze(1)
    has_negative = total.squeeze(1) > 0  # False for NaN
    return torch.where(has_negative, drawn.clamp(max=logits.shape[1] - 1), -1)


def _normalized_projection(projection: nn.Linear, states: torch.Tensor) -> torch.Tensor:
    """Unit-length contrastive features, in float32 (the loss accumulates in float32)."""
    return F.normalize(projection(states).float(), dim=-1)


def _share_all_but_self_attention(encoder: BlipTextModel, decoder: BlipTextLMHeadModel) -> None:
    """Make the decoder use the encoder's embeddings and, in every layer, every module but
    the self-attention (``attention``): BLIP's ``tie_encoder_decoder_weights`` with
    ``/attention`` skipped. The LM head keeps the matrix it was tied to, the decoder's own
    word embeddings before the swap, as in ``BLIP_Pretrain``."""
    decoder.bert.embeddings = encoder.embeddings
    for encoder_layer, decoder_layer in zip(encoder.encoder.layer, decoder.bert.encoder.layer):
        for name, module in encoder_layer.named_children():
            if name != "attention":
                setattr(decoder_layer, name, module)
