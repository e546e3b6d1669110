"""Training convergence: blipfast's kernels train a BLIP model the way transformers does.

For each task, one tiny transformers model (random weights) is copied three ways and each
copy trains for ``STEPS`` AdamW steps (float32, ``model.train()``, fixed learning rate) on
the same fixed batches, cycled:

- eager: transformers' model as it is (PyTorch ops; the reference);
- patched: the same model after ``blipfast.patch(model)`` (still transformers' class,
  blipfast's fused kernels inside);
- blipfast model: ``blipfast.models.<Task>.from_hf(model)``.

Tasks:

- captioning (``BlipForConditionalGeneration``): the LM loss with label smoothing 0.1, pad
  positions labelled -100;
- image-text retrieval (``BlipForImageTextRetrieval``): ITM, the cross-entropy of
  ``itm_score`` (``use_itm_head=True``) on the positive pairs (label 1) and on the same
  images with the texts rolled by one (label 0), plus ITC, the symmetric cross-entropy of
  the (image x text) cosine similarities (``use_itm_head=False``) divided by 0.07.

Every batch has one right-padded text. The patched and blipfast-model runs are each
compared with the eager run (measured: the largest over both variants, which agree with
each other to the bit on this machine; CPU, Triton interpreter):

=============================  ==============================  ==========  =========  ======
what                           measure                         captioning  retrieval  bound
=============================  ==============================  ==========  =========  ======
loss, steps 1-5                |loss - eager| / |eager|        0           3.7e-7     5e-6
loss, every step               |loss - eager| / |eager|        1.8e-7      4.2e-5     2e-4
first step's gradients         ||g - eager|| / ||eager||,      5.3e-7      5.2e-6     5e-5
                               per parameter
final parameters (state dict)  ||p - eager|| / ||eager||,      1.4e-6      6.0e-5     3e-4
                               per floating-point tensor
=============================  ==============================  ==========  =========  ======

The runs differ only by float32 reassociation, which AdamW carries from step to step, so
the later-step and parameter bounds are looser (the retrieval loss also falls to 0.08 by
the last step, which inflates its relative error). Attention key biases are left out of the
gradient and parameter comparisons: a key bias adds the same number to all of a query's
scores, so its exact gradient is zero, and AdamW turns its rounding noise into
learning-rate-sized steps that differ in every run (3e-3 to 7e-2 relative here).

The first step's gradients are compared because AdamW is blind to a parameter gradient
off by a constant factor (it divides each update by the gradient's running RMS): scaling
the LayerNorm kernel's weight gradient, or the bias-GELU kernel's bias gradient, by 1.001
leaves losses and parameters within rounding, but gives gradient errors of 1e-3 here.
Errors that propagate do show in the losses: scaling the LayerNorm kernel's input gradient
by 1.001 gives loss errors of 1.1e-5 (captioning) and 3.2e-5 (retrieval) by step 5 and
parameter errors of 1.2e-3 and 3.4e-4.

Each run must also learn (mean loss over the last pass through the batches below 0.7 x
that over the first; measured 0.41 captioning, 0.05 retrieval), so the test fails if
nothing trains, and the patched model must stay transformers' class, patched.

Size: the Triton interpreter costs tens of milliseconds per kernel launch and grid
program on CPU, so the models have one layer per tower (which still runs every kernel
path: LayerNorm with and without residual, add+LayerNorm with its sum output, bias+GELU,
self-, causal and cross-attention, padded keys), images of 24 pixels (9 patches + class
token), texts of 7 tokens, batches of 2 and 30 steps; the two-layer models are compared
for one step in ``tests/test_patch.py`` and ``tests/test_blip_models.py``. Weights are
drawn with std 0.1 instead of transformers' defaults (1e-10 for the vision tower, which
makes every image look the same, and 0.02 for text, which leaves attention uniform), so
that retrieval learns within these steps.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import blipfast
import blipfast.models
from blip_models import PAD, hf_model, images, text_batch, tiny_config

CAPTIONING = "BlipForConditionalGeneration"
RETRIEVAL = "BlipForImageTextRetrieval"

STEPS = 30
LEARNING_RATE = 2e-3
BATCH_SIZE = 2
NUMBER_OF_BATCHES = 2
TEXT_LENGTH = 7
PADDED_FROM = 4  # the last text of each batch is padding from this position on
IMAGE_SIZE = 24
LAYERS = 1
INITIALIZER_RANGE = 0.1
LABEL_SMOOTHING = 0.1
ITC_TEMPERATURE = 0.07
SEED = 31

EARLY_STEPS = 5
EARLY_LOSS_RELATIVE_TOLERANCE = 5e-6
LOSS_RELATIVE_TOLERANCE = 2e-4
GRADIENT_RELATIVE_TOLERANCE = 5e-5
PARAMETER_RELATIVE_TOLERANCE = 3e-4
LEARNED_LOSS_RATIO = 0.7


@dataclass(frozen=True)
class Batch:
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


@dataclass(frozen=True)
class TrainingRun:
    losses: list[float]
    first_gradients: dict[str, torch.Tensor | None]  # by parameter name, tied names too
    state: dict[str, torch.Tensor]  # the final state dict


def _config(task: str) -> transformers.BlipConfig:
    label_smoothing = LABEL_SMOOTHING if task == CAPTIONING else 0.0
    config = tiny_config(image_size=IMAGE_SIZE, num_hidden_layers=LAYERS,
                         label_smoothing=label_smoothing, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    config.vision_config.num_hidden_layers = LAYERS
    config.vision_config.attention_dropout = 0.0  # blipfast raises on attention dropout
    for part in (config, config.vision_config, config.text_config):
        part.initializer_range = INITIALIZER_RANGE
    return config


@functools.cache
def _initial_model(task: str) -> nn.Module:
    """The one transformers model every run of ``task`` starts from (copied, never trained)."""
    model = hf_model(task, _config(task), seed=SEED)
    dropouts = [module.p for module in model.modules() if isinstance(module, nn.Dropout)]
    assert dropouts and all(p == 0.0 for p in dropouts), dropouts
    return model


@functools.cache
def _batches() -> tuple[Batch, ...]:
    generator = torch.Generator().manual_seed(SEED)
    batches = []
    for _ in range(NUMBER_OF_BATCHES):
        input_ids, attention_mask = text_batch(BATCH_SIZE, TEXT_LENGTH, generator,
                                               pad_last_from=PADDED_FROM)
        batches.append(Batch(images(BATCH_SIZE, generator, size=IMAGE_SIZE), input_ids,
                             attention_mask))
    return tuple(batches)


def _captioning_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    return model(pixel_values=batch.pixel_values, input_ids=batch.input_ids,
                 attention_mask=batch.attention_mask, labels=labels).loss


def _retrieval_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """ITM on positive and text-rolled negative pairs, plus symmetric ITC."""
    size = batch.input_ids.shape[0]
    matching = model(input_ids=torch.cat([batch.input_ids, batch.input_ids.roll(1, dims=0)]),
                     attention_mask=torch.cat([batch.attention_mask,
                                               batch.attention_mask.roll(1, dims=0)]),
                     pixel_values=torch.cat([batch.pixel_values, batch.pixel_values]),
                     use_itm_head=True).itm_score
    matching_labels = torch.cat([torch.ones(size), torch.zeros(size)]).long()
    matching_loss = F.cross_entropy(matching, matching_labels)
    similarities = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, use_itm_head=False).itm_score
    logits = similarities / ITC_TEMPERATURE
    targets = torch.arange(size)
    contrastive_loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    return matching_loss + contrastive_loss


LOSSES = {CAPTIONING: _captioning_loss, RETRIEVAL: _retrieval_loss}


def _train(task: str, model: nn.Module) -> TrainingRun:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    batches = _batches()
    losses, first_gradients = [], None
    for step in range(STEPS):
        loss = LOSSES[task](model, batches[step % len(batches)])
        optimizer.zero_grad()
        loss.backward()
        if first_gradients is None:
            first_gradients = {
                name: None if parameter.grad is None else parameter.grad.clone()
                for name, parameter in model.named_parameters(remove_duplicate=False)}
        optimizer.step()
        losses.append(loss.item())
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    return TrainingRun(losses, first_gradients, state)


@functools.cache
def _eager_run(task: str) -> TrainingRun:
    return _train(task, copy.deepcopy(_initial_model(task)))


def _patched(task: str) -> nn.Module:
    model = blipfast.patch(copy.deepcopy(_initial_model(task)))
    _assert_still_patched_transformers_model(task, model)
    return model


def _blipfast_model(task: str) -> nn.Module:
    model = getattr(blipfast.models, task).from_hf(copy.deepcopy(_initial_model(task)))
    assert type(model) is getattr(blipfast.models, task)
    return model


VARIANTS = {"patched": _patched, "blipfast_model": _blipfast_model}


def _assert_still_patched_transformers_model(task: str, model: nn.Module) -> None:
    assert type(model) is getattr(transformers, task)
    assert blipfast.is_patched(model)


def _relative_loss_errors(run: TrainingRun, reference: TrainingRun) -> list[float]:
    return [abs(loss - expected) / abs(expected)
            for loss, expected in zip(run.losses, reference.losses)]


def _without_key_bias(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """``tensor`` less any attention key bias: a key bias adds the same number to all of a
    query's scores, which softmax ignores, so its exact gradient is zero and AdamW turns
    the rounding noise of that gradient into learning-rate-sized steps, different in every
    run. None for the text towers' ``key.bias``; the key third removed from the vision
    tower's fused ``qkv.bias`` (laid out query, key, value)."""
    if name.endswith("key.bias"):
        return None
    if name.endswith("qkv.bias"):
        query, _, value = tensor.chunk(3)
        return torch.cat([query, value])
    return tensor


