"""Tests for blipfast.models.blip.salesforce_checkpoint (Salesforce <-> transformers BLIP).

Besides round trips (which cannot catch a mapping that is wrong the same way in both
directions), the weights of a Salesforce-layout checkpoint are generated here from key
names and shapes written down from Salesforce's code (``vit.py``, ``med.py``,
``blip.py``, ``blip_retrieval.py``, ``blip_vqa.py``), independently of the converter, and
a small functional forward pass that reads those Salesforce names directly is compared
with transformers' model loaded from the converted state dict.
"""

from __future__ import annotations

import logging
import math
import re

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)

import blipfast.models
from blipfast.models.blip.salesforce_checkpoint import (
    config_from_salesforce,
    salesforce_dropped_keys,
    salesforce_to_transformers,
    transformers_to_salesforce,
)

MODEL_CLASSES = {
    "captioning": BlipForConditionalGeneration,
    "retrieval": BlipForImageTextRetrieval,
    "vqa": BlipForQuestionAnswering,
}

# Tiny sizes. The vision and text widths differ on purpose, so that a cross-attention
# key/value projection (text_hidden x vision_hidden) cannot be confused with a square one.
TINY = dict(
    vision_hidden=48,
    vision_layers=2,
    vision_heads=4,
    vision_mlp=4 * 48,  # Salesforce's ViT uses mlp_ratio=4
    image_size=32,
    patch_size=8,
    text_hidden=32,
    text_layers=2,
    text_heads=4,
    text_intermediate=80,
    vocab=99,
    max_positions=40,
    embed_dim=16,
)
# transformers' BlipForQuestionAnswering has one text config whose encoder_hidden_size is
# the vision width for both text models, while Salesforce's VQA decoder cross-attends to
# the question states (med_config's encoder_width, the text width): the two agree only
# when the vision and text widths are equal (768 for ViT-B + BERT-base).
TINY_VQA = dict(TINY, vision_hidden=32, vision_mlp=4 * 32)


def dims(task: str) -> dict:
    return TINY_VQA if task == "vqa" else TINY


def tiny_transformers_config(task: str) -> BlipConfig:
    """The tiny config written out by hand (not inferred by the code under test)."""
    t = dims(task)
    return BlipConfig(
        vision_config=dict(
            hidden_size=t["vision_hidden"],
            intermediate_size=t["vision_mlp"],
            num_hidden_layers=t["vision_layers"],
            num_attention_heads=t["vision_heads"],
            image_size=t["image_size"],
            patch_size=t["patch_size"],
            layer_norm_eps=1e-6,
        ),
        text_config=dict(
            vocab_size=t["vocab"],
            hidden_size=t["text_hidden"],
            intermediate_size=t["text_intermediate"],
            num_hidden_layers=t["text_layers"],
            num_attention_heads=t["text_heads"],
            max_position_embeddings=t["max_positions"],
            layer_norm_eps=1e-12,
            bos_token_id=None,
            eos_token_id=None,
            sep_token_id=None,
            pad_token_id=0,
        ),
        image_text_hidden_size=t["embed_dim"],
    )


# ---------------------------------------------------------------------------------------
# Salesforce key names and shapes, written from Salesforce's modules.
# ---------------------------------------------------------------------------------------


