"""BLIP (Li et al., 2022) on blipfast's fused kernels: drop-in for transformers' BLIP
classes (same names, arguments, outputs and state dicts)."""

from blipfast.models.blip.modeling import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
)
from blipfast.models.blip.pretrained import BlipPreTrainedModel
from blipfast.models.blip.text import BlipTextLMHeadModel, BlipTextModel
from blipfast.models.blip.vision import BlipVisionModel, recompute_projection_outputs

__all__ = [
    "BlipForConditionalGeneration",
    "BlipForImageTextRetrieval",
    "BlipForQuestionAnswering",
    "BlipPreTrainedModel",
    "BlipTextLMHeadModel",
    "BlipTextModel",
    "BlipVisionModel",
    "recompute_projection_outputs",
]
