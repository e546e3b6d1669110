"""Shared cases for the contrastive-loss tests (CPU interpreter and CUDA).

Each case builds fresh random inputs and compares the loss and the gradients of every
input (features and logit_scale) with the float64 reference, within the one tolerance
table of ``tolerances.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F

import blipfast
from blipfast import reference
from interpreter_like_gpu import in_each_matmul_order
from tolerances import assert_close_to_reference


@dataclasses.dataclass(frozen=True)
class PairCase:
    """Inputs of :func:`blipfast.ops.contrastive_loss` (one process)."""

    name: str
    batch: int
    feature_dim: int
    queries: int = 0  # 0: image_feat is (B, D); else (B, Q, D)
    repeated_ids: bool = False
    label_smoothing: float = 0.0
    # "transposed": (D, B) storage viewed as (B, D), (D, Q, B) as (B, Q, D); "strided": every
    # other row of a larger buffer (the image ids, if any, are such a view too)
    layout: str = "contiguous"
    logit_scale: float = 1 / 0.07
    scale_shape: tuple = ()
    tied_queries: bool = False  # queries 0 and 2 of every image equal: exact ties in the max

    def __str__(self) -> str:
        return self.name


PAIR_CASES = [
    PairCase("one_pair", batch=1, feature_dim=16),
    PairCase("odd_batch", batch=37, feature_dim=24),
    PairCase("ids_smoothing", batch=50, feature_dim=64, repeated_ids=True, label_smoothing=0.1),
    PairCase("queries3", batch=33, feature_dim=32, queries=3),
    PairCase("queries4_dim88_ids", batch=20, feature_dim=88, queries=4, repeated_ids=True),
    PairCase("queries32", batch=17, feature_dim=16, queries=32, label_smoothing=0.1),
    PairCase("queries3_tied", batch=9, feature_dim=16, queries=3, tied_queries=True),
    PairCase("dim256_transposed_scale100", batch=40, feature_dim=256, layout="transposed",
             logit_scale=100.0),
    PairCase("strided_scale_shape1", batch=29, feature_dim=48, layout="strided",
             scale_shape=(1,)),
    PairCase("strided_ids", batch=21, feature_dim=32, layout="strided", repeated_ids=True),
    # BLIP clamps the temperature at 0.001: confident rows, whose softmax minus target
    # needs the row's largest score to cancel exactly
    PairCase("temperature_clamp_scale1000", batch=17, feature_dim=32, logit_scale=1000.0),
    PairCase("queries3_scale1000_smoothing", batch=17, feature_dim=32, queries=3,
             logit_scale=1000.0, label_smoothing=0.1),
]


@dataclasses.dataclass(frozen=True)
class QueueCase:
    """Inputs of :func:`blipfast.ops.contrastive_loss_with_queue`."""

    name: str
    batch: int
    feature_dim: int
    queue: int = 0
    alpha: float = 0.4
    ids: bool = False
    label_smoothing: float = 0.0
    blip_queue_layout: bool = False  # queue stored (D, K) as BLIP does, passed as .t()
    id_views: bool = False  # ids passed as views of every other element of a larger buffer
    logit_scale: float = 1 / 0.07

    def __str__(self) -> str:
        return self.name


QUEUE_CASES = [
    QueueCase("no_queue", batch=19, feature_dim=32),
    QueueCase("queue", batch=12, feature_dim=40, queue=45),
    QueueCase("queue_ids_smoothing", batch=16, feature_dim=32, queue=37, ids=True,
              label_smoothing=0.1),
    QueueCase("queue_id_views", batch=11, feature_dim=16, queue=23, ids=True, id_views=True),
    QueueCase("alpha0_blip_layout", batch=9, feature_dim=64, queue=20, alpha=0.0,
              blip_queue_layout=True),
    QueueCase("queue_scale1000", batch=17, feature_dim=32, queue=30, logit_scale=1000.0),
]


def random_cases(count: int, seed: int) -> tuple[list[PairCase], list[QueueCase]]:
    """``count`` pair cases and ``count`` queue cases drawing their options at once (batch,
    feature dim, queries, ids, label smoothing, layouts, logit_scale up to BLIP's clamp at
    1000, queue length, alpha, id views): combinations the listed cases do not name.
    Deterministic in ``seed``; the name spells out each case."""
    import random

    draw = random.Random(seed)
    pairs, queues = [], []
    for number in range(count):
        batch, dim = draw.randint(1, 60), draw.choice((16, 24, 40, 64, 88, 256))
        queries = draw.choice((0, 0, 2, 3, 5))
        ids, smoothing = draw.random() < 0.5, draw.choice((0.0, 0.0, 0.1, 0.3))
        layout = draw.choice(("contiguous", "transposed", "strided"))
        scale = draw.choice((1 / 0.07, 1.0, 100.0, 1000.0))
        scale_shape = draw.choice(((), (1,)))
        tied = queries >= 3 and draw.random() < 0.3
        pairs.append(PairCase(
            f"random{number}_b{batch}_d{dim}_q{queries}{'_ids' if ids else ''}"
            f"_smoothing{smoothing}_{layout}_scale{scale:.4g}{'_shape1' if scale_shape else ''}"
            f"{'_tied' if tied else ''}",
            batch, dim, queries, ids, smoothing, layout, scale, scale_shape, tied))

        batch, dim = draw.randint(1, 30), draw.choice((16, 24, 40, 64, 88, 256))
        queue = draw.choice((0, draw.randint(1, 50)))
        alpha = draw.choice((0.0, 0.4, 1.0))
        ids = queue > 0 and draw.random() < 0.5
        smoothing = draw.choice((0.0, 0.1))
        blip_layout = queue > 0 and draw.random() < 0.5
        id_views = ids and draw.random() < 0.5
        scale = draw.choice((1 / 0.07, 1.0, 1000.0))
        queues.append(QueueCase(
            f"random{number}_b{batch}_d{dim}_queue{queue}_alpha{alpha}{'_ids' if ids else ''}"
            f"{'_views' if id_views else ''}_smoothing{smoothing}"
            f"{'_blip_layout' if blip_layout else ''}_scale{scale:.4g}",
            batch, dim, queue, alpha, ids, smoothing, blip_layout, id_views, scale))
    return pairs, queues


def _features(shape, layout: str, dtype, device, generator) -> torch.Tensor:
    """Normalized random features with the given layout (values identical across dtypes)."""
    reverse = tuple(reversed(range(len(shape))))  # (B, D) -> (D, B); (B, Q, D) -> (D, Q, B)
    if layout == "transposed":
        storage = torch.randn(*reversed(shape), generator=generator)
        values = storage.permute(reverse)
    elif layout == "strided":
        storage = torch.randn(shape[0] * 2, *shape[1:], generator=generator)
        values = storage[::2]
    else:
        values = torch.randn(*shape, generator=generator)
    values = values / values.norm(dim=-1, keepdim=True)
    if layout == "contiguous":
        return values.to(device, dtype)
    # Keep the non-contiguous view: write the normalized values back into the storage.
    storage = storage.clone()
    if layout == "transposed":
        storage.copy_(values.permute(reverse))
        return storage.to(device, dtype).permute(reverse)
    storage[::2] = values
    return storage.to(device, dtype)[::2]


def _compare(name, actual_values, run_reference, leaves, dtype) -> None:
    """Compare (loss, grads...) against the float64 reference, with PyTorch's own error
    measured twice in the same dtype: as given, and reversed (the batch rows and the
    feature dimension; gradients reversed back), which sums every score and every softmax
    in another order. The scores' rounding dominates PyTorch's error, and one order alone
    is at times several times more exact than usual (at logit_scale 1000, float32: bounds
    as low as 3e-5 beside a median of 5e-5), which fails a kernel whose error is of the
    usual size. On CPU in float32, both again with the matmuls in a GPU's order, the
    interpreter's for the kernels (``torch_matmuls_like_gpu``): with BLIP-2's best of
    queries at logit_scale 1000, this CPU's BLAS rounded the scores 6 times less than that
    order (kernel 8.8e-5, PyTorch 1.4e-5 with BLAS, 8.9e-5 in the GPU's order)."""
    exact = run_reference(torch.float64, True)
    yardsticks = in_each_matmul_order(actual_values[0].device, dtype,
                                      [lambda: run_reference(dtype, False),
                                       lambda: run_reference(dtype, False, reverse=True)])
    labels = ["loss"] + [f"grad_{label}" for label in leaves]
    # The reversal maps back right (else it would pass off a wrong result as a yardstick).
    exact_reversed = run_reference(torch.float64, True, reverse=True)
    for label, expected, value in zip(labels, exact, exact_reversed):
        torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12,
                                   msg=lambda text: f"{name}/{label} reversed: {text}")
    for index, label in enumerate(labels):
        assert_close_to_reference(f"{name}/{label}", actual_values[index],
                                  [results[index] for results in yardsticks], exact[index])


