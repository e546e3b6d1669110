"""blipfast's BLIP pre-training step on CUDA at BLIP-base size (ViT-B/16 at 224, BERT-base
text, captions of 30 tokens) under bf16 and fp16 autocast, against the straightforward
implementation on transformers' modules (tests/pretraining_reference.py) in float32
(skipped without a GPU).

Tolerance (the rule of tests/tolerances.py): each loss, and the gradient of a set of
parameters from every part of the model, may be off the float32 reference by at most twice
the reference's own error under the same autocast dtype, plus a floor of 1% (losses) or 2%
(gradient norms). fp16 also runs three optimizer steps with a GradScaler: every loss and
parameter stays finite.
"""

import copy

import pytest
import torch

from pretraining_reference import ReferencePreTraining, blipfast_state_dict

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BATCH, TEXT_LENGTH, QUEUE_SIZE = 8, 30, 64
# One parameter behind each kernel's backward, in the first layers, whose float32 gradient
# is large enough to compare (norms on CPU: 0.03 to 12; see below). Not the ViT's qkv or
# fc1 weights: at this init their gradients are ~2e-7 in every loss, 1e-7 of the
# others' (the kernel GPU tests check attention's backward at the ViT shapes).
GRADIENT_PARAMETERS = ("temp", "vision_proj.weight", "text_proj.weight", "itm_head.weight",
                       "vision_model.encoder.layers.0.self_attn.projection.weight",
                       "vision_model.encoder.layers.0.mlp.fc2.weight",
                       "text_encoder.encoder.layer.0.attention.self.query.weight",
                       "text_encoder.encoder.layer.0.crossattention.self.value.weight",
                       "text_decoder.bert.encoder.layer.0.attention.self.key.weight",
                       "text_encoder.embeddings.word_embeddings.weight")
# A gradient under this fraction of the largest compared may be rounding noise (the two
# this list replaced were ~1e-14 of it): comparing it could not tell a kernel error from
# noise.
SMALLEST_COMPARED_GRADIENT = 1e-4


@pytest.fixture(scope="module")
def initial_state():
    import transformers
    from transformers import BlipConfig

    from blipfast.train import BlipForPreTraining

    transformers.logging.set_verbosity_error()
    config = BlipConfig(vision_config=dict(image_size=224))
    # BERT's init for the cross-attention (scale 1): the reference's 10x, for a few
    # layers, leaves twelve layers' ITM and LM gradients at ~1e-13 below the top layer.
    reference = ReferencePreTraining(config, queue_size=QUEUE_SIZE, momentum=0.995,
                                     cross_attention_scale=1.0).cuda()
    model = BlipForPreTraining(config, queue_size=QUEUE_SIZE, momentum=0.995).cuda()
    state = {key: value.clone() for key, value in blipfast_state_dict(reference).items()}
    model.load_state_dict(state)
    return config, reference, model, state, copy.deepcopy(reference.state_dict())


def _inputs():
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(BATCH, 3, 224, 224, generator=generator)
    ids = torch.randint(1000, 30000, (BATCH, TEXT_LENGTH), generator=generator)
    ids[:, 0] = 101
    mask = torch.ones(BATCH, TEXT_LENGTH, dtype=torch.long)
    for row, length in enumerate((30, 12, 25, 7, 30, 18, 9, 21)):
        mask[row, length:] = 0
        ids[row, length:] = 0
    return pixels.cuda(), ids.cuda(), mask.cuda()


def _run(module, state, arguments, dtype, **options):
    """Losses and selected gradients of one forward/backward from ``state``."""
    module.load_state_dict(state)
    module.train().zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        output = module(*arguments, **options)
    losses = (torch.stack([output.loss_itc, output.loss_itm, output.loss_lm])
              if hasattr(output, "loss_itc") else torch.stack(list(output)))
    losses.sum().backward()
    parameters = dict(module.named_parameters())
    return output, losses.detach().double(), {name: parameters[name].grad.double().clone()
                                              for name in GRADIENT_PARAMETERS}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_losses_and_gradients_under_autocast(initial_state, dtype):
    _, reference, model, state, reference_state = initial_state
    torch.backends.cuda.matmul.allow_tf32 = False
    pixels, ids, mask = _inputs()
    output, losses, gradients = _run(model, state, (pixels, ids, mask), dtype, alpha=0.4,
                                     generator=torch.Generator("cuda").manual_seed(0))
    negatives = (output.negative_text_index, output.negative_image_index)
    assert all(bool((n >= 0).all()) for n in negatives)
    arguments = (pixels, ids, mask, 0.4, *negatives)
    _, exact, exact_gradients = _run(reference, reference_state, arguments, None)
    _, reference_low, reference_gradients = _run(reference, reference_state, arguments, dtype)
    for index, name in enumerate(("itc", "itm", "lm")):
        error = (losses[index] - exact[index]).abs().item()
        allowed = (2 * (reference_low[index] - exact[index]).abs().item()
                   + 0.01 * max(1.0, exact[index].abs().item()))
        assert error <= allowed, f"loss_{name}: {error:.4g} > {allowed:.4g} ({dtype})"
    largest = max(gradient.norm().item() for gradient in exact_gradients.values())
    for name in GRADIENT_PARAMETERS:
        scale = exact_gradients[name].norm().item()
        assert scale >= SMALLEST_COMPARED_GRADIENT * largest, \
            f"grad {name}: norm {scale:.3g} is noise beside {largest:.3g}; compare another"
        error = (gradients[name] - exact_gradients[name]).norm().item()
        allowed = (2 * (reference_gradients[name] - exact_gradients[name]).norm().item()
                   + 0.02 * scale)
        assert error <= allowed, \
            f"grad {name}: {error:.4g} > {allowed:.4g} (norm {scale:.4g}, {dtype})"


def test_fp16_training_with_grad_scaler_stays_finite(initial_state):
    _, _, model, state, _ = initial_state
    model.load_state_dict(state)
    model.train()
    optimizer = torch.optim.AdamW(list(model.trainable_parameters()), lr=1e-5)
    scaler = torch.amp.GradScaler("cuda")
    pixels, ids, mask = _inputs()
    for step in range(3):
        with torch.autocast("cuda", dtype=torch.float16):
            output = model(pixels, ids, mask, alpha=0.4)
        assert torch.isfinite(output.loss), f"step {step}: loss {output.loss}"
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(output.loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert all(torch.isfinite(parameter).all() for parameter in model.parameters())
    assert int(model.queue.pointer) == (3 * BATCH) % QUEUE_SIZE


@pytest.mark.parametrize("matching_negatives", ["blip_retrieval", "blip_pretrain"])
def test_training_step_does_not_synchronize_with_the_host(initial_state, matching_negatives):
    """forward + backward of one step raise under CUDA's sync debug mode "error" if
    anything in them waits for the device (``.item()``, a host copy, a data-dependent
    shape), with either way of drawing the ITM negatives. Single process: the cross-rank
    gathers, which read row counts, are not run."""
    _, _, model, state, _ = initial_state
    model.load_state_dict(state)
    model.train()
    model.matching_negatives = matching_negatives  # the module-scoped model: reset below
    pixels, ids, mask = _inputs()
    try:
        for debug_mode in ("default", "error"):  # the first step compiles the kernels
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(debug_mode)
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    output = model(pixels, ids, mask, alpha=0.4)
                output.loss.backward()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        model.matching_negatives = "blip_retrieval"
    model.zero_grad(set_to_none=True)