def _relative_error(name: str, actual: torch.Tensor, expected: torch.Tensor) -> float | None:
    """``||actual - expected|| / ||expected||``, key biases left out (None for a text
    tower's key bias; see :func:`_without_key_bias`)."""
    actual, expected = _without_key_bias(name, actual), _without_key_bias(name, expected)
    if expected is None:
        return None
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _relative_parameter_errors(run: TrainingRun, reference: TrainingRun) -> dict[str, float]:
    """The relative error of every floating-point tensor of the final state dict (key
    biases left out); other tensors must be equal."""
    assert run.state.keys() == reference.state.keys()
    errors = {}
    for name, expected in reference.state.items():
        if not expected.is_floating_point():
            assert torch.equal(run.state[name], expected), name
            continue
        error = _relative_error(name, run.state[name], expected)
        if error is not None:
            errors[name] = error
    return errors


def _relative_first_gradient_errors(run: TrainingRun, reference: TrainingRun) -> dict[str, float]:
    """The relative error of the first step's gradient of every parameter (key biases left
    out: their exact gradient is zero, see :func:`_without_key_bias`). A parameter without
    an eager gradient must have none, or a zero one, here too."""
    assert run.first_gradients.keys() == reference.first_gradients.keys()
    errors = {}
    for name, expected in reference.first_gradients.items():
        actual = run.first_gradients[name]
        if expected is None:
            assert actual is None or not actual.any(), f"{name}: unexpected gradient"
            continue
        assert actual is not None, f"{name}: no gradient"
        error = _relative_error(name, actual, expected)
        if error is not None:
            errors[name] = error
    return errors


