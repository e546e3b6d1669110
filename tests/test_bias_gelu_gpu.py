"""The bias + GELU and bias + GELU + linear cases on CUDA in bf16, fp16 and fp32, a
ViT-sized FFN, and torch.compile with inductor (skipped without a GPU)."""

import pytest
import torch

from blipfast import reference
from blipfast.ops.bias_gelu import bias_gelu
from seeds import case_seed
from bias_gelu_cases import (
    CASES,
    LINEAR_CASES,
    BiasGeluCase,
    BiasGeluLinearCase,
    run_case,
    run_linear_case,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU_CASES = CASES + [
    # The first FFN projection of ViT-B/16 at 384 px for a batch of 64 images.
    BiasGeluCase("vit_ffn_64x577_n3072", (64, 577), 3072),
    BiasGeluCase("vit_ffn_64x577_n3072_float32_bias", (64, 577), 3072, bias="float32"),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_bias_gelu_matches_reference_gpu(case, dtype):
    if case.leading == (64, 577) and dtype == torch.float32:
        pytest.skip("the ViT shape is covered in bf16 and fp16")
    run_case(case, dtype, "cuda", seed=case_seed(f"{case}/{dtype}/gpu"))


GPU_LINEAR_CASES = LINEAR_CASES + [
    # The FFN of ViT-B/16 at 384 px after its first matmul, for a batch of 16 images.
    BiasGeluLinearCase("vit_ffn_16x577_n3072_m768",
                       BiasGeluCase("x", (16, 577), 3072, bias="float32"), 768),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", GPU_LINEAR_CASES, ids=str)
def test_bias_gelu_linear_matches_reference_gpu(case, dtype):
    run_linear_case(case, dtype, "cuda", seed=case_seed(f"{case}/{dtype}/linear/gpu"))


def test_torch_compile_inductor_gpu():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 35, 768, generator=generator).to("cuda", torch.bfloat16)
    bias = torch.randn(768, generator=generator).to("cuda")

    def step(x, bias):
        return bias_gelu(x, bias).float().square().sum()

    compiled = torch.compile(step, fullgraph=True)
    leaves = [x.clone().requires_grad_(), bias.clone().requires_grad_()]
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    expected_leaves = [x.clone().requires_grad_(), bias.clone().requires_grad_()]
    expected = reference.bias_gelu(*expected_leaves).float().square().sum()
    expected_grads = torch.autograd.grad(expected, expected_leaves)
    torch.testing.assert_close(loss, expected, atol=0.0, rtol=1e-2)
    torch.testing.assert_close(grads[0], expected_grads[0], atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(grads[1], expected_grads[1], atol=1e-2, rtol=1e-2)
