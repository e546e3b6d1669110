"""BLIP task models, drop-in for transformers' classes of the same names: captioning
(:class:`BlipForConditionalGeneration`), image-text retrieval with ITM and ITC heads
(:class:`BlipForImageTextRetrieval`) and visual question answering
(:class:`BlipForQuestionAnswering`). Same submodule names, ``forward`` / ``generate``
arguments, output classes and fields, and generated token layout."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig, GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.blip.modeling_blip import (
    BlipForConditionalGenerationModelOutput,
    BlipImageTextMatchingModelOutput,
    BlipTextVisionModelOutput,
)

from blipfast.models.blip import layers
from blipfast.models.blip.pretrained import BlipPreTrainedModel
from blipfast.models.blip.text import BlipTextLMHeadModel, BlipTextModel, broadcast_index
from blipfast.models.blip.vision import BlipVisionModel
from blipfast.ops._checks import check_index_vector, check_values, value_range


# The decoder's LM head is tied to its word embeddings, seen from the task model.
_TIED_DECODER_WEIGHTS = {f"text_decoder.{tied}": f"text_decoder.{source}"
                         for tied, source in BlipTextLMHeadModel._tied_weights_keys.items()}


def _image_attention_mask(image_embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)


def _image_index(pixel_values: torch.Tensor, input_ids: Optional[torch.Tensor],
                 index_name: Optional[str] = None) -> Optional[torch.Tensor]:
    """The image each text row attends (:func:`~blipfast.models.blip.text.broadcast_index`
    for the task models' arguments): None for one image per text, zeros for one image and
    several texts; other batch pairs raise ``ValueError`` naming ``pixel_values`` and
    ``input_ids``."""
    if input_ids is None:
        return None
    return broadcast_index(pixel_values, input_ids.shape[0], "pixel_values", "input_ids",
                           index_name)


def _one_text_for_every_image(pixel_values: torch.Tensor, input_ids: Optional[torch.Tensor],
                              *per_text: Optional[torch.Tensor]) -> tuple[Any, ...]:
    """``(input_ids, *per_text)``, each of batch 1 expanded (a view) to the image batch
    when one text goes with several images (the same caption or question for every image:
    transformers broadcasts the text there); otherwise as given."""
    tensors = (input_ids, *per_text)
    if input_ids is None or input_ids.shape[0] != 1 or pixel_values.shape[0] <= 1:
        return tensors
    batch = pixel_values.shape[0]
    return tuple(tensor.expand(batch, *tensor.shape[1:])
                 if tensor is not None and tensor.dim() > 0 and tensor.shape[0] == 1 else tensor
                 for tensor in tensors)


class BlipForConditionalGeneration(BlipPreTrainedModel, GenerationMixin):
    """Image captioning: ViT + image-grounded text decoder.

    ``forward(pixel_values, input_ids, attention_mask, labels)`` returns ``loss`` (with the
    text config's label smoothing) and ``logits``; ``generate(pixel_values, input_ids=None)``
    returns token ids starting with the BOS token, as transformers does.
    """

    salesforce_task = "captioning"
    main_input_name = "pixel_values"
    _tied_weights_keys = _TIED_DECODER_WEIGHTS

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_decoder = BlipTextLMHeadModel(config.text_config)
        self.decoder_input_ids = config.text_config.bos_token_id
        self.decoder_pad_token_id = config.text_config.pad_token_id
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The text decoder's word embedding table."""
        return self.text_decoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the text decoder's word embedding table with ``value``."""
        self.text_decoder.set_input_embeddings(value)

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.LongTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        interpolate_pos_encoding: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> BlipForConditionalGenerationModelOutput:
        """``pixel_values`` (B, 3, H, W), caption ``input_ids`` / ``attention_mask`` (B, L) and
        optional ``labels`` -> ``BlipForConditionalGenerationModelOutput``: ``loss`` (next-token,
        label-smoothed, mean), ``logits`` (B, L, vocab), ``image_embeds`` = ``last_hidden_state``
        (ViT output), ViT ``hidden_states``. Names mirror transformers' class of the same name.
        One image (B = 1) goes with every caption, as in transformers, and one caption (with
        its mask and labels) with every image. ``kwargs`` go to the
        vision model and the text decoder, as there (``num_items_in_batch`` and ``use_cache``
        are accepted and ignored: no cache is returned). ``logits_to_keep`` as
        :meth:`BlipTextLMHeadModel.forward` (0: logits at every position).
        ``interpolate_pos_encoding``: passed to the vision model (resize its position
        embeddings to images of another size than the config's, see
        :meth:`BlipVisionModel.forward`)."""
        input_ids, attention_mask, labels = _one_text_for_every_image(
            pixel_values, input_ids, attention_mask, labels)
        image_index = _image_index(pixel_values, input_ids)
        kwargs.pop("use_cache", None)
        vision_outputs = self.vision_model(pixel_values=pixel_values,
                                           interpolate_pos_encoding=interpolate_pos_encoding,
                                           return_dict=True, **kwargs)
        image_embeds = vision_outputs.last_hidden_state
        outputs = self.text_decoder(input_ids=input_ids, attention_mask=attention_mask,
                                    encoder_hidden_states=image_embeds, labels=labels,
                                    reduction="mean", logits_to_keep=logits_to_keep,
                                    encoder_batch_index=image_index, use_cache=False,
                                    return_dict=True, **kwargs)
        output = BlipForConditionalGenerationModelOutput(
            loss=outputs.loss, logits=outputs.logits, image_embeds=image_embeds,
            last_hidden_state=vision_outputs.last_hidden_state,
            hidden_states=vision_outputs.hidden_states)
        return layers.model_output(output, return_dict, self.config)

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: Optional[Union[torch.LongTensor, list[list[int]]]] = None,
        attention_mask: Optional[torch.LongTensor] = None,
        interpolate_pos_encoding: bool = False,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        """Captions for ``pixel_values`` (B, 3, H, W), optionally continuing the prompt
        ``input_ids`` (a tensor or token lists, whose last token, the tokenizer's [SEP], is
        dropped; its first is set to BOS). ``generate_kwargs`` go to transformers'
        ``generate`` (``max_length``, ``num_beams``, ``do_sample``, ...). Ends at the [SEP]
        token, pads with [PAD]. One image goes with every prompt, as in transformers, and
        one prompt with every image.
        ``attention_mask``: the prompt's (B, L) mask (its last column dropped with the [SEP]).
        ``interpolate_pos_encoding``: passed to the vision model (resize its position
        embeddings to images of another size than the config's, see
        :meth:`BlipVisionModel.forward`). Raises ValueError if the text config has no
        ``bos_token_id`` (a caption's first token), or for an empty image batch."""
        _require_token_id(self.config.text_config.bos_token_id, "bos_token_id",
                          "BlipForConditionalGeneration.generate")
        _require_images(pixel_values, "BlipForConditionalGeneration.generate")
        batch = pixel_values.shape[0]
        image_embeds = self.vision_model(pixel_values=pixel_values,
                                         interpolate_pos_encoding=interpolate_pos_encoding)[0]
        text_config = self.config.text_config
        if input_ids is None:
            prompt = torch.LongTensor([[self.decoder_input_ids, text_config.eos_token_id]]) \
                .repeat(batch, 1).to(image_embeds.device)
        elif isinstance(input_ids, list):  # token lists, as transformers takes (there they
            # stay on the CPU, which fails beside images on a GPU)
            prompt = torch.tensor(input_ids, dtype=torch.long, device=image_embeds.device)
        else:
            prompt = input_ids.clone()
        prompt[:, 0] = text_config.bos_token_id
        prompt, attention_mask = _one_text_for_every_image(pixel_values, prompt, attention_mask)
        prompt = prompt.contiguous()  # generate extends it
        _image_index(pixel_values, prompt)  # raises for batches that do not go together
        prompt_mask = attention_mask[:, :-1].contiguous() if attention_mask is not None else None
        if prompt_mask is None and text_config.bos_token_id == text_config.pad_token_id:
            # transformers' generate would infer the mask from the padding id and mask BOS
            prompt_mask = prompt[:, :-1] != text_config.pad_token_id
            prompt_mask[:, 0] = True
        return self.text_decoder.generate(
            input_ids=prompt[:, :-1], eos_token_id=text_config.sep_token_id,
            pad_token_id=text_config.pad_token_id, attention_mask=prompt_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=_image_attention_mask(image_embeds), **generate_kwargs)


class BlipForImageTextRetrieval(BlipPreTrainedModel):
    """Image-text matching (``use_itm_head=True``: ``itm_score`` (B, 2) logits from the
    image-grounded text encoder) and contrastive similarity (``use_itm_head=False``:
    ``itm_score`` = (B_image, B_text) cosine similarities of the projected features).

    ``config``: a :class:`BlipConfig` (its ``vision_config`` and ``text_config`` build the
    ViT and the text encoder; ``image_text_hidden_size`` sizes the projections)."""

    salesforce_task = "retrieval"
    main_input_name = "input_ids"  # as transformers' (Trainer counts its tokens)

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.image_text_hidden_size)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.image_text_hidden_size)
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)
        self.decoder_pad_token_id = getattr(config, "decoder_pad_token_id",
                                            config.text_config.pad_token_id)
        self.decoder_start_token_id = getattr(config, "decoder_start_token_id",
                                              config.text_config.bos_token_id)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The text encoder's word embedding table."""
        return self.text_encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the text encoder's word embedding table with ``value``."""
        self.text_encoder.set_input_embeddings(value)

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor,
        use_itm_head: Optional[bool] = True,
        attention_mask: Optional[torch.LongTensor] = None,
        interpolate_pos_encoding: bool = False,
        return_dict: Optional[bool] = None,
        image_index: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> BlipImageTextMatchingModelOutput:
        """As transformers' ``BlipForImageTextRetrieval.forward``, plus ``image_index``
        (blipfast extension): (B_text,) integer, text b is matched against image
        ``image_index[b]``, so several texts are scored against one image without
        repeating its keys and values. It applies to the ITM head only: with
        ``use_itm_head=False`` every text is scored against every image, and passing
        ``image_index`` raises ``ValueError``. Without ``image_index``, the ITM head scores
        one image (B_image = 1) against every text, and one text against every image, as
        transformers does. ``interpolate_pos_encoding``: passed to the vision
        model (resize its position embeddings to images of another size than the
        config's, see :meth:`BlipVisionModel.forward`). ``labels`` and ``return_loss``,
        which ``transformers.Trainer`` passes from a dataset with a labels column, are
        accepted and ignored, as transformers' model ignores them: it returns no loss."""
        if image_index is not None and not use_itm_head:
            raise ValueError("image_index picks the image each text is matched against by the "
                             "ITM head; with use_itm_head=False every text is scored against "
                             "every image: drop image_index")
        if image_index is not None:  # before the ViT runs, naming this argument
            check_index_vector("BlipForImageTextRetrieval", "image_index", image_index,
                               input_ids.shape[0], pixel_values.device, "pixel_values is",
                               shape_name="(B_text,) = ")
            images = pixel_values.shape[0]
            check_values(image_index, lambda index: (index >= 0) & (index < images),
                         lambda: f"BlipForImageTextRetrieval: image_index values must lie "
                                 f"in [0, {images}) (the batch of pixel_values)",
                         found=value_range)
        # One text against several images (re-ranking a query's candidate images) needs no
        # index: the text model broadcasts the text, as transformers does.
        if use_itm_head and image_index is None and input_ids is not None \
                and input_ids.shape[0] != 1:
            image_index = _image_index(pixel_values, input_ids, "image_index")
        vision_outputs = self.vision_model(pixel_values=pixel_values,
                                           interpolate_pos_encoding=interpolate_pos_encoding,
                                           return_dict=True, **kwargs)
        image_embeds = vision_outputs.last_hidden_state
        if use_itm_head:
            question_embeds = self.text_encoder(
                input_ids=input_ids, attention_mask=attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=_image_attention_mask(image_embeds),
                encoder_batch_index=image_index, return_dict=True, **kwargs).last_hidden_state
            output = self.itm_head(question_embeds[:, 0, :])
        else:
            question_embeds = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                                return_dict=True, **kwargs).last_hidden_state
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
            text_feat = F.normalize(self.text_proj(question_embeds[:, 0, :]), dim=-1)
            output = image_feat @ text_feat.t()
        result = BlipImageTextMatchingModelOutput(
            itm_score=output, last_hidden_state=vision_outputs.last_hidden_state,
            hidden_states=vision_outputs.hidden_states, question_embeds=question_embeds)
        return layers.model_output(result, return_dict, self.config)


