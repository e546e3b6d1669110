"""Models on blipfast's kernels. ``blipfast.models.BlipForConditionalGeneration`` etc. are
drop-in replacements for transformers' BLIP classes (see :mod:`blipfast.models.blip`)."""

from blipfast.models.blip import (
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipForQuestionAnswering,
    BlipPreTrainedModel,
    BlipTextLMHeadModel,
    BlipTextModel,
    BlipVisionModel,
    recompute_projection_outputs,
)

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
