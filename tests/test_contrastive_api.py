"""The contrastive ops' contract beyond numerics: argument errors, non-finite inputs,
torch.compile tracing, torch.library checks, and the reference path on CPU without the
Triton interpreter."""

import re

import pytest
import torch

import blipfast
from blipfast import reference
from blipfast.ops import contrastive_loss, contrastive_loss_with_queue
from contrastive_cases import normalized
from compile_checks import assert_compiles_like_reference


def _pair(batch=6, dim=16):
    return normalized(batch, dim), normalized(batch, dim), torch.tensor(10.0)


@pytest.mark.parametrize("change, error, words", [
    (lambda i, t, s: (i.numpy(), t, s, {}), TypeError, "image_feat must be a torch.Tensor"),
    (lambda i, t, s: (i.int(), t, s, {}), TypeError, "image_feat has dtype torch.int32"),
    (lambda i, t, s: (i, t.long(), s, {}), TypeError, "text_feat has dtype torch.int64"),
    (lambda i, t, s: (i, t.half(), s, {}), TypeError, "features must share one dtype"),
    (lambda i, t, s: (i[0], t, s, {}), ValueError, "image_feat must have shape (B, D) or (B, Q, D)"),
    (lambda i, t, s: (i, t[None], s, {}), ValueError, "text_feat must have shape (B, D)"),
    (lambda i, t, s: (i, t[:, :8], s, {}), ValueError, "text_feat has feature dim 8"),
    (lambda i, t, s: (i, t[:4], s, {}), ValueError, "text_feat has 4 rows but image_feat has 6"),
    (lambda i, t, s: (i[:0], t[:0], s, {}), ValueError, "have no rows"),
    (lambda i, t, s: (torch.zeros(6, 600), torch.zeros(6, 600), s, {}), ValueError,
     "feature dim 600 of image_feat is not supported"),
    (lambda i, t, s: (i, t, 10.0, {}), TypeError, "logit_scale must be a tensor"),
    (lambda i, t, s: (i, t, torch.ones(2), {}), ValueError, "logit_scale must be a scalar tensor"),
    (lambda i, t, s: (i, t, torch.tensor(3), {}), TypeError, "logit_scale must be floating point"),
    (lambda i, t, s: (i, t, s, {"image_ids": torch.zeros(5, dtype=torch.long)}), ValueError,
     "image_ids must have shape (6,)"),
    (lambda i, t, s: (i, t, s, {"image_ids": torch.zeros(6)}), TypeError,
     "image_ids must have dtype int32 or int64"),
    (lambda i, t, s: (i, t, s, {"image_ids": list(range(6))}), TypeError,
     "image_ids must be an integer tensor or None, got list"),
    (lambda i, t, s: (i, t, s, {"label_smoothing": 1.5}), ValueError,
     "label_smoothing must lie in [0, 1]"),
    (lambda i, t, s: (i, t, s, {"label_smoothing": "0.1"}), TypeError,
     "label_smoothing must be a float"),
    (lambda i, t, s: (i, t.to("meta"), s, {}), ValueError, "text_feat is on meta but image_feat"),
    (lambda i, t, s: (i, t, s.to("meta"), {}), ValueError,
     "logit_scale is on meta but the features are on cpu"),
    (lambda i, t, s: (torch.zeros(6, 0, 16), t, s, {}), ValueError,
     "image_feat has 0 queries"),
])
def test_bad_arguments_raise_clear_errors(change, error, words):
    image, text, scale, options = change(*_pair())
    with pytest.raises(error, match=re.escape(words)):
        contrastive_loss(image, text, scale, **options)


def test_hard_negatives_generator_must_be_a_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator or None, got int"):
        blipfast.ops.contrastive_loss_with_hard_negatives(*_pair(), generator=0)


def _queue_inputs():
    image, text, scale = _pair()
    return dict(image_feat=image, text_feat=text, logit_scale=scale,
                image_feat_momentum=normalized(6, 16), text_feat_momentum=normalized(6, 16),
                image_queue=normalized(10, 16), text_queue=normalized(10, 16))