class BlipForQuestionAnswering(BlipPreTrainedModel, GenerationMixin):
    """VQA: ViT, image-grounded question encoder, answer decoder (cross-attending the
    question states). ``forward`` with ``labels`` returns the answer loss; ``generate``
    returns answer token ids starting with BOS.

    ``config``: a :class:`BlipConfig` (its ``vision_config`` builds the ViT, its
    ``text_config`` the question encoder and the answer decoder)."""

    salesforce_task = "vqa"
    main_input_name = "input_ids"  # as transformers'
    _tied_weights_keys = _TIED_DECODER_WEIGHTS

    def __init__(self, config: BlipConfig) -> None:
        super().__init__(config)
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(config.text_config, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(config.text_config)
        self.decoder_pad_token_id = config.text_config.pad_token_id
        self.decoder_start_token_id = config.text_config.bos_token_id
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        """The question encoder's word embedding table (the answer decoder has its own)."""
        return self.text_encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        """Replace the question encoder's word embedding table with ``value``."""
        self.text_encoder.set_input_embeddings(value)

    def _encode_question(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], interpolate_pos_encoding: bool,
                         **kwargs: Any) -> tuple[BaseModelOutputWithPooling, torch.Tensor]:
        """(ViT outputs, question states (B, L, hidden)) for the questions ``input_ids``
        about ``pixel_values`` (one image per question, or one for all, or one question for
        all images, already expanded by the caller); ``kwargs`` go to
        both models, as in transformers."""
        image_index = _image_index(pixel_values, input_ids)
        vision_outputs = self.vision_model(pixel_values=pixel_values,
                                           interpolate_pos_encoding=interpolate_pos_encoding,
                                           return_dict=True, **kwargs)
        image_embeds = vision_outputs.last_hidden_state
        question_embeds = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=_image_attention_mask(image_embeds),
            encoder_batch_index=image_index, return_dict=True, **kwargs).last_hidden_state
        return vision_outputs, question_embeds

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor,
        decoder_input_ids: Optional[torch.LongTensor] = None,
        decoder_attention_mask: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.LongTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        interpolate_pos_encoding: bool = False,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> BlipTextVisionModelOutput:
        """As transformers': ``labels`` (answer ids, already starting with BOS) give the
        loss; otherwise ``decoder_input_ids`` is required. One image (B = 1) goes with every
        question, and one question (with its mask, and answers of batch 1) with every
        image, as in transformers. ``kwargs`` go to the vision model, the question encoder
        and the answer decoder, as there (``output_hidden_states=True``: the ViT's in ``hidden_states``;
        ``num_items_in_batch`` and ``use_cache`` are accepted and ignored).
        ``interpolate_pos_encoding``: passed to the vision model (resize its position
        embeddings to images of another size than the config's, see
        :meth:`BlipVisionModel.forward`)."""
        if labels is None and decoder_input_ids is None:
            raise ValueError("BlipForQuestionAnswering.forward needs labels (training) or "
                             "decoder_input_ids (inference; or call generate)")
        kwargs.pop("use_cache", None)
        input_ids, attention_mask, labels, decoder_input_ids, decoder_attention_mask = \
            _one_text_for_every_image(pixel_values, input_ids, attention_mask, labels,
                                      decoder_input_ids, decoder_attention_mask)
        vision_outputs, question_embeds = self._encode_question(
            input_ids, pixel_values, attention_mask, interpolate_pos_encoding, **kwargs)
        if labels is not None and decoder_input_ids is None:
            decoder_input_ids = labels
        answer_output = self.text_decoder(
            input_ids=decoder_input_ids, attention_mask=decoder_attention_mask,
            encoder_hidden_states=question_embeds, encoder_attention_mask=attention_mask,
            labels=labels, reduction="mean", use_cache=False, return_dict=True, **kwargs)
        loss = answer_output.loss.mean() if labels is not None else None
        output = BlipTextVisionModelOutput(loss=loss, image_embeds=vision_outputs.last_hidden_state,
                                           last_hidden_state=vision_outputs.last_hidden_state,
                                           hidden_states=vision_outputs.hidden_states)
        return layers.model_output(output, return_dict, self.config)

    @torch.no_grad()
    def generate(
        self,
        input_ids: Union[torch.LongTensor, list[list[int]]],
        pixel_values: torch.Tensor,
        attention_mask: Optional[torch.LongTensor] = None,
        interpolate_pos_encoding: bool = False,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        """Answers to the questions ``input_ids`` (a tensor or token lists) about
        ``pixel_values``; ``generate_kwargs`` go to transformers' ``generate``. One image goes
        with every question, and one question with every image. The answer
        decoder attends every question token, padding included, as transformers' and
        Salesforce BLIP's ``generate`` do (``forward`` applies ``attention_mask`` there, as
        Salesforce BLIP's training does). ``interpolate_pos_encoding``: passed to the vision
        model (resize its position embeddings to images of another size than the
        config's, see :meth:`BlipVisionModel.forward`). Raises ValueError if there is no
        decoder start token (the text config's ``bos_token_id``), or for an empty image
        batch."""
        _require_token_id(self.decoder_start_token_id, "bos_token_id",
                          "BlipForQuestionAnswering.generate")
        _require_images(pixel_values, "BlipForQuestionAnswering.generate")
        questions = (torch.tensor(input_ids, dtype=torch.long, device=pixel_values.device)
                     if isinstance(input_ids, list) else input_ids)
        questions, attention_mask = _one_text_for_every_image(pixel_values, questions,
                                                              attention_mask)
        _, question_embeds = self._encode_question(questions, pixel_values, attention_mask,
                                                   interpolate_pos_encoding)
        bos_ids = torch.full((question_embeds.shape[0], 1), self.decoder_start_token_id,
                             device=question_embeds.device)
        # Given, not inferred from the padding id by transformers, which would mask BOS
        # where it is also the padding id.
        return self.text_decoder.generate(
            input_ids=bos_ids, attention_mask=torch.ones_like(bos_ids),
            eos_token_id=self.config.text_config.sep_token_id,
            pad_token_id=self.config.text_config.pad_token_id,
            encoder_hidden_states=question_embeds,
            encoder_attention_mask=_image_attention_mask(question_embeds), **generate_kwargs)


def _require_token_id(token_id: Optional[int], name: str, caller: str) -> None:
    """Raise a ValueError naming ``config.text_config.<name>`` when it is None (e.g. a
    config inferred from a checkpoint whose vocabulary lacks transformers' default id)."""
    if token_id is None:
        raise ValueError(f"{caller}: config.text_config.{name} is None; set it to the token "
                         "id generation starts with (BLIP's tokenizer: [DEC], 30522)")


def _require_images(pixel_values: torch.Tensor, caller: str) -> None:
    """Raise a ValueError for an empty image batch, on which transformers' generation
    fails deep inside (a reduction over zero rows)."""
    if isinstance(pixel_values, torch.Tensor) and pixel_values.dim() > 0 \
            and pixel_values.shape[0] == 0:
        raise ValueError(f"{caller}: pixel_values has batch 0: there is nothing to generate "
                         "(skip the call for an empty batch)")
