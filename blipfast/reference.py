"""Pure-PyTorch references for every blipfast op.

These are the oracles the tests compare the Triton kernels against, and the path the
public ops take on devices where the kernels do not run (CPU without the Triton
interpreter). They favour clarity over speed and compute in float32 (float64 when given
float64 inputs), returning the dtype each function's docstring names (the input dtype,
but float32 for the losses and the hard-negative probabilities of lower-precision
inputs). As the kernels do, they compute in the inputs' dtypes under ``torch.autocast``
too: autocast is off inside them (it would run their matrix products in bfloat16 or
float16 and return those results as float32).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, ParamSpec, TypeVar

import torch

__all__ = [
    "attention",
    "attention_with_flash_gradients",
    "score_matrix_cross_entropy",
    "contrastive_loss",
    "contrastive_loss_with_queue",
    "hard_negative_probabilities",
    "sample_hard_negatives",
    "bias_gelu",
    "cross_entropy",
    "bias_gelu_linear",
    "layer_norm",
    "add_layer_norm",
]


Parameters = ParamSpec("Parameters")
Result = TypeVar("Result")


def _outside_autocast(function: Callable[Parameters, Result]) -> Callable[Parameters, Result]:
    """``function`` run with CPU and CUDA autocast off (when either is on), so it computes
    in the dtypes it is given, as the kernels it stands for do."""
    @functools.wraps(function)
    def wrapper(*args: Parameters.args, **kwargs: Parameters.kwargs) -> Result:
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return function(*args, **kwargs)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return function(*args, **kwargs)

    return wrapper


@_outside_autocast
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    kv_index: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference multi-head attention with the semantics of :func:`blipfast.ops.attention`.

    Materializes the (B, H, Lq, Lk) score matrix. A query row with no key to attend to
    gives output 0 (and gradient 0), never NaN. With ``upcast=False`` it computes in the
    input dtype, which measures PyTorch's own rounding error in that dtype (the tests'
    yardstick for tolerances).
    """
    compute_dtype = _compute_dtype(q.dtype, upcast)
    k, v, probs, _ = _attention_probabilities(q, k, v, causal, key_padding_mask, kv_index,
                                              softmax_scale, compute_dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute_dtype))
    return out.to(q.dtype)