@pytest.mark.parametrize("change, error, words", [
    (dict(image_feat_momentum=normalized(5, 16)), ValueError,
     "image_feat_momentum has 5 rows but image_feat has 6"),
    (dict(text_queue=None), ValueError, "pass both image_queue and text_queue, or neither"),
    (dict(text_queue=normalized(9, 16)), ValueError, "text_queue has 9 rows but image_queue has 10"),
    (dict(image_queue=normalized(10, 8)), ValueError, "image_queue has feature dim 8"),
    (dict(queue_image_ids=torch.arange(10)), ValueError, "queue_image_ids needs image_ids"),
    (dict(image_ids=torch.arange(6), queue_image_ids=torch.arange(3)), ValueError,
     "queue_image_ids must have shape (10,)"),
    (dict(alpha=1.5), ValueError, "alpha must lie in [0, 1]"),
    (dict(alpha=float("nan")), TypeError, "alpha must be a finite float, got nan"),
    (dict(alpha=True), TypeError, "alpha must be a finite float, got True"),
    (dict(image_queue=None, text_queue=None, image_ids=torch.arange(6),
          queue_image_ids=torch.arange(10)), ValueError,
     "queue_image_ids given without image_queue"),
    (dict(image_feat=normalized(6, 2, 16)), ValueError, "image_feat must have shape (B, D)"),
])
def test_queue_form_bad_arguments(change, error, words):
    arguments = {**_queue_inputs(), **change}
    with pytest.raises(error, match=re.escape(words)):
        contrastive_loss_with_queue(**arguments)


@pytest.mark.parametrize("missing", ["image_queue", "text_queue"])
def test_the_queue_reference_also_refuses_one_queue_alone(missing):
    arguments = {**_queue_inputs(), missing: None}
    with pytest.raises(ValueError, match="pass both image_queue and text_queue, or neither"):
        reference.contrastive_loss_with_queue(**arguments)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf
@pytest.mark.parametrize("where", ["image_inf", "text_nan", "scale_inf"])
def test_non_finite_inputs_give_a_nan_loss(where):
    image, text, scale = _pair()
    if where == "image_inf":
        image[2, 3] = float("inf")
    elif where == "text_nan":
        text[4, 0] = float("nan")
    else:
        scale = torch.tensor(float("inf"))
    assert torch.isnan(contrastive_loss(image, text, scale))
    queue = _queue_inputs()
    queue.update(image_feat=image, text_feat=text, logit_scale=scale)
    assert torch.isnan(contrastive_loss_with_queue(**queue))


def test_torch_compile_traces_the_custom_op():
    image, text, scale = normalized(9, 2, 16), normalized(9, 16), torch.tensor(12.0)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 5])

    def step(image, text, scale):
        return contrastive_loss(image, text, scale, image_ids=ids, label_smoothing=0.1)

    def expected_step(image, text, scale):
        return reference.contrastive_loss(image, text, scale, image_ids=ids, label_smoothing=0.1)

    assert_compiles_like_reference(step, expected_step, (image, text, scale), atol=1e-5)


def test_queue_form_compiles_with_dynamic_shapes():
    """contrastive_loss_with_queue in one graph under dynamic=True, with alpha a symbolic
    float input its argument checks must trace."""
    inputs = _queue_inputs()
    image, text, scale = inputs.pop("image_feat"), inputs.pop("text_feat"), inputs.pop("logit_scale")

    def step(image, text, scale, alpha):
        return contrastive_loss_with_queue(image, text, scale, alpha=alpha, **inputs)

    def expected_step(image, text, scale, alpha):
        return reference.contrastive_loss_with_queue(image, text, scale, alpha=alpha, **inputs)

    assert_compiles_like_reference(step, expected_step, (image, text, scale), 0.3,
                                   dynamic=True, atol=1e-5)


@pytest.mark.interpreter
def test_custom_op_passes_torch_library_checks():
    from blipfast.kernels.contrastive import contrastive_forward_op

    rows, columns = normalized(7, 3, 16).requires_grad_(), normalized(11, 16).requires_grad_()
    scale = torch.tensor(8.0, requires_grad=True)
    arguments = (rows, columns, scale, torch.arange(7), torch.arange(11) % 7, None, None,
                 True, True, 0.0, 0.1, 0, 0)
    torch.library.opcheck(contrastive_forward_op, arguments,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))


