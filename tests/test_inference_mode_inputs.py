"""Tensors made under ``torch.inference_mode`` as inputs that take no gradient (a mask, an
index, labels, ids, a bias, a residual) while another input trains. Autograd refuses to
save an inference tensor; the PyTorch ops the kernels replace (SDPA's mask,
``gelu(x + bias)``, ``LayerNorm(x + residual)``) do not save these, so they work there,
and the Triton path raised "Inference tensors cannot be saved for backward". The kernels
(and the reference path, for the index and labels it saves) now keep a copy of such a
tensor: outputs and gradients equal those with ordinary tensors.
"""

from __future__ import annotations

import pytest
import torch

from blipfast import ops
from blipfast.ops._dispatch import use_triton


def _attention(generator):
    q = torch.randn(3, 5, 2, 16, generator=generator)
    # k and v take gradients too, so that the reference's k[kv_index] saves the index.
    k, v = (torch.randn(2, 7, 2, 16, generator=generator).requires_grad_() for _ in range(2))
    mask = torch.rand(2, 7, generator=generator) > 0.3
    mask[:, 0] = True
    index = torch.tensor([1, 0, 1])
    return (lambda q, mask, index: ops.attention(q, k, v, causal=True, key_padding_mask=mask,
                                                 kv_index=index)), q, (mask, index)


def _bias_gelu(generator):
    x, bias = torch.randn(3, 32, generator=generator), torch.randn(32, generator=generator)
    return ops.bias_gelu, x, (bias,)


def _bias_gelu_linear(generator):
    x, gelu_bias = torch.randn(3, 32, generator=generator), torch.randn(32, generator=generator)
    weight = torch.randn(5, 32, generator=generator)
    return (lambda x, gelu_bias: ops.bias_gelu_linear(x, gelu_bias, weight, None)), x, (gelu_bias,)


def _layer_norm(generator):
    x, residual = torch.randn(3, 32, generator=generator), torch.randn(3, 32, generator=generator)
    weight, bias = torch.randn(32, generator=generator), torch.randn(32, generator=generator)
    return (lambda x, residual: ops.layer_norm(x, weight, bias, residual=residual)), x, \
        (residual,)


def _cross_entropy(generator):
    logits = torch.randn(4, 32, generator=generator)
    labels = torch.randint(0, 32, (4,), generator=generator)
    return (lambda logits, labels: ops.cross_entropy(logits, labels, reduction="none")), \
        logits, (labels,)


def _contrastive_loss(generator):
    image, text = torch.randn(4, 16, generator=generator), torch.randn(4, 16, generator=generator)
    ids = torch.tensor([0, 1, 0, 2])
    return (lambda image, ids: ops.contrastive_loss(image, text, torch.tensor(3.0),
                                                    image_ids=ids)), image, (ids,)


OPS = {"attention": _attention, "bias_gelu": _bias_gelu, "bias_gelu_linear": _bias_gelu_linear,
       "layer_norm": _layer_norm, "cross_entropy": _cross_entropy,
       "contrastive_loss": _contrastive_loss}


@pytest.mark.parametrize("path", ["kernels", "reference"])
@pytest.mark.parametrize("name", OPS)
@pytest.mark.interpreter
def test_inference_tensor_inputs_train_as_ordinary_ones(name, path, monkeypatch):
    """On the Triton path (the interpreter here) and the PyTorch reference path (CPU
    without it), which saved an inference-mode kv_index or labels for its indexing and
    ``nll_loss``."""
    if path == "reference":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at every call
    assert use_triton(torch.device("cpu")) == (path == "kernels")
    operation, trained, others = OPS[name](torch.Generator().manual_seed(17))
    with torch.inference_mode():
        inference_others = tuple(tensor.clone() for tensor in others)
    assert all(tensor.is_inference() for tensor in inference_others)

    def gradient(inputs):
        leaf = trained.clone().requires_grad_()
        output = operation(leaf, *inputs)
        weights = torch.linspace(0.5, 1.5, output.numel()).view(output.shape)
        (grad,) = torch.autograd.grad((output.float() * weights).sum(), leaf)
        return output.detach(), grad

    expected_output, expected_grad = gradient(others)
    output, grad = gradient(inference_others)
    torch.testing.assert_close(output, expected_output, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
