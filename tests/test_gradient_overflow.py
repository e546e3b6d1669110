"""fp16 training with a GradScaler: no kernel hides an overflowed gradient.

A GradScaler multiplies the loss by a large scale and skips the optimizer step when any
gradient is not finite. A backward that turned an inf coming from above into a finite
number (a clamp, a ``where`` that zeroes it, a saturating cast), or that computed in
float32 and rounded a too-large result to fp16's largest finite value, would hide the
overflow, and the scaler would apply a wrong update. For every op with a backward, in
fp16 through the Triton interpreter: with an inf in the output gradient, and with a
scaled output gradient whose input gradients exceed fp16's range, each input gradient
holds a non-finite value exactly when PyTorch's reference gradient of that input does.
On a CUDA machine the same cases run the compiled kernels too.
"""

import pytest
import torch
import torch.nn.functional as F

from blipfast import ops, reference
from kernel_devices import KERNEL_DEVICES

# the interpreter's numpy reports the overflows this test makes on purpose
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

HALF = torch.float16
SCALE = 2.0 ** 20  # scaled output gradients: every input gradient passes 65504


def _attention_case(generator):
    q, k, v = (torch.randn(2, 5, 2, 16, generator=generator).to(HALF) for _ in range(3))
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    return (q, k, v), dict(key_padding_mask=mask, causal=True)


def _layer_norm_case(generator):
    x, residual = (torch.randn(6, 32, generator=generator).to(HALF) for _ in range(2))
    weight, bias = (torch.randn(32, generator=generator).to(HALF) for _ in range(2))
    return (x, weight, bias), dict(residual=residual)


def _add_layer_norm_case(generator):
    x, residual = (torch.randn(6, 32, generator=generator).to(HALF) for _ in range(2))
    weight, bias = (torch.randn(32, generator=generator).to(HALF) for _ in range(2))
    return (x, residual, weight, bias), {}


def _bias_gelu_case(generator):
    return (torch.randn(6, 32, generator=generator).to(HALF),
            torch.randn(32, generator=generator).to(HALF)), {}


def _bias_gelu_linear_case(generator):
    return (torch.randn(6, 32, generator=generator).to(HALF),
            torch.randn(32, generator=generator).to(HALF),
            torch.randn(16, 32, generator=generator).to(HALF),
            torch.randn(16, generator=generator).to(HALF)), {}


def _cross_entropy_case(generator):
    return (torch.randn(6, 50, generator=generator).to(HALF),), dict(
        labels=torch.randint(0, 50, (6,), generator=generator), label_smoothing=0.1)


def _contrastive_case(generator):
    image_feat, text_feat = (F.normalize(torch.randn(6, 32, generator=generator), dim=-1)
                             .to(HALF) for _ in range(2))
    return (image_feat, text_feat, torch.tensor([10.0])), {}


def _first(function):
    """The op's first output (add_layer_norm returns the normed rows and the sum)."""
    def first_output(*args, **kwargs):
        out = function(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out
    return first_output


OPS = {
    "attention": (ops.attention, reference.attention, _attention_case),
    "layer_norm_residual": (ops.layer_norm, reference.layer_norm, _layer_norm_case),
    "add_layer_norm": (_first(ops.add_layer_norm), _first(reference.add_layer_norm),
                       _add_layer_norm_case),
    "bias_gelu": (ops.bias_gelu, reference.bias_gelu, _bias_gelu_case),
    "bias_gelu_linear": (ops.bias_gelu_linear, reference.bias_gelu_linear,
                         _bias_gelu_linear_case),
    "cross_entropy": (ops.cross_entropy, reference.cross_entropy, _cross_entropy_case),
    "contrastive_loss": (ops.contrastive_loss, reference.contrastive_loss, _contrastive_case),
}


def _output_gradient(kind: str, out: torch.Tensor, generator) -> torch.Tensor:
    if out.dim() == 0:  # a loss: what GradScaler's scaled backward sends
        return torch.full_like(out, SCALE ** 2 if kind == "scaled" else float("inf"))
    grad = torch.randn(out.shape, generator=generator).to(out.device, out.dtype)
    if kind == "scaled":
        return grad * SCALE  # fp16 holds 2**20 times a unit value
    grad.view(-1)[3] = float("inf")
    return grad


def _input_gradients_finite(function, inputs, options, kind, seed):
    leaves = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    out = function(*leaves, **options)
    out.backward(_output_gradient(kind, out, torch.Generator().manual_seed(seed)))
    return [bool(torch.isfinite(leaf.grad).all()) for leaf in leaves]


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("kind", ["inf", "scaled"])
@pytest.mark.parametrize("op_name", list(OPS))
def test_an_overflowed_gradient_stays_non_finite(op_name, kind, device):
    op, reference_op, make_case = OPS[op_name]
    inputs, options = make_case(torch.Generator().manual_seed(len(op_name)))
    inputs = [tensor.to(device) for tensor in inputs]
    options = {name: value.to(device) if isinstance(value, torch.Tensor) else value
               for name, value in options.items()}
    seed = len(op_name) + len(kind)
    got = _input_gradients_finite(op, inputs, options, kind, seed)
    expected = _input_gradients_finite(reference_op, inputs, options, kind, seed)
    assert got == expected, (f"{op_name}, {kind} output gradient: input gradients finite "
                             f"{got}, PyTorch's reference {expected}")
    half_inputs = [index for index, tensor in enumerate(inputs) if tensor.dtype == HALF]
    assert not any(got[index] for index in half_inputs), (
        f"{op_name}, {kind}: an fp16 input gradient is finite ({got}): the case does not "
        "overflow, so it checks nothing")