def test_cpu_without_interpreter_uses_the_reference(reference_path):
    image, text, scale = [t.requires_grad_() for t in _pair()]
    loss = contrastive_loss(image, text, scale)
    torch.testing.assert_close(loss, reference.contrastive_loss(image, text, scale))
    loss.backward()
    assert torch.isfinite(image.grad).all() and scale.grad is not None
    out = blipfast.ops.contrastive_loss_with_hard_negatives(
        image, text, scale, image_ids=torch.tensor([0, 0, 1, 2, 3, 4]),
        generator=torch.Generator().manual_seed(0))
    assert out.negative_text_index[0] not in (0, 1) and out.negative_image_index[1] not in (0, 1)
    queue = contrastive_loss_with_queue(**_queue_inputs())
    assert queue.dtype == torch.float32 and torch.isfinite(queue)


def test_public_api_is_exported():
    for name in ("contrastive_loss", "contrastive_loss_with_hard_negatives",
                 "contrastive_loss_with_queue", "ContrastiveLossOutput"):
        assert name in blipfast.ops.__all__ and hasattr(blipfast.ops, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_the_reference_gives_a_tie_between_equal_queries_to_the_first(dtype):
    """BLIP-2's best-of-queries score: with query 2 equal to query 0 in every image, the
    whole gradient goes to query 0 (as torch.max's does), in float64 too, where one
    (N * Q, D) product through BLAS rounds those equal rows differently on every seed
    tried (the reference's own yardstick then broke the tie the other way)."""
    generator = torch.Generator().manual_seed(10)
    image = torch.randn(18, 3, 88, generator=generator, dtype=dtype)
    image[:, 2] = image[:, 0]
    text = torch.randn(18, 88, generator=generator, dtype=dtype)
    leaves = [image.requires_grad_(), text]
    loss = reference.contrastive_loss(*leaves, torch.tensor(1.0, dtype=dtype))
    grad_image = torch.autograd.grad(loss, leaves[0])[0]
    assert (grad_image[:, 2] == 0).all()
    assert (grad_image[:, 0] != 0).any() and (grad_image[:, 1] != 0).any()


@pytest.mark.interpreter
@pytest.mark.parametrize("loss", ["pair", "hard_negatives", "queue"])
def test_only_logit_scale_needs_a_gradient(loss):
    """Frozen encoders with a learnable temperature: only logit_scale requires a gradient,
    and gets the reference's (the backward op once returned one empty tensor for both
    feature gradients, which torch.library refuses as aliased outputs)."""

    def run(module, scale):
        if loss == "queue":
            return module.contrastive_loss_with_queue(**{**queue, "logit_scale": scale})
        if loss == "hard_negatives" and module is blipfast.ops:
            return module.contrastive_loss_with_hard_negatives(image, text, scale).loss
        return module.contrastive_loss(image, text, scale)

    image, text, _ = _pair()
    queue = _queue_inputs()
    gradients = []
    for module in (blipfast.ops, reference):
        scale = torch.tensor(10.0, requires_grad=True)
        run(module, scale).backward()
        gradients.append(scale.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=1e-5, atol=1e-6)


@pytest.mark.interpreter
@pytest.mark.parametrize("loss", ["pair", "queue"])
def test_label_smoothing_one_as_cross_entropy_takes_it(loss):
    """label_smoothing 1 (uniform targets), which F.cross_entropy accepts: the loss and
    every gradient as the reference's."""
    image, text, _ = _pair()
    queue = _queue_inputs()
    results = []
    for module in (blipfast.ops, reference):
        leaves = (image.clone().requires_grad_(), text.clone().requires_grad_(),
                  torch.tensor(10.0, requires_grad=True))
        if loss == "queue":
            value = module.contrastive_loss_with_queue(
                **{**queue, "image_feat": leaves[0], "text_feat": leaves[1],
                   "logit_scale": leaves[2]}, label_smoothing=1.0)
        else:
            value = module.contrastive_loss(*leaves, label_smoothing=1.0)
        results.append((value, *torch.autograd.grad(value, leaves)))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
