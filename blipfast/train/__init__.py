"""Training on blipfast's kernels.

- :class:`BlipForPreTraining`: BLIP's pre-training step (ITC with momentum distillation
  and a feature queue, ITM with hard negatives, LM) on one image pass.
- :func:`momentum_update_`: the fused momentum (EMA) update of parameter lists.
- :func:`ramped_alpha`: BLIP's ramp of the distillation weight.
- :class:`FeatureQueue`: the queue of momentum features.
"""

from blipfast.train.feature_queue import FeatureQueue
from blipfast.train.momentum import momentum_update_, ramped_alpha
from blipfast.train.pretraining import BlipForPreTraining, BlipForPreTrainingOutput

__all__ = ["BlipForPreTraining", "BlipForPreTrainingOutput", "FeatureQueue", "momentum_update_",
           "ramped_alpha"]