def salesforce_vit_spec(D: int, depth: int, image: int, patch: int, mlp: int) -> dict[str, tuple[int, ...]]:
    """``visual_encoder`` = vit.VisionTransformer (timm PatchEmbed, Block, qkv_bias=True)."""
    p = "visual_encoder."
    n = (image // patch) ** 2
    spec = {
        p + "cls_token": (1, 1, D),
        p + "pos_embed": (1, n + 1, D),
        p + "patch_embed.proj.weight": (D, 3, patch, patch),
        p + "patch_embed.proj.bias": (D,),
    }
    for i in range(depth):
        b = f"{p}blocks.{i}."
        spec.update({
            b + "norm1.weight": (D,), b + "norm1.bias": (D,),
            b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
            b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
            b + "norm2.weight": (D,), b + "norm2.bias": (D,),
            b + "mlp.fc1.weight": (mlp, D), b + "mlp.fc1.bias": (mlp,),
            b + "mlp.fc2.weight": (D, mlp), b + "mlp.fc2.bias": (D,),
        })
    spec[p + "norm.weight"] = (D,)
    spec[p + "norm.bias"] = (D,)
    return spec


def salesforce_bert_spec(prefix: str, H: int, layers: int, inter: int, vocab: int, positions: int,
                         encoder_width: int) -> dict[str, tuple[int, ...]]:
    """med.BertModel(add_pooling_layer=False) with add_cross_attention=True."""
    spec = {
        prefix + "embeddings.position_ids": (1, positions),
        prefix + "embeddings.word_embeddings.weight": (vocab, H),
        prefix + "embeddings.position_embeddings.weight": (positions, H),
        prefix + "embeddings.LayerNorm.weight": (H,),
        prefix + "embeddings.LayerNorm.bias": (H,),
    }
    for i in range(layers):
        b = f"{prefix}encoder.layer.{i}."
        for att, kv_in in (("attention.", H), ("crossattention.", encoder_width)):
            spec.update({
                b + att + "self.query.weight": (H, H), b + att + "self.query.bias": (H,),
                b + att + "self.key.weight": (H, kv_in), b + att + "self.key.bias": (H,),
                b + att + "self.value.weight": (H, kv_in), b + att + "self.value.bias": (H,),
                b + att + "output.dense.weight": (H, H), b + att + "output.dense.bias": (H,),
                b + att + "output.LayerNorm.weight": (H,), b + att + "output.LayerNorm.bias": (H,),
            })
        spec.update({
            b + "intermediate.dense.weight": (inter, H), b + "intermediate.dense.bias": (inter,),
            b + "output.dense.weight": (H, inter), b + "output.dense.bias": (H,),
            b + "output.LayerNorm.weight": (H,), b + "output.LayerNorm.bias": (H,),
        })
    return spec


def salesforce_lm_head_spec(H: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """med.BertLMHeadModel.cls = BertOnlyMLMHead; decoder.bias is predictions.bias and
    decoder.weight is tied to the word embeddings (both listed in the state dict)."""
    p = "text_decoder.cls.predictions."
    return {
        p + "bias": (vocab,),
        p + "transform.dense.weight": (H, H), p + "transform.dense.bias": (H,),
        p + "transform.LayerNorm.weight": (H,), p + "transform.LayerNorm.bias": (H,),
        p + "decoder.weight": (vocab, H),
        p + "decoder.bias": (vocab,),
    }


def salesforce_spec(task: str, *, vision_hidden, vision_layers, vision_mlp, image_size, patch_size,
                    text_hidden, text_layers, text_intermediate, vocab, max_positions, embed_dim,
                    **_) -> dict[str, tuple[int, ...]]:
    spec = salesforce_vit_spec(vision_hidden, vision_layers, image_size, patch_size, vision_mlp)
    bert = dict(H=text_hidden, layers=text_layers, inter=text_intermediate, vocab=vocab,
                positions=max_positions, encoder_width=vision_hidden)
    if task in ("retrieval", "vqa"):  # BLIP_Retrieval / BLIP_ITM / BLIP_VQA: self.text_encoder
        spec.update(salesforce_bert_spec("text_encoder.", **bert))
    if task == "captioning":  # BLIP_Decoder: self.text_decoder cross-attends to the image
        spec.update(salesforce_bert_spec("text_decoder.bert.", **bert))
        spec.update(salesforce_lm_head_spec(text_hidden, vocab))
    if task == "vqa":  # BLIP_VQA: self.text_decoder cross-attends to the question states
        spec.update(salesforce_bert_spec("text_decoder.bert.", **dict(bert, encoder_width=text_hidden)))
        spec.update(salesforce_lm_head_spec(text_hidden, vocab))
    if task == "retrieval":
        spec.update({
            "vision_proj.weight": (embed_dim, vision_hidden), "vision_proj.bias": (embed_dim,),
            "text_proj.weight": (embed_dim, text_hidden), "text_proj.bias": (embed_dim,),
            "itm_head.weight": (2, text_hidden), "itm_head.bias": (2,),
        })
    return spec


def make_weights(spec: dict[str, tuple[int, ...]], seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random fp32 weights for a Salesforce spec, with BLIP's tied tensors shared."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in spec.items():
        if device == "meta":
            sd[key] = torch.empty(shape, device="meta", dtype=torch.long if key.endswith("position_ids") else None)
            continue
        if key.endswith("position_ids"):
            sd[key] = torch.arange(shape[1]).expand(1, -1).clone()
        elif len(shape) == 1 and ("norm" in key.lower()) and key.endswith("weight"):
            sd[key] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            sd[key] = 0.2 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            scale = 0.5 if len(shape) == 3 or "embeddings" in key else 1.5 / math.sqrt(fan_in)
            sd[key] = scale * torch.randn(shape, generator=g)
    if "text_decoder.cls.predictions.decoder.weight" in sd:
        sd["text_decoder.cls.predictions.decoder.weight"] = sd["text_decoder.bert.embeddings.word_embeddings.weight"]
        sd["text_decoder.cls.predictions.decoder.bias"] = sd["text_decoder.cls.predictions.bias"]
    return sd


# ---------------------------------------------------------------------------------------
# Independent functional forward passes in Salesforce's naming.
# ---------------------------------------------------------------------------------------


def sf_vit_forward(sd, image, heads: int, patch: int) -> torch.Tensor:
    """vit.VisionTransformer.forward: patch embed, cls token, pos embed, pre-norm blocks, norm."""
    p = "visual_encoder."
    eps = 1e-6
    x = F.conv2d(image, sd[p + "patch_embed.proj.weight"], sd[p + "patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    B, _, C = x.shape
    x = torch.cat([sd[p + "cls_token"].expand(B, -1, -1), x], dim=1)
    x = x + sd[p + "pos_embed"][:, : x.size(1)]
    N = x.size(1)
    for i in range(sum(1 for k in sd if k.startswith(p + "blocks.") and k.endswith(".norm1.weight"))):
        b = f"{p}blocks.{i}."
        h = F.layer_norm(x, (C,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], eps)
        qkv = F.linear(h, sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(B, N, C)
        x = x + F.linear(o, sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        h = F.layer_norm(x, (C,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], eps)
        h = F.gelu(F.linear(h, sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        x = x + F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
    return F.layer_norm(x, (C,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps)


def _ln(sd, key, x):
    return F.layer_norm(x, (x.shape[-1],), sd[key + ".weight"], sd[key + ".bias"], 1e-12)


def _lin(sd, key, x):
    return F.linear(x, sd[key + ".weight"], sd[key + ".bias"])


def sf_bert_attention(sd, p, hidden, kv_states, heads, additive_mask):
    """med.BertAttention: BertSelfAttention + BertSelfOutput (post-norm residual)."""
    B, L, H = hidden.shape
    d = H // heads

    def split(t):
        return t.view(t.shape[0], t.shape[1], heads, d).permute(0, 2, 1, 3)

    q = split(_lin(sd, p + "self.query", hidden))
    k = split(_lin(sd, p + "self.key", kv_states))
    v = split(_lin(sd, p + "self.value", kv_states))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if additive_mask is not None:
        scores = scores + additive_mask
    ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(B, L, H)
    return _ln(sd, p + "output.LayerNorm", _lin(sd, p + "output.dense", ctx) + hidden)


def sf_bert_forward(sd, prefix, input_ids, heads, encoder_states=None, encoder_mask=None, causal=False):
    """med.BertModel.forward (mode='multimodal' when encoder_states is given, else 'text')."""
    L = input_ids.shape[1]
    pos = sd[prefix + "embeddings.position_ids"][:, :L]
    x = F.embedding(input_ids, sd[prefix + "embeddings.word_embeddings.weight"])
    x = x + F.embedding(pos, sd[prefix + "embeddings.position_embeddings.weight"])
    x = _ln(sd, prefix + "embeddings.LayerNorm", x)
    self_mask = None
    if causal:  # get_extended_attention_mask with is_decoder=True and an all-ones padding mask
        allowed = torch.ones(L, L).tril()
        self_mask = ((1.0 - allowed) * -10000.0)[None, None]
    cross_mask = None
    if encoder_mask is not None:
        cross_mask = ((1.0 - encoder_mask.float()) * -10000.0)[:, None, None, :]
    n_layers = sum(1 for k in sd
                   if k.startswith(prefix + "encoder.layer.") and k.endswith(".intermediate.dense.weight"))
    for i in range(n_layers):
        b = f"{prefix}encoder.layer.{i}."
        x = sf_bert_attention(sd, b + "attention.", x, x, heads, self_mask)
        if encoder_states is not None:
            x = sf_bert_attention(sd, b + "crossattention.", x, encoder_states, heads, cross_mask)
        h = F.gelu(_lin(sd, b + "intermediate.dense", x))
        x = _ln(sd, b + "output.LayerNorm", _lin(sd, b + "output.dense", h) + x)
    return x


def sf_lm_head(sd, hidden):
    """med.BertLMPredictionHead: transform (dense, gelu, LayerNorm) then decoder."""
    p = "text_decoder.cls.predictions."
    h = _ln(sd, p + "transform.LayerNorm", F.gelu(_lin(sd, p + "transform.dense", hidden)))
    return F.linear(h, sd[p + "decoder.weight"], sd[p + "decoder.bias"])


def load_transformers(task: str, sf_sd) -> torch.nn.Module:
    model = MODEL_CLASSES[task](tiny_transformers_config(task)).eval()
    model.load_state_dict(salesforce_to_transformers(sf_sd, task), strict=True)
    return model


def _max_err(a, b):
    return (a - b).abs().max().item()


TOL = 1e-5


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], generator=g)
    ids = torch.randint(1, TINY["vocab"], (2, 7), generator=g)
    answer_ids = torch.randint(1, TINY["vocab"], (2, 5), generator=g)
    return image, ids, answer_ids


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(MODEL_CLASSES))
def test_transformers_round_trip_is_exact(task):
    torch.manual_seed(0)
    model = MODEL_CLASSES[task](tiny_transformers_config(task))
    hf = model.state_dict()
    sf = transformers_to_salesforce(hf, task)
    # the Salesforce side has exactly the keys written down from Salesforce's code
    spec = salesforce_spec(task, **dims(task))
    assert set(sf) == set(spec)
    for key, shape in spec.items():
        assert tuple(sf[key].shape) == shape, key
    back = salesforce_to_transformers(sf, task)
    assert set(back) == set(hf)
    for key in hf:
        assert back[key].dtype == hf[key].dtype
        assert torch.equal(back[key], hf[key]), key


@pytest.mark.parametrize("task", list(MODEL_CLASSES))
def test_salesforce_round_trip_is_exact(task):
    sf = make_weights(salesforce_spec(task, **dims(task)))
    back = transformers_to_salesforce(salesforce_to_transformers(sf, task), task)
    assert set(back) == set(sf)
    for key in sf:
        assert torch.equal(back[key], sf[key]), key


# ---------------------------------------------------------------------------------------
# Non-circular: Salesforce-named weights -> functional forward vs transformers model
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def test_captioning_matches_salesforce_forward(inputs):
    image, ids, _ = inputs
    sf = make_weights(salesforce_spec("captioning", **TINY), seed=11)
    model = load_transformers("captioning", sf)
    ref_img = sf_vit_forward(sf, image, TINY["vision_heads"], TINY["patch_size"])
    out = model(pixel_values=image, input_ids=ids)
    assert _max_err(out.image_embeds, ref_img) < TOL
    ref_h = sf_bert_forward(sf, "text_decoder.bert.", ids, TINY["text_heads"],
                            encoder_states=ref_img, encoder_mask=torch.ones(ref_img.shape[:2]), causal=True)
    ref_logits = sf_lm_head(sf, ref_h)
    assert ref_logits.abs().max() > 1.0  # outputs are not trivially small
    assert _max_err(out.logits, ref_logits) < TOL


@torch.no_grad()
def test_retrieval_matches_salesforce_forward(inputs):
    image, ids, _ = inputs
    sf = make_weights(salesforce_spec("retrieval", **TINY), seed=12)
    model = load_transformers("retrieval", sf)
    ref_img = sf_vit_forward(sf, image, TINY["vision_heads"], TINY["patch_size"])
    assert _max_err(model.vision_model(pixel_values=image).last_hidden_state, ref_img) < TOL

    # ITM: text encoder with cross-attention to the image, itm_head on [CLS]
    ref_mm = sf_bert_forward(sf, "text_encoder.", ids, TINY["text_heads"],
                             encoder_states=ref_img, encoder_mask=torch.ones(ref_img.shape[:2]))
    hf_mm = model.text_encoder(input_ids=ids, encoder_hidden_states=ref_img,
                               encoder_attention_mask=torch.ones(ref_img.shape[:2], dtype=torch.long))
    assert _max_err(hf_mm.last_hidden_state, ref_mm) < TOL
    ref_itm = _lin(sf, "itm_head", ref_mm[:, 0])
    out = model(input_ids=ids, pixel_values=image, use_itm_head=True)
    assert _max_err(out.itm_score, ref_itm) < TOL

    # ITC: unimodal text encoder (mode='text'), projections, cosine similarity
    ref_txt = sf_bert_forward(sf, "text_encoder.", ids, TINY["text_heads"])
    img_feat = F.normalize(_lin(sf, "vision_proj", ref_img[:, 0]), dim=-1)
    txt_feat = F.normalize(_lin(sf, "text_proj", ref_txt[:, 0]), dim=-1)
    out = model(input_ids=ids, pixel_values=image, use_itm_head=False)
    assert _max_err(out.itm_score, img_feat @ txt_feat.t()) < TOL


@torch.no_grad()
def test_vqa_matches_salesforce_forward(inputs):
    image, ids, answer_ids = inputs
    sf = make_weights(salesforce_spec("vqa", **TINY_VQA), seed=13)
    model = load_transformers("vqa", sf)
    ref_img = sf_vit_forward(sf, image, TINY_VQA["vision_heads"], TINY_VQA["patch_size"])
    assert _max_err(model.vision_model(pixel_values=image).last_hidden_state, ref_img) < TOL
    q_mask = torch.ones(ids.shape, dtype=torch.long)
    ref_q = sf_bert_forward(sf, "text_encoder.", ids, TINY["text_heads"],
                            encoder_states=ref_img, encoder_mask=torch.ones(ref_img.shape[:2]))
    hf_q = model.text_encoder(input_ids=ids, attention_mask=q_mask, encoder_hidden_states=ref_img,
                              encoder_attention_mask=torch.ones(ref_img.shape[:2], dtype=torch.long))
    assert _max_err(hf_q.last_hidden_state, ref_q) < TOL
    ref_a = sf_bert_forward(sf, "text_decoder.bert.", answer_ids, TINY["text_heads"],
                            encoder_states=ref_q, encoder_mask=q_mask, causal=True)
    ref_logits = sf_lm_head(sf, ref_a)
    hf_logits = model.text_decoder(input_ids=answer_ids, encoder_hidden_states=ref_q,
                                   encoder_attention_mask=q_mask).logits
    assert _max_err(hf_logits, ref_logits) < TOL


# ---------------------------------------------------------------------------------------
# Config inference
# ---------------------------------------------------------------------------------------


def test_config_from_salesforce_tiny():
    for task in MODEL_CLASSES:
        d = dims(task)
        sf = make_weights(salesforce_spec(task, **d))
        cfg = config_from_salesforce(sf, task, vision_num_attention_heads=4, text_num_attention_heads=4)
        v, t = cfg.vision_config, cfg.text_config
        D = d["vision_hidden"]
        assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (D, 2, 4, 4 * D)
        assert (v.image_size, v.patch_size, v.layer_norm_eps) == (32, 8, 1e-6)
        assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == (99, 32, 2, 4)
        assert (t.intermediate_size, t.max_position_embeddings, t.encoder_hidden_size) == (80, 40, D)
        assert t.layer_norm_eps == 1e-12
        # what BLIP trains with (med.py's LM loss, med_config.json's hidden dropout); its
        # attention-probability dropout the fused kernel does not have
        assert (t.label_smoothing, t.hidden_dropout_prob, t.attention_probs_dropout_prob) == \
            (0.1, 0.1, 0.0)
        assert t.bos_token_id is None and t.sep_token_id is None and t.pad_token_id == 0
        if task == "retrieval":
            assert cfg.image_text_hidden_size == 16
        # the inferred config builds a model that takes the converted weights strictly
        MODEL_CLASSES[task](cfg).load_state_dict(salesforce_to_transformers(sf, task), strict=True)
    with pytest.raises(ValueError, match="head"):
        config_from_salesforce(make_weights(salesforce_spec("captioning", **TINY)), "captioning")
    # shapes a BLIP config cannot express
    heads = dict(vision_num_attention_heads=4, text_num_attention_heads=4)
    sf = make_weights(salesforce_spec("captioning", **TINY))
    sf["visual_encoder.patch_embed.proj.weight"] = torch.zeros(48, 3, 8, 4)
    with pytest.raises(ValueError, match="patch embedding weight shape"):
        config_from_salesforce(sf, "captioning", **heads)
    sf = make_weights(salesforce_spec("captioning", **TINY))
    sf["visual_encoder.pos_embed"] = sf["visual_encoder.pos_embed"][:, :16]
    with pytest.raises(ValueError, match="not 1 \\+ a square"):
        config_from_salesforce(sf, "captioning", **heads)
    sf = make_weights(salesforce_spec("vqa", **TINY_VQA))
    sf["text_decoder.bert.embeddings.position_embeddings.weight"] = torch.zeros(41, 32)
    sf["text_decoder.bert.embeddings.position_ids"] = torch.arange(41).expand(1, -1)
    with pytest.raises(ValueError, match="encoder and decoder differ in size"):
        config_from_salesforce(sf, "vqa", **heads)
    with pytest.raises(ValueError, match="vision hidden size 48 is not divisible by 5"):
        config_from_salesforce(make_weights(salesforce_spec("captioning", **dims("captioning"))),
                               "captioning", vision_num_attention_heads=5,
                               text_num_attention_heads=4)
    # a VQA checkpoint whose decoder cross-attention width is not the vision width cannot be
    # expressed by transformers' single text config
    with pytest.raises(ValueError, match="cross-attention"):
        config_from_salesforce(make_weights(salesforce_spec("vqa", **TINY)), "vqa",
                               vision_num_attention_heads=4, text_num_attention_heads=4)
    # nor can a pre-training checkpoint whose vision width is not the text width (ViT-L):
    # its decoder's cross-attention fits the image, the VQA decoder reads the question
    pretraining = make_weights(salesforce_spec("retrieval", **TINY))
    pretraining.update(make_weights(salesforce_spec("captioning", **TINY), seed=1))
    with pytest.raises(ValueError, match="VQA model needs equal vision and text widths"):
        config_from_salesforce(pretraining, "vqa", drop_unused_modules=True, **heads)
    config_from_salesforce(pretraining, "captioning", drop_unused_modules=True, **heads)


BASE_TEXT = dict(text_hidden=768, text_layers=12, text_intermediate=3072, vocab=30524, max_positions=512,
                 embed_dim=256)


@pytest.mark.parametrize(
    "task,vision,expected",
    [
        # model_large_caption.pth: ViT-L/16 at 384
        ("captioning", dict(vision_hidden=1024, vision_layers=24, vision_mlp=4096, image_size=384, patch_size=16),
         (1024, 24, 16, 4096, 384, 16)),
        # model_base_retrieval_coco.pth: ViT-B/16 at 384
        ("retrieval", dict(vision_hidden=768, vision_layers=12, vision_mlp=3072, image_size=384, patch_size=16),
         (768, 12, 12, 3072, 384, 16)),
        # model_base_vqa_capfilt_large.pth: ViT-B/16 at 480
        ("vqa", dict(vision_hidden=768, vision_layers=12, vision_mlp=3072, image_size=480, patch_size=16),
         (768, 12, 12, 3072, 480, 16)),
    ],
)
def test_config_from_salesforce_real_sizes_on_meta(task, vision, expected):
    sf = make_weights(salesforce_spec(task, **vision, **BASE_TEXT), device="meta")
    cfg = config_from_salesforce(sf, task)
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size,
            v.image_size, v.patch_size) == expected
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads) == (30524, 768, 12, 12)
    assert t.encoder_hidden_size == vision["vision_hidden"]
    assert (t.bos_token_id, t.pad_token_id, t.sep_token_id) == (30522, 0, 102)
    if task == "retrieval":
        assert cfg.image_text_hidden_size == 256
    # every converted tensor has the shape transformers' model built from the config expects
    with torch.device("meta"):
        model = MODEL_CLASSES[task](cfg)
    expected_shapes = {k: tuple(p.shape) for k, p in model.state_dict().items()}
    converted = salesforce_to_transformers(sf, task)
    assert {k: tuple(p.shape) for k, p in converted.items()} == expected_shapes


# ---------------------------------------------------------------------------------------
# Dropped keys, raw checkpoints, bad input
# ---------------------------------------------------------------------------------------


def _training_state(task: str) -> dict[str, torch.Tensor]:
    extra = {
        "visual_encoder_m.cls_token": torch.zeros(1, 1, 48),
        "visual_encoder_m.blocks.0.attn.qkv.weight": torch.zeros(144, 48),
        "text_encoder_m.embeddings.word_embeddings.weight": torch.zeros(99, 32),
        "vision_proj_m.weight": torch.zeros(16, 48),
        "text_proj_m.bias": torch.zeros(16),
        "image_queue": torch.zeros(16, 8),
        "text_queue": torch.zeros(16, 8),
        "temp": torch.tensor(0.07),
    }
    if task == "retrieval":
        extra.update({"idx_queue": torch.full((1, 8), -100), "ptr_queue": torch.zeros(1, dtype=torch.long)})
    else:
        extra["queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return extra


@pytest.mark.parametrize("task", list(MODEL_CLASSES))
def test_training_state_is_dropped_and_listed(task, caplog):
    sf = make_weights(salesforce_spec(task, **dims(task)))
    clean = salesforce_to_transformers(sf, task)
    extra = _training_state(task)
    raw = {"model": {**sf, **extra}, "epoch": 5, "config": {"image_size": 32}}
    with caplog.at_level(logging.INFO, logger="blipfast.models.blip.salesforce_checkpoint"):
        converted = salesforce_to_transformers(raw, task)
    assert set(converted) == set(clean)
    assert all(converted[k] is clean[k] for k in clean)
    position_ids = [k for k in sf if k.endswith("embeddings.position_ids")]
    assert salesforce_dropped_keys(raw, task) == list(extra) + position_ids
    assert f"dropped {len(extra) + len(position_ids)} key(s)" in caplog.text
    assert salesforce_dropped_keys(sf, task) == position_ids


def test_pretrain_checkpoint_needs_drop_unused_modules():
    # blip_pretrain.BLIP_Pretrain has every module: encoder, decoder, heads, momentum, queues
    sf = make_weights(salesforce_spec("retrieval", **TINY_VQA))
    sf.update(make_weights(salesforce_spec("captioning", **TINY_VQA)))
    sf.update(_training_state("captioning"))
    for task in MODEL_CLASSES:
        with pytest.raises(ValueError, match="drop_unused_modules"):
            salesforce_to_transformers(sf, task)
        converted = salesforce_to_transformers(sf, task, drop_unused_modules=True)
        assert set(converted) == set(MODEL_CLASSES[task](tiny_transformers_config(task)).state_dict())
    dropped = salesforce_dropped_keys(sf, "captioning", drop_unused_modules=True)
    assert "itm_head.weight" in dropped and "text_encoder.encoder.layer.1.output.dense.weight" in dropped
    assert not any(k.startswith("text_decoder.") and "position_ids" not in k for k in dropped)


def _blip_pretrain_weights() -> dict[str, torch.Tensor]:
    """A BLIP_Pretrain state dict (``blip_pretrain.py``): every module, with the tensors
    its ``tie_encoder_decoder_weights(text_decoder.bert, text_encoder, '', '/attention')``
    shares. That call gives the decoder the encoder's modules (all but self-attention)
    after ``resize_token_embeddings`` tied the LM head to the decoder's own word
    embeddings, so the head keeps a matrix of its own: untied."""
    sf = make_weights(salesforce_spec("retrieval", **TINY_VQA))
    sf.update(make_weights(salesforce_spec("captioning", **TINY_VQA), seed=1))
    for key in list(sf):
        if key.startswith("text_decoder.bert.") and ".attention." not in key:
            sf[key] = sf["text_encoder." + key[len("text_decoder.bert."):]]
    sf["text_decoder.cls.predictions.decoder.weight"] = torch.randn(
        sf["text_encoder.embeddings.word_embeddings.weight"].shape)
    sf.update(_training_state("captioning"))
    return sf


@pytest.mark.parametrize("task", ["captioning", "vqa"])
def test_pretraining_checkpoint_has_an_untied_lm_head(task):
    """Converted for a task model that ties its decoder's word embeddings to the LM head,
    a BLIP_Pretrain checkpoint gives both the head's matrix: what BLIP_Decoder / BLIP_VQA
    hold after their non-strict load writes the tied parameter twice, the head (loaded
    after ``bert``) last."""
    sf = _blip_pretrain_weights()
    head = sf["text_decoder.cls.predictions.decoder.weight"]
    converted = salesforce_to_transformers(sf, task, drop_unused_modules=True)
    assert converted["text_decoder.bert.embeddings.word_embeddings.weight"] is head
    assert converted["text_decoder.cls.predictions.decoder.weight"] is head
    if task == "vqa":  # the question encoder keeps the encoder's own
        assert converted["text_encoder.embeddings.word_embeddings.weight"] is \
            sf["text_encoder.embeddings.word_embeddings.weight"]
    model = MODEL_CLASSES[task](tiny_transformers_config("vqa"))  # TINY_VQA's widths
    model.load_state_dict(converted, strict=True)
    assert torch.equal(model.text_decoder.bert.embeddings.word_embeddings.weight, head)
    # A head that differs from a decoder whose embeddings are not the encoder's is no
    # BLIP_Pretrain checkpoint: still an error
    sf["text_decoder.bert.embeddings.word_embeddings.weight"] = \
        sf["text_encoder.embeddings.word_embeddings.weight"] + 1.0
    with pytest.raises(ValueError, match="tied"):
        salesforce_to_transformers(sf, task, drop_unused_modules=True)


def test_unknown_key_raises():
    sf = make_weights(salesforce_spec("captioning", **TINY))
    sf["visual_encoder.blocks.0.attn.relative_bias"] = torch.zeros(3)
    sf["text_decoder.bert.pooler.dense.weight"] = torch.zeros(32, 32)
    with pytest.raises(ValueError, match="unknown") as err:
        salesforce_to_transformers(sf, "captioning")
    assert "visual_encoder.blocks.0.attn.relative_bias" in str(err.value)
    assert "text_decoder.bert.pooler.dense.weight" in str(err.value)
    hf = MODEL_CLASSES["retrieval"](tiny_transformers_config("retrieval")).state_dict()
    hf["logit_scale"] = torch.tensor(1.0)
    with pytest.raises(ValueError, match="unknown.*logit_scale"):
        transformers_to_salesforce(hf, "retrieval")


def test_missing_key_raises():
    sf = make_weights(salesforce_spec("vqa", **TINY_VQA))
    del sf["text_decoder.bert.encoder.layer.0.crossattention.self.key.bias"]
    del sf["visual_encoder.blocks.0.norm2.weight"]
    with pytest.raises(ValueError, match="missing") as err:
        salesforce_to_transformers(sf, "vqa")
    assert "text_decoder.bert.encoder.layer.0.crossattention.self.key.bias" in str(err.value)
    assert "visual_encoder.blocks.0.norm2.weight" in str(err.value)
    # a whole middle layer missing is detected from the highest layer index
    sf = make_weights(salesforce_spec("captioning", **TINY))
    for k in [k for k in sf if k.startswith("visual_encoder.blocks.0.")]:
        del sf[k]
    with pytest.raises(ValueError, match=r"missing.*visual_encoder\.blocks\.0\."):
        salesforce_to_transformers(sf, "captioning")
    hf = MODEL_CLASSES["captioning"](tiny_transformers_config("captioning")).state_dict()
    del hf["vision_model.post_layernorm.bias"]
    with pytest.raises(ValueError, match=r"missing.*vision_model\.post_layernorm\.bias"):
        transformers_to_salesforce(hf, "captioning")


def test_a_layer_of_another_size_is_named_as_in_the_checkpoint():
    """The config comes from the first layers' shapes; a later layer of another size raises
    a ValueError naming its Salesforce key (and the transformers one), before any loading."""
    sf = make_weights(salesforce_spec("captioning", **TINY))
    key = "text_decoder.bert.encoder.layer.1.intermediate.dense.weight"
    sf[key] = torch.zeros(sf[key].shape[0] + 2, sf[key].shape[1])
    model_class = blipfast.models.BlipForConditionalGeneration  # transformers' is imported
    with pytest.raises(ValueError, match="do not fit") as error:
        model_class.from_salesforce(sf, vision_num_attention_heads=TINY["vision_heads"],
                                    text_num_attention_heads=TINY["text_heads"])
    # the text keys are the same in both layouts
    assert f"{key} has shape ({sf[key].shape[0]}, {sf[key].shape[1]})" in str(error.value)
    sf = make_weights(salesforce_spec("captioning", **TINY))
    key = "visual_encoder.blocks.1.attn.qkv.weight"
    sf[key] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=re.escape(key) + r" \(loaded as vision_model\."
                       r"encoder\.layers\.1\.self_attn\.qkv\.weight\) has shape \(5, 5\)"):
        model_class.from_salesforce(sf, vision_num_attention_heads=TINY["vision_heads"],
                                    text_num_attention_heads=TINY["text_heads"])


def test_wrong_task_raises():
    sf = make_weights(salesforce_spec("captioning", **TINY))
    for fn in (salesforce_to_transformers, transformers_to_salesforce, config_from_salesforce,
               salesforce_dropped_keys):
        with pytest.raises(ValueError, match="unknown task 'caption'"):
            fn(sf, "caption")
    # a checkpoint of another task: its modules are reported
    with pytest.raises(ValueError, match="missing.*itm_head"):
        salesforce_to_transformers(sf, "retrieval")


def test_tied_lm_head_duplicates():
    sf = make_weights(salesforce_spec("captioning", **TINY))
    # absent duplicates are filled from their source
    partial = {k: v for k, v in sf.items() if not k.startswith("text_decoder.cls.predictions.decoder.")}
    hf = salesforce_to_transformers(partial, "captioning")
    word_embeddings = sf["text_decoder.bert.embeddings.word_embeddings.weight"]
    assert hf["text_decoder.cls.predictions.decoder.weight"] is word_embeddings
    assert hf["text_decoder.cls.predictions.decoder.bias"] is sf["text_decoder.cls.predictions.bias"]
    # untied values cannot be represented by the tied transformers model
    sf["text_decoder.cls.predictions.decoder.weight"] = sf["text_decoder.cls.predictions.decoder.weight"] + 1
    with pytest.raises(ValueError, match="tied"):
        salesforce_to_transformers(sf, "captioning")


def test_position_ids_must_be_default():
    sf = make_weights(salesforce_spec("retrieval", **TINY))
    sf["text_encoder.embeddings.position_ids"] = sf["text_encoder.embeddings.position_ids"].flip(-1)
    with pytest.raises(ValueError, match="position_ids"):
        salesforce_to_transformers(sf, "retrieval")
    # 0, 1, 2, ... but shorter than the position table
    sf["text_encoder.embeddings.position_ids"] = torch.arange(39).expand(1, -1)
    with pytest.raises(ValueError, match="position_ids"):
        salesforce_to_transformers(sf, "retrieval")


def test_checkpoint_without_vision_blocks_or_with_non_tensors_raises():
    sf = make_weights(salesforce_spec("captioning", **TINY))
    blockless = {k: v for k, v in sf.items() if not k.startswith("visual_encoder.blocks.")}
    with pytest.raises(ValueError, match="no vision transformer blocks"):
        salesforce_to_transformers(blockless, "captioning")
    sf["visual_encoder.norm.bias"] = [0.0] * 48
    with pytest.raises(ValueError, match=r"visual_encoder\.norm\.bias is not a tensor"):
        salesforce_to_transformers(sf, "captioning")


def test_a_distributed_data_parallel_state_dict_loads():
    """Saved from the DistributedDataParallel wrapper, every key starts with "module.": the
    prefix is dropped, the weights convert as without it."""
    sf = make_weights(salesforce_spec("captioning", **TINY))
    wrapped = {"model": {f"module.{key}": value for key, value in sf.items()}}
    converted = salesforce_to_transformers(wrapped, "captioning")
    expected = salesforce_to_transformers(sf, "captioning")
    assert converted.keys() == expected.keys()
    assert all(converted[key] is expected[key] for key in expected
               if not key.endswith("position_ids"))


def test_an_unreadable_checkpoint_file_is_named(tmp_path):
    """A truncated or empty .pth raises ValueError naming the file (torch's own errors do
    not), before a model is built; a missing one, torch's FileNotFoundError."""
    import blipfast.models
    from blipfast.train import BlipForPreTraining

    whole = tmp_path / "whole.pth"
    torch.save({"model": make_weights(salesforce_spec("captioning", **TINY))}, whole)
    truncated, empty, text = (tmp_path / name for name in ("truncated.pth", "empty.pth",
                                                            "text.pth"))
    truncated.write_bytes(whole.read_bytes()[:1000])
    empty.write_bytes(b"")
    text.write_bytes(b"not a checkpoint")
    for path in (truncated, empty, text):
        for load in (blipfast.models.BlipForConditionalGeneration.from_salesforce,
                     BlipForPreTraining.from_salesforce):
            with pytest.raises(ValueError, match=f"cannot read the checkpoint '{path}'"):
                load(path)
    with pytest.raises(FileNotFoundError):
        blipfast.models.BlipForConditionalGeneration.from_salesforce(tmp_path / "missing.pth")
    assert blipfast.models.BlipForConditionalGeneration.from_salesforce(
        whole, vision_num_attention_heads=4, text_num_attention_heads=4) is not None
