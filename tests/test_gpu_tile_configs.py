"""The tile configurations the kernels take on a GPU, run through the Triton interpreter.

On CPU the launchers pick small tiles for the interpreter; on a GPU they pick others that
the CPU tests would otherwise never run: attention's 64 x 64 tiles (and 32-row ones for
short queries, 128-row forward tiles for long ones, the one-launch backward for keys that
fit one tile), LayerNorm's packed rows, bias+GELU's 2048- and 4096-element tiles,
cross-entropy's 4096-class blocks, the contrastive kernels' 64-column tiles. Here each
kernel module's ``interpreter_enabled`` is patched to answer False, so its config
functions choose as on a GPU, while Triton still interprets; every case of each kernel
then runs in bf16 (as interpreter_like_gpu.py makes it; tiles do not depend on the
dtype) against the reference, as in the kernels' own CPU tests. So do attention's
sequence tails (on the cases with ragged lengths of each kind) and split head dims on top
of the GPU tiles (the sweep's candidates).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch

from blipfast import reference
from seeds import case_seed
import attention_cases
import bias_gelu_cases
import contrastive_cases
import cross_entropy_cases
import layer_norm_cases

pytestmark = pytest.mark.interpreter

KERNEL_MODULES = ("attention", "layer_norm", "bias_gelu", "cross_entropy", "contrastive")
# Ragged queries and keys of each kind: short text, cross-attention onto 577 image tokens,
# ViT-g's 67 tokens of head dim 88, shared keys, rows without keys, a decode step.
TAIL_CASES = [case for case in attention_cases.CASES if case.name in (
    "text_causal_padded", "text_to_image_cross", "vit_g_self_d88", "kv_index_repeats",
    "fully_masked_rows", "decode_step_over_cache")]
assert len(TAIL_CASES) == 6, "a case named here was renamed in attention_cases.py"

CASES = {  # name: (cases, run_case)
    "attention": (attention_cases.CASES, attention_cases.run_case),
    "layer_norm": (layer_norm_cases.CASES, layer_norm_cases.run_case),
    "bias_gelu": (bias_gelu_cases.CASES, bias_gelu_cases.run_case),
    "bias_gelu_linear": (bias_gelu_cases.LINEAR_CASES, bias_gelu_cases.run_linear_case),
    "cross_entropy": (cross_entropy_cases.CASES, cross_entropy_cases.run_case),
    "contrastive": (contrastive_cases.PAIR_CASES, contrastive_cases.run_pair_case),
    "contrastive_queue": (contrastive_cases.QUEUE_CASES, contrastive_cases.run_queue_case),
}


@contextlib.contextmanager
def gpu_tile_configs():
    """The kernels' config functions choose as on a GPU (Triton still interprets)."""
    with contextlib.ExitStack() as stack:
        for module in KERNEL_MODULES:
            stack.enter_context(mock.patch(f"blipfast.kernels.{module}.interpreter_enabled",
                                           lambda: False))
        attention_cases.clear_attention_config_caches()  # attention caches them per shape
        stack.callback(attention_cases.clear_attention_config_caches)
        yield


def test_the_configs_are_the_gpu_ones():
    """The premise: patched, the config functions give the GPU's tiles."""
    from blipfast.kernels import attention, bias_gelu, contrastive, cross_entropy, layer_norm

    interpreted = (attention._forward_config(35, 35, 64), cross_entropy._block_v(30524),
                   contrastive._tile_config(1, 256), layer_norm._forward_config(70, 768),
                   bias_gelu._forward_config(70, 3072))
    with gpu_tile_configs():
        on_gpu = (attention._forward_config(35, 35, 64), cross_entropy._block_v(30524),
                  contrastive._tile_config(1, 256), layer_norm._forward_config(70, 768),
                  bias_gelu._forward_config(70, 3072))
        assert attention._backward_config(35, 35, 64)["BLOCK_N"] == 64  # one-launch backward
    assert on_gpu[0]["BLOCK_M"] == 64 and on_gpu[0]["BLOCK_N"] == 64 and on_gpu[1] == 4096
    assert on_gpu[2]["BLOCK_N"] == 32 and on_gpu[2]["num_warps"] == 8
    for kernel_name, interpreted_config, gpu_config in zip(
            ("attention", "cross_entropy", "contrastive", "layer_norm", "bias_gelu"),
            interpreted, on_gpu):
        assert interpreted_config != gpu_config, kernel_name


@pytest.mark.parametrize("kernel, case", [
    pytest.param(kernel, case, id=f"{kernel}-{case}")
    for kernel, (cases, _) in CASES.items() for case in cases])
def test_gpu_tiles_match_reference(kernel, case):
    with gpu_tile_configs():
        CASES[kernel][1](case, torch.bfloat16, "cpu",
                         seed=case_seed(f"{case}/gpu-tiles"))


@pytest.mark.parametrize("name", sorted(attention_cases.GPU_TAIL_CONFIGS))
@pytest.mark.parametrize("case", TAIL_CASES, ids=str)
def test_attention_gpu_tiles_with_sequence_tails_match_reference(case, name):
    config = attention_cases.GPU_TAIL_CONFIGS[name]
    with gpu_tile_configs(), attention_cases.attention_configs(forward=config, backward=config):
        attention_cases.run_case(case, torch.bfloat16, "cpu",
                                 seed=case_seed(f"{case}/{name}/gpu-tiles"))


@pytest.mark.parametrize("case", attention_cases.SPLIT_HEAD_DIM_CASES, ids=str)
def test_attention_gpu_tiles_with_split_head_dim_match_reference(case):
    with gpu_tile_configs(), attention_cases.attention_configs(
            forward=dict(SPLIT_HEAD_DIM=True)):
        attention_cases.run_case(case, torch.bfloat16, "cpu",
                                 seed=case_seed(f"{case}/split/gpu-tiles"))


@pytest.mark.parametrize("rows, n", [(1, 64), (105, 88), (7, 3072)])
def test_bias_gelu_gpu_tiles_recompute_the_activation_bit_for_bit(rows, n):
    """bias+GELU's backward stores the activation again for bias_gelu_linear's weight
    gradient: with the GPU's tiles it equals the forward's output bit for bit, and the
    gradients match the float64 reference (float32)."""
    from blipfast.kernels import bias_gelu as kernels

    generator = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, n, generator=generator)
    bias = torch.randn(n, generator=generator)
    grad_out = torch.randn(rows, n, generator=generator)
    with gpu_tile_configs():
        out = kernels.bias_gelu_forward(x, bias)
        grad_x, grad_bias, activation = kernels.bias_gelu_backward(grad_out, x, bias, True,
                                                                   store_activation=True)
    assert torch.equal(activation, out)  # recomputed bit for bit
    x64, bias64 = x.double().requires_grad_(), bias.double().requires_grad_()
    expected = reference.bias_gelu(x64, bias64)
    expected_grads = torch.autograd.grad(expected, (x64, bias64), grad_out.double())
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=0)
    torch.testing.assert_close(grad_x.double(), expected_grads[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(grad_bias.double(), expected_grads[1], atol=2e-5, rtol=0)