@_outside_autocast
def attention_with_flash_gradients(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[torch.Tensor] = None,
    kv_index: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attention`'s output and its gradients ``(out, grad_q, grad_k, grad_v)`` for
    the output gradient ``grad_out``, computed in the inputs' dtype the way
    FlashAttention-2 computes them (and PyTorch's flash SDPA backend, and blipfast's
    kernels): the softmax's backward takes each row's ``sum(P * dP)`` as
    ``rowsum(grad_out * out)`` from the output, not from the probabilities.

    Equal to autograd through :func:`attention` in exact arithmetic; in a low dtype it
    rounds as that algorithm does. Where a row's softmax is one key (``P`` = 1), the
    exact ``dP - rowsum(grad_out * out)`` is 0 and autograd's ``P * (dP - sum(P * dP))``
    gives exactly 0, while this order leaves the rounding of two dot products that
    should agree. The tests take PyTorch's error in both orders as the yardstick of the
    kernels' error. Same arguments as :func:`attention`; ``grad_out`` has the output's
    shape (B, Lq, H, D).
    """
    dtype = q.dtype
    key_batch = k.shape[0]
    gathered_k, gathered_v, probs, scale = _attention_probabilities(
        q, k, v, causal, key_padding_mask, kv_index, softmax_scale, dtype)
    grad_out = grad_out.to(dtype)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, gathered_v)
    grad_v = torch.einsum("bhqk,bqhd->bkhd", probs, grad_out)
    grad_probs = torch.einsum("bqhd,bkhd->bhqk", grad_out, gathered_v)
    row_sums = (grad_out * out).sum(dim=-1).transpose(1, 2).unsqueeze(-1)  # (B, H, Lq, 1)
    grad_scores = probs * (grad_probs - row_sums) * scale
    grad_q = torch.einsum("bhqk,bkhd->bqhd", grad_scores, gathered_k)
    grad_k = torch.einsum("bhqk,bqhd->bkhd", grad_scores, q)
    if kv_index is not None:  # each query batch row's key gradients back to its key row
        grad_k = grad_k.new_zeros((key_batch, *grad_k.shape[1:])).index_add_(0, kv_index,
                                                                              grad_k)
        grad_v = grad_v.new_zeros((key_batch, *grad_v.shape[1:])).index_add_(0, kv_index,
                                                                              grad_v)
    return out, grad_q, grad_k, grad_v


def _attention_probabilities(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
    key_padding_mask: Optional[torch.Tensor], kv_index: Optional[torch.Tensor],
    softmax_scale: Optional[float], compute_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(k and v gathered by ``kv_index``, the (B, H, Lq, Lk) attention probabilities in
    ``compute_dtype`` with masked keys exactly 0, the softmax scale)."""
    if kv_index is not None:
        k, v = k[kv_index], v[kv_index]
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask[kv_index]
    len_q, len_k, head_dim = q.shape[1], k.shape[1], q.shape[3]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale

    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(compute_dtype), k.to(compute_dtype)) * scale
    if not causal and key_padding_mask is None:
        # Every key allowed: what the masking below computes, without its passes over
        # the scores and the masked copy of the probabilities kept for the backward
        # (the models' CPU path: the ViT's self-attention, cross-attention to images).
        return k, v, torch.softmax(scores, dim=-1), scale
    allowed = torch.ones(len_q, len_k, dtype=torch.bool, device=q.device)
    if causal:
        # Bottom-right aligned: query i sees key j when j <= i + (Lk - Lq).
        allowed = allowed.tril(diagonal=len_k - len_q)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(torch.bool)
    # Fully masked rows: softmax over zeros, then zeroed, so no NaN reaches the output
    # or the gradient.
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_has_key = allowed.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(~row_has_key, 0.0)
    probs = torch.softmax(scores, dim=-1) * allowed
    return k, v, probs, scale


def _global_batch(image_feat: torch.Tensor, text_feat: torch.Tensor,
                  image_ids: Optional[torch.Tensor], group, with_grad: bool):
    """(this rank's pair ids, the global batch's pair ids, every rank's images, every
    rank's texts), ranks concatenated in order (uneven sizes allowed), with one exchange of
    the row counts. Without ``image_ids`` the pair ids are global positions (each pair its
    own positive). ``with_grad``: the features are gathered with the gradient of
    ``torch.distributed.nn.functional.all_gather`` (each rank gets the sum over ranks of the
    gradient at its rows) by :func:`blipfast.distributed.gather_with_grad`, whose gloo
    backward, unlike that function's, works in a subgroup. Without a group, traceable
    into one graph; with one, the gathers run outside it."""
    if group is None:
        ids = (image_ids if image_ids is not None
               else torch.arange(text_feat.shape[0], device=text_feat.device))
        return ids, ids, image_feat, text_feat
    return _gathered_batch(image_feat, text_feat, image_ids, group, with_grad)


@torch.compiler.disable  # collectives run outside a compiled graph (ranks' shapes differ)
def _gathered_batch(image_feat: torch.Tensor, text_feat: torch.Tensor,
                    image_ids: Optional[torch.Tensor], group, with_grad: bool):
    """:func:`_global_batch` over a group."""
    from blipfast.distributed import gather_no_grad, gather_with_grad

    local = text_feat.shape[0]

    gather = gather_with_grad if with_grad else gather_no_grad
    images_all, offset, sizes = gather(image_feat, group)
    texts_all = gather(text_feat, group, sizes=sizes)[0]
    if image_ids is not None:
        return image_ids, gather_no_grad(image_ids, group, sizes=sizes)[0], images_all, texts_all
    ids_all = torch.arange(sum(sizes), device=text_feat.device)
    return ids_all[offset:offset + local], ids_all, images_all, texts_all


def _distributed_group(group):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if group is None else group
    return None if dist.get_world_size(group) == 1 else group


def _similarity(image_feat: torch.Tensor, text_feat: torch.Tensor, logit_scale: torch.Tensor,
                compute_dtype: torch.dtype) -> torch.Tensor:
    """logit_scale * image . text, (N_images, N_texts); for (N, Q, D) image features the
    best of the Q queries (BLIP-2's Q-Former), as LAVIS computes it: ``max``, whose
    gradient goes to the first of tied queries (``amax`` would split it among them)."""
    image = image_feat.to(compute_dtype)
    text = text_feat.to(compute_dtype)
    if image.dim() == 2:
        scores = image @ text.t()
    else:
        # One product per query, each of its own contiguous copy: the same row of
        # same-shaped products, so equal query vectors score equal to the bit and a tie
        # goes to the first. (In one (N * Q, D) product, BLAS may round two equal rows
        # differently by where they sit in its blocks.)
        scores = torch.stack([image[:, query].contiguous() @ text.t()
                              for query in range(image.shape[1])], dim=-1).max(dim=-1).values
    return logit_scale.to(compute_dtype) * scores


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of -sum_j targets * log_softmax(logits) (targets need not sum to 1)."""
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


@_outside_autocast
def score_matrix_cross_entropy(
    row_feat: torch.Tensor,
    column_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    row_ids: torch.Tensor,
    column_ids: torch.Tensor,
    *,
    teacher_feat: Optional[torch.Tensor] = None,
    alpha: float = 0.0,
    label_smoothing: float = 0.0,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the engine behind the contrastive losses (``blipfast.kernels.
    contrastive``): per-row and per-column soft-target cross-entropies of
    ``S = logit_scale * max_q row_feat[i, q] . column_feat[j]``, materialized.

    Row targets: ``(1 - eps) * (alpha * softmax(logit_scale * teacher_feat @ column_feat.T)
    + (1 - alpha) * P / row count) + eps / C``; column targets: ``(1 - eps) * P / column
    count + eps / R``, with ``P = row_ids[:, None] == column_ids[None, :]`` (a row or
    column without positives gets a zero hard target), ``eps`` = ``label_smoothing``.
    Returns (row losses (R,), column losses (C,)), in the dtype computed in: float32
    (float64 for float64 features) with ``upcast=True`` (the default), ``row_feat``'s
    dtype with ``upcast=False``.
    """
    compute_dtype = _compute_dtype(row_feat.dtype, upcast)
    scores = _similarity(row_feat, column_feat, logit_scale, compute_dtype)
    positive = (row_ids[:, None] == column_ids[None, :]).to(compute_dtype)
    row_targets = positive / positive.sum(dim=1, keepdim=True).clamp_min(1)
    column_targets = positive / positive.sum(dim=0, keepdim=True).clamp_min(1)
    if teacher_feat is not None:
        with torch.no_grad():
            teacher = _similarity(teacher_feat, column_feat, logit_scale.detach(), compute_dtype)
            row_targets = alpha * torch.softmax(teacher, dim=1) + (1 - alpha) * row_targets
    num_rows, num_columns = scores.shape
    row_targets = (1 - label_smoothing) * row_targets + label_smoothing / num_columns
    column_targets = (1 - label_smoothing) * column_targets + label_smoothing / num_rows
    row_losses = -(row_targets * torch.log_softmax(scores, dim=1)).sum(dim=1)
    column_losses = -(column_targets * torch.log_softmax(scores, dim=0)).sum(dim=0)
    return row_losses, column_losses


@_outside_autocast
def contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    image_ids: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    group: Optional[torch.distributed.ProcessGroup] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Reference image-text contrastive loss with the semantics of
    :func:`blipfast.ops.contrastive_loss`: gathers every rank's features with the
    gradient of ``torch.distributed.nn.functional.all_gather`` (outside a compiled graph),
    materializes the logits of the local rows against the global batch in both directions
    and applies ``F.cross_entropy`` with probability targets (``positives / row sum``) and
    ``label_smoothing``. With ``upcast=False`` it computes in the features' dtype."""
    compute_dtype = _compute_dtype(image_feat.dtype, upcast)
    ids, ids_all, images_all, texts_all = _global_batch(
        image_feat, text_feat, image_ids, _distributed_group(group), with_grad=True)
    targets = (ids[:, None] == ids_all[None, :]).to(compute_dtype)
    targets = targets / targets.sum(dim=1, keepdim=True)
    image_to_text = _similarity(image_feat, texts_all, logit_scale, compute_dtype)
    text_to_image = _similarity(images_all, text_feat, logit_scale, compute_dtype).t()
    loss = 0.5 * (
        torch.nn.functional.cross_entropy(image_to_text, targets, label_smoothing=label_smoothing)
        + torch.nn.functional.cross_entropy(text_to_image, targets, label_smoothing=label_smoothing))
    return loss.to(image_feat.dtype if not upcast else loss.dtype)


@_outside_autocast
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
    upcast: bool = True,
) -> torch.Tensor:
    """Reference of :func:`blipfast.ops.contrastive_loss_with_queue`, written as salesforce
    BLIP's ``blip_pretrain.py`` / ``blip_retrieval.py`` compute it: logits of the online
    features against [momentum features; queue], soft targets ``alpha * softmax(momentum
    logits) + (1 - alpha) * positives / row sum`` (computed without gradient), smoothed to
    ``(1 - label_smoothing) * targets + label_smoothing / num_keys``, soft-target
    cross-entropy, averaged over the two directions. With ``upcast=True`` (the default) it
    computes in float32 (float64 for float64 features) and returns that dtype; with
    ``upcast=False`` it computes in, and returns, the features' dtype."""
    compute_dtype = _compute_dtype(image_feat.dtype, upcast)
    batch = image_feat.shape[0]
    device = image_feat.device
    ids = image_ids if image_ids is not None else torch.arange(batch, device=device)
    # Momentum features and queues are constants (BLIP computes them under no_grad).
    image_feat_momentum, text_feat_momentum = image_feat_momentum.detach(), text_feat_momentum.detach()
    image_keys, text_keys = image_feat_momentum, text_feat_momentum
    key_ids = ids
    if (image_queue is None) != (text_queue is None):
        raise ValueError("contrastive loss: pass both image_queue and text_queue, or neither")
    if image_queue is not None and text_queue is not None:
        image_keys = torch.cat([image_keys, image_queue.detach()])
        text_keys = torch.cat([text_keys, text_queue.detach()])
        if queue_image_ids is None:  # queue entries are never positives
            queue_image_ids = ids.min() - 1 - torch.arange(image_queue.shape[0], device=device)
        key_ids = torch.cat([ids, queue_image_ids])
    with torch.no_grad():
        targets = (ids[:, None] == key_ids[None, :]).to(compute_dtype)
        targets = targets / targets.sum(dim=1, keepdim=True)
        scale = logit_scale.detach()
        image_to_text_teacher = _similarity(image_feat_momentum, text_keys, scale, compute_dtype)
        text_to_image_teacher = _similarity(text_feat_momentum, image_keys, scale, compute_dtype)
        image_to_text_targets = (alpha * torch.softmax(image_to_text_teacher, dim=1)
                                 + (1 - alpha) * targets)
        text_to_image_targets = (alpha * torch.softmax(text_to_image_teacher, dim=1)
                                 + (1 - alpha) * targets)
        num_keys = key_ids.shape[0]
        image_to_text_targets = (1 - label_smoothing) * image_to_text_targets + label_smoothing / num_keys
        text_to_image_targets = (1 - label_smoothing) * text_to_image_targets + label_smoothing / num_keys
    image_to_text = _similarity(image_feat, text_keys, logit_scale, compute_dtype)
    text_to_image = _similarity(text_feat, image_keys, logit_scale, compute_dtype)
    loss = 0.5 * (_soft_cross_entropy(image_to_text, image_to_text_targets)
                  + _soft_cross_entropy(text_to_image, text_to_image_targets))
    return loss.to(image_feat.dtype if not upcast else loss.dtype)


@_outside_autocast
def hard_negative_probabilities(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    image_ids: Optional[torch.Tensor] = None,
    group: Optional[torch.distributed.ProcessGroup] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The distributions hard negatives are drawn from, materialized: row i of the first
    is the softmax over the global batch's texts of local image i's logits with its
    positives excluded (probability 0); row j of the second the same over the global
    batch's images for local text j. A row with no negative is all zeros. (B, N) each,
    float32 (float64 for float64 inputs); no gradient."""
    compute_dtype = _compute_dtype(image_feat.dtype, True)
    with torch.no_grad():
        ids, ids_all, images_all, texts_all = _global_batch(
            image_feat, text_feat, image_ids, _distributed_group(group), with_grad=False)
        positive = ids[:, None] == ids_all[None, :]
        image_to_text = _similarity(image_feat, texts_all, logit_scale, compute_dtype)
        text_to_image = _similarity(images_all, text_feat, logit_scale, compute_dtype).t()
        results = []
        for logits in (image_to_text, text_to_image):
            has_negative = ~positive.all(dim=1, keepdim=True)
            logits = logits.masked_fill(positive, float("-inf")).masked_fill(~has_negative, 0.0)
            results.append(torch.softmax(logits, dim=1) * has_negative * ~positive)
    return results[0], results[1]


@_outside_autocast
def sample_hard_negatives(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    image_ids: Optional[torch.Tensor] = None,
    group: Optional[torch.distributed.ProcessGroup] = None,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference hard-negative sampler: ``torch.multinomial`` on
    :func:`hard_negative_probabilities`. Returns global indices (negative text per local
    image, negative image per local text), int64, -1 where a row has no negative."""
    results = []
    for probabilities in hard_negative_probabilities(image_feat, text_feat, logit_scale,
                                                     image_ids=image_ids, group=group):
        has_negative = probabilities.sum(dim=1) > 0
        safe = torch.where(has_negative[:, None], probabilities, torch.ones_like(probabilities))
        draws = torch.multinomial(safe.float().cpu() if generator is not None
                                  and generator.device.type == "cpu" else safe.float(),
                                  1, generator=generator).squeeze(1).to(probabilities.device)
        results.append(torch.where(has_negative, draws, torch.full_like(draws, -1)))
    return results[0], results[1]


def _compute_dtype(dtype: torch.dtype, upcast: bool) -> torch.dtype:
    if not upcast:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


@_outside_autocast
def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor], *,
              upcast: bool = True) -> torch.Tensor:
    """Reference of :func:`blipfast.ops.bias_gelu`: ``F.gelu(x + bias)``, exact (erf)
    GELU, computed in float32 (float64 for float64 x) and returned in x's dtype. With
    ``upcast=False`` it computes as PyTorch would natively (``x + bias`` in the promoted
    dtype of the two), then casts to x's dtype: PyTorch's own error, the tests' yardstick.
    """
    compute_dtype = _compute_dtype(x.dtype, upcast)
    z = x.to(compute_dtype)
    if bias is not None:
        z = z + (bias.to(compute_dtype) if upcast else bias)
    return torch.nn.functional.gelu(z, approximate="none").to(x.dtype)


@_outside_autocast
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  label_smoothing: float = 0.0, reduction: str = "mean",
                  upcast: bool = True) -> torch.Tensor:
    """Reference of :func:`blipfast.ops.cross_entropy`: ``F.cross_entropy`` over the last
    dimension of logits (..., V), computed in float32 (float64 for float64 logits) and
    returned in that dtype; ``"none"`` is shaped like ``labels``. With ``upcast=False``
    it runs on the logits' own dtype, as PyTorch would without autocast."""
    compute_dtype = _compute_dtype(logits.dtype, upcast)
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(compute_dtype), labels.reshape(-1).long(),
        ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
    return losses.reshape(labels.shape) if reduction == "none" else losses


@_outside_autocast
def bias_gelu_linear(x: torch.Tensor, gelu_bias: Optional[torch.Tensor],
                     weight: torch.Tensor, bias: Optional[torch.Tensor], *,
                     upcast: bool = True) -> torch.Tensor:
    """Reference of :func:`blipfast.ops.bias_gelu_linear`: ``F.linear(gelu(x + gelu_bias),
    weight, bias)``, computed in float32 (float64 for float64 x) and returned in x's
    dtype. With ``upcast=False``: :func:`bias_gelu` natively, then ``F.linear`` in x's
    dtype, as PyTorch would run the two layers."""
    compute_dtype = _compute_dtype(x.dtype, upcast)
    activation = bias_gelu(x.to(compute_dtype), gelu_bias, upcast=upcast)
    output = torch.nn.functional.linear(
        activation, weight.to(compute_dtype),
        bias.to(compute_dtype) if bias is not None else None)
    return output.to(x.dtype)


@_outside_autocast
def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               *, residual: Optional[torch.Tensor] = None, eps: float = 1e-5,
               upcast: bool = True) -> torch.Tensor:
    """Reference of :func:`blipfast.ops.layer_norm`: ``F.layer_norm(x + residual, (N,),
    weight, bias, eps)`` over the last dimension, computed in float32 (float64 for float64
    x) and returned in x's dtype; the sum is normalized before it is rounded. With
    ``upcast=False`` it computes as PyTorch would natively (the sum rounded to x's dtype,
    F.layer_norm on x's dtype with the parameters as given): PyTorch's own error, the
    tests' yardstick."""
    return _residual_layer_norm(x, residual, weight, bias, eps, upcast, round_sum=False)[0]


@_outside_autocast
def add_layer_norm(x: torch.Tensor, residual: Optional[torch.Tensor],
                   weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], *,
                   eps: float = 1e-5, upcast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`blipfast.ops.add_layer_norm`: ``(layer_norm(s), s)`` with
    ``s = x + residual`` rounded to x's dtype: the sum is normalized as it is returned, as
    PyTorch's ``LayerNorm(x + residual)`` does. The normalization is computed in float32
    (float64 for float64 x); ``upcast`` as in :func:`layer_norm`."""
    return _residual_layer_norm(x, residual, weight, bias, eps, upcast, round_sum=True)


def _residual_layer_norm(x, residual, weight, bias, eps, upcast, round_sum):
    """(LayerNorm(x + residual), x + residual) in x's dtype; ``round_sum``: normalize the
    sum rounded to x's dtype instead of the sum in the compute dtype."""
    compute_dtype = _compute_dtype(x.dtype, upcast)
    total = x.to(compute_dtype)
    if residual is not None:
        total = total + residual.to(compute_dtype)
    if round_sum:
        total = total.to(x.dtype).to(compute_dtype)
    if upcast:
        weight = weight.to(compute_dtype) if weight is not None else None
        bias = bias.to(compute_dtype) if bias is not None else None
    normed = torch.nn.functional.layer_norm(total, (x.shape[-1],), weight, bias, eps)
    return normed.to(x.dtype), total.to(x.dtype)
