"""blipfast's BLIP at the full BLIP-base config (ViT-B/16 at 384, BERT-base text) on CUDA
against transformers' eager model with the same random weights (skipped without a GPU).

bf16: blipfast's error against transformers in float32 may be at most twice transformers'
own bf16 error plus a small floor (the tolerance rule of tests/tolerances.py). float32 (no
TF32): logits within 1e-3 and identical greedy captions.
"""

import pytest
import torch

import blipfast
import blipfast.models as models

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BATCH, TEXT_LENGTH = 4, 35


@pytest.fixture(scope="module")
def base_models():
    import transformers
    from transformers import BlipConfig

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.BlipForConditionalGeneration(BlipConfig()).cuda().eval()
    return hf, models.BlipForConditionalGeneration.from_hf(hf).eval()


def _inputs(device="cuda"):
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(BATCH, 3, 384, 384, generator=generator)
    ids = torch.randint(1000, 30000, (BATCH, TEXT_LENGTH), generator=generator)
    ids[:, 0] = 30522
    mask = torch.ones(BATCH, TEXT_LENGTH, dtype=torch.long)
    mask[-1, 20:] = 0
    return dict(pixel_values=pixels.to(device), input_ids=ids.to(device),
                attention_mask=mask.to(device), labels=ids.masked_fill(mask == 0, -100).to(device))


def _error(a, b, mask):
    return ((a.double() - b.double()).abs() * mask[..., None]).max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_base_config_logits_and_loss_under_autocast(base_models, dtype):
    hf, ours = base_models
    inputs = _inputs()
    mask = inputs["attention_mask"].double()
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = hf(**inputs)
        with torch.autocast("cuda", dtype=dtype):
            hf_low = hf(**inputs)
            ours_low = ours(**inputs)
            patched_low = blipfast.patch(hf)(**inputs)
        blipfast.unpatch(hf)
    hf_error = _error(hf_low.logits, exact.logits, mask)
    for name, output in (("blipfast", ours_low), ("patched", patched_low)):
        error = _error(output.logits, exact.logits, mask)
        assert torch.isfinite(output.logits).all(), name
        assert error <= 2 * hf_error + 0.05, (name, error, hf_error)
        loss_error = abs(output.loss.item() - exact.loss.item())
        assert loss_error <= 2 * abs(hf_low.loss.item() - exact.loss.item()) + 5e-3, name


def test_base_config_float32_and_greedy_captions(base_models):
    hf, ours = base_models
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    inputs = _inputs()
    with torch.no_grad():
        expected, actual = hf(**inputs), ours(**inputs)
    mask = inputs["attention_mask"].double()
    assert _error(actual.logits, expected.logits, mask) < 1e-3
    captions = hf.generate(pixel_values=inputs["pixel_values"], max_length=12)
    assert torch.equal(ours.generate(pixel_values=inputs["pixel_values"], max_length=12), captions)


def test_base_config_training_step_gradients(base_models):
    hf, ours = base_models
    inputs = _inputs()
    torch.backends.cuda.matmul.allow_tf32 = False
    for model in (hf, ours):
        model.zero_grad(set_to_none=True)
        model.train()
        model(**inputs).loss.backward()
        model.eval()
    ours_parameters = dict(ours.named_parameters())
    for name, parameter in hf.named_parameters():
        if parameter.grad is None:
            continue
        scale = parameter.grad.abs().max().item()
        error = (ours_parameters[name].grad - parameter.grad).abs().max().item()
        assert error <= 1e-3 * max(scale, 1e-4), (name, error, scale)
