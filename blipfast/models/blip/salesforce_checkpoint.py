"""Convert BLIP checkpoints between the Salesforce layout and the transformers layout.

The original BLIP code (``salesforce/BLIP``: ``models/blip.py``, ``blip_retrieval.py``,
``blip_vqa.py``, ``blip_pretrain.py``, ``med.py``, ``vit.py``) saves ``.pth`` files whose
dict holds the model's state dict under ``"model"``. transformers' BLIP
(``BlipForConditionalGeneration``, ``BlipForImageTextRetrieval``,
``BlipForQuestionAnswering``) names the same weights differently. blipfast's BLIP models
use transformers' parameter names, so these functions are all that is needed to move a
checkpoint from one code base to the other.

Tasks and the classes they pair:

============  ==========================================  ================================
task          Salesforce model                            transformers model
============  ==========================================  ================================
captioning    ``BLIP_Decoder``                            ``BlipForConditionalGeneration``
retrieval     ``BLIP_Retrieval`` / ``BLIP_ITM``           ``BlipForImageTextRetrieval``
vqa           ``BLIP_VQA``                                ``BlipForQuestionAnswering``
============  ==========================================  ================================

Key mapping (``N`` is a layer index):

* Vision transformer, ``visual_encoder.`` <-> ``vision_model.``:

  - ``cls_token`` <-> ``embeddings.class_embedding`` (both ``(1, 1, D)``)
  - ``pos_embed`` <-> ``embeddings.position_embedding`` (both ``(1, 1 + (S/P)**2, D)``)
  - ``patch_embed.proj.{weight,bias}`` <-> ``embeddings.patch_embedding.{weight,bias}``
  - ``blocks.N.norm1`` <-> ``encoder.layers.N.layer_norm1``
  - ``blocks.N.attn.qkv`` <-> ``encoder.layers.N.self_attn.qkv`` (same fused q|k|v rows)
  - ``blocks.N.attn.proj`` <-> ``encoder.layers.N.self_attn.projection``
  - ``blocks.N.norm2`` <-> ``encoder.layers.N.layer_norm2``
  - ``blocks.N.mlp.fc1`` / ``mlp.fc2`` <-> ``encoder.layers.N.mlp.fc1`` / ``mlp.fc2``
  - ``norm`` <-> ``post_layernorm``

  No tensor needs a reshape or transpose: both code bases store the class token and the
  position table with a leading batch dimension of 1, and both split the fused ``qkv``
  projection as ``(3, heads, head_dim)``.

* The BERT-style text models (``med.py``) already carry the names transformers uses:
  ``text_encoder.*`` <-> ``text_encoder.*`` and ``text_decoder.bert.*`` /
  ``text_decoder.cls.predictions.*`` <-> the same names. In particular Salesforce's
  ``encoder.layer.N.crossattention.*`` (created because ``med_config.json`` sets
  ``add_cross_attention``) is transformers' ``crossattention`` module key for key.
  Two differences remain:

  - Salesforce's ``embeddings.position_ids`` is a persistent buffer (it is in every
    ``.pth``); in transformers it is not saved. It is dropped on the way in (after
    checking that it holds ``0, 1, 2, ...``) and regenerated on the way out.
  - The task models' LM head is tied in both code bases: ``cls.predictions.decoder.weight``
    is the word embedding matrix ``bert.embeddings.word_embeddings.weight`` and
    ``cls.predictions.decoder.bias`` is ``cls.predictions.bias``. Both layouts list
    all four keys. On input either tied duplicate may be absent (it is filled from its
    source, as checkpoints saved without shared tensors lack it); where present it must
    equal its source, or a :class:`ValueError` is raised, since the tied transformers
    model cannot hold two different values. One exception: a pre-training checkpoint
    (``BLIP_Pretrain``: ``model_base.pth``, ``model_base_capfilt_large.pth``,
    ``model_large.pth``) has an untied LM head. Its ``tie_encoder_decoder_weights`` gives
    the decoder the text encoder's word embeddings after the head was tied to the
    decoder's own, so ``text_decoder.bert.embeddings.word_embeddings.weight`` equals
    ``text_encoder.embeddings.word_embeddings.weight`` and the head keeps a matrix of its
    own. Converted for captioning or VQA, such a checkpoint gives the tied decoder the
    head's matrix, as Salesforce's ``BLIP_Decoder`` and ``BLIP_VQA`` end up holding it
    when they load it: their tied parameter is written twice, the head's value last.
    :class:`blipfast.train.BlipForPreTraining` keeps the two apart, as BLIP does.

* Retrieval heads ``vision_proj``, ``text_proj``, ``itm_head`` keep their names.

Dropped keys. :func:`salesforce_to_transformers` drops Salesforce-only state and
:func:`salesforce_dropped_keys` returns the exact list of keys it drops (the two
functions share one code path; the converter also logs a one-line summary at INFO level
through this module's logger). Dropped are:

* training state: momentum encoders (any top-level module whose name ends in ``_m``:
  ``visual_encoder_m``, ``text_encoder_m``, ``vision_proj_m``, ``text_proj_m``),
  the queues ``image_queue``, ``text_queue``, ``idx_queue``, ``ptr_queue`` /
  ``queue_ptr``, and the contrastive temperature ``temp`` (transformers' retrieval
  model has no temperature: its ITC score is a plain cosine similarity);
* the text models' ``embeddings.position_ids`` buffers (see above);
* only with ``drop_unused_modules=True``: whole modules that exist in another BLIP task
  but not in the requested one, e.g. ``text_encoder.*`` / ``vision_proj.*`` /
  ``text_proj.*`` / ``itm_head.*`` when a pre-training checkpoint
  (``model_base_capfilt_large.pth``, which has every module) is converted for
  captioning. Without the flag such keys are an error, so a checkpoint for the wrong
  task is never half loaded by accident.

Every other key must be known, and every expected key present: unknown or missing keys
raise a :class:`ValueError` that lists them. Layer counts are taken from the highest
layer index found, so a missing middle layer or a missing tensor inside a layer is
reported too.

Image size. Position embeddings are passed through untouched. A Salesforce checkpoint
stores the table for the resolution it was trained at (384 for the fine-tuned
checkpoints, 224 for the pre-training ones); :func:`config_from_salesforce` reads that
resolution back, so the config it returns builds a model whose
``position_embedding`` has the checkpoint's shape. To run at another resolution, keep
that config and pass ``interpolate_pos_encoding=True`` to the model's forward: it
resizes the table at run time with the same bicubic interpolation
(``align_corners=False``) that Salesforce's ``interpolate_pos_embed`` applies once at
load time. Loading the weights into a model configured for a different image size fails
with a shape mismatch instead of silently resampling the table.

Tensors are not copied: the returned dicts hold the input tensors (with new keys), except
for regenerated ``position_ids`` buffers and filled-in tied duplicates.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import BlipConfig

__all__ = [
    "TASKS",
    "salesforce_to_transformers",
    "salesforce_dropped_keys",
    "transformers_to_salesforce",
    "config_from_salesforce",
]

logger = logging.getLogger(__name__)

#: The supported task names.
TASKS: tuple[str, ...] = ("captioning", "retrieval", "vqa")

# Salesforce ViT LayerNorm epsilon (vit.py: ``partial(nn.LayerNorm, eps=1e-6)``).
_VIT_LAYER_NORM_EPS = 1e-6
# med_config.json / bert-base-uncased LayerNorm epsilon.
_BERT_LAYER_NORM_EPS = 1e-12
# med.py's BertLMHeadModel: CrossEntropyLoss(reduction=reduction, label_smoothing=0.1).
_BLIP_LM_LABEL_SMOOTHING = 0.1
# med_config.json's hidden_dropout_prob.
_BLIP_TEXT_HIDDEN_DROPOUT = 0.1

# ---------------------------------------------------------------------------------------
# Key templates: (Salesforce suffix, transformers suffix) under a component's prefixes.
# ---------------------------------------------------------------------------------------

_VISION_GLOBAL: tuple[tuple[str, str], ...] = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
    ("patch_embed.proj.bias", "embeddings.patch_embedding.bias"),
    ("norm.weight", "post_layernorm.weight"),
    ("norm.bias", "post_layernorm.bias"),
)

_VISION_BLOCK_MODULES: tuple[tuple[str, str], ...] = (
    ("norm1", "layer_norm1"),
    ("attn.qkv", "self_attn.qkv"),
    ("attn.proj", "self_attn.projection"),
    ("norm2", "layer_norm2"),
    ("mlp.fc1", "mlp.fc1"),
    ("mlp.fc2", "mlp.fc2"),
)

_BERT_EMBEDDINGS: tuple[str, ...] = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
)

_BERT_ATTENTION_MODULES: tuple[str, ...] = (
    "self.query",
    "self.key",
    "self.value",
    "output.dense",
    "output.LayerNorm",
)

_BERT_LAYER_MODULES: tuple[str, ...] = (
    *(f"attention.{m}" for m in _BERT_ATTENTION_MODULES),
    *(f"crossattention.{m}" for m in _BERT_ATTENTION_MODULES),
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
)

_LM_HEAD: tuple[str, ...] = (
    "bias",
    "transform.dense.weight",
    "transform.dense.bias",
    "transform.LayerNorm.weight",
    "transform.LayerNorm.bias",
    "decoder.weight",
    "decoder.bias",
)

_RETRIEVAL_HEADS: tuple[str, ...] = tuple(
    f"{m}.{p}" for m in ("vision_proj", "text_proj", "itm_head") for p in ("weight", "bias")
)

# Salesforce-only training state (top-level names).
_TRAINING_STATE = frozenset({"image_queue", "text_queue", "idx_queue", "ptr_queue", "queue_ptr", "temp"})

# Top-level Salesforce modules that some BLIP task has; used by ``drop_unused_modules``.
_KNOWN_MODULES = ("visual_encoder.", "text_encoder.", "text_decoder.", "vision_proj.", "text_proj.", "itm_head.")

_VISION_SF, _VISION_HF = "visual_encoder.", "vision_model."
_ENC = "text_encoder."
_DEC_BERT = "text_decoder.bert."
_DEC_LM = "text_decoder.cls.predictions."

# Components of each task: ("vision" | "bert" | "lm_head" | "heads", prefix).
_TASK_COMPONENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "captioning": (("vision", _VISION_SF), ("bert", _DEC_BERT), ("lm_head", _DEC_LM)),
    "retrieval": (("vision", _VISION_SF), ("bert", _ENC), ("heads", "")),
    "vqa": (("vision", _VISION_SF), ("bert", _ENC), ("bert", _DEC_BERT), ("lm_head", _DEC_LM)),
}

_MAX_LISTED = 25


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(map(repr, TASKS))}")


def _load_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, object],
) -> Mapping[str, object]:
    """A Salesforce checkpoint given as a ``.pth`` path (loaded on the CPU, tensors only)
    or as the object already loaded, which is returned as it is. A file torch cannot read
    or unpickle (truncated, empty, not a checkpoint, holding objects other than tensors)
    raises ValueError naming it, with torch's message; a missing or unreadable one,
    torch's OSError."""
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            return torch.load(checkpoint, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as error:  # no path
            raise ValueError(f"cannot read the checkpoint {os.fspath(checkpoint)!r}: "
                             f"{type(error).__name__}: {error}") from error
    return checkpoint


def _unwrap(state_dict: Mapping[str, object]) -> Mapping[str, object]:
    """Return the state dict inside a raw Salesforce checkpoint (``{"model": ...}``), with
    the ``module.`` prefix a ``DistributedDataParallel`` wrapper's state dict puts on every
    key removed."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    inner = state_dict.get("model") if "model" in state_dict else None
    if isinstance(inner, Mapping):
        state_dict = inner
    prefix = "module."
    if state_dict and all(isinstance(k, str) and k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(sorted(keys)[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _layer_count(keys: Iterable[str], pattern: re.Pattern[str]) -> int:
    indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _layer_pattern(prefix: str, container: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix + container) + r"(\d+)\.")


@dataclass
class _KeyPlan:
    """Expected keys of one task at given layer counts, in both layouts."""

    sf_to_hf: dict[str, str] = field(default_factory=dict)
    # (duplicate, source) pairs that hold the same tensor, in both layouts.
    tied: list[tuple[str, str]] = field(default_factory=list)
    # Salesforce-only position_ids buffers: key -> number of positions' source key.
    position_ids: dict[str, str] = field(default_factory=dict)


def _build_plan(task: str, vision_layers: int, bert_layers: Mapping[str, int]) -> _KeyPlan:
    plan = _KeyPlan()
    for kind, prefix in _TASK_COMPONENTS[task]:
        if kind == "vision":
            for sf, hf in _VISION_GLOBAL:
                plan.sf_to_hf[_VISION_SF + sf] = _VISION_HF + hf
            for i in range(vision_layers):
                for sf, hf in _VISION_BLOCK_MODULES:
                    for p in ("weight", "bias"):
                        plan.sf_to_hf[f"{_VISION_SF}blocks.{i}.{sf}.{p}"] = f"{_VISION_HF}encoder.layers.{i}.{hf}.{p}"
        elif kind == "bert":
            for name in _BERT_EMBEDDINGS:
                plan.sf_to_hf[prefix + name] = prefix + name
            for i in range(bert_layers[prefix]):
                for module in _BERT_LAYER_MODULES:
                    for p in ("weight", "bias"):
                        key = f"{prefix}encoder.layer.{i}.{module}.{p}"
                        plan.sf_to_hf[key] = key
            plan.position_ids[prefix + "embeddings.position_ids"] = prefix + "embeddings.position_embeddings.weight"
        elif kind == "lm_head":
            for name in _LM_HEAD:
                plan.sf_to_hf[prefix + name] = prefix + name
            plan.tied.append((prefix + "decoder.weight", _DEC_BERT + "embeddings.word_embeddings.weight"))
            plan.tied.append((prefix + "decoder.bias", prefix + "bias"))
        else:  # heads
            for name in _RETRIEVAL_HEADS:
                plan.sf_to_hf[name] = name
    return plan


def _plan_for(keys: Iterable[str], task: str, vision_prefix: str,
              vision_container: str) -> tuple[_KeyPlan, int, dict[str, int]]:
    """The task's key plan at the layer counts ``keys`` show (highest index + 1; the ViT
    blocks under ``vision_prefix + vision_container``, as the layout names them), with
    those counts: (plan, vision layers, text layers per text-model prefix)."""
    keys = list(keys)
    vision_layers = _layer_count(keys, _layer_pattern(vision_prefix, vision_container))
    bert_layers = {prefix: _layer_count(keys, _layer_pattern(prefix, "encoder.layer."))
                   for kind, prefix in _TASK_COMPONENTS[task] if kind == "bert"}
    return _build_plan(task, vision_layers, bert_layers), vision_layers, bert_layers


def _is_training_state(key: str) -> bool:
    top = key.split(".", 1)[0]
    return top in _TRAINING_STATE or top.endswith("_m")


def _is_unused_module(key: str, task: str) -> bool:
    """True for keys of a BLIP module that ``task``'s model does not have."""
    used = {prefix for _, prefix in _TASK_COMPONENTS[task]}
    if not key.startswith(_KNOWN_MODULES):
        return False
    top = key.split(".", 1)[0] + "."
    if top == "text_decoder.":
        return not any(p.startswith("text_decoder.") for p in used)
    if top in ("vision_proj.", "text_proj.", "itm_head."):
        return "" not in used  # the retrieval heads component
    return top not in used


