"""A straightforward PyTorch implementation of BLIP's pre-training step (salesforce BLIP
``blip_pretrain.py``), on transformers' eager BLIP modules, to check
:class:`blipfast.train.BlipForPreTraining` against.

Written the plain way on purpose: logits materialized, the queue kept as BLIP keeps it,
(dim, size), a Python loop over parameters for the momentum update and over rows for the
queue, negatives gathered row by row with their image states repeated, positive and
negative ITM pairs in separate passes, the LM loss from the logits. The ITM negatives are
inputs (the indices blipfast drew), so both implementations score the same pairs.

Parameter and module names equal blipfast's, so :func:`blipfast_state_dict` converts the
state dict (only the queue's layout differs).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import BlipConfig
from transformers.models.blip.modeling_blip import BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

MOMENTUM_PAIRS = (("vision_model", "vision_model_momentum"),
                  ("vision_proj", "vision_proj_momentum"),
                  ("text_encoder", "text_encoder_momentum"),
                  ("text_proj", "text_proj_momentum"))


class ReferencePreTraining(nn.Module):
    def __init__(self, config: BlipConfig, queue_size: int, momentum: float,
                 label_smoothing: float = 0.1, encoder_token_id: Optional[int] = None,
                 seed: int = 0, cross_attention_scale: float = 10.0):
        super().__init__()
        torch.manual_seed(seed)
        self.config, self.queue_size, self.momentum = config, queue_size, momentum
        self.label_smoothing, self.encoder_token_id = label_smoothing, encoder_token_id
        text = config.text_config
        self.vision_model = BlipVisionModel(config.vision_config)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(text)
        embed_dim = config.image_text_hidden_size
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, embed_dim)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim)
        self.itm_head = nn.Linear(text.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))
        with torch.no_grad():  # LayerNorms and biases away from 1 and 0 (a swap would show)
            for name, parameter in self.named_parameters():
                if "LayerNorm" in name or "layernorm" in name or "layer_norm" in name:
                    parameter.add_(0.1 * torch.randn_like(parameter))
                elif name.endswith("bias"):
                    parameter.normal_(0.0, 0.02)
                elif "crossattention" in name:
                    # With BERT's 0.02 init, scoring texts against the wrong images moved
                    # the ITM loss by 3e-6 relative, under the 1e-5 loss tolerance; with
                    # the cross-attention weights 10x larger, by 5e-4. That suits the
                    # tests' few-layer configs; through BLIP-base's twelve, each
                    # cross-attention LayerNorm divides the ITM and LM gradients by its
                    # large input, and below the top layer they fall to ~1e-13, too small
                    # to compare (there, scale 1).
                    parameter.mul_(cross_attention_scale)
        # BLIP's tie_encoder_decoder_weights(decoder.bert, encoder, '', '/attention'): the
        # decoder takes the encoder's modules; its LM head keeps the matrix it was tied to
        # (the decoder's own word embeddings before the swap), so the head is untied.
        head = self.text_decoder.cls.predictions.decoder.weight
        self.text_decoder.bert.embeddings = self.text_encoder.embeddings
        for encoder_layer, decoder_layer in zip(self.text_encoder.encoder.layer,
                                                self.text_decoder.bert.encoder.layer):
            decoder_layer.crossattention = encoder_layer.crossattention
            decoder_layer.intermediate = encoder_layer.intermediate
            decoder_layer.output = encoder_layer.output
        assert self.text_decoder.cls.predictions.decoder.weight is head
        assert head is not self.text_encoder.embeddings.word_embeddings.weight
        for online, momentum_name in MOMENTUM_PAIRS:
            setattr(self, momentum_name, copy.deepcopy(getattr(self, online)).requires_grad_(False))
        dim = config.image_text_hidden_size
        self.register_buffer("image_queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(dim, queue_size), dim=0))
        self.register_buffer("idx_queue", torch.full((1, queue_size), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def forward(self, image, input_ids, attention_mask, alpha, negative_text_index,
                negative_image_index, image_ids: Optional[torch.Tensor] = None):
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        image_embeds = self.vision_model(image).last_hidden_state
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
        image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
        text_output = self.text_encoder(input_ids, attention_mask=attention_mask)
        text_feat = F.normalize(self.text_proj(text_output.last_hidden_state[:, 0, :]), dim=-1)

        with torch.no_grad():
            self._momentum_update()
            image_embeds_m = self.vision_model_momentum(image).last_hidden_state
            image_feat_m = F.normalize(self.vision_proj_momentum(image_embeds_m[:, 0, :]), dim=-1)
            image_feat_all = torch.cat([image_feat_m.t(), self.image_queue.clone().detach()], dim=1)
            text_output_m = self.text_encoder_momentum(input_ids, attention_mask=attention_mask)
            text_feat_m = F.normalize(
                self.text_proj_momentum(text_output_m.last_hidden_state[:, 0, :]), dim=-1)
            text_feat_all = torch.cat([text_feat_m.t(), self.text_queue.clone().detach()], dim=1)
            sim_i2t_m = image_feat_m @ text_feat_all / self.temp
            sim_t2i_m = text_feat_m @ image_feat_all / self.temp
            if image_ids is None:
                sim_targets = torch.zeros(sim_i2t_m.size(), device=image.device)
                sim_targets.fill_diagonal_(1)
            else:
                idx_all = torch.cat([image_ids.view(1, -1), self.idx_queue.clone().detach()], dim=1)
                positives = torch.eq(image_ids.view(-1, 1), idx_all).float()
                sim_targets = positives / positives.sum(1, keepdim=True)
            sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
            sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
        sim_i2t = image_feat @ text_feat_all / self.temp
        sim_t2i = text_feat @ image_feat_all / self.temp
        loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
        loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
        loss_ita = (loss_i2t + loss_t2i) / 2
        self._dequeue_and_enqueue(image_feat_m, text_feat_m, image_ids)

        encoder_input_ids = input_ids.clone()
        if self.encoder_token_id is not None:
            encoder_input_ids[:, 0] = self.encoder_token_id
        output_pos = self.text_encoder(encoder_input_ids, attention_mask=attention_mask,
                                       encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=image_atts)
        bs = image.size(0)
        image_embeds_neg = torch.stack([image_embeds[int(j)] for j in negative_image_index])
        text_ids_neg = torch.stack([encoder_input_ids[int(j)] for j in negative_text_index])
        text_atts_neg = torch.stack([attention_mask[int(j)] for j in negative_text_index])
        text_ids_all = torch.cat([encoder_input_ids, text_ids_neg], dim=0)
        text_atts_all = torch.cat([attention_mask, text_atts_neg], dim=0)
        image_embeds_all = torch.cat([image_embeds_neg, image_embeds], dim=0)
        image_atts_all = torch.cat([image_atts, image_atts], dim=0)
        output_neg = self.text_encoder(text_ids_all, attention_mask=text_atts_all,
                                       encoder_hidden_states=image_embeds_all,
                                       encoder_attention_mask=image_atts_all)
        vl_embeddings = torch.cat([output_pos.last_hidden_state[:, 0, :],
                                   output_neg.last_hidden_state[:, 0, :]], dim=0)
        vl_output = self.itm_head(vl_embeddings)
        itm_labels = torch.cat([torch.ones(bs, dtype=torch.long),
                                torch.zeros(2 * bs, dtype=torch.long)]).to(image.device)
        loss_itm = F.cross_entropy(vl_output, itm_labels)

        decoder_input_ids = input_ids.clone()
        decoder_input_ids[:, 0] = self.config.text_config.bos_token_id
        decoder_targets = decoder_input_ids.masked_fill(
            decoder_input_ids == self.config.text_config.pad_token_id, -100)
        logits = self.text_decoder(decoder_input_ids, attention_mask=attention_mask,
                                   encoder_hidden_states=image_embeds,
                                   encoder_attention_mask=image_atts).logits
        loss_lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                  decoder_targets[:, 1:].reshape(-1),
                                  label_smoothing=self.label_smoothing)
        return loss_ita, loss_itm, loss_lm

    @torch.no_grad()
    def _momentum_update(self):
        for online, momentum_name in MOMENTUM_PAIRS:
            for param, param_m in zip(getattr(self, online).parameters(),
                                      getattr(self, momentum_name).parameters()):
                param_m.data = param_m.data * self.momentum + param.data * (1.0 - self.momentum)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat, text_feat, image_ids):
        if image_ids is None:
            image_ids = torch.full((image_feat.shape[0],), -1, dtype=torch.long,
                                   device=image_feat.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            image_feat, text_feat, image_ids = (_all_gather_uneven(t) for t in
                                                (image_feat, text_feat, image_ids))
        ptr = int(self.queue_ptr)
        for k in range(image_feat.shape[0]):
            self.image_queue[:, (ptr + k) % self.queue_size] = image_feat[k].float()
            self.text_queue[:, (ptr + k) % self.queue_size] = text_feat[k].float()
            self.idx_queue[0, (ptr + k) % self.queue_size] = image_ids[k]
        self.queue_ptr[0] = (ptr + image_feat.shape[0]) % self.queue_size


def _all_gather_uneven(tensor):
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, tensor.shape[0])
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    slots = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(slots, padded)
    return torch.cat([slot[:size] for slot, size in zip(slots, sizes)])


def blipfast_state_dict(reference: ReferencePreTraining) -> dict:
    """The reference's state as :class:`blipfast.train.BlipForPreTraining` names it."""
    state = {}
    for key, value in reference.state_dict().items():
        if key == "image_queue":
            state["queue.image_features"] = value.t().contiguous()
        elif key == "text_queue":
            state["queue.text_features"] = value.t().contiguous()
        elif key == "idx_queue":
            state["queue.image_ids"] = value.view(-1).clone()
        elif key == "queue_ptr":
            state["queue.pointer"] = value.view(()).clone()
        elif key == "temp":
            state["temp"] = value.view(1).clone()  # blipfast's is (1,), BLIP's ()
        else:
            state[key] = value
    return state
