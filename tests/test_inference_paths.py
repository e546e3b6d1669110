"""Without autograd (no_grad, or no input requiring a gradient) the fused ops call their
launchers directly instead of their autograd.Function: the same kernels, so the outputs
must be the same bit for bit, and nothing may be recorded for a backward."""

import pytest
import torch

from blipfast import ops


def _inputs(generator):
    def random(*shape):
        return torch.randn(*shape, generator=generator)

    return dict(
        q=random(2, 9, 2, 32), k=random(2, 13, 2, 32), v=random(2, 13, 2, 32),
        mask=torch.arange(13)[None, :] < torch.tensor([[13], [5]]),
        x=random(2, 7, 48), residual=random(2, 7, 48), weight=random(48), bias=random(48),
        hidden=random(2, 7, 64), gelu_bias=random(64), projection=random(48, 64),
        logits=random(2, 7, 50), labels=torch.randint(0, 50, (2, 7), generator=generator),
    )


CALLS = {
    "attention": lambda t: ops.attention(t["q"], t["k"], t["v"], causal=True,
                                         key_padding_mask=t["mask"]),
    "layer_norm": lambda t: ops.layer_norm(t["x"], t["weight"], t["bias"],
                                           residual=t["residual"]),
    "add_layer_norm": lambda t: torch.cat(ops.add_layer_norm(t["x"], t["residual"],
                                                             t["weight"], t["bias"])),
    "bias_gelu": lambda t: ops.bias_gelu(t["hidden"], t["gelu_bias"]),
    "bias_gelu_linear": lambda t: ops.bias_gelu_linear(t["hidden"], t["gelu_bias"],
                                                       t["projection"], t["bias"]),
    "cross_entropy": lambda t: ops.cross_entropy(t["logits"], t["labels"],
                                                 label_smoothing=0.1, reduction="none"),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_without_autograd_the_kernels_give_the_same_output(name):
    inputs = _inputs(torch.Generator().manual_seed(7))
    with_grad = {key: value.clone().requires_grad_(value.is_floating_point())
                 for key, value in inputs.items()}
    expected = CALLS[name](with_grad)
    assert expected.grad_fn is not None  # the autograd path ran
    with torch.no_grad():
        under_no_grad = CALLS[name](with_grad)
    plain = CALLS[name](inputs)  # grad mode on, but nothing requires a gradient
    for output in (under_no_grad, plain):
        assert output.grad_fn is None and not output.requires_grad
        torch.testing.assert_close(output, expected.detach(), rtol=0, atol=0)