def _same_values(a: Tensor, b: Tensor) -> bool:
    if a.is_meta or b.is_meta:
        return a.shape == b.shape
    return a.shape == b.shape and torch.equal(a, b.to(device=a.device, dtype=a.dtype))


def _check_position_ids(key: str, value: object, positions: int | None) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"{key} is not a tensor")
    if value.is_meta:
        return
    expected = torch.arange(value.shape[-1], device=value.device).expand(1, -1)
    if value.dim() != 2 or not torch.equal(value.long(), expected) or (
        positions is not None and value.shape[-1] != positions
    ):
        raise ValueError(
            f"{key} is not the default position index buffer 0..n-1 matching the position "
            "embedding table; transformers' BLIP text model cannot hold custom position ids"
        )


@dataclass
class _Split:
    converted: dict[str, Tensor]
    dropped: list[str]
    plan: _KeyPlan


def _split_salesforce(state_dict: Mapping[str, object], task: str, drop_unused_modules: bool) -> _Split:
    """Validate a Salesforce state dict and split it into converted and dropped keys."""
    _check_task(task)
    sd = _unwrap(state_dict)
    for k in sd:
        if not isinstance(k, str):
            raise ValueError(f"state dict keys must be strings, got {k!r}")

    dropped: list[str] = []
    kept: dict[str, object] = {}
    for k, v in sd.items():
        if _is_training_state(k) or (drop_unused_modules and _is_unused_module(k, task)):
            dropped.append(k)
        else:
            kept[k] = v

    plan, vision_layers, bert_layers = _plan_for(kept, task, _VISION_SF, "blocks.")

    tied_duplicates = {dup for dup, _ in plan.tied}
    optional = tied_duplicates | set(plan.position_ids)
    unknown = [k for k in kept if k not in plan.sf_to_hf and k not in plan.position_ids]
    missing = [k for k in plan.sf_to_hf if k not in kept and k not in optional]
    empty = []
    if vision_layers == 0:
        empty.append(f"no vision transformer blocks ({_VISION_SF}blocks.N.*)")
    empty += [f"no text layers ({p}encoder.layer.N.*)" for p, n in bert_layers.items() if n == 0]
    hint = ""
    if any(_is_unused_module(k, task) for k in unknown):
        hint = (
            " (some belong to modules the task's model does not have, e.g. a pre-training "
            "checkpoint; pass drop_unused_modules=True to drop them)"
        )
    _raise_key_problems("Salesforce", task, unknown, missing, empty, unknown_hint=hint)
    tensors = _check_tensors(kept)

    for key, source in plan.position_ids.items():
        if key in tensors:
            _check_position_ids(key, tensors[key], tensors[source].shape[0])
            dropped.append(key)

    converted: dict[str, Tensor] = {}
    for sf_key, hf_key in plan.sf_to_hf.items():
        if sf_key in tensors:
            converted[hf_key] = tensors[sf_key]
    if _has_untied_pretraining_head(sd, tensors):
        # What BLIP_Decoder / BLIP_VQA hold after loading it: the head's matrix, loaded last
        # into their tied parameter (see the module docstring).
        converted[plan.sf_to_hf[_DEC_BERT + _WORD_EMBEDDINGS]] = tensors[_DEC_LM + "decoder.weight"]
        logger.info("pre-training checkpoint: its untied LM head matrix becomes the %s "
                    "decoder's tied word embeddings, as in Salesforce's loaders", task)
    _fill_and_check_tied(converted, [(plan.sf_to_hf[d], plan.sf_to_hf[s]) for d, s in plan.tied], "Salesforce")
    return _Split(converted=converted, dropped=dropped, plan=plan)


_WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"


def _has_untied_pretraining_head(state_dict: Mapping[str, object], kept: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` has BLIP_Pretrain's untied LM head: a decoder whose word
    embeddings are the text encoder's and a head matrix that differs from them."""
    head = kept.get(_DEC_LM + "decoder.weight")
    decoder_embeddings = kept.get(_DEC_BERT + _WORD_EMBEDDINGS)
    encoder_embeddings = state_dict.get(_ENC + _WORD_EMBEDDINGS)
    if not all(isinstance(t, Tensor) for t in (head, decoder_embeddings, encoder_embeddings)):
        return False
    assert isinstance(head, Tensor) and isinstance(decoder_embeddings, Tensor)  # for mypy
    assert isinstance(encoder_embeddings, Tensor)
    if head.is_meta or decoder_embeddings.is_meta or encoder_embeddings.is_meta:
        return False
    return (_same_values(decoder_embeddings, encoder_embeddings)
            and not _same_values(head, decoder_embeddings))


def _raise_key_problems(layout: str, task: str, unknown: list[str], missing: list[str],
                        empty: list[str], unknown_hint: str = "") -> None:
    """One ValueError listing every unknown and missing key and every empty layer stack
    of a ``layout`` ("Salesforce" / "transformers") state dict; nothing if all is well."""
    if not (unknown or missing or empty):
        return
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s) for task {task!r}{unknown_hint}: {_format_keys(unknown)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s) for task {task!r}: {_format_keys(missing)}")
    problems += empty
    raise ValueError(f"cannot convert {layout} BLIP state dict: " + "; ".join(problems))


def _check_tensors(state_dict: Mapping[str, object]) -> dict[str, Tensor]:
    """``state_dict`` as a dict of tensors; raises ValueError naming an entry that is not
    a tensor."""
    return {k: _tensor_entry(k, v) for k, v in state_dict.items()}


def _tensor_entry(key: str, value: object) -> Tensor:
    """``value``, which must be a tensor; raises ValueError naming ``key`` otherwise."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{key} is not a tensor (got {type(value).__name__})")
    return value


def _fill_and_check_tied(sd: dict[str, Tensor], tied: list[tuple[str, str]], layout: str) -> None:
    for dup, source in tied:
        if dup not in sd:
            sd[dup] = sd[source]
        elif not _same_values(sd[dup], sd[source]):
            raise ValueError(
                f"{layout} state dict has {dup} different from {source}; these weights are tied in "
                "BLIP (the LM head reuses the word embeddings / its bias), so an untied checkpoint "
                "cannot be represented"
            )


def salesforce_to_transformers(
    state_dict: Mapping[str, object], task: str, *, drop_unused_modules: bool = False
) -> dict[str, Tensor]:
    """Convert a Salesforce BLIP state dict to transformers' BLIP parameter names.

    Args:
        state_dict: The Salesforce state dict, or the raw object loaded from a Salesforce
            ``.pth`` file (a dict whose ``"model"`` entry is the state dict).
        task: ``"captioning"`` (``BLIP_Decoder`` -> ``BlipForConditionalGeneration``),
            ``"retrieval"`` (``BLIP_Retrieval`` / ``BLIP_ITM`` ->
            ``BlipForImageTextRetrieval``) or ``"vqa"`` (``BLIP_VQA`` ->
            ``BlipForQuestionAnswering``).
        drop_unused_modules: Also drop whole modules that belong to another BLIP task
            (e.g. the ITM/ITC heads and text encoder of a pre-training checkpoint when
            converting it for captioning). Off by default, so such keys raise.

    Returns:
        A new dict with transformers' key names that ``load_state_dict(..., strict=True)``
        accepts on the task's transformers model built from
        :func:`config_from_salesforce`. Tensors are shared with the input, not copied.
        The keys that were dropped (training state, ``position_ids`` buffers, unused
        modules) are returned by :func:`salesforce_dropped_keys` and summarized in an INFO
        log message.

    Raises:
        ValueError: For an unknown task, unknown or missing keys (all listed), non-tensor
            values, tied LM-head weights that differ, or non-default ``position_ids``.
    """
    split = _split_salesforce(state_dict, task, drop_unused_modules)
    if split.dropped:
        logger.info(
            "salesforce_to_transformers(task=%r): dropped %d key(s) not used by transformers' model: %s",
            task,
            len(split.dropped),
            _format_keys(split.dropped),
        )
    return split.converted


def _salesforce_names(state_dict: Mapping[str, object], task: str) -> dict[str, str]:
    """The Salesforce name of each transformers key that :func:`salesforce_to_transformers`
    makes from ``state_dict`` for ``task`` (keys are read, not validated): what error
    messages about a converted tensor show, so that they name an entry of the user's file.
    """
    _check_task(task)
    keys = [key for key in _unwrap(state_dict) if isinstance(key, str)]
    plan = _plan_for(keys, task, _VISION_SF, "blocks.")[0]
    return {hf: sf for sf, hf in plan.sf_to_hf.items()}


def salesforce_dropped_keys(
    state_dict: Mapping[str, Tensor], task: str, *, drop_unused_modules: bool = False
) -> list[str]:
    """List the keys :func:`salesforce_to_transformers` drops for the same arguments.

    The list holds, in input order, the Salesforce-only training state (momentum encoders
    ``*_m.*``, ``image_queue``, ``text_queue``, ``idx_queue``, ``ptr_queue`` /
    ``queue_ptr``, ``temp``), with ``drop_unused_modules=True`` the keys of modules the
    task's model does not have, and then the text models' ``embeddings.position_ids``
    buffers (which transformers regenerates instead of loading).

    Args:
        state_dict: As for :func:`salesforce_to_transformers`.
        task: As for :func:`salesforce_to_transformers`.
        drop_unused_modules: As for :func:`salesforce_to_transformers`.

    Returns:
        The dropped Salesforce keys.

    Raises:
        ValueError: In the same cases as :func:`salesforce_to_transformers` (the input is
            fully validated, so an empty list means a clean, complete checkpoint).
    """
    return list(_split_salesforce(state_dict, task, drop_unused_modules).dropped)


def transformers_to_salesforce(state_dict: Mapping[str, Tensor], task: str) -> dict[str, Tensor]:
    """Convert a transformers BLIP state dict to the Salesforce BLIP layout.

    The inverse of :func:`salesforce_to_transformers`: converting a transformers state
    dict to Salesforce names and back gives the same keys and the very same tensors.

    The output also holds each text model's ``embeddings.position_ids`` buffer
    (``arange(max_position_embeddings)`` of shape ``(1, n)``, int64), which Salesforce's
    ``med.py`` registers as a persistent buffer, so that the result loads into the
    Salesforce model with ``strict=True``. It holds no training state (momentum encoders,
    queues, ``temp``); Salesforce's ``load_checkpoint`` loads with ``strict=False`` and
    keeps those modules' fresh values.

    Args:
        state_dict: A state dict of ``BlipForConditionalGeneration`` (task
            ``"captioning"``), ``BlipForImageTextRetrieval`` (``"retrieval"``) or
            ``BlipForQuestionAnswering`` (``"vqa"``). The tied LM-head duplicates
            (``text_decoder.cls.predictions.decoder.{weight,bias}``) may be absent (as in
            checkpoints saved without shared tensors); ``embeddings.position_ids`` keys
            saved by older transformers versions are accepted and ignored.
        task: ``"captioning"``, ``"retrieval"`` or ``"vqa"``.

    Returns:
        A new dict with Salesforce key names. Tensors are shared with the input.

    Raises:
        ValueError: For an unknown task, unknown or missing keys (all listed), non-tensor
            values, or tied LM-head weights that differ.
    """
    _check_task(task)
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    plan, vision_layers, bert_layers = _plan_for(state_dict, task, _VISION_HF, "encoder.layers.")
    hf_to_sf = {hf: sf for sf, hf in plan.sf_to_hf.items()}
    ignorable = set(plan.position_ids)  # same key names in both layouts
    optional = {plan.sf_to_hf[d] for d, _ in plan.tied}

    unknown = [k for k in state_dict if k not in hf_to_sf and k not in ignorable]
    missing = [k for k in hf_to_sf if k not in state_dict and k not in optional]
    empty = []
    if vision_layers == 0:
        empty.append(f"no vision layers ({_VISION_HF}encoder.layers.N.*)")
    empty += [f"no text layers ({p}encoder.layer.N.*)" for p, n in bert_layers.items() if n == 0]
    _raise_key_problems("transformers", task, unknown, missing, empty)
    _check_tensors(state_dict)

    hf: dict[str, Tensor] = {k: v for k, v in state_dict.items() if k in hf_to_sf}
    _fill_and_check_tied(hf, [(plan.sf_to_hf[d], plan.sf_to_hf[s]) for d, s in plan.tied], "transformers")

    out: dict[str, Tensor] = {}
    for sf_key, hf_key in plan.sf_to_hf.items():
        out[sf_key] = hf[hf_key]
    for key, source in plan.position_ids.items():
        table = out[source]
        out[key] = torch.arange(table.shape[0], dtype=torch.long, device=table.device).expand(1, -1).clone()
    return out


def _heads(hidden: int, override: int | None, what: str) -> int:
    if override is not None:
        if override <= 0 or hidden % override:
            raise ValueError(f"{what} hidden size {hidden} is not divisible by {override} attention heads")
        return override
    if hidden % 64:
        raise ValueError(
            f"cannot infer the {what} attention head count: hidden size {hidden} is not a multiple of "
            f"the head size 64 used by every BLIP checkpoint; pass {what}_num_attention_heads"
        )
    return hidden // 64


def config_from_salesforce(
    state_dict: Mapping[str, object],
    task: str,
    *,
    vision_num_attention_heads: int | None = None,
    text_num_attention_heads: int | None = None,
    drop_unused_modules: bool = False,
) -> BlipConfig:
    """Infer the transformers ``BlipConfig`` that matches a Salesforce BLIP checkpoint.

    Read from tensor shapes (meta tensors work, nothing is computed):

    * vision: hidden size (``cls_token``), layers (``blocks.N``), MLP size (``fc1``), patch
      size (``patch_embed.proj``) and image size (``sqrt(pos_embed rows - 1) * patch``),
      e.g. ViT-B/16 768 / 12 layers, ViT-L/16 1024 / 24 layers;
    * text: vocabulary and hidden size (``word_embeddings``), layers, intermediate size,
      ``max_position_embeddings``; ``text_config.encoder_hidden_size`` is the vision hidden
      size (checked against the cross-attention key projection);
    * ``image_text_hidden_size`` from ``vision_proj`` (retrieval; 256 otherwise).

    Not recoverable from weights, hence fixed to BLIP's values: head size 64 (so
    ViT-B 12 heads, ViT-L 16, BERT-base 12; override with the ``*_num_attention_heads``
    arguments), exact GELU, LayerNorm epsilon 1e-6 in the ViT (Salesforce's ``vit.py``;
    transformers' default is 1e-5) and 1e-12 in the text model, and what BLIP trains
    with: the LM loss's label smoothing 0.1 (``med.py`` fixes it; transformers' default
    is 0) and the text model's hidden dropout 0.1 (``med_config.json``). Its
    attention-probability dropout (0.1 there) stays 0: blipfast's fused attention has
    none, and its models refuse a nonzero value in training. Special token ids keep
    transformers' defaults (they match Salesforce's tokenizer: ``[DEC]`` bos 30522, pad 0,
    sep 102, eos 2); an id outside a smaller vocabulary is set to ``None``.

    The image size is the checkpoint's own (e.g. 384 for ``model_base_retrieval_coco.pth``,
    224 for ``model_base_capfilt_large.pth``); see the module docs for running at another
    resolution with ``interpolate_pos_encoding=True``.

    Args:
        state_dict: The Salesforce state dict or raw loaded checkpoint (validated as in
            :func:`salesforce_to_transformers`).
        task: ``"captioning"``, ``"retrieval"`` or ``"vqa"``.
        vision_num_attention_heads: Override the ViT head count (default hidden / 64).
        text_num_attention_heads: Override the text head count (default hidden / 64).
        drop_unused_modules: As for :func:`salesforce_to_transformers`.

    Returns:
        A ``transformers.BlipConfig``; the task's transformers model built from it accepts
        ``salesforce_to_transformers(state_dict, task)`` with ``strict=True``.

    Raises:
        ValueError: For an invalid checkpoint (as :func:`salesforce_to_transformers`),
            inconsistent shapes (non-square patch or position grid, encoder and decoder
            text models of different sizes), head counts that cannot be inferred, or for
            VQA a vision width other than the text width (e.g. a ViT-L pre-training
            checkpoint): transformers' VQA model gives its answer decoder's
            cross-attention the vision width, but that decoder reads the question
            encoder's states (Salesforce's ``BLIP_VQA`` drops those weights of such a
            checkpoint and trains them anew).
    """
    from transformers import BlipConfig, BlipTextConfig

    split = _split_salesforce(state_dict, task, drop_unused_modules)
    sd = _unwrap(state_dict)

    def shape(key: str) -> tuple[int, ...]:
        return tuple(_tensor_entry(key, sd[key]).shape)

    # Vision.
    hidden = shape(_VISION_SF + "cls_token")[-1]
    patch_w = shape(_VISION_SF + "patch_embed.proj.weight")
    if len(patch_w) != 4 or patch_w[2] != patch_w[3] or patch_w[1] != 3 or patch_w[0] != hidden:
        raise ValueError(f"unexpected patch embedding weight shape {patch_w} (want ({hidden}, 3, P, P))")
    patch = patch_w[2]
    positions = shape(_VISION_SF + "pos_embed")[1]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ValueError(f"pos_embed has {positions} rows, which is not 1 + a square number of patches")
    vision_layers = _layer_count(split.plan.sf_to_hf, _layer_pattern(_VISION_SF, "blocks."))
    vision_config = dict(
        hidden_size=hidden,
        intermediate_size=shape(_VISION_SF + "blocks.0.mlp.fc1.weight")[0],
        num_hidden_layers=vision_layers,
        num_attention_heads=_heads(hidden, vision_num_attention_heads, "vision"),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=_VIT_LAYER_NORM_EPS,
    )

    # Text (one config for the encoder and the decoder).
    text_shapes = {}
    for kind, prefix in _TASK_COMPONENTS[task]:
        if kind != "bert":
            continue
        vocab, text_hidden = shape(prefix + "embeddings.word_embeddings.weight")
        text_shapes[prefix] = dict(
            vocab_size=vocab,
            hidden_size=text_hidden,
            num_hidden_layers=_layer_count(split.plan.sf_to_hf, _layer_pattern(prefix, "encoder.layer.")),
            intermediate_size=shape(prefix + "encoder.layer.0.intermediate.dense.weight")[0],
            max_position_embeddings=shape(prefix + "embeddings.position_embeddings.weight")[0],
        )
        encoder_width = shape(prefix + "encoder.layer.0.crossattention.self.key.weight")[1]
        if encoder_width != hidden:
            raise ValueError(
                f"{prefix} cross-attention takes width {encoder_width} but the vision model has width "
                f"{hidden}; transformers' BLIP sets text_config.encoder_hidden_size to the vision width "
                "for every text model (for VQA also the decoder, which reads the question states), "
                "so this checkpoint cannot be expressed"
            )
    first, *others = text_shapes.values()
    for other in others:
        if other != first:
            raise ValueError(f"the text encoder and decoder differ in size ({first} vs {other}); "
                             "transformers' BlipForQuestionAnswering has one text config for both")
    if task == "vqa" and first["hidden_size"] != hidden:
        raise ValueError(
            f"a VQA model needs equal vision and text widths, but this checkpoint has vision "
            f"width {hidden} and text width {first['hidden_size']}: transformers' (and "
            "blipfast's) BlipForQuestionAnswering give the answer decoder's cross-attention "
            "the vision width, while it reads the question states (text width); Salesforce's "
            "BLIP_VQA drops those weights of such a checkpoint and trains them anew")
    text_config = dict(
        first,
        num_attention_heads=_heads(first["hidden_size"], text_num_attention_heads, "text"),
        hidden_act="gelu",
        layer_norm_eps=_BERT_LAYER_NORM_EPS,
        label_smoothing=_BLIP_LM_LABEL_SMOOTHING,
        hidden_dropout_prob=_BLIP_TEXT_HIDDEN_DROPOUT,
    )
    defaults = BlipTextConfig()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id"):
        value = getattr(defaults, name)
        if isinstance(value, int) and value >= first["vocab_size"]:
            text_config[name] = None

    kwargs = {}
    if task == "retrieval":
        kwargs["image_text_hidden_size"] = shape("vision_proj.weight")[0]
    return BlipConfig(text_config=text_config, vision_config=vision_config, **kwargs)
