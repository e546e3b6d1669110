"""Tiny random BLIP configs and inputs shared by the model tests (no downloads)."""

from __future__ import annotations

import torch
import transformers
from transformers import BlipConfig

transformers.logging.set_verbosity_error()

VOCAB = 99
BOS, SEP, EOS, PAD = 97, 98, 2, 0
TASKS = ("BlipForConditionalGeneration", "BlipForImageTextRetrieval", "BlipForQuestionAnswering")


def tiny_config(image_size: int = 32, **text_overrides) -> BlipConfig:
    """Two layers each side, hidden 32 with 2 heads of 16, 16 patches + class token.

    The vision weights are drawn with standard deviation 0.02, not the 1e-10 of
    ``BlipVisionConfig``'s default: with those, every image and every image token leaves
    the ViT as the same vector, so no test could see a ViT attention or position bug, or
    a text row cross-attending the wrong image."""
    text = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=40, bos_token_id=BOS,
                sep_token_id=SEP, eos_token_id=EOS, pad_token_id=PAD)
    text.update(text_overrides)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=image_size, patch_size=8, initializer_range=0.02)
    return BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)


def hf_model(task: str, config: BlipConfig, seed: int) -> torch.nn.Module:
    """transformers' model with random weights, LayerNorms and biases randomized too (the
    defaults of 1 and 0 would hide a swapped weight and bias)."""
    torch.manual_seed(seed)
    model = getattr(transformers, task)(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or "layernorm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.normal_(0.0, 0.02)
    return model.eval()


def text_batch(batch: int, length: int, generator: torch.Generator, pad_last_from: int | None = None):
    """Token ids starting with BOS, and a 0/1 mask; the last row padded from
    ``pad_last_from`` (right padding, as the BLIP tokenizer does)."""
    ids = torch.randint(3, BOS, (batch, length), generator=generator)
    ids[:, 0] = BOS
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad_last_from is not None:
        ids[-1, pad_last_from:] = PAD
        mask[-1, pad_last_from:] = 0
    return ids, mask


def images(batch: int, generator: torch.Generator, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=generator)
