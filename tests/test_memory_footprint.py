"""What the fused ops and the models allocate, checked on CPU before any GPU measures a
peak: the contrastive losses never hold a (B, N) or (N, N) matrix, attention never an
(Lq, Lk) one, cross-entropy no float32 copy of the logits, and no training step of
blipfast's models or of transformers' patched ones an attention mask or score matrix.

Each op runs forward and backward with its Triton launches intercepted (a launch runs
nothing, so this needs neither the interpreter nor a GPU; every tensor the op and its
launchers allocate is still allocated) under a dispatch mode that records allocations:
every operator output that does not alias an input by the operator's schema, including the
operators inside blipfast's torch.library ops and those the autograd engine runs for the
backward. Two bounds per op:

- no single allocation is larger than the op's inputs together (a float32 copy of half
  precision logits is twice as large; a matrix over both sequence axes is several times
  larger at these sizes);
- the bytes allocated over forward and backward grow linearly: four times the lengths (or
  the batch and the queue) give at most 4.25 times the bytes, where a quadratic term
  would give about 16.

The same recorder run on each op's materializing reference (``blipfast.reference``)
breaks both bounds (cross-entropy's copy the first only), and on transformers' eager
models finds their masks and attention probabilities, so these tests can fail.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch._library.custom_ops import OPDEFS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import blipfast.ops as ops
from blipfast import reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from launch_interception import kernel_launches_intercepted  # noqa: E402

GROWTH = 4
# Allowed ratio of the bytes allocated at GROWTH times the size to those at the size.
LINEAR_GROWTH_LIMIT = 4.25


@dataclass
class Allocation:
    operator: str
    shape: tuple
    dtype: torch.dtype
    bytes: int


class AllocationRecorder(TorchDispatchMode):
    """Records every tensor an operator allocates (its outputs that do not alias an
    input). blipfast's torch.library ops are run through their Python bodies under the
    recorder, so what they allocate inside is recorded rather than only their results."""

    def __init__(self):
        super().__init__()
        self.allocations: list[Allocation] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "blipfast":
            with self:
                return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        result = func(*args, **kwargs)
        results = result if isinstance(result, (tuple, list)) else (result,)
        for returned, value in zip(func._schema.returns, results):
            if returned.alias_info is not None:  # a view, or an in-place or out= result
                continue
            for tensor in tree_leaves(value):
                if isinstance(tensor, torch.Tensor):
                    self.allocations.append(Allocation(
                        str(func), tuple(tensor.shape), tensor.dtype,
                        tensor.untyped_storage().nbytes()))
        return result

    def total_bytes(self) -> int:
        return sum(allocation.bytes for allocation in self.allocations)

    def largest(self) -> Allocation:
        return max(self.allocations, key=lambda allocation: allocation.bytes)


def record(step: Callable[[], torch.Tensor], inputs: list[torch.Tensor],
           intercept: bool = True, reference_modules: tuple[str, ...] = ()) -> AllocationRecorder:
    """Allocations of ``step()`` (the forward) and of its backward to ``inputs`` (the
    output gradient, all ones, is made outside the recording); ``intercept`` and
    ``reference_modules`` as ``bench/launch_interception.py``'s
    :func:`kernel_launches_intercepted`."""
    recorder = AllocationRecorder()
    with kernel_launches_intercepted(reference_modules) if intercept else contextlib.nullcontext():
        with recorder:
            output = step()
        grad_output = torch.ones_like(output)
        with recorder:
            torch.autograd.grad(output, inputs, grad_output, allow_unused=True)
    return recorder


@dataclass
class OpCall:
    fused: Callable[[], torch.Tensor]
    materialized: Callable[[], torch.Tensor]  # the reference, which builds the matrix
    inputs: list  # the tensors that get gradients
    constants: list = ()  # the other tensor arguments

    def input_bytes(self) -> int:
        return sum(tensor.untyped_storage().nbytes()
                   for tensor in [*self.inputs, *self.constants])


def _features(*shape, dtype=torch.float32):
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1).to(dtype).requires_grad_()


# Each case: a function of the size returning an OpCall. CASES below gives the sizes, at
# which a matrix over both axes is several times the inputs' bytes.

def contrastive_pair(size):
    image, text = _features(size, 32), _features(size, 32)
    scale = torch.tensor(14.0, requires_grad=True)
    ids = torch.arange(size) // 2
    arguments = dict(image_ids=ids, label_smoothing=0.1)
    return OpCall(lambda: ops.contrastive_loss(image, text, scale, **arguments),
                  lambda: reference.contrastive_loss(image, text, scale, **arguments),
                  [image, text, scale], [ids])


def contrastive_multi_query(size):
    image, text = _features(size, 4, 32), _features(size, 32)
    scale = torch.tensor(14.0, requires_grad=True)
    return OpCall(lambda: ops.contrastive_loss(image, text, scale),
                  lambda: reference.contrastive_loss(image, text, scale),
                  [image, text, scale])


def contrastive_hard_negatives(size):
    image, text = _features(size, 32), _features(size, 32)
    scale = torch.tensor(14.0, requires_grad=True)

    def fused():
        generator = torch.Generator().manual_seed(0)
        return ops.contrastive_loss_with_hard_negatives(
            image, text, scale, generator=generator).loss

    def materialized():
        loss = reference.contrastive_loss(image, text, scale)
        with torch.no_grad():
            reference.hard_negative_probabilities(image, text, scale)
        return loss

    return OpCall(fused, materialized, [image, text, scale])


def contrastive_queue(size):
    image, text = _features(size, 32), _features(size, 32)
    scale = torch.tensor(14.0, requires_grad=True)
    arguments = dict(image_feat_momentum=_features(size, 32).detach(),
                     text_feat_momentum=_features(size, 32).detach(),
                     image_queue=_features(2 * size, 32).detach(),
                     text_queue=_features(2 * size, 32).detach(), alpha=0.4)
    return OpCall(lambda: ops.contrastive_loss_with_queue(image, text, scale, **arguments),
                  lambda: reference.contrastive_loss_with_queue(image, text, scale,
                                                                **arguments),
                  [image, text, scale], list(arguments.values())[:4])


def _heads(batch, length, dtype=torch.float16):
    return torch.randn(batch, length, 2, 16, dtype=dtype, requires_grad=True)


def attention_causal_padded(size):
    q, k, v = _heads(2, size), _heads(2, size), _heads(2, size)
    mask = torch.rand(2, size) > 0.2
    arguments = dict(causal=True, key_padding_mask=mask)
    return OpCall(lambda: ops.attention(q, k, v, **arguments),
                  lambda: reference.attention(q, k, v, **arguments),
                  [q, k, v], [value for value in arguments.values()
                              if isinstance(value, torch.Tensor)])


def attention_shared_keys(size):
    # Cross-attention of four texts onto two images' keys (kv_index), the texts an eighth
    # as long as the images.
    q, k, v = _heads(4, size // 8), _heads(2, size), _heads(2, size)
    arguments = dict(key_padding_mask=torch.rand(2, size) > 0.2,
                     kv_index=torch.tensor([0, 1, 1, 0]))
    return OpCall(lambda: ops.attention(q, k, v, **arguments),
                  lambda: reference.attention(q, k, v, **arguments),
                  [q, k, v], [value for value in arguments.values()
                              if isinstance(value, torch.Tensor)])


def cross_entropy_half(size):
    logits = torch.randn(6, 125 * size, dtype=torch.float16, requires_grad=True)
    labels = torch.randint(0, 125 * size, (6,))
    labels[2] = -100
    arguments = dict(label_smoothing=0.1)
    return OpCall(lambda: ops.cross_entropy(logits, labels, **arguments),
                  lambda: reference.cross_entropy(logits, labels, **arguments),
                  [logits], [labels])


CASES = {
    # name: (case, size); the comment gives, at that size, the reference's largest
    # allocation (the matrix, or for cross-entropy the float32 copy) in inputs' bytes.
    "contrastive_pair": (contrastive_pair, 256),  # 3.9x
    "contrastive_multi_query": (contrastive_multi_query, 512),  # 12.8x
    "contrastive_hard_negatives": (contrastive_hard_negatives, 256),  # 4x
    "contrastive_queue": (contrastive_queue, 256),  # 3x
    "attention_causal_padded": (attention_causal_padded, 256),  # 10.6x
    "attention_shared_keys": (attention_shared_keys, 288),  # 3.9x
    "cross_entropy_half": (cross_entropy_half, 8),  # 2x
}


@pytest.mark.parametrize("name", CASES)
def test_no_allocation_is_larger_than_the_inputs(name):
    case, size = CASES[name]
    call = case(size)
    largest = record(call.fused, call.inputs).largest()
    assert largest.bytes <= call.input_bytes(), (
        f"{name}: {largest.operator} allocated {largest.shape} {largest.dtype} "
        f"({largest.bytes} bytes), more than the inputs together ({call.input_bytes()})")


@pytest.mark.parametrize("name", CASES)
def test_bytes_allocated_grow_linearly(name):
    case, size = CASES[name]
    totals = []
    for scaled in (size, GROWTH * size):
        call = case(scaled)
        totals.append(record(call.fused, call.inputs).total_bytes())
    assert totals[1] <= LINEAR_GROWTH_LIMIT * totals[0], (
        f"{name}: {totals[0]} bytes at size {size}, {totals[1]} at {GROWTH}x: "
        f"{totals[1] / totals[0]:.1f}x, not linear")


@pytest.mark.parametrize("name", CASES)
def test_the_recorder_catches_the_materializing_reference(name):
    """The reference of each op holds the matrix the fused op avoids (or a float32 copy):
    recorded the same way, its largest allocation breaks the first bound, and (but for
    cross-entropy's copy, which is linear) its bytes break the second."""
    case, size = CASES[name]
    totals = []
    for scaled in (size, GROWTH * size):
        call = case(scaled)
        recorder = record(call.materialized, call.inputs, intercept=False)
        assert recorder.largest().bytes > call.input_bytes()
        totals.append(recorder.total_bytes())
    if not name.startswith("cross_entropy"):
        assert totals[1] > LINEAR_GROWTH_LIMIT * totals[0]


# --------------------------------------------------------------------------------------
# Models: no tensor over two sequence axes (an attention mask or score matrix) is ever
# allocated in a training step, blipfast's models and transformers' patched ones alike.
# --------------------------------------------------------------------------------------

TEXT_LENGTH, ANSWER_LENGTH, IMAGE_SIZE = 11, 6, 40
IMAGE_TOKENS = (IMAGE_SIZE // 8) ** 2 + 1  # 8-pixel patches and the class token: 26
# No other dim of these configs and batches takes these values (batch 3, hidden 32,
# heads 2 of 16, FFN 64, vocabulary 99, positions 40, queue 4, patches 8 x 8).
SEQUENCE_LENGTHS = {TEXT_LENGTH, ANSWER_LENGTH, IMAGE_TOKENS}


def _training_step(task: str, patched: bool = False, transformers_eager: bool = False):
    """One forward and backward of a tiny model at the lengths above, as a callable."""
    import blipfast
    import blipfast.models as models
    from blip_models import hf_model, images, text_batch, tiny_config

    model = hf_model(task, tiny_config(image_size=IMAGE_SIZE), seed=0)
    if not transformers_eager:
        model = blipfast.patch(model) if patched else getattr(models, task).from_hf(model)
    model.train()
    generator = torch.Generator().manual_seed(0)
    ids, mask = text_batch(3, TEXT_LENGTH, generator, pad_last_from=7)
    pixels = images(3, generator, size=IMAGE_SIZE)
    if task == "BlipForConditionalGeneration":
        arguments = dict(labels=ids.masked_fill(mask == 0, -100))
    elif task == "BlipForQuestionAnswering":
        arguments = dict(labels=text_batch(3, ANSWER_LENGTH, generator)[0])
    else:  # image-text matching; on blipfast's model two of the three texts on one image
        arguments = dict(use_itm_head=True)
        if not (transformers_eager or patched):
            pixels, arguments["image_index"] = pixels[:2], torch.tensor([0, 1, 1])

    def step():
        output = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, **arguments)
        return output.loss if task != "BlipForImageTextRetrieval" else output.itm_score.sum()

    return step, [parameter for parameter in model.parameters() if parameter.requires_grad]


def _pretraining_step():
    from blip_models import images, text_batch, tiny_config
    from blipfast.train import BlipForPreTraining

    torch.manual_seed(3)
    model = BlipForPreTraining(tiny_config(image_size=IMAGE_SIZE), queue_size=4, momentum=0.9,
                               encoder_token_id=5).train()
    generator = torch.Generator().manual_seed(3)
    ids, mask = text_batch(3, TEXT_LENGTH, generator, pad_last_from=7)
    pixels = images(3, generator, size=IMAGE_SIZE)

    def step():
        return model(pixels, ids, mask, alpha=0.4, image_ids=torch.tensor([0, 1, 0]),
                     generator=torch.Generator().manual_seed(0)).loss

    return step, list(model.trainable_parameters())


# The pre-training step indexes with the hard negatives the contrastive kernel draws, which
# an intercepted launch leaves unwritten: its contrastive losses run their reference, whose
# (B, N) matrices are over batch axes (the tests above cover the kernel).
REFERENCE_MODULES = {"pretraining": ("contrastive",)}


MODEL_STEPS = {
    "captioning": lambda: _training_step("BlipForConditionalGeneration"),
    "image_text_matching": lambda: _training_step("BlipForImageTextRetrieval"),
    "question_answering": lambda: _training_step("BlipForQuestionAnswering"),
    "pretraining": _pretraining_step,
    "patched_captioning": lambda: _training_step("BlipForConditionalGeneration", patched=True),
    "patched_image_text_matching": lambda: _training_step("BlipForImageTextRetrieval",
                                                          patched=True),
    "patched_question_answering": lambda: _training_step("BlipForQuestionAnswering",
                                                         patched=True),
}


def _over_two_sequence_axes(recorder: AllocationRecorder) -> list[Allocation]:
    return [allocation for allocation in recorder.allocations
            if sum(size in SEQUENCE_LENGTHS for size in allocation.shape) >= 2]


@pytest.mark.parametrize("name", MODEL_STEPS)
def test_training_steps_allocate_nothing_over_two_sequence_axes(name):
    step, parameters = MODEL_STEPS[name]()
    recorder = record(step, parameters, reference_modules=REFERENCE_MODULES.get(name, ()))
    assert len(recorder.allocations) > 100  # the step ran, and was recorded
    assert _over_two_sequence_axes(recorder) == []


@pytest.mark.parametrize("task", ["BlipForConditionalGeneration", "BlipForImageTextRetrieval"])
def test_the_recorder_catches_transformers_masks_and_scores(task):
    """transformers' eager model, recorded the same way, allocates its (B, 1, L, L) masks
    and (B, H, Lq, Lk) attention probabilities."""
    step, parameters = _training_step(task, transformers_eager=True)
    shapes = {allocation.shape for allocation in
              _over_two_sequence_axes(record(step, parameters, intercept=False))}
    assert (3, 2, TEXT_LENGTH, IMAGE_TOKENS) in shapes  # cross-attention probabilities
    assert (3, 2, IMAGE_TOKENS, IMAGE_TOKENS) in shapes  # the ViT's
