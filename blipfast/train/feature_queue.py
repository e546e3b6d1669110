"""The queue of momentum features that ALBEF / BLIP pre-training uses as extra negatives
for the contrastive loss."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from blipfast.distributed import gather_no_grad
from blipfast.ops._checks import check_index_vector, check_values, value_range

__all__ = ["FeatureQueue"]

NO_ID = -1
"""The id of queue entries enqueued without ids (and of the initial random entries):
never equal to an image id, which must be non-negative."""


def check_image_ids(op: str, image_ids: Optional[torch.Tensor], rows: int,
                    device: torch.device, device_owner: str, shape_name: str = "") -> None:
    """``image_ids`` is None or an int32/int64 (rows,) tensor on ``device`` (as the
    contrastive loss takes ids: a uint64 id past int64's range would turn negative) of
    non-negative ids (a negative one would match the queue's entries without an id,
    :data:`NO_ID`); ``device_owner`` and ``shape_name`` as
    :func:`~blipfast.ops._checks.check_index_vector` takes them."""
    check_index_vector(op, "image_ids", image_ids, rows, device, device_owner, shape_name)
    if image_ids is not None:
        check_values(image_ids, lambda ids: ids >= 0,
                     lambda: f"{op}: image_ids must be non-negative ({NO_ID} marks queue "
                             "entries without an id)", found=value_range)


class FeatureQueue(nn.Module):
    """A ring buffer of (image feature, text feature, image id) entries, as buffers (so
    they are saved in the state dict and moved by ``.to``).

    Layout: ``image_features`` and ``text_features`` are (size, dim) float32, the layout
    :func:`blipfast.ops.contrastive_loss_with_queue` takes (BLIP keeps (dim, size));
    ``image_ids`` is (size,) int64; ``pointer`` is the next slot to write (a 0-dim int64
    tensor, so enqueueing never reads it on the host). The initial entries are random unit
    vectors with id :data:`NO_ID`, as in BLIP.

    Args:
        size: the number of entries (K), a positive int.
        dim: the feature dimension (D), a positive int.
        generator: a CPU ``torch.Generator`` drawing the initial random entries (the
            buffers are made on the CPU; move the module with ``.to``), or None for
            torch's default generator.

    Raises:
        ValueError: a ``size`` or ``dim`` that is not a positive int.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    image_ids: torch.Tensor
    pointer: torch.Tensor

    def __init__(self, size: int, dim: int, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"FeatureQueue: size must be a positive int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"FeatureQueue: dim must be a positive int, got {dim!r}")
        self.size = size
        self.register_buffer("image_features",
                             F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("text_features",
                             F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("image_ids", torch.full((size,), NO_ID, dtype=torch.int64))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                image_ids: Optional[torch.Tensor] = None,
                group: Optional[torch.distributed.ProcessGroup] = None) -> None:
        """Write the rows of every rank of ``group`` (gathered in rank order; default: the
        world group when torch.distributed is initialized) after the last written entry,
        wrapping around; when more rows than ``size`` arrive, the last ``size`` are kept.

        Args:
            image_feat, text_feat: (B, dim) features (stored as float32).
            image_ids: (B,) non-negative int32 or int64 ids, or None (entries get
                :data:`NO_ID`).
            group: the process group to gather over.

        Raises:
            TypeError naming the argument: features that are not floating-point tensors,
                ids that are not an int32 or int64 tensor.
            ValueError naming the argument: shapes that do not match the queue or each other,
                tensors on different devices, negative ids (on CUDA a device-side
                assertion instead).
        """
        for name, tensor in (("image_feat", image_feat), ("text_feat", text_feat)):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise TypeError(f"FeatureQueue.enqueue: {name} must be a floating-point tensor, "
                                f"got {type(tensor).__name__}"
                                + (f" of {tensor.dtype}" if isinstance(tensor, torch.Tensor) else ""))
            if tensor.dim() != 2 or tensor.shape[1] != self.image_features.shape[1]:
                raise ValueError(f"FeatureQueue.enqueue: {name} must have shape (B, "
                                 f"{self.image_features.shape[1]}), got {tuple(tensor.shape)}")
        if text_feat.shape[0] != image_feat.shape[0]:
            raise ValueError(f"FeatureQueue.enqueue: text_feat has {text_feat.shape[0]} rows "
                             f"but image_feat has {image_feat.shape[0]}")
        if text_feat.device != image_feat.device:
            raise ValueError(f"FeatureQueue.enqueue: text_feat is on {text_feat.device} but "
                             f"image_feat is on {image_feat.device}")
        check_image_ids("FeatureQueue.enqueue", image_ids, image_feat.shape[0],
                        image_feat.device, "image_feat is")
        if image_ids is None:
            image_ids = torch.full((image_feat.shape[0],), NO_ID, dtype=torch.int64,
                                   device=image_feat.device)
        # One exchange of the row counts serves the three gathers.
        image_feat, _, sizes = gather_no_grad(image_feat, group)
        text_feat = gather_no_grad(text_feat, group, sizes=sizes)[0]
        image_ids = gather_no_grad(image_ids.to(torch.int64), group, sizes=sizes)[0]
        # Row k goes to slot (pointer + k) % size; with more rows than slots, only the
        # last `size` rows (which would overwrite the earlier ones) are written.
        rows = image_feat.shape[0]
        first = max(0, rows - self.size)
        image_feat, text_feat, image_ids = image_feat[first:], text_feat[first:], image_ids[first:]
        slots = (self.pointer + torch.arange(first, rows, device=self.pointer.device)) % self.size
        self.image_features.index_copy_(0, slots, image_feat.to(self.image_features))
        self.text_features.index_copy_(0, slots, text_feat.to(self.text_features))
        self.image_ids.index_copy_(0, slots, image_ids.to(self.image_ids.device))
        self.pointer.copy_((self.pointer + rows) % self.size)
