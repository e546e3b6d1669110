"""Image-text contrastive (ITC) losses and hard-negative sampling: argument checking,
gathering across ranks, and dispatch to the tiled Triton kernels (which never build the
N x N logits) or to the PyTorch reference."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from blipfast import reference
from blipfast.distributed import (agree_on_sizes, gather_no_grad, gather_with_grad,
                                  resolve_group)
from blipfast.kernels import contrastive as contrastive_kernels
from blipfast.ops._checks import (SUPPORTED_DTYPES, check_index_vector, is_finite,
                                  type_name)
from blipfast.ops._dispatch import use_triton

MAX_FEATURE_DIM = 512


class ContrastiveLossOutput(NamedTuple):
    """Loss and hard negatives from one tiled pass.

    Attributes:
        loss: float32 scalar, as :func:`contrastive_loss` returns it.
        negative_text_index: int64 (B,): for each local image, the global index of a text
            drawn from softmax(similarities) over the global batch with its positives
            excluded; -1 when every text is a positive.
        negative_image_index: int64 (B,): the same for each local text, over images.
    """

    loss: torch.Tensor
    negative_text_index: torch.Tensor
    negative_image_index: torch.Tensor


def contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    image_ids: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    group: Optional[torch.distributed.ProcessGroup] = None,
) -> torch.Tensor:
    """Image-text contrastive loss over the global batch, without N x N logits in memory.

    Layouts:
        image_feat: (B, D), or (B, Q, D) for BLIP-2's Q-Former (Q query embeddings per
            image; the similarity of an image and a text is the max over its queries, in
            both directions). text_feat: (B, D). Any strides. Features are used as given
            (callers normalize). logit_scale: a one-element tensor (1 / temperature); it
            receives a gradient. The Triton path forms that gradient from the scaled
            scores divided by logit_scale, so a logit_scale of exactly 0 gives a NaN
            gradient there (the loss is right; BLIP's clamp keeps it in [2, 1000]).

    Semantics: with ``S = logit_scale * image . text`` over the global batch (every rank
    of ``group``; default: the default process group when torch.distributed is
    initialized with more than one process, else just this process), the loss is
    ``0.5 * (mean over local images of CE(S[i, :], targets) + mean over local texts of
    CE(S[:, j], targets))``. Local row r of a rank whose rows start at global offset o
    has its positive at o + r. Local batch sizes may differ between ranks. Features of
    every rank are gathered with gradient, so gradients equal those of gathering with
    ``torch.distributed.nn.functional.all_gather`` and materializing the logits
    (:func:`blipfast.reference.contrastive_loss`). Across ranks, the local batch sizes
    are exchanged once per call: a host synchronization on an NCCL-only group, none with a
    CPU backend such as "cpu:gloo,cuda:nccl" (see
    :func:`blipfast.distributed.gather_with_grad`).

    Args:
        image_ids: int (B,), optional: all global pairs with the same id are positives
            (several captions per image); targets are positives / their count.
        label_smoothing: epsilon as in ``F.cross_entropy``: targets become
            ``(1 - eps) * targets + eps / N``.
        group: the process group to gather over.

    Returns:
        float32 scalar. Non-finite features or logit_scale give a NaN loss (never a
        finite one). Memory beyond inputs and gradients, on the Triton path (CUDA, or
        CPU with ``TRITON_INTERPRET=1``): O((B + N) * D). The PyTorch reference path
        (CPU without the interpreter, and under ``torch.func`` transforms) materializes
        the logits: several (B, N) float32 matrices kept for the backward.

    torch.compile: a single process traces into one graph (custom ops, ``fullgraph=True``
    works); across ranks the gather and the size exchange run outside the compiled graph
    (graph breaks), with the same results.

    Raises:
        TypeError / ValueError naming the argument: integer or mixed-dtype features,
        mismatched D or batch sizes, D above 512, non-scalar logit_scale, ids of the
        wrong shape or dtype, tensors on different devices.
    """
    resolved = resolve_group(group)
    _check_pair(image_feat, text_feat, logit_scale, image_ids, label_smoothing,
                distributed=resolved is not None)
    sizes = _agree_across_ranks(image_feat, image_ids, resolved, "contrastive_loss")
    if not use_triton(image_feat.device, image_feat, op="contrastive_loss"):
        return reference.contrastive_loss(image_feat, text_feat, logit_scale,
                                          image_ids=image_ids, label_smoothing=label_smoothing,
                                          group=group).float()
    return _fused_contrastive(image_feat, text_feat, logit_scale, image_ids, label_smoothing,
                              resolved, seed=None, sizes=sizes).loss


def contrastive_loss_with_hard_negatives(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    image_ids: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    group: Optional[torch.distributed.ProcessGroup] = None,
    generator: Optional[torch.Generator] = None,
) -> ContrastiveLossOutput:
    """:func:`contrastive_loss` plus hard negatives for image-text matching, drawn in the
    same tiled pass (BLIP / BLIP-2 ITM): for each local image a text, and for each local
    text an image, sampled from the softmax of its similarities over the global batch with
    its positives (same pair, or same ``image_ids``) excluded.

    Sampling is Gumbel-max: the argmax over non-positives of ``S + Gumbel noise`` is an
    exact sample of that softmax; the noise comes from a counter-based generator keyed on
    global (image, text) indices and a seed drawn from ``generator`` (default: the global
    generator of the features' device), so a fixed generator state gives the same draws
    whatever the tiling, and across ranks (each rank with that generator state) the draws
    one process makes on the concatenated batch. The two directions draw independently.
    No gradient flows through the indices. Where the Triton kernels do not run (CPU
    without ``TRITON_INTERPRET=1``), the PyTorch path draws with ``torch.multinomial`` on
    the materialized softmax (:func:`blipfast.reference.sample_hard_negatives`): the same
    distribution, but other indices for the same generator state, and without the
    tiling and across-ranks guarantees.

    Returns:
        :class:`ContrastiveLossOutput` (loss, negative_text_index, negative_image_index);
        indices are global (into the gathered batch), int64, -1 where no negative exists.
    """
    resolved = resolve_group(group)
    _check_pair(image_feat, text_feat, logit_scale, image_ids, label_smoothing,
                distributed=resolved is not None)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError("contrastive_loss_with_hard_negatives: generator must be a "
                        f"torch.Generator or None, got {type_name(generator)}")
    sizes = _agree_across_ranks(image_feat, image_ids, resolved,
                                "contrastive_loss_with_hard_negatives")
    if not use_triton(image_feat.device, image_feat, op="contrastive_loss_with_hard_negatives"):
        loss = reference.contrastive_loss(image_feat, text_feat, logit_scale, image_ids=image_ids,
                                          label_smoothing=label_smoothing, group=group).float()
        negative_texts, negative_images = reference.sample_hard_negatives(
            image_feat, text_feat, logit_scale, image_ids=image_ids, group=group,
            generator=generator)
        return ContrastiveLossOutput(loss, negative_texts, negative_images)
    return _fused_contrastive(image_feat, text_feat, logit_scale, image_ids, label_smoothing,
                              resolved, seed=_draw_seed(generator, image_feat.device),
                              sizes=sizes)


def contrastive_loss_with_queue(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    image_feat_momentum: torch.Tensor,
    text_feat_momentum: torch.Tensor,
    image_queue: Optional[torch.Tensor] = None,
    text_queue: Optional[torch.Tensor] = None,
    image_ids: Optional[torch.Tensor] = None,
    queue_image_ids: Optional[torch.Tensor] = None,
    alpha: float = 0.4,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """BLIP's pre-training ITC (ALBEF style): momentum features and a feature queue as
    extra negatives, with momentum-distilled soft targets.

    As salesforce BLIP's ``blip_pretrain.py`` (and ``blip_retrieval.py`` with ids) computes
    it, for the local batch (no gather; the queue carries other ranks' and earlier steps'
    momentum features):

    - keys: ``text_keys = [text_feat_momentum; text_queue]``, likewise for images;
      no gradient flows into keys, momentum features or queues;
    - logits: ``logit_scale * image_feat @ text_keys.T`` (image-to-text) and
      ``logit_scale * text_feat @ image_keys.T`` (text-to-image);
    - targets: ``alpha * softmax(logit_scale * image_feat_momentum @ text_keys.T) +
      (1 - alpha) * positives / count`` (and the text-to-image mirror), then label
      smoothing ``(1 - eps) * targets + eps / num_keys``; positives are the pair itself,
      or every key with the same id when ``image_ids`` (and ``queue_image_ids`` for the
      queue) are given;
    - loss: the mean of the two soft-target cross-entropies, averaged over local rows.

    Args:
        image_feat, text_feat: (B, D) online features (with gradient).
        logit_scale: one-element tensor (1 / temperature); receives a gradient from the
            logits (the teacher logits use its value without gradient, as in BLIP).
        image_feat_momentum, text_feat_momentum: (B, D) momentum-encoder features.
        image_queue, text_queue: (K, D) queued momentum features (BLIP stores its queues
            as (D, K): pass ``queue.t()``, a view, no copy of the layout is needed), or
            None for no queue. Both or neither.
        image_ids: int (B,); queue_image_ids: int (K,), the ids of the queued entries
            (without them, queue entries are never positives).
        alpha: weight of the distilled targets, in [0, 1] (BLIP ramps it to 0.4).
        label_smoothing: epsilon in [0, 1], as in ``F.cross_entropy``: the (distilled)
            targets become ``(1 - eps) * targets + eps / num_keys``, num_keys = B + K.

    Returns:
        float32 scalar.
    """
    _check_queue_arguments(image_feat, text_feat, logit_scale, image_feat_momentum,
                           text_feat_momentum, image_queue, text_queue, image_ids,
                           queue_image_ids, alpha, label_smoothing)
    if not use_triton(image_feat.device, image_feat, op="contrastive_loss_with_queue"):
        return reference.contrastive_loss_with_queue(
            image_feat, text_feat, logit_scale, image_feat_momentum=image_feat_momentum,
            text_feat_momentum=text_feat_momentum, image_queue=image_queue,
            text_queue=text_queue, image_ids=image_ids, queue_image_ids=queue_image_ids,
            alpha=alpha, label_smoothing=label_smoothing).float()
    batch = image_feat.shape[0]
    ids = image_ids if image_ids is not None else torch.arange(batch, device=image_feat.device)
    ids = ids.to(torch.int64)
    image_keys, text_keys, key_ids = image_feat_momentum.detach(), text_feat_momentum.detach(), ids
    if image_queue is not None and text_queue is not None:  # both or neither: checked above
        image_keys = torch.cat([image_keys, image_queue.detach()])
        text_keys = torch.cat([text_keys, text_queue.detach()])
        if queue_image_ids is None:  # ids no batch id can equal: queue entries never positive
            queue_image_ids = ids.min() - 1 - torch.arange(image_queue.shape[0], device=ids.device)
        key_ids = torch.cat([ids, queue_image_ids.to(torch.int64)])
    losses = []
    for rows, teacher, keys in ((image_feat, image_feat_momentum, text_keys),
                                (text_feat, text_feat_momentum, image_keys)):
        row_losses = contrastive_kernels.contrastive_forward_op(
            rows, keys, logit_scale, ids, key_ids, teacher.detach() if alpha > 0 else None,
            None, True, False,
            float(alpha), float(label_smoothing), 0, 0)[0]
        losses.append(row_losses.mean())
    loss = 0.5 * (losses[0] + losses[1])
    return _propagate_non_finite(loss, image_feat, text_feat, logit_scale, image_keys, text_keys)


# --------------------------------------------------------------------------------------
# The fused path
# --------------------------------------------------------------------------------------


def _agree_across_ranks(image_feat: torch.Tensor, image_ids: Optional[torch.Tensor], group,
                        op: str) -> Optional[list[int]]:
    """Every rank's batch size (None without a group), after checking across ranks what a
    rank alone cannot: the features' dtype, dims and trailing shape, whether image_ids are
    given, and that no rank is empty. Every rank raises alike, rather than some waiting in
    a collective the others never join."""
    if group is None:
        return None
    sizes = agree_on_sizes(image_feat, group, op,
                           {"whether image_ids is given": int(image_ids is not None)})
    if 0 in sizes:
        raise ValueError(f"{op}: rank {sizes.index(0)} of the group has no image-text pairs; "
                         "every rank needs at least one (its loss is a mean over its pairs)")
    return sizes


def _fused_contrastive(image_feat, text_feat, logit_scale, image_ids, label_smoothing, group,
                       seed, sizes=None) -> ContrastiveLossOutput:
    """One rank's loss (and negatives when ``seed`` is given) on the Triton kernels.

    Single process: image-to-text and text-to-image are the row and column terms of one
    N x N problem (two forward passes, two backward passes over it). Across ranks: two
    problems, local images x global texts (row term) and global images x local texts
    (column term), on features gathered with gradient.
    """
    local = text_feat.shape[0]
    device = text_feat.device
    eps = float(label_smoothing)
    if group is None:
        ids = (image_ids if image_ids is not None else torch.arange(local, device=device))
        ids = ids.to(torch.int64)
        (row_losses, column_losses, _, _, negative_texts,
         negative_images) = contrastive_kernels.contrastive_forward_op(
            image_feat, text_feat, logit_scale, ids, ids, None, seed, True, True, 0.0, eps, 0, 0)
    else:
        # One exchange of the row counts (the caller's) serves the three gathers.
        images_all, offset, sizes = gather_with_grad(image_feat, group, sizes=sizes)
        texts_all = gather_with_grad(text_feat, group, sizes=sizes)[0]
        total = texts_all.shape[0]
        if image_ids is None:
            ids_all = torch.arange(total, device=device)
        else:
            ids_all = gather_no_grad(image_ids.to(torch.int64), group, sizes=sizes)[0]
        ids = ids_all[offset:offset + local]
        row_losses, _, _, _, negative_texts, _ = contrastive_kernels.contrastive_forward_op(
            image_feat, texts_all, logit_scale, ids, ids_all, None, seed, True, False, 0.0, eps,
            offset, 0)
        _, column_losses, _, _, _, negative_images = contrastive_kernels.contrastive_forward_op(
            images_all, text_feat, logit_scale, ids_all, ids, None, seed, False, True, 0.0, eps,
            0, offset)
    loss = 0.5 * (row_losses.mean() + column_losses.mean())
    loss = _propagate_non_finite(loss, image_feat, text_feat, logit_scale)
    return ContrastiveLossOutput(loss, negative_texts, negative_images)


def _propagate_non_finite(loss: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """Make the loss NaN when any input holds inf or NaN (the kernels' max and exp could
    otherwise swallow a non-finite score). Costs one read of the inputs, no host sync,
    and adds no gradient."""
    poison = sum(tensor.detach().float().sum() for tensor in tensors) * 0.0
    return loss + poison


def _draw_seed(generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """A one-element int64 seed tensor on ``device``, drawn from ``generator`` (no host
    synchronisation)."""
    source_device = generator.device if generator is not None else device
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=source_device,
                         dtype=torch.int64)
    return seed.to(device)


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------


def _check_features(name: str, tensor, dims: tuple[int, ...], like=None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"contrastive loss: {name} must be a torch.Tensor, got "
                        f"{type_name(tensor)}")
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"contrastive loss: {name} has dtype {tensor.dtype}; supported: "
                        "float16, bfloat16, float32")
    if tensor.dim() not in dims:
        shapes = " or ".join({2: "(B, D)", 3: "(B, Q, D)"}[d] for d in dims)
        raise ValueError(f"contrastive loss: {name} must have shape {shapes}, got "
                         f"{tuple(tensor.shape)}")
    if like is None:
        return
    like_name, like_tensor = like
    if tensor.device != like_tensor.device:
        raise ValueError(f"contrastive loss: {name} is on {tensor.device} but {like_name} is "
                         f"on {like_tensor.device}")
    if tensor.dtype != like_tensor.dtype:
        raise TypeError(f"contrastive loss: {name} has dtype {tensor.dtype} but {like_name} "
                        f"has {like_tensor.dtype}; features must share one dtype")
    if tensor.shape[-1] != like_tensor.shape[-1]:
        raise ValueError(f"contrastive loss: {name} has feature dim {tensor.shape[-1]} but "
                         f"{like_name} has {like_tensor.shape[-1]}")


def _check_rows(name: str, tensor: torch.Tensor, rows: int, other: str) -> None:
    if tensor.shape[0] != rows:
        raise ValueError(f"contrastive loss: {name} has {tensor.shape[0]} rows but {other} "
                         f"has {rows}; they must match")


def _check_scale_and_smoothing(logit_scale, device: torch.device, label_smoothing) -> None:
    if not isinstance(logit_scale, torch.Tensor):
        raise TypeError("contrastive loss: logit_scale must be a tensor (it receives a "
                        f"gradient), got {type_name(logit_scale)}")
    if logit_scale.numel() != 1:
        raise ValueError("contrastive loss: logit_scale must be a scalar tensor, got shape "
                         f"{tuple(logit_scale.shape)}")
    if not logit_scale.is_floating_point():
        raise TypeError(f"contrastive loss: logit_scale must be floating point, got "
                        f"{logit_scale.dtype}")
    if logit_scale.device != device:
        raise ValueError(f"contrastive loss: logit_scale is on {logit_scale.device} but the "
                         f"features are on {device}")
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError("contrastive loss: label_smoothing must be a float, got "
                        f"{type_name(label_smoothing)}")
    if not 0.0 <= label_smoothing <= 1.0:  # as F.cross_entropy's (1: uniform targets)
        raise ValueError(f"contrastive loss: label_smoothing must lie in [0, 1], got "
                         f"{label_smoothing}")


def _check_pair(image_feat, text_feat, logit_scale, image_ids, label_smoothing,
                distributed: bool = False) -> None:
    """Local checks. ``distributed``: an empty batch is checked across ranks later, so that
    every rank raises (not this one alone, leaving the others in a collective)."""
    _check_features("image_feat", image_feat, (2, 3))
    _check_features("text_feat", text_feat, (2,), like=("image_feat", image_feat))
    _check_rows("text_feat", text_feat, image_feat.shape[0], "image_feat")
    batch, feature_dim = text_feat.shape
    if batch == 0 and not distributed:
        raise ValueError("contrastive loss: image_feat and text_feat have no rows")
    if not 1 <= feature_dim <= MAX_FEATURE_DIM:
        raise ValueError(f"contrastive loss: feature dim {feature_dim} of image_feat is not "
                         f"supported; supported: 1 to {MAX_FEATURE_DIM}")
    if image_feat.dim() == 3 and image_feat.shape[1] == 0:
        raise ValueError("contrastive loss: image_feat has 0 queries (dim 1)")
    check_index_vector("contrastive loss", "image_ids", image_ids, batch, image_feat.device,
                       "the features are")
    _check_scale_and_smoothing(logit_scale, image_feat.device, label_smoothing)


def _check_queue_arguments(image_feat, text_feat, logit_scale, image_feat_momentum,
                           text_feat_momentum, image_queue, text_queue, image_ids,
                           queue_image_ids, alpha, label_smoothing) -> None:
    _check_features("image_feat", image_feat, (2,))
    _check_pair(image_feat, text_feat, logit_scale, image_ids, label_smoothing)
    batch = image_feat.shape[0]
    for name, tensor in (("image_feat_momentum", image_feat_momentum),
                         ("text_feat_momentum", text_feat_momentum)):
        _check_features(name, tensor, (2,), like=("image_feat", image_feat))
        _check_rows(name, tensor, batch, "image_feat")
    if (image_queue is None) != (text_queue is None):
        raise ValueError("contrastive loss: pass both image_queue and text_queue, or neither")
    if image_queue is not None:
        for name, tensor in (("image_queue", image_queue), ("text_queue", text_queue)):
            _check_features(name, tensor, (2,), like=("image_feat", image_feat))
        _check_rows("text_queue", text_queue, image_queue.shape[0], "image_queue")
        check_index_vector("contrastive loss", "queue_image_ids", queue_image_ids,
                           image_queue.shape[0], image_feat.device, "the features are")
    elif queue_image_ids is not None:
        raise ValueError("contrastive loss: queue_image_ids given without image_queue")
    if queue_image_ids is not None and image_ids is None:
        raise ValueError("contrastive loss: queue_image_ids needs image_ids for the batch")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not is_finite(alpha):
        raise TypeError(f"contrastive loss: alpha must be a finite float, got {alpha!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"contrastive loss: alpha must lie in [0, 1], got {alpha}")