def _mean_loss_of_pass(losses: list[float], first: bool) -> float:
    """The mean loss over the first or last pass through the batches."""
    passed = losses[:NUMBER_OF_BATCHES] if first else losses[-NUMBER_OF_BATCHES:]
    return sum(passed) / len(passed)


def _assert_worst_within(errors: dict, tolerance: float, what: str) -> None:
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tolerance, \
        f"{what} {worst}: relative error {errors[worst]:.2e} > {tolerance:.0e}"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("task", [CAPTIONING, RETRIEVAL], ids=["captioning", "retrieval"])
def test_training_matches_eager_transformers(task, variant):
    reference = _eager_run(task)
    model = VARIANTS[variant](task)
    run = _train(task, model)
    if variant == "patched":
        _assert_still_patched_transformers_model(task, model)

    loss_errors = dict(enumerate(_relative_loss_errors(run, reference)))
    assert len(loss_errors) == STEPS
    early_errors = {step: loss_errors[step] for step in range(EARLY_STEPS)}
    context = f"(losses {run.losses}, eager {reference.losses})"
    _assert_worst_within(early_errors, EARLY_LOSS_RELATIVE_TOLERANCE, f"{context} loss of step")
    _assert_worst_within(loss_errors, LOSS_RELATIVE_TOLERANCE, f"{context} loss of step")

    gradient_errors = _relative_first_gradient_errors(run, reference)
    assert len(gradient_errors) > 20
    _assert_worst_within(gradient_errors, GRADIENT_RELATIVE_TOLERANCE, "first-step gradient of")

    parameter_errors = _relative_parameter_errors(run, reference)
    assert len(parameter_errors) > 20
    _assert_worst_within(parameter_errors, PARAMETER_RELATIVE_TOLERANCE, "final")

    for losses in (reference.losses, run.losses):
        first, last = _mean_loss_of_pass(losses, True), _mean_loss_of_pass(losses, False)
        assert last < LEARNED_LOSS_RATIO * first, f"did not learn: losses {losses}"


def test_every_batch_has_a_right_padded_text():
    """The masked path is trained too: each batch's last text is padding from
    ``PADDED_FROM`` on, the others are not padded."""
    for batch in _batches():
        assert batch.attention_mask[-1, PADDED_FROM:].eq(0).all()
        assert batch.input_ids[-1, PADDED_FROM:].eq(PAD).all()
        assert batch.attention_mask[:-1].eq(1).all()