def _reversed_rows(tensor: Optional[torch.Tensor], reverse: bool) -> Optional[torch.Tensor]:
    """``tensor`` (ids) with its rows (first dimension) in reverse order when ``reverse``."""
    return tensor.flip(0) if reverse and tensor is not None else tensor


def _reversed_features(tensor: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``tensor`` (features, or their gradient) with its rows and its feature dimension in
    reverse order when ``reverse`` (its own inverse)."""
    return tensor.flip(0, -1) if reverse else tensor


def run_pair_case(case: PairCase, dtype: torch.dtype, device: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    image_shape = ((case.batch, case.queries, case.feature_dim) if case.queries
                   else (case.batch, case.feature_dim))
    image = _features(image_shape, case.layout, dtype, device, generator)
    if case.tied_queries:  # the gradient of a tie goes to the first query, as torch.max's
        image = image.clone()
        image[:, 2] = image[:, 0]
    text = _features((case.batch, case.feature_dim), case.layout, dtype, device, generator)
    scale = torch.full(case.scale_shape, case.logit_scale, device=device)
    ids = None
    if case.repeated_ids:
        ids = torch.randint(0, max(1, case.batch // 3), (case.batch,), generator=generator).to(device)
        if case.layout == "strided":
            ids = _every_other_element(ids)
    upstream = 0.7
    options = dict(image_ids=ids, label_smoothing=case.label_smoothing)

    leaves = [image.detach().requires_grad_(), text.detach().requires_grad_(),
              scale.detach().requires_grad_()]
    loss = blipfast.ops.contrastive_loss(*leaves, **options)
    assert loss.dtype == torch.float32 and loss.shape == ()
    grads = torch.autograd.grad(loss, leaves, torch.tensor(upstream, device=device))
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype

    def run_reference(cast_dtype, upcast, reverse=False):
        inputs = [_reversed_features(leaf.detach().to(cast_dtype), reverse).requires_grad_()
                  for leaf in leaves[:2]]
        inputs.append(leaves[2].detach().to(torch.float64 if upcast else torch.float32)
                      .requires_grad_())
        result = reference.contrastive_loss(
            *inputs, upcast=upcast, **dict(options, image_ids=_reversed_rows(ids, reverse)))
        image_grad, text_grad, scale_grad = torch.autograd.grad(
            result, inputs, torch.tensor(upstream, dtype=result.dtype, device=device))
        return (result, _reversed_features(image_grad, reverse),
                _reversed_features(text_grad, reverse), scale_grad)

    _compare(case.name, (loss, *grads), run_reference, ["image", "text", "scale"], dtype)


def run_queue_case(case: QueueCase, dtype: torch.dtype, device: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.feature_dim)

    def features(rows):
        return _features((rows, case.feature_dim), "contiguous", dtype, device, generator)

    image, text, image_momentum, text_momentum = (features(case.batch) for _ in range(4))
    queues = {}
    if case.queue:
        image_queue, text_queue = features(case.queue), features(case.queue)
        if case.blip_queue_layout:  # BLIP's (D, K) buffers, passed as (K, D) views
            image_queue, text_queue = image_queue.t().contiguous().t(), text_queue.t().contiguous().t()
        queues = dict(image_queue=image_queue, text_queue=text_queue)
    ids = {}
    if case.ids:
        ids = dict(image_ids=torch.randint(0, 6, (case.batch,), generator=generator).to(device),
                   queue_image_ids=torch.randint(0, 9, (case.queue,), generator=generator).to(device))
        if case.id_views:
            ids = {key: _every_other_element(value) for key, value in ids.items()}
    scale = torch.tensor(case.logit_scale, device=device)
    options = dict(alpha=case.alpha, label_smoothing=case.label_smoothing, **ids)

    leaves = [image.requires_grad_(), text.requires_grad_(), scale.requires_grad_()]
    constants = dict(image_feat_momentum=image_momentum, text_feat_momentum=text_momentum, **queues)
    loss = blipfast.ops.contrastive_loss_with_queue(*leaves, **constants, **options)
    assert loss.dtype == torch.float32 and loss.shape == ()
    grads = torch.autograd.grad(loss, leaves)
    assert image.shape == shape

    def run_reference(cast_dtype, upcast, reverse=False):
        # Reversed: the batch rows, the queue entries (and their ids) and the features.
        inputs = [_reversed_features(leaf.detach().to(cast_dtype), reverse).requires_grad_()
                  for leaf in leaves[:2]]
        inputs.append(leaves[2].detach().to(torch.float64 if upcast else torch.float32)
                      .requires_grad_())
        cast = {key: _reversed_features(value.to(cast_dtype), reverse)
                for key, value in constants.items()}
        reordered = dict(options, **{key: _reversed_rows(value, reverse)
                                     for key, value in ids.items()})
        result = reference.contrastive_loss_with_queue(*inputs, upcast=upcast, **cast,
                                                       **reordered)
        image_grad, text_grad, scale_grad = torch.autograd.grad(result, inputs)
        return (result, _reversed_features(image_grad, reverse),
                _reversed_features(text_grad, reverse), scale_grad)

    _compare(case.name, (loss, *grads), run_reference, ["image", "text", "scale"], dtype)


def _every_other_element(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` as a stride-2 view whose storage holds other ids in between (a kernel that
    ignored the stride would read those)."""
    storage = torch.stack([ids, ids.flip(0) + 1], dim=1)
    view = storage[:, 0]
    assert view.stride() == (2,) and torch.equal(view, ids)
    return view


def normalized(*shape, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random unit vectors along the last dim (float32, CPU)."""
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


# Larger shapes for the GPU, where the tiles are 64-128 wide: several tiles in both
# directions, ragged edges, and BLIP-2's Q=32.
GPU_PAIR_CASES = [
    PairCase("gpu_many_tiles", batch=1000, feature_dim=256, repeated_ids=True,
             label_smoothing=0.1),
    PairCase("gpu_queries32", batch=300, feature_dim=256, queries=32),
]
GPU_QUEUE_CASES = [
    QueueCase("gpu_queue", batch=200, feature_dim=256, queue=1000, ids=True),
]
